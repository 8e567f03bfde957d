"""The simulator's workload: which requests arrive when, for which model, under which SLO, and what a cold start costs.

Every policy in a comparison is run on the same workload (see
``notes/evaluation-method.md``), so everything that defines it lives here as
pure functions of their inputs: a request trace (``load_trace``, with the two
Azure 2023 traces shipped in ``sim/traces``), the models the requests are
spread over (``DEFAULT_MODEL_MIX`` or a model-mix file) and how popular each
is (``parse_popularity``), the scaling of the trace's rate and duration
(``build_requests``); the per-model SLOs (``default_slo``) and the time to
bring up a model instance (``ColdStartModel``) are the drivers' shared figures
in ``festina_hpc.cluster``. Randomness comes only from the
``numpy.random.Generator`` the caller passes in, so one seed gives one
workload.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from festina_hpc.errors import TraceError
from festina_hpc.policy.types import Request

TRACES_DIR = Path(__file__).resolve().parent / "traces"
MIXES_DIR = Path(__file__).resolve().parent / "mixes"  # shipped model-mix files, <name>.txt
SHIPPED_TRACES: tuple[tuple[str, str], ...] = (
    ("azure-code", "azure_2023_code.csv"),
    ("azure-conv", "azure_2023_conv.csv"),
)

# Trace columns, matched case-insensitively; MODEL_COLUMN is optional.
TIMESTAMP_COLUMN = "TIMESTAMP"
PROMPT_COLUMN = "ContextTokens"
OUTPUT_COLUMN = "GeneratedTokens"
MODEL_COLUMN = "model"

_DATETIME = r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(?:\.\d*)?"
_SECONDS = r"\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?"
_INT = r"\d{1,18}"  # fits int64 without overflow
_DATETIME_RE = re.compile(_DATETIME)
_SECONDS_RE = re.compile(_SECONDS)
_INT_RE = re.compile(_INT)
_EXAMPLE_DATETIME = "2023-11-16 18:17:03.9800000"

# Ordered so that the first N models of the mix are a realistic cluster for any
# N: the most requested (rank 1 under Zipf) are the small, widely deployed chat
# models; a 13B follows at N=3; a model that needs tensor parallelism enters at
# N=4 (codellama-34b, tp=2 on H100) and a 70B at N=6 (tp=4), so every N >= 4
# mixes instance sizes, with the large models in the less popular tail (a
# choice, not a measurement: no public trace gives per-model LLM popularity
# for these models; pass a model-mix file to change it). The last two repeat
# sizes already present (an older 7B and 70B), adding models without new sizes;
# llama-2-70b is last also because its 4,096-token context is shorter than the
# prompt plus output of 14% of azure-code and 8% of azure-conv requests.
DEFAULT_MODEL_MIX: tuple[str, ...] = (
    "llama-3.1-8b",
    "mistral-7b",
    "llama-2-13b",
    "codellama-34b",
    "mistral-nemo-12b",
    "llama-3.1-70b",
    "llama-2-7b",
    "llama-2-70b",
)


# ---------------------------------------------------------------- traces


def shipped_trace(name: str) -> Path:
    """The path of a trace shipped with festina: "azure-code" or "azure-conv" (Azure LLM inference 2023)."""
    for known, filename in SHIPPED_TRACES:
        if name.strip().lower() == known:
            return TRACES_DIR / filename
    names = ", ".join(known for known, _ in SHIPPED_TRACES)
    raise TraceError(f"unknown trace {name!r} (known: {names})")


def _readonly(values: np.ndarray, dtype: type) -> np.ndarray:
    array: np.ndarray = np.array(values, dtype=dtype)  # a copy, so the caller's array stays writable
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class Trace:
    """Requests in arrival order: when each arrives and how many tokens it reads and writes.

    The arrays are read-only and index-aligned; ``eq=False`` because arrays do
    not compare as one value (two traces are equal only if they are the same
    object).
    """

    arrival_s: np.ndarray  # float64, seconds after the trace's first request (so arrival_s[0] == 0), sorted
    prompt_tokens: np.ndarray  # int64, >= 1 (the trace's ContextTokens)
    output_tokens: np.ndarray  # int64, >= 1 (the trace's GeneratedTokens)
    models: tuple[str, ...] | None  # the trace's model column, or None if it has none
    source: str  # where it came from (a file path), for messages and results
    # 1-based line of each request in the source file (header = line 1), for messages; None if not from a file.
    lines: np.ndarray | None = field(default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "arrival_s", _readonly(self.arrival_s, np.float64))
        object.__setattr__(self, "prompt_tokens", _readonly(self.prompt_tokens, np.int64))
        object.__setattr__(self, "output_tokens", _readonly(self.output_tokens, np.int64))
        if self.lines is not None:
            object.__setattr__(self, "lines", _readonly(self.lines, np.int64))
        arrays = [self.arrival_s, self.prompt_tokens, self.output_tokens]
        if any(array.ndim != 1 for array in arrays):
            raise TraceError(f"{self.source}: trace fields must be one-dimensional arrays")
        n = len(self.arrival_s)
        lengths = {"arrival_s": n, "prompt_tokens": len(self.prompt_tokens), "output_tokens": len(self.output_tokens)}
        if self.models is not None:
            lengths["models"] = len(self.models)
        if self.lines is not None:
            lengths["lines"] = len(self.lines)
        if len(set(lengths.values())) != 1:
            raise TraceError(f"{self.source}: trace fields differ in length: {lengths}")

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        """Time from the first to the last arrival."""
        return float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) else 0.0

    def where(self, index: int) -> str:
        """'<source>: line N' for request ``index``, for one-line errors."""
        if self.lines is not None:
            return f"{self.source}: line {int(self.lines[index])}"
        return f"{self.source}: request {index}"


def _read_rows(path: Path) -> tuple[list[str], list[list[str]], list[int]]:
    """Header, the non-blank rows, and each row's 1-based file line."""
    rows: list[list[str]] = []
    lines: list[int] = []
    line = 0
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header: list[str] | None = None
            for row in reader:
                line = reader.line_num
                if not row:
                    continue
                if header is None:
                    header = row
                    continue
                rows.append(row)
                lines.append(line)
    except OSError as exc:
        raise TraceError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise TraceError(f"{path}: not UTF-8 text") from None
    except csv.Error as exc:
        raise TraceError(f"{path}: line {line + 1}: not valid CSV: {exc}") from None
    if header is None or not any(cell.strip() for cell in header):
        raise TraceError(f"{path}: empty file (expected a header: {TIMESTAMP_COLUMN},{PROMPT_COLUMN},"
                         f"{OUTPUT_COLUMN}[,{MODEL_COLUMN}])")
    return header, rows, lines


