"""The control socket: only root and the festina service user; a real unprivileged uid is refused (SO_PEERCRED)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from festina_hpc.node.errors import NodeError
from festina_hpc.node.service import ControlServer, request
from tests.node.conftest import SimNode, make_job

CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\\n")
print(s.makefile().readline().strip())
"""

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")


@pytest.fixture
def served(sim_node: SimNode) -> Iterator[tuple[SimNode, Path]]:
    folder = Path(tempfile.mkdtemp(prefix="festina-node-sock-", dir="/tmp"))
    folder.chmod(0o755)  # other users must reach the socket to be refused by the peer check, not the file mode
    sock = folder / "control.sock"
    server = ControlServer(sock, sim_node.agent, frozenset({0, pwd.getpwnam("daemon").pw_uid}))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield sim_node, sock
    server.shutdown()
    server.server_close()
    shutil.rmtree(folder, ignore_errors=True)


def call_as(user: str, sock: Path, op: str, args: dict[str, object]) -> dict[str, object]:
    done = subprocess.run(["/usr/bin/python3", "-c", CLIENT, str(sock), json.dumps({"op": op, "args": args})],
                          user=user, capture_output=True, text=True, timeout=20, check=True)
    answer: dict[str, object] = json.loads(done.stdout)
    return answer


def test_nobody_cannot_change_clocks_or_mps(served: tuple[SimNode, Path]) -> None:
    node, sock = served
    node.agent.prolog(make_job(71, mps_pct=50, clock_mhz=1500))
    for op, args in [("lock_clocks", {"gpu": 0, "clock_mhz": 900}), ("reset_clocks", {"gpu": 0}),
                     ("set_power_limit", {"gpu": 0, "power_w": 200}), ("mps_stop", {"gpu": 1}),
                     ("mps_start", {"gpu": 1}), ("set_settings", {"gpu": 0, "clock_mhz": 900, "sm_pct": {"71": 10}})]:
        answer = call_as("nobody", sock, op, args)
        assert answer["ok"] is False and str(answer["error"]).startswith("permission denied: uid 65534"), op
    assert node.gpu.current_clock_mhz(0) == 1500
    assert node.gpu.power_limit_w(0) == node.gpu.spec.tdp_w
    assert node.mps.daemon(1) is None
    assert node.state.read().gpu(0).jobs[0].desired_sm_pct is None


def test_root_and_the_service_user_may(served: tuple[SimNode, Path]) -> None:
    node, sock = served
    assert call_as("daemon", sock, "lock_clocks", {"gpu": 0, "clock_mhz": 1200}) == {"ok": True, "result": 1200}
    assert node.gpu.current_clock_mhz(0) == 1200
    assert request(sock, "reset_clocks", {"gpu": 0}) is None
    assert node.gpu.current_clock_mhz(0) == node.gpu.spec.max_clock_mhz
    with pytest.raises(NodeError, match="argument clock_mhz = '1200; reboot' must be an integer"):
        request(sock, "lock_clocks", {"gpu": 0, "clock_mhz": "1200; reboot"})
    with pytest.raises(NodeError, match="unknown op"):
        request(sock, "shell", {"cmd": "id"})


def test_instance_secret_answers_root_and_the_service_user_only(served: tuple[SimNode, Path], tmp_path: Path) -> None:
    from festina_hpc.daemon.node_control import ADMIN_OPS
    from festina_hpc.node.control import JobSecrets
    from festina_hpc.serve.secret import write_secret

    node, sock = served
    _, secret = write_secret(tmp_path / "secrets", "71")
    node.agent.job_secrets = JobSecrets(str(tmp_path / "secrets"), home_of=lambda uid: None)
    node.agent.prolog(make_job(71, mps_pct=50))
    assert call_as("nobody", sock, "instance_secret", {"job_id": 71})["ok"] is False
    assert call_as("daemon", sock, "instance_secret", {"job_id": 71}) == {"ok": True, "result": secret}
    with pytest.raises(NodeError, match="job 72 does not run on this node"):
        request(sock, "instance_secret", {"job_id": 72})
    assert "instance_secret" not in ADMIN_OPS  # festinad never relays it for an admin
