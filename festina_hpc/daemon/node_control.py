"""festinad's side of head-to-node control: signed requests to festina-node's control port (clock, shares, drain).

Each call is one TCP connection to ``<node address>:<port>`` carrying one
JSON line, a ``ControlMessage`` signed for that node (``festina_hpc.node.auth``:
a MUNGE credential made as festinad's user, or an HMAC under the shared key),
and one JSON line back. The node refuses a message that is forged, replayed,
stale or meant for another node; that refusal comes back as ``NodeControlError``
with the node's reason. Calls block: festinad runs them in a worker thread.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from festina_hpc.config import NodeControlConfig
from festina_hpc.errors import ConfigError, FestinaError
from festina_hpc.node.auth import ControlMessage, Munge, MungeSigner, SecretSigner, Signer, load_secret

# What an admin may ask festinad to do on a node (festina-node itself serves more to local root).
ADMIN_OPS = ("lock_clocks", "reset_clocks", "set_settings", "drain_instance", "status")


class NodeControlError(FestinaError):
    """A node refused a control message, failed the op, or did not answer."""


class NodeControlClient:
    """Signs and sends control messages; ``address_of`` maps a Slurm node name to where it listens."""

    def __init__(self, signer: Signer, port: int, *, timeout_s: float = 10.0,
                 address_of: Callable[[str], str] = lambda node: node, clock: Callable[[], float] = time.time,
                 ports: Mapping[str, int] | None = None):
        self.signer = signer
        self.port = port  # every node's, but those in ``ports``
        self._ports = dict(ports or {})
        self._timeout_s = timeout_s
        self._address_of = address_of
        self._clock = clock

    def sign(self, node: str, op: str, args: Mapping[str, Any]) -> dict[str, Any]:
        """The wire form of a fresh message for ``node`` (own nonce, issued now)."""
        message = ControlMessage.new(op, args, node, self._clock())
        return message.to_wire(self.signer.scheme, self.signer.sign(message))

    def call(self, node: str, op: str, args: Mapping[str, Any] | None = None) -> Any:
        """Run ``op`` on ``node``; its result, or ``NodeControlError`` saying why not."""
        return self.send(node, self.sign(node, op, args or {}))

    def send(self, node: str, wire: Mapping[str, Any]) -> Any:
        """Send an already signed message (tests replay one this way) and return the node's result."""
        host, port = self._address_of(node), self._ports.get(node, self.port)
        where = f"festina-node {node} at {host}:{port}"
        try:
            with socket.create_connection((host, port), timeout=self._timeout_s) as sock:
                sock.sendall(json.dumps(wire).encode() + b"\n")
                data = sock.makefile("rb").readline(65536)
        except OSError as exc:
            raise NodeControlError(f"{where}: {exc.strerror or exc}") from None
        try:
            answer = json.loads(data)
        except ValueError:
            raise NodeControlError(f"{where}: unreadable answer {data[:100]!r}") from None
        if not isinstance(answer, dict) or not answer.get("ok"):
            error = answer.get("error", "no detail") if isinstance(answer, dict) else "no detail"
            raise NodeControlError(f"{where}: {error}")
        return answer.get("result")

    # -- what festinad asks for ----------------------------------------------------------------------------------

    def set_clock(self, node: str, gpu: int, clock_mhz: int) -> Any:
        """Lock GPU ``gpu``'s clock now."""
        return self.call(node, "lock_clocks", {"gpu": gpu, "clock_mhz": clock_mhz})

    def reset_clock(self, node: str, gpu: int) -> Any:
        return self.call(node, "reset_clocks", {"gpu": gpu})

    def set_shares(self, node: str, gpu: int, sm_pct_by_job: Mapping[int, float],
                   clock_mhz: int | None = None) -> Any:
        """Ask for SM shares (and a clock); the node applies the clock at its next tick and records each share as
        the job's wanted one (``desired_sm_pct``): a running instance's share is fixed, so that takes a restart."""
        return self.call(node, "set_settings", {"gpu": gpu, "clock_mhz": clock_mhz,
                                                "sm_pct": {str(job): pct for job, pct in sm_pct_by_job.items()}})

    def drain_instance(self, node: str, gpu: int, job_id: int) -> Any:
        """The job's model server stops taking requests and finishes those it holds, then exits."""
        return self.call(node, "drain_instance", {"gpu": gpu, "job_id": job_id})

    def status(self, node: str) -> Any:
        return self.call(node, "status")


def node_control_from_config(cfg: NodeControlConfig, address_of: Callable[[str], str]) -> NodeControlClient | None:
    """The client ``[node_control]`` asks for, or None when it names no port; a readable secret file is refused."""
    if not cfg.port and not cfg.ports:
        return None
    if cfg.port > 65535:
        raise ConfigError(f"node_control.port = {cfg.port} must be in 0..65535 (0 = off)")
    signer: Signer
    if cfg.auth == "secret":
        if not cfg.secret_file:
            raise ConfigError("node_control.auth = 'secret' needs node_control.secret_file")
        signer = SecretSigner(load_secret(Path(cfg.secret_file)))
    else:
        signer = MungeSigner(Munge(cfg.munge_socket))
    return NodeControlClient(signer, cfg.port, timeout_s=cfg.timeout_s, address_of=address_of, ports=cfg.ports)