def _column_index(path: Path, header: list[str]) -> dict[str, int]:
    seen: dict[str, int] = {}
    for i, cell in enumerate(header):
        key = cell.strip().lower()
        if key in seen:
            raise TraceError(f"{path}: line 1: column {cell.strip()!r} appears twice")
        seen[key] = i
    index: dict[str, int] = {}
    for name in (TIMESTAMP_COLUMN, PROMPT_COLUMN, OUTPUT_COLUMN):
        if name.lower() not in seen:
            raise TraceError(f"{path}: line 1: missing column {name} (header: {','.join(header)})")
        index[name] = seen[name.lower()]
    if MODEL_COLUMN in seen:
        index[MODEL_COLUMN] = seen[MODEL_COLUMN]
    return index


def _all_match(pattern: str, values: Sequence[str]) -> bool:
    """Whether every value (surrounding blanks allowed) matches ``pattern``: one C-level regex over all rows."""
    return re.fullmatch(rf"(?:[ \t]*(?:{pattern})[ \t]*\n)*", "\n".join(values) + "\n") is not None


def _tokens(path: Path, name: str, values: Sequence[str], lines: Sequence[int]) -> np.ndarray:
    if not _all_match(_INT, values):
        for value, line in zip(values, lines):
            if not _INT_RE.fullmatch(value.strip()):
                raise TraceError(f"{path}: line {line}: {name} must be a positive integer, got {value!r}")
    tokens = np.array(values).astype(np.int64)
    zero = np.flatnonzero(tokens < 1)
    if zero.size:
        i = int(zero[0])
        raise TraceError(f"{path}: line {lines[i]}: {name} must be a positive integer, got {values[i]!r}")
    return tokens


