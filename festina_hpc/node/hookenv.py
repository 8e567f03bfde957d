"""Reads and validates what Slurm hands the hooks in their environment: job, user, node, GPUs, comment.

Nothing here trusts its input: every value is matched against a strict form
before it is used, and nothing from the environment ever reaches a shell. The
job comment carries the head node's directives in festina's own form,
``festina:model=<model>,instance=<id>[,port=<port>][,clock_mhz=<MHz>]``
(festinad's jobs carry ``port``: where the node's control loop reaches the
model server, on this node's loopback); a comment that is
not in that form (a user's own note, or one with shell metacharacters) is
ignored as a whole, and the reason is kept for the log. The job name is never read.

Values from the environment reach the hook log only through ``shown`` (quoted,
control characters escaped, long values cut with their length), and the hook
log's ``HookLogFormatter`` escapes whatever else a message carries, so a
hostile value can neither write a line of its own nor fill the log.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from festina_hpc.node.errors import NodeInputError
from festina_hpc.slurm import validate
from festina_hpc.slurm.errors import SlurmInputError

_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?")
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./:-]{0,127}")
_INSTANCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# [0-9], not \d: \d also matches other scripts' digits, which int() would read.
_GPU_LIST = re.compile(r"[0-9]{1,2}(,[0-9]{1,2}){0,63}")
_DIGITS = re.compile(r"[0-9]{1,10}")  # job ids and uids are uint32 in Slurm: 10 digits at most
MAX_JOB_ID = 2**32 - 1
MAX_UID = 2**32 - 2  # (uid_t)-1 means "no uid"
MAX_SHOWN_CHARS = 64  # of one value in a log line
MAX_MESSAGE_CHARS = 2000  # of one message in the hook log, whatever it carries
_COMMENT_PREFIX = "festina:"
_MAX_COMMENT_CHARS = 512
MIN_CLOCK_MHZ = 100
MAX_CLOCK_MHZ = 5000


@dataclass(frozen=True)
class Directives:
    """What the head node asked for in the job comment; None where it said nothing."""

    model: str | None = None
    instance: str | None = None
    clock_mhz: int | None = None
    port: int | None = None  # the model server's TCP port on this node


@dataclass(frozen=True)
class JobContext:
    """One job as a hook sees it, validated."""

    job_id: int
    uid: int
    user: str
    node: str
    gpus: tuple[int, ...]  # NVML indexes of the job's GPUs on this node (SLURM_JOB_GPUS)
    mps_pct: int | None  # the job's MPS share (--gres=mps:K), None for whole GPUs
    directives: Directives
    comment_ignored: str = ""  # why a comment was not taken as directives ("" when taken or absent)


def escape_controls(text: str) -> str:
    """``text`` with every non-printable character (newline, carriage return, escape, U+2028...) as a backslash
    escape, so that it stays on one line of a log and cannot move a terminal's cursor."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escaped(ch) for ch in text)


