"""The root-owned festina-node service: privileged GPU operations behind a local Unix socket, and the control loop.

Only root and the festina service user may use the socket. The kernel tells
who is at the other end (``SO_PEERCRED``: the peer's uid as of ``connect``),
so the check does not rest on file modes or on anything the caller says; the
socket file itself is world-connectable on purpose, so that the refusal is
an answer ("permission denied") rather than a silent ``EACCES``. A request is
one JSON line, ``{"op": ..., "args": {...}}``; the answer is one JSON line,
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``. Every
argument is type-checked before it reaches the agent; nothing reaches a shell.

festinad on the head node reaches the same ops over TCP (``NetworkControlServer``,
``[node] control_port``, off by default): there no kernel vouches for the caller,
so each message carries a credential (``node/auth.py``: MUNGE as festinad's user,
or an HMAC under a shared key) bound to the op, its arguments, this node, the time
and a nonce; a forged, replayed, stale or misdirected one is logged and refused
before anything runs.

The control loop runs in the same process: every ``control_period_s`` it
runs the local controller (``node/control.py``: the policy's ``control()``
per GPU over what the model servers report, then ``NodeAgent.control_tick``:
energy samples, MPS health, settings put in force, servers told), or only
``control_tick`` where no control policy is configured.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import socketserver
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from festina_hpc.errors import FestinaError
from festina_hpc.node.agent import NodeAgent, TickReport
from festina_hpc.node.auth import AuthRefused, ControlMessage, Verifier
from festina_hpc.node.control import LocalController, job_owns_pid
from festina_hpc.node.errors import AccessDenied, NodeError, NodeInputError
from festina_hpc.node.state import as_plain

logger = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 65536


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a Unix stream socket (from the kernel)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _int(args: Mapping[str, Any], key: str) -> int:
    value = args.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise NodeInputError(f"argument {key} = {value!r} must be an integer")
    return value


def _number(args: Mapping[str, Any], key: str) -> float:
    value = args.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise NodeInputError(f"argument {key} = {value!r} must be a number")
    return float(value)


def _settings(agent: NodeAgent, args: Mapping[str, Any]) -> None:
    raw = args.get("sm_pct", {})
    if not isinstance(raw, dict):
        raise NodeInputError(f"argument sm_pct = {raw!r} must map job ids to shares")
    shares: dict[int, float] = {}
    for key, value in raw.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise NodeInputError(f"sm_pct key {key!r} is not a job id")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise NodeInputError(f"sm_pct of job {key} = {value!r} must be a number")
        shares[int(key)] = float(value)
    clock = args.get("clock_mhz")
    agent.request_settings(_int(args, "gpu"), None if clock is None else _int(args, "clock_mhz"), shares)


def _drain_instance(agent: NodeAgent, args: Mapping[str, Any]) -> int:
    """SIGTERM to a job's model server, which then drains: /health 503, no new requests, in-flight ones finish.

    Only a pid the control loop saw the job's server report, and that still runs in that job, is signalled.
    """
    gpu, job_id = _int(args, "gpu"), _int(args, "job_id")
    job = agent.status().gpu(gpu).job(job_id)
    if job is None:
        raise NodeInputError(f"GPU {gpu}: job {job_id} does not run on this GPU")
    if job.server_pid is None or not job_owns_pid(job.server_pid, job_id):
        raise NodeError(f"GPU {gpu} job {job_id}: no model server of this job is known to drain")
    os.kill(job.server_pid, signal.SIGTERM)
    return job.server_pid


def _instance_secret(agent: NodeAgent, args: Mapping[str, Any]) -> str | None:
    """The secret of a job's model server (festinad asks for a user's adopted job, whose file only that user
    and root can read); None when the node knows none. Not one of festinad's ADMIN_OPS."""
    job_id = _int(args, "job_id")
    for rec in agent.status().gpus.values():
        job = rec.job(job_id)
        if job is not None:
            return agent.job_secrets(job)
    raise NodeInputError(f"job {job_id} does not run on this node")


OPERATIONS: dict[str, Callable[[NodeAgent, Mapping[str, Any]], Any]] = {
    "status": lambda agent, args: as_plain(agent.status()),
    "lock_clocks": lambda agent, args: agent.lock_clock(_int(args, "gpu"), _int(args, "clock_mhz")),
    "reset_clocks": lambda agent, args: agent.reset_clock(_int(args, "gpu")),
    "set_power_limit": lambda agent, args: agent.set_power_limit(_int(args, "gpu"), _number(args, "power_w")),
    "mps_start": lambda agent, args: agent.mps_start(_int(args, "gpu")),
    "mps_stop": lambda agent, args: agent.mps_stop(_int(args, "gpu")),
    "set_settings": _settings,
    "drain_instance": _drain_instance,
    "instance_secret": _instance_secret,
    "control_tick": lambda agent, args: {k: v for k, v in asdict(agent.control_tick()).items() if k != "readings"},
}


def handle_request(agent: NodeAgent, line: bytes) -> dict[str, Any]:
    """The answer to one request line from an allowed caller."""
    try:
        request = json.loads(line)
    except ValueError as exc:
        return {"ok": False, "error": f"not a JSON request: {exc}"}
    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
        return {"ok": False, "error": "a request is a JSON object with an \"op\""}
    return dispatch(agent, request["op"], request.get("args", {}))


