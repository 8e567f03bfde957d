"""Pure parsers of Slurm's output: ``squeue/sinfo --json``, ``scontrol -o show``, GRES strings, hostlists.

Every function takes text (or decoded JSON) and returns project records; none
runs a command, so each is tested on output captured from real clusters
(``tests/slurm/samples``). Two JSON shapes are read: Slurm 22.05's
(``openapi/v0.0.38``: plain numbers, ``job_state`` a string, node ``state`` a
string plus ``state_flags``, a job's ``exit_code`` the raw wait status, 768 for
``exit 3``) and the newer data parser's (24.x to 25.11: numbers wrapped as
``{"set", "infinite", "number"}``, states as lists, ``exit_code`` an object of
``status``, ``return_code`` and ``signal``). ``scontrol -o show job`` gives
``ExitCode=<code>:<signal>`` and times in the local time zone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

from festina_hpc.slurm.types import ENDED_JOB_STATES, Gres, SlurmJob, SlurmNode

_NULLS = frozenset({"", "(null)", "N/A", "None", "none"})
_ONELINER_KEY = re.compile(r"\s+(?=[A-Za-z][A-Za-z0-9_/:]*=)")
_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")
# Node base states as Slurm names them; anything else in a state list is a flag.
_BASE_NODE_STATES = frozenset({"IDLE", "MIXED", "ALLOCATED", "DOWN", "ERROR", "FUTURE", "UNKNOWN", "COMPLETING"})


def _load(text: str, what: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: not JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{what}: expected a JSON object, got {type(data).__name__}")
    return data


def number(value: Any) -> int | None:
    """A plain int, or the newer parser's ``{"set": true, "infinite": false, "number": N}``; None when unset."""
    if isinstance(value, Mapping):
        if not value.get("set", True) or value.get("infinite"):
            return None
        value = value.get("number")
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return int(value)
    return None


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Mapping):  # sacct-style {"job": ..., "administrator": ...}
        value = value.get("job")
    return "" if value is None else str(value)


def expand_hostlist(expr: str) -> tuple[str, ...]:
    """``n[1-3,5],gpu07`` -> (n1, n2, n3, n5, gpu07); zero padding (``n[01-02]``) is kept."""
    expr = expr.strip()
    if expr in _NULLS:
        return ()
    names: list[str] = []
    for part in _split_top_level(expr, ","):
        names.extend(_expand_one(part))
    return tuple(names)