def _timestamps_s(path: Path, values: Sequence[str], lines: Sequence[int]) -> np.ndarray:
    """Seconds after the first row, from datetimes or from seconds-from-start; the first row decides which."""
    first = values[0].strip()
    if _SECONDS_RE.fullmatch(first) or _SECONDS_RE.fullmatch(first.removeprefix("-")):
        kind, pattern = "seconds from start", _SECONDS
    elif _DATETIME_RE.fullmatch(first):
        kind, pattern = "datetime", _DATETIME
    else:
        raise TraceError(f"{path}: line {lines[0]}: cannot parse {TIMESTAMP_COLUMN} {values[0]!r} "
                         f"(expected a datetime such as {_EXAMPLE_DATETIME} or seconds from the start)")
    if not _all_match(pattern, values):
        regex = re.compile(pattern)
        for value, line in zip(values, lines):
            text = value.strip()
            if kind == "seconds from start" and text.startswith("-") and _SECONDS_RE.fullmatch(text[1:]):
                raise TraceError(f"{path}: line {line}: {TIMESTAMP_COLUMN} must be >= 0 seconds from the start, "
                                 f"got {value!r}")
            if not regex.fullmatch(text):
                raise TraceError(f"{path}: line {line}: cannot parse {TIMESTAMP_COLUMN} {value!r} as {kind} "
                                 f"(line {lines[0]} set the format; every row must use it)")
    if kind == "seconds from start":
        return np.array(values).astype(np.float64)
    stripped = [value.strip() for value in values]
    try:
        # Seven fractional digits (the Azure format) are 100 ns; numpy keeps up to nine.
        stamps = np.array(stripped, dtype="datetime64[ns]")
    except ValueError:
        for value, line in zip(stripped, lines):
            try:
                np.datetime64(value, "ns")
            except ValueError as exc:
                raise TraceError(f"{path}: line {line}: cannot parse {TIMESTAMP_COLUMN} {value!r}: {exc}") from None
        raise
    return (stamps - stamps[0]).astype(np.int64) / 1e9


def load_trace(path: Path | str) -> Trace:
    """Read a request trace CSV.

    Columns (any order, names case-insensitive, others ignored):
    ``TIMESTAMP`` is either a datetime (``2023-11-16 18:17:03.9800000``, any
    number of fractional digits, ``T`` or a blank between date and time, no
    time zone) or seconds from the start (a float >= 0); the first row decides
    which and every row must use the same. ``ContextTokens`` (prompt) and
    ``GeneratedTokens`` (output) are integers >= 1: the Azure 2023 traces
    have no zero on either, and a request that generates nothing has no first
    token to time. An optional ``model`` column names each request's model.
    Rows must be in arrival order (equal times are fine). Arrivals are
    returned relative to the first row, so ``arrival_s[0] == 0``.

    Every problem is a one-line ``TraceError`` naming the file, the 1-based
    line (the header is line 1) and the field and value.
    """
    path = Path(path)
    header, rows, lines = _read_rows(path)
    if not rows:
        raise TraceError(f"{path}: no requests (the file has only a header)")
    index = _column_index(path, header)
    width = len(header)
    if any(len(row) != width for row in rows):
        i = next(i for i, row in enumerate(rows) if len(row) != width)
        raise TraceError(f"{path}: line {lines[i]}: expected {width} fields as in the header, got {len(rows[i])}")
    columns = list(zip(*rows))
    raw_s = _timestamps_s(path, columns[index[TIMESTAMP_COLUMN]], lines)
    back = np.flatnonzero(np.diff(raw_s) < 0)
    if back.size:
        i = int(back[0]) + 1
        stamps = columns[index[TIMESTAMP_COLUMN]]
        raise TraceError(f"{path}: line {lines[i]}: {TIMESTAMP_COLUMN} goes backwards: {stamps[i]!r} is before "
                         f"{stamps[i - 1]!r} on line {lines[i - 1]} (rows must be in arrival order)")
    models: tuple[str, ...] | None = None
    if MODEL_COLUMN in index:
        models = tuple(name.strip() for name in columns[index[MODEL_COLUMN]])
        if not all(models):
            i = models.index("")
            raise TraceError(f"{path}: line {lines[i]}: {MODEL_COLUMN} is empty")
    return Trace(arrival_s=raw_s - raw_s[0],
                 prompt_tokens=_tokens(path, PROMPT_COLUMN, columns[index[PROMPT_COLUMN]], lines),
                 output_tokens=_tokens(path, OUTPUT_COLUMN, columns[index[OUTPUT_COLUMN]], lines),
                 models=models, source=str(path), lines=np.array(lines, dtype=np.int64))