def _escaped(ch: str) -> str:
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch)
    if named:
        return named
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def shown(value: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """A value from the job's environment as a log line shows it: quoted with its control characters escaped
    (``repr``) and, past ``limit`` characters, cut with its length."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} chars)"


class HookLogFormatter(logging.Formatter):
    """The hook log's formatter: one record is one line whatever its message carries.

    Control characters in a message are escaped and a message is cut at ``MAX_MESSAGE_CHARS``; a traceback
    (a genuine internal error: bad input never gets one) keeps its lines, each after a ``  | `` prefix, so
    nothing in an exception's text can start a line that reads as a record of its own.
    """

    TRACE_PREFIX = "  | "

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = escape_controls(record.message)
        if len(message) > MAX_MESSAGE_CHARS:
            message = f"{message[:MAX_MESSAGE_CHARS]}... ({len(message)} chars)"
        record.message = message
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return "\n".join(self.TRACE_PREFIX + escape_controls(line)
                         for line in super().formatException(ei).splitlines())

    def formatStack(self, stack_info: str) -> str:
        return "\n".join(self.TRACE_PREFIX + escape_controls(line) for line in stack_info.splitlines())


def _refused(variable: str, value: str, what: str) -> NodeInputError:
    return NodeInputError(f"hook environment: {variable} {shown(value)} is not {what}")


def parse_gpu_list(text: str, variable: str = "GPU list") -> tuple[int, ...]:
    """``"0,1"`` -> (0, 1); refuses anything but distinct small indexes."""
    if not _GPU_LIST.fullmatch(text):
        raise NodeInputError(f"{variable} {shown(text)} is not a comma-separated list of GPU indexes (0..99)")
    gpus = tuple(int(g) for g in text.split(","))
    if len(set(gpus)) != len(gpus):
        raise NodeInputError(f"{variable} {shown(text)} names a GPU twice")
    return gpus


def parse_comment(comment: str) -> tuple[Directives, str]:
    """The directives in a job comment and, when it is ignored, why. Never raises."""
    if not comment or not comment.startswith(_COMMENT_PREFIX):
        return Directives(), ""
    if len(comment) > _MAX_COMMENT_CHARS or not comment.isprintable():
        return Directives(), (f"comment {shown(comment)} is not one printable line of at most "
                              f"{_MAX_COMMENT_CHARS} characters")
    values: dict[str, str] = {}
    for item in comment[len(_COMMENT_PREFIX):].split(","):
        key, sep, value = item.partition("=")
        if not sep or key in values:
            return Directives(), f"comment item {shown(item)} is not a single key=value"
        values[key] = value
    unknown = sorted(set(values) - {"model", "instance", "clock_mhz", "port"})
    if unknown:
        return Directives(), f"comment key {shown(unknown[0])} is not one of model, instance, clock_mhz, port"
    model, instance, clock = values.get("model"), values.get("instance"), values.get("clock_mhz")
    port_text = values.get("port")
    if model is not None and not _MODEL.fullmatch(model):
        return Directives(), f"comment model {shown(model)} is not a model name"
    if instance is not None and not _INSTANCE.fullmatch(instance):
        return Directives(), f"comment instance {shown(instance)} is not an instance id"
    clock_mhz = None
    if clock is not None:
        if not (re.fullmatch(r"[0-9]{1,5}", clock) and MIN_CLOCK_MHZ <= int(clock) <= MAX_CLOCK_MHZ):
            return Directives(), f"comment clock_mhz {shown(clock)} is not a clock in {MIN_CLOCK_MHZ}..{MAX_CLOCK_MHZ}"
        clock_mhz = int(clock)
    port = None
    if port_text is not None:
        if not (re.fullmatch(r"[0-9]{1,5}", port_text) and 1 <= int(port_text) <= 65535):
            return Directives(), f"comment port {shown(port_text)} is not a TCP port (1..65535)"
        port = int(port_text)
    return Directives(model, instance, clock_mhz, port), ""


def _number(env: Mapping[str, str], variable: str, pattern: re.Pattern[str], low: int, high: int) -> int:
    """A bounded decimal number; the pattern bounds its digits before ``int()`` reads it."""
    text = env.get(variable, "")
    if not pattern.fullmatch(text) or not low <= int(text) <= high:
        raise _refused(variable, text, f"a number in {low}..{high}")
    return int(text)


def job_context(env: Mapping[str, str]) -> JobContext:
    """The validated job of a Prolog, Epilog or TaskProlog environment; ``NodeInputError`` names a bad value."""
    job_id = _number(env, "SLURM_JOB_ID", _DIGITS, 1, MAX_JOB_ID)
    # A task's environment may lack SLURMD_NODENAME; a one-node job's node list is then its node.
    node_variable = next((v for v in ("SLURMD_NODENAME", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(v)),
                         "SLURMD_NODENAME")
    node_text = env.get(node_variable, "")
    try:
        node = validate.node_name(node_text)
    except SlurmInputError:
        raise _refused(node_variable, node_text, "a node name (letters, digits, '_', '.', '-')") from None
    uid = _number(env, "SLURM_JOB_UID", _DIGITS, 0, MAX_UID)
    user = env.get("SLURM_JOB_USER", "")
    if not _USER.fullmatch(user):
        raise _refused("SLURM_JOB_USER", user, "a user name")
    # SLURM_JOB_GPUS holds the node's indexes; a task's CUDA_VISIBLE_DEVICES may be renumbered from 0 (or be
    # UUIDs), so it is never read.
    gpu_text = env.get("SLURM_JOB_GPUS") or ""
    gpus = parse_gpu_list(gpu_text, "hook environment: SLURM_JOB_GPUS") if gpu_text else ()
    mps_pct = None
    if env.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE") is not None:
        mps_pct = _number(env, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", re.compile(r"[0-9]{1,3}"), 1, 100)
    directives, ignored = parse_comment(env.get("SLURM_JOB_COMMENT", ""))
    return JobContext(job_id, uid, user, node, gpus, mps_pct, directives, ignored)