def _split_top_level(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets and parentheses."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p for p in parts if p]


def _expand_one(pattern: str) -> list[str]:
    start = pattern.find("[")
    if start < 0:
        return [pattern]
    end = pattern.index("]", start)
    head, body, tail = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
    out = []
    for item in body.split(","):
        lo, _, hi = item.partition("-")
        if not hi:
            values = [lo]
        else:
            width = len(lo) if lo.startswith("0") else 0
            values = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        for v in values:
            out.extend(_expand_one(head + v + tail))
    return out


def gres_indices(detail: str) -> dict[str, tuple[int, ...]]:
    """Which devices of its node a job was given, per GRES name, from one ``gres_detail`` entry (squeue
    --json) or ``GRES=`` (``scontrol -d``): ``gpu:h100:2(IDX:0-1)`` -> ``{"gpu": (0, 1)}``,
    ``mps:25(IDX:1)`` -> ``{"mps": (1,)}``; ``IDX:N/A`` gives ``()``."""
    out: dict[str, tuple[int, ...]] = {}
    if not detail or detail.strip() in _NULLS:
        return out
    for item in _split_top_level(detail.strip(), ","):
        match = re.fullmatch(r"([A-Za-z_]+)[^(]*\(IDX:([^)]*)\)", item.strip())
        if match is None:
            continue
        found: list[int] = []
        for part in match[2].split(","):
            first, _, last = part.partition("-")
            if first.isdigit() and (not last or last.isdigit()):
                found.extend(range(int(first), int(last or first) + 1))
        out[match[1]] = tuple(dict.fromkeys(out.get(match[1], ()) + tuple(found)))
    return out


def parse_gres(text: str) -> tuple[Gres, ...]:
    """A node's GRES string, configured or used: ``gpu:h100:2(IDX:0-1),mps:h100:0(IDX:N/A)``."""
    if text is None or text.strip() in _NULLS:
        return ()
    out = []
    for item in _split_top_level(text.strip(), ","):
        item = re.sub(r"\(.*\)$", "", item.strip())  # IDX/socket detail
        parts = item.split(":")
        if len(parts) < 2:
            continue  # a bare name without a count says nothing we use
        name, count = parts[0], parts[-1]
        gres_type = parts[1] if len(parts) >= 3 else None
        if not count.isdigit():
            continue
        out.append(Gres(name, gres_type, int(count)))
    return tuple(out)


def parse_tres_per_node(text: str) -> tuple[Gres, ...]:
    """A job's per-node request: ``gres:mps:50`` / ``gres:gpu:h100:2`` (22.05) or ``gres/gpu:h100=2`` (newer)."""
    if text is None or text.strip() in _NULLS:
        return ()
    out = []
    for item in _split_top_level(text.strip(), ","):
        if item.startswith("gres/"):
            spec, _, count = item[len("gres/"):].partition("=")
            name, _, gres_type = spec.partition(":")
        elif item.startswith("gres:"):
            parts = item[len("gres:"):].split(":")
            name, count = parts[0], parts[-1] if len(parts) >= 2 else "1"
            gres_type = parts[1] if len(parts) >= 3 else ""
        else:
            continue  # cpu=, mem=: not GRES
        out.append(Gres(name, gres_type or None, int(count) if count.isdigit() else 1))
    return tuple(out)


def _node_state(node: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    state = node.get("state")
    flags = [str(f).upper() for f in node.get("state_flags") or ()]
    if isinstance(state, list):  # newer parser: ["IDLE", "DRAIN"]
        words = [str(s).upper() for s in state]
        base = next((w for w in words if w in _BASE_NODE_STATES), words[0] if words else "UNKNOWN")
        flags = [w for w in words if w != base] + flags
        return base.lower(), tuple(dict.fromkeys(flags))
    return str(state or "unknown").lower(), tuple(dict.fromkeys(flags))


def node_from_json(node: Mapping[str, Any]) -> SlurmNode:
    state, flags = _node_state(node)
    partitions = node.get("partitions") or ()
    features = node.get("features") or ""
    if isinstance(features, str):
        features = [f for f in features.split(",") if f]
    return SlurmNode(
        name=str(node["name"]),
        state=state,
        flags=flags,
        reason=_text(node.get("reason")),
        cpus=number(node.get("cpus")) or 0,
        alloc_cpus=number(node.get("alloc_cpus")) or 0,
        gres=parse_gres(_text(node.get("gres"))),
        gres_used=parse_gres(_text(node.get("gres_used"))),
        partitions=tuple(str(p) for p in partitions),
        features=tuple(str(f) for f in features),
        address=_text(node.get("address")),
    )


def parse_sinfo_json(text: str) -> tuple[SlurmNode, ...]:
    """``sinfo --json``: every node (22.05 ignores sinfo's filters, so the caller filters)."""
    data = _load(text, "sinfo --json")
    if "nodes" not in data:
        raise ValueError("sinfo --json: no 'nodes' key")
    seen: dict[str, SlurmNode] = {}
    for raw in data["nodes"]:
        node = node_from_json(raw)
        seen.setdefault(node.name, node)  # newer sinfo lists a node once per partition
    return tuple(seen.values())


def _job_state(value: Any) -> str:
    if isinstance(value, list):  # newer parser: ["PENDING"] or ["RUNNING", "REQUEUED"]
        return str(value[0]).upper() if value else "UNKNOWN"
    return str(value or "UNKNOWN").upper()


def exit_status(value: Any) -> tuple[int, int] | None:
    """A job's ``exit_code`` from ``squeue --json`` as (exit code, signal); None when Slurm gives none.

    22.05 gives the raw wait status (``768`` = exit 3, ``9`` = killed by signal 9); the newer data parser
    ``{"status": ["EXITED"], "return_code": {"set": true, "number": 3}, "signal": {"id": {...}, "name": ""}}``.
    """
    if isinstance(value, Mapping):
        code = number(value.get("return_code"))
        signal = value.get("signal")
        signal_id = number(signal.get("id")) if isinstance(signal, Mapping) else None
        if code is None and signal_id is None:
            return None
        return code or 0, signal_id or 0
    raw = number(value)
    if raw is None or raw < 0:
        return None
    return (raw >> 8) & 0xFF, raw & 0x7F


def parse_exit_code(text: str) -> tuple[int, int] | None:
    """``scontrol``'s ``ExitCode=3:0`` (exit code, signal); None when empty or not that form."""
    code, sep, signal = text.partition(":")
    if not sep or not code.isdigit() or not signal.isdigit():
        return None
    return int(code), int(signal)


def parse_local_time(text: str) -> int | None:
    """``scontrol``'s ``2026-12-07T23:31:35`` (slurmctld's local time zone, which this host shares) as epoch
    seconds; None for ``Unknown``, ``None`` and the like."""
    try:
        return int(datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").astimezone().timestamp())
    except ValueError:
        return None


def job_from_json(job: Mapping[str, Any]) -> SlurmJob:
    state = _job_state(job.get("job_state"))
    ended = state in ENDED_JOB_STATES
    exit_pair = exit_status(job.get("exit_code")) if ended else None
    return SlurmJob(
        job_id=int(number(job.get("job_id")) or 0),
        name=_text(job.get("name")),
        state=state,
        reason=_text(job.get("state_reason")) or "None",
        nodes=expand_hostlist(_text(job.get("nodes"))),
        gres=parse_tres_per_node(_text(job.get("tres_per_node"))),
        gres_detail=tuple(str(g) for g in job.get("gres_detail") or ()),
        comment=_text(job.get("comment")),
        user=_text(job.get("user_name")),
        account=_text(job.get("account")),
        partition=_text(job.get("partition")),
        required_nodes=expand_hostlist(_text(job.get("required_nodes"))),
        excluded_nodes=expand_hostlist(_text(job.get("excluded_nodes"))),
        restart_count=number(job.get("restart_cnt")) or 0,
        submit_time_s=number(job.get("submit_time")) or None,
        start_time_s=number(job.get("start_time")) or None,
        tres_alloc=_text(job.get("tres_alloc_str")),
        end_time_s=(number(job.get("end_time")) or None) if ended else None,
        exit_code=exit_pair[0] if exit_pair else None,
        exit_signal=exit_pair[1] if exit_pair else None,
    )


def parse_squeue_json(text: str) -> tuple[SlurmJob, ...]:
    """``squeue --json``: every job slurmctld holds, finished ones within MinJobAge included."""
    data = _load(text, "squeue --json")
    if "jobs" not in data:
        raise ValueError("squeue --json: no 'jobs' key")
    return tuple(job_from_json(j) for j in data["jobs"])


def parse_sacct_json(text: str) -> tuple[SlurmJob, ...]:
    """``sacct --json`` (needs slurmdbd). Its exit codes are unreliable on 22.05, so none are read."""
    data = _load(text, "sacct --json")
    out = []
    for job in data.get("jobs", ()):
        state = job.get("state") or {}
        allocated = (job.get("tres") or {}).get("allocated") or ()
        gres = tuple(Gres(t["name"].split(":")[0], None, int(t["count"] or 0))
                     for t in allocated if t.get("type") == "gres" and t.get("name"))
        times = job.get("time") or {}
        out.append(SlurmJob(
            job_id=int(number(job.get("job_id")) or 0), name=_text(job.get("name")),
            state=_job_state(state.get("current")), reason=_text(state.get("reason")) or "None",
            nodes=expand_hostlist(_text(job.get("nodes"))), gres=gres, gres_detail=(),
            comment=_text(job.get("comment")), user=_text(job.get("user")), account=_text(job.get("account")),
            partition=_text(job.get("partition")), restart_count=number(job.get("restart_cnt")) or 0,
            submit_time_s=number(times.get("submission")) or None, start_time_s=number(times.get("start")) or None))
    return tuple(out)


def parse_oneliner(line: str) -> dict[str, str]:
    """One ``scontrol -o show job|node`` record as ``{key: value}``; ``(null)`` and friends become "".

    Values may hold spaces (``Reason=sample drain [root@...]``, ``OS=Linux 6.18 ...``); a new key starts only
    at whitespace followed by ``Key=``, so a value with `` word=`` inside would be split (festina never writes one).
    """
    out: dict[str, str] = {}
    for token in _ONELINER_KEY.split(line.strip()):
        key, sep, value = token.partition("=")
        if sep:
            value = value.strip()
            out[key] = "" if value in _NULLS else value
    return out


def job_from_oneliner(fields: Mapping[str, str]) -> SlurmJob:
    user = fields.get("UserId", "")
    restarts = fields.get("Restarts", "0")
    state = fields.get("JobState", "UNKNOWN").upper()
    ended = state in ENDED_JOB_STATES
    exit_pair = parse_exit_code(fields.get("ExitCode", "")) if ended else None
    return SlurmJob(
        job_id=int(fields["JobId"]),
        name=fields.get("JobName", ""),
        state=state,
        reason=fields.get("Reason") or "None",
        nodes=expand_hostlist(fields.get("NodeList", "")),
        gres=parse_tres_per_node(fields.get("TresPerNode", "")),
        gres_detail=tuple(v for k, v in fields.items() if k == "GRES" and v),
        comment=fields.get("Comment", ""),
        user=user.split("(")[0],
        account=fields.get("Account", ""),
        partition=fields.get("Partition", ""),
        required_nodes=expand_hostlist(fields.get("ReqNodeList", "")),
        excluded_nodes=expand_hostlist(fields.get("ExcNodeList", "")),
        restart_count=int(restarts) if restarts.isdigit() else 0,
        submit_time_s=parse_local_time(fields.get("SubmitTime", "")),
        # A pending job's StartTime is the scheduler's estimate, not a start.
        start_time_s=parse_local_time(fields.get("StartTime", "")) if state != "PENDING" else None,
        tres_alloc=fields.get("TRES", ""),
        end_time_s=parse_local_time(fields.get("EndTime", "")) if ended else None,
        exit_code=exit_pair[0] if exit_pair else None,
        exit_signal=exit_pair[1] if exit_pair else None,
    )


def node_from_oneliner(fields: Mapping[str, str]) -> SlurmNode:
    words = [w for w in fields.get("State", "UNKNOWN").split("+") if w]
    base = words[0].rstrip("*~#%$@!^-") if words else "UNKNOWN"
    features = fields.get("AvailableFeatures", "")
    return SlurmNode(
        name=fields["NodeName"],
        state=base.lower(),
        flags=tuple(w.upper() for w in words[1:]),
        reason=fields.get("Reason", ""),
        cpus=int(fields.get("CPUTot", "0") or 0),
        alloc_cpus=int(fields.get("CPUAlloc", "0") or 0),
        gres=parse_gres(fields.get("Gres", "")),
        gres_used=parse_gres(fields.get("GresUsed", "")),
        partitions=tuple(p for p in fields.get("Partitions", "").split(",") if p),
        features=tuple(f for f in features.split(",") if f),
        address=fields.get("NodeAddr", ""),
    )


def parse_oneliners(text: str) -> list[dict[str, str]]:
    return [parse_oneliner(line) for line in text.splitlines() if line.strip()]


# What ``scontrol show job`` prints, exit code 0, when slurmctld holds no job at all.
_NO_JOBS = "No jobs in the system"


def parse_scontrol_jobs(text: str) -> tuple[SlurmJob, ...]:
    """``scontrol -o show job`` (every job, one line each); none when it says there are none."""
    if text.strip() == _NO_JOBS:
        return ()
    return tuple(job_from_oneliner(fields) for fields in parse_oneliners(text))


def parse_sbatch_parsable(text: str) -> int:
    """``sbatch --parsable`` prints ``<job id>`` or ``<job id>;<cluster>``."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    job_id = first.split(";")[0].strip()
    if not job_id.isdigit():
        raise ValueError(f"sbatch --parsable printed {text.strip()[:80]!r}, not a job id")
    return int(job_id)


def parse_version(text: str) -> tuple[int, int]:
    """``slurm 22.05.8`` (``scontrol --version``) or ``25.11.2`` (pyslurm) -> (major, minor)."""
    match = _VERSION.search(text)
    if not match:
        raise ValueError(f"no Slurm version in {text.strip()[:80]!r}")
    return int(match.group(1)), int(match.group(2))


# Job states in which a job holds its node's resources.
_HOLDING_STATES = frozenset({"RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED"})


def with_mps_used_from_jobs(nodes: tuple[SlurmNode, ...], jobs: tuple[SlurmJob, ...]) -> tuple[SlurmNode, ...]:
    """Nodes whose ``mps`` used count is the sum of the running jobs' MPS shares.

    Slurm 22.05's ``sinfo``/``scontrol -d`` report ``mps:h100:1(IDX:0)`` for a GPU that two jobs share at 25%
    and 30% (observed on the dev cluster: it counts GPUs with MPS in use, not shares). Each job's
    ``gres_detail`` (``mps:25(IDX:0)``, one entry per allocated node, in node order) is right.
    """
    used: dict[str, int] = {}
    for job in jobs:
        if job.state not in _HOLDING_STATES:
            continue
        for name, detail in zip(job.nodes, job.gres_detail):
            used[name] = used.get(name, 0) + sum(g.count for g in parse_gres(detail) if g.name == "mps")
    out: list[SlurmNode] = []
    for node in nodes:
        configured = next((g for g in node.gres if g.name == "mps"), None)
        if configured is None:
            out.append(node)
            continue
        others = tuple(g for g in node.gres_used if g.name != "mps")
        out.append(replace(node, gres_used=others + (Gres("mps", configured.type, used.get(node.name, 0)),)))
    return tuple(out)