# ---------------------------------------------------------------- models and popularity


def model_mix_path(name_or_path: Path | str) -> Path:
    """A model-mix file: a path, or the name of a shipped one (``festina_hpc/sim/mixes/<name>.txt``)."""
    path = Path(name_or_path)
    if path.exists() or path.suffix:
        return path
    shipped = MIXES_DIR / f"{name_or_path}.txt"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in MIXES_DIR.glob("*.txt")))
    raise TraceError(f"model mix {str(name_or_path)!r} is neither a file nor a shipped mix (shipped: {names})")


class MixEntry(NamedTuple):
    """One line of a model-mix file."""

    name: str
    weight: float | None = None
    profile: str | None = None  # a variant's base model (``name = profile``), whose profile it uses


def read_model_mix(path: Path | str) -> list[MixEntry]:
    """Read a model-mix file: one model per line, optionally ``name, weight``; ``#`` starts a comment.

    ``name = profile`` serves a model of its own (a fine-tune, say) with the
    profile of a shipped model (``Catalog.add_variant``). Either every model has
    a weight (a positive number; relative, need not sum to 1) or none does (then
    the popularity spec decides). The order is the popularity rank. Names are not
    checked here: pass them through the ``ProfileStore`` that will serve them.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise TraceError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise TraceError(f"{path}: not UTF-8 text") from None
    mix: list[MixEntry] = []
    first_line: dict[str, int] = {}
    weighted_line: int | None = None
    plain_line: int | None = None
    for line, raw in enumerate(text.splitlines(), start=1):
        content = raw.split("#", 1)[0].strip()
        if not content:
            continue
        parts = [part.strip() for part in content.split(",")]
        if len(parts) > 2:
            raise TraceError(f"{path}: line {line}: expected 'model' or 'model, weight', got {content!r}")
        name, _, profile = (part.strip() for part in parts[0].partition("="))
        if not name:
            raise TraceError(f"{path}: line {line}: model name is empty")
        if "=" in parts[0] and not profile:
            raise TraceError(f"{path}: line {line}: expected 'name = profile' for a variant, got {parts[0]!r}")
        if name.lower() in first_line:
            raise TraceError(f"{path}: line {line}: model {name} is already listed on line {first_line[name.lower()]}")
        first_line[name.lower()] = line
        weight: float | None = None
        if len(parts) == 2:
            try:
                weight = float(parts[1])
            except ValueError:
                weight = math.nan
            if not math.isfinite(weight) or weight <= 0:
                raise TraceError(f"{path}: line {line}: weight of {name} must be a positive number, got {parts[1]!r}")
            weighted_line = line if weighted_line is None else weighted_line
        else:
            plain_line = line if plain_line is None else plain_line
        if weighted_line is not None and plain_line is not None:
            raise TraceError(f"{path}: line {line}: give a weight on every line or on none "
                             f"(line {weighted_line} has one, line {plain_line} has none)")
        mix.append(MixEntry(name, weight, profile or None))
    if not mix:
        raise TraceError(f"{path}: no models listed")
    return mix


def split_model_mix(mix: Sequence[MixEntry]) -> tuple[tuple[str, ...], tuple[float, ...] | None]:
    """(model names, weights or None) from ``read_model_mix``'s list, ready for ``build_requests``."""
    names = tuple(entry.name for entry in mix)
    weights = [entry.weight for entry in mix]
    if all(weight is None for weight in weights):
        return names, None
    if any(weight is None for weight in weights):
        raise TraceError("model mix: give a weight for every model or for none")
    return names, tuple(float(weight) for weight in weights if weight is not None)


@dataclass(frozen=True)
class Popularity:
    """How requests spread over the model mix: rank-based Zipf, P(model i) ∝ 1/(i+1)^zipf_s; 0 is uniform."""

    zipf_s: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.zipf_s) or self.zipf_s < 0:
            raise TraceError(f"popularity: zipf exponent must be a number >= 0, got {self.zipf_s!r}")

    def __str__(self) -> str:
        return "uniform" if self.zipf_s == 0 else f"zipf:{self.zipf_s:g}"

    def probabilities(self, n_models: int) -> np.ndarray:
        """P(request is for model i), i = 0..n_models-1 in mix order; sums to 1."""
        if n_models < 1:
            raise TraceError("popularity: the model mix is empty")
        weights = 1.0 / np.arange(1, n_models + 1, dtype=np.float64) ** self.zipf_s
        return weights / weights.sum()


