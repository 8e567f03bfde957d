"""Reads and validates what Slurm hands the hooks in their environment: job, user, node, GPUs, comment.

Nothing here trusts its input: every value is matched against a strict form
before it is used, and nothing from the environment ever reaches a shell. The
job comment carries the head node's directives in festina's own form,
``festina:model=<model>,instance=<id>[,port=<port>][,clock_mhz=<MHz>]``
(festinad's jobs carry ``port``: where the node's control loop reaches the
model server, on this node's loopback); a comment that is
not in that form (a user's own note, or one with shell metacharacters) is
ignored as a whole, and the reason is kept for the log. The job name is never read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from festina_hpc.node.errors import NodeInputError
from festina_hpc.slurm import validate
from festina_hpc.slurm.errors import SlurmInputError

_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?")
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./:-]{0,127}")
_INSTANCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_GPU_LIST = re.compile(r"\d{1,2}(,\d{1,2}){0,63}")
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


def parse_gpu_list(text: str) -> tuple[int, ...]:
    """``"0,1"`` -> (0, 1); refuses anything but distinct small indexes."""
    if not _GPU_LIST.fullmatch(text):
        raise NodeInputError(f"GPU list {text[:40]!r} is not a comma-separated list of GPU indexes")
    gpus = tuple(int(g) for g in text.split(","))
    if len(set(gpus)) != len(gpus):
        raise NodeInputError(f"GPU list {text!r} names a GPU twice")
    return gpus


def parse_comment(comment: str) -> tuple[Directives, str]:
    """The directives in a job comment and, when it is ignored, why. Never raises."""
    if not comment or not comment.startswith(_COMMENT_PREFIX):
        return Directives(), ""
    if len(comment) > _MAX_COMMENT_CHARS or not comment.isprintable():
        return Directives(), "comment too long or not printable"
    values: dict[str, str] = {}
    for item in comment[len(_COMMENT_PREFIX):].split(","):
        key, sep, value = item.partition("=")
        if not sep or key in values:
            return Directives(), f"comment item {item[:40]!r} is not a single key=value"
        values[key] = value
    unknown = sorted(set(values) - {"model", "instance", "clock_mhz", "port"})
    if unknown:
        return Directives(), f"comment key {unknown[0][:40]!r} is not one of model, instance, clock_mhz, port"
    model, instance, clock = values.get("model"), values.get("instance"), values.get("clock_mhz")
    port_text = values.get("port")
    if model is not None and not _MODEL.fullmatch(model):
        return Directives(), f"comment model {model[:40]!r} is not a model name"
    if instance is not None and not _INSTANCE.fullmatch(instance):
        return Directives(), f"comment instance {instance[:40]!r} is not an instance id"
    clock_mhz = None
    if clock is not None:
        if not (clock.isascii() and clock.isdigit() and MIN_CLOCK_MHZ <= int(clock) <= MAX_CLOCK_MHZ):
            return Directives(), f"comment clock_mhz {clock[:40]!r} is not a clock in {MIN_CLOCK_MHZ}..{MAX_CLOCK_MHZ}"
        clock_mhz = int(clock)
    port = None
    if port_text is not None:
        if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5 and 1 <= int(port_text) <= 65535):
            return Directives(), f"comment port {port_text[:40]!r} is not a TCP port"
        port = int(port_text)
    return Directives(model, instance, clock_mhz, port), ""


def job_context(env: Mapping[str, str]) -> JobContext:
    """The validated job of a Prolog, Epilog or TaskProlog environment; ``NodeInputError`` names a bad value."""
    try:
        job_id = validate.job_id(env.get("SLURM_JOB_ID", ""))
        # A task's environment may lack SLURMD_NODENAME; a one-node job's node list is then its node.
        node = validate.node_name(env.get("SLURMD_NODENAME") or env.get("SLURM_JOB_NODELIST")
                                  or env.get("SLURM_NODELIST", ""))
    except SlurmInputError as exc:
        raise NodeInputError(f"hook environment: {exc}") from None
    uid_text = env.get("SLURM_JOB_UID", "")
    if not (uid_text.isascii() and uid_text.isdigit()) or len(uid_text) > 10:
        raise NodeInputError(f"hook environment: SLURM_JOB_UID {uid_text[:20]!r} is not a uid")
    user = env.get("SLURM_JOB_USER", "")
    if not _USER.fullmatch(user):
        raise NodeInputError(f"hook environment: SLURM_JOB_USER {user[:40]!r} is not a user name")
    # SLURM_JOB_GPUS holds the node's indexes; a task's CUDA_VISIBLE_DEVICES may be renumbered from 0.
    gpu_text = env.get("SLURM_JOB_GPUS") or ""
    gpus = parse_gpu_list(gpu_text) if gpu_text else ()
    pct_text = env.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
    mps_pct = None
    if pct_text is not None:
        if not (pct_text.isascii() and pct_text.isdigit() and 1 <= int(pct_text) <= 100):
            raise NodeInputError(f"hook environment: CUDA_MPS_ACTIVE_THREAD_PERCENTAGE {pct_text[:20]!r} "
                                 f"is not a percentage in 1..100")
        mps_pct = int(pct_text)
    directives, ignored = parse_comment(env.get("SLURM_JOB_COMMENT", ""))
    return JobContext(job_id, int(uid_text), user, node, gpus, mps_pct, directives, ignored)