def dispatch(agent: NodeAgent, op_name: str, args: Any) -> dict[str, Any]:
    """The answer to one checked caller's ``op``: ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": ...}``."""
    try:
        op = OPERATIONS.get(op_name)
        if op is None:
            raise NodeInputError(f"unknown op {op_name[:40]!r} (known: {', '.join(sorted(OPERATIONS))})")
        if not isinstance(args, dict):
            raise NodeInputError("args must be a JSON object")
        return {"ok": True, "result": op(agent, args)}
    except FestinaError as exc:
        return {"ok": False, "error": str(exc)}


class ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, agent: NodeAgent, allowed_uids: frozenset[int]):
        self.agent = agent
        self.allowed_uids = allowed_uids
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        super().__init__(str(path), _Handler)
        # Connectable by all: SO_PEERCRED decides, and a refused caller gets an answer saying so.
        os.chmod(path, 0o666)


class _Handler(socketserver.StreamRequestHandler):
    server: ControlServer

    def handle(self) -> None:
        uid = peer_uid(self.connection)
        # Read the request even when refusing it: closing on unread data resets the connection, and the
        # caller would see an error instead of the answer.
        line = self.rfile.readline(MAX_REQUEST_BYTES)
        if uid not in self.server.allowed_uids:
            logger.warning("control socket: refused uid %d", uid)
            self._answer({"ok": False, "error": f"permission denied: uid {uid} is neither root nor the festina "
                                                f"service user"})
            return
        answer = handle_request(self.server.agent, line)
        logger.info("control socket: uid %d: %s -> %s", uid, line[:200].decode(errors="replace").strip(),
                    "ok" if answer["ok"] else answer["error"])
        self._answer(answer)

    def _answer(self, answer: dict[str, Any]) -> None:
        self.wfile.write(json.dumps(answer).encode() + b"\n")


class NetworkControlServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """The same ops over TCP for festinad on the head node; each message must carry a valid credential.

    A refused message (forged, replayed, stale, another node's) changes nothing: it is logged with
    the peer's address and answered with the reason, and no op runs.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], agent: NodeAgent, verifier: Verifier):
        self.agent = agent
        self.verifier = verifier
        super().__init__(address, _NetworkHandler)


class _NetworkHandler(socketserver.StreamRequestHandler):
    server: NetworkControlServer
    timeout = 10.0  # a peer that connects and says nothing does not hold a thread for long

    def handle(self) -> None:
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        try:
            line = self.rfile.readline(MAX_REQUEST_BYTES)
        except OSError:
            return
        op = "?"
        try:
            try:
                raw = json.loads(line)
            except ValueError:
                raise AuthRefused("not a JSON message") from None
            message, scheme, credential = ControlMessage.from_wire(raw)
            op = message.op
            self.server.verifier.verify(message, scheme, credential)
        except AuthRefused as exc:
            logger.warning("network control: refused op %.40r from %s: %s", op, peer, exc)
            self._answer({"ok": False, "error": f"refused: {exc}"})
            return
        except NodeError as exc:  # unmunge could not run: refuse, but say it is ours
            logger.error("network control: cannot check op %.40r from %s: %s", op, peer, exc)
            self._answer({"ok": False, "error": f"refused: cannot check the credential: {exc}"})
            return
        answer = dispatch(self.server.agent, message.op, message.args)
        logger.info("network control: %s: %s %s -> %s", peer, message.op, json.dumps(message.args)[:200],
                    "ok" if answer["ok"] else answer["error"])
        self._answer(answer)

    def _answer(self, answer: dict[str, Any]) -> None:
        try:
            self.wfile.write(json.dumps(answer).encode() + b"\n")
        except OSError:
            pass  # the peer left; the op (if any) ran and was logged


def request(path: Path, op: str, args: Mapping[str, Any] | None = None, timeout_s: float = 30.0) -> Any:
    """Call the node service; its result, ``AccessDenied`` when refused, ``NodeError`` when it failed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(path))
            sock.sendall(json.dumps({"op": op, "args": dict(args or {})}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            raise NodeError(f"festina-node service at {path}: {exc.strerror or exc}") from None
    try:
        answer = json.loads(data)
    except ValueError:
        raise NodeError(f"festina-node service at {path}: unreadable answer {data[:100]!r}") from None
    if not answer.get("ok"):
        error = str(answer.get("error", "no detail"))
        raise (AccessDenied if error.startswith("permission denied") else NodeError)(error)
    return answer.get("result")


class ControlLoop:
    """Every ``period_s`` in a thread until stopped: the controller's step (or ``control_tick`` without one).

    A failing tick is logged, not fatal.
    """

    def __init__(self, agent: NodeAgent, period_s: float, controller: LocalController | None = None):
        self._agent = agent
        self._period_s = period_s
        self._controller = controller
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="festina-node-control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            try:
                report = self.tick()
                if report.mps_restarted or report.clock_changes or report.share_changes:
                    logger.info("control tick: %s", report)
            except Exception:  # noqa: BLE001 - the loop must outlive one bad tick; the hooks still account
                logger.exception("control tick failed")

    def tick(self) -> TickReport:
        if self._controller is None:
            return self._agent.control_tick()
        return self._controller.step(self._agent).tick

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