UNIFORM = Popularity(0.0)


def parse_popularity(spec: str) -> Popularity:
    """``"uniform"`` or ``"zipf:S"`` (S >= 0; ``zipf:0`` is uniform, ``zipf:1`` the classic Zipf law)."""
    text = spec.strip().lower()
    if text == "uniform":
        return UNIFORM
    if text.startswith("zipf:"):
        try:
            exponent = float(text.removeprefix("zipf:"))
        except ValueError:
            exponent = math.nan
        if math.isfinite(exponent) and exponent >= 0:
            return Popularity(exponent)
    raise TraceError(f"popularity {spec!r}: expected 'uniform' or 'zipf:S' with a number S >= 0, e.g. 'zipf:1.0'")


def _probabilities(models: Sequence[str], popularity: Popularity, weights: Sequence[float] | None) -> np.ndarray:
    if not models:
        raise TraceError("model mix is empty")
    if len({name.lower() for name in models}) != len(models):
        raise TraceError(f"model mix lists a model twice: {', '.join(models)}")
    if weights is None:
        return popularity.probabilities(len(models))
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(models),):
        raise TraceError(f"model mix: {len(w)} weights for {len(models)} models")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise TraceError(f"model mix: weights must be positive numbers, got {list(weights)}")
    return w / w.sum()


def assign_models(n_requests: int, models: Sequence[str], popularity: Popularity, rng: np.random.Generator,
                  weights: Sequence[float] | None = None) -> np.ndarray:
    """Model index (into ``models``) of each of ``n_requests`` requests, drawn independently.

    P(model i) ∝ 1/(i+1)^S for ``popularity`` zipf:S over the mix order, or ∝
    ``weights[i]`` when weights are given (they override the popularity).
    Draws ``n_requests`` uniforms from ``rng``, so the same seed gives the same
    assignment.
    """
    if n_requests < 0:
        raise TraceError(f"n_requests must be >= 0, got {n_requests}")
    p = _probabilities(models, popularity, weights)
    # Inverse CDF over one batch of uniforms: the draw for request k does not depend on n_requests.
    cdf = np.cumsum(p)
    cdf[-1] = 1.0
    return np.searchsorted(cdf, rng.random(n_requests), side="right").astype(np.int64)


def build_requests(trace: Trace, models: Sequence[str], popularity: Popularity, rng: np.random.Generator,
                   rate_scale: float = 1.0, duration_s: float | None = None,
                   weights: Sequence[float] | None = None) -> list[Request]:
    """The requests of one simulation run, ids 0..n-1 in arrival order.

    ``rate_scale`` multiplies the arrival rate (arrivals are divided by it: 2.0
    replays the trace twice as fast); ``duration_s`` then keeps arrivals
    before that time. Where the trace has a model column it is used and every
    name must be one of ``models``; otherwise models are drawn with
    ``assign_models`` for the whole trace before the duration cut, so a
    shorter run is a prefix of a longer one with the same seed, and
    ``rate_scale`` does not change which request goes to which model.
    """
    if not math.isfinite(rate_scale) or rate_scale <= 0:
        raise TraceError(f"rate_scale must be a positive number, got {rate_scale!r}")
    if duration_s is not None and not (math.isfinite(duration_s) and duration_s > 0):
        raise TraceError(f"duration_s must be a positive number of seconds, got {duration_s!r}")
    arrival_s = trace.arrival_s / rate_scale
    n = len(trace) if duration_s is None else int(np.searchsorted(arrival_s, duration_s, side="left"))
    if trace.models is not None:
        known = set(models)
        for i, name in enumerate(trace.models):
            if name not in known:
                raise TraceError(f"{trace.where(i)}: unknown model {name!r} (known: {', '.join(models)})")
        names = list(trace.models[:n])
    else:
        index = assign_models(len(trace), models, popularity, rng, weights)
        names = [models[i] for i in index[:n].tolist()]
    arrivals = arrival_s[:n].tolist()
    prompts = trace.prompt_tokens[:n].tolist()
    outputs = trace.output_tokens[:n].tolist()
    return [Request(id=i, arrival_s=arrivals[i], model=names[i], prompt_tokens=prompts[i], output_tokens=outputs[i])
            for i in range(n)]
