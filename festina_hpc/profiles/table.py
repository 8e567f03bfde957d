"""One profile table: latency and board power of a model on a GPU type, O(1) lookups.

A table is a full grid over five axes: phase (prefill, decode), batch size,
context tokens, SM share (MPS active-thread percentage) and SM clock. For
prefill, ``latency_s`` is the time to prefill ``batch`` prompts of
``context_tokens`` each; for decode it is the time of one decode step (the
time between tokens) for ``batch`` sequences each holding ``context_tokens``
of KV cache. ``power_w`` is the board power of each GPU of the instance while
the step runs with this instance alone on the GPU.

Lookups between grid points are multilinear: linear in batch, context, SM
share and clock (latency is close to affine in batch and bilinear in batch x
context for prefill, so linear interpolation is exact on those terms). The
grid is small and pre-bucketed into numpy arrays, so a lookup is a handful of
bisections over axes of ~10 points plus 16 corner reads: constant time.
Outside the grid a lookup raises ``OutOfProfileRange`` naming the field, or,
with ``clamp=True``, answers at the nearest edge and says so (``clamped``).

On disk a table is a CSV file with ``#`` header lines: the first is
``# festina-profile gpu=<gpu> model=<model> tp=<n>``, the rest say how the
table was made. Columns: ``phase,batch,context_tokens,sm_pct,clock_mhz,
latency_s,power_w``.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from festina_hpc.errors import OutOfProfileRange, ProfileError

PHASES = ("prefill", "decode")
AXES = ("batch", "context_tokens", "sm_pct", "clock_mhz")
COLUMNS = ("phase", *AXES, "latency_s", "power_w")
HEADER_TAG = "festina-profile"

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Lookup:
    """Latency and power at one point of a table."""

    latency_s: float
    power_w: float
    clamped: bool  # True when a coordinate was outside the grid and moved to its edge


@dataclass(frozen=True)
class LookupMany:
    """Vectorised lookup results, one element per query."""

    latency_s: FloatArray
    power_w: FloatArray
    clamped: npt.NDArray[np.bool_]


class ProfileTable:
    """A validated table for one (GPU type, model) pair."""

    def __init__(self, gpu: str, model: str, tp: int, axes: Sequence[Sequence[float]],
                 latency_s: FloatArray, power_w: FloatArray, notes: Sequence[str] = ()):
        """``latency_s``/``power_w`` have shape (2 phases, *axis lengths); axes ascend."""
        self.gpu, self.model, self.tp = gpu, model, tp
        self.axes: tuple[tuple[float, ...], ...] = tuple(tuple(float(v) for v in a) for a in axes)
        self.latency_s = np.ascontiguousarray(latency_s, dtype=np.float64)
        self.power_w = np.ascontiguousarray(power_w, dtype=np.float64)
        self.notes = tuple(notes)
        expected = (len(PHASES), *(len(a) for a in self.axes))
        if self.latency_s.shape != expected or self.power_w.shape != expected:
            raise ProfileError(f"table {gpu}/{model}: arrays have shape {self.latency_s.shape}, expected {expected}")
        self._np_axes = [np.asarray(a) for a in self.axes]
        # Flat Python lists and strides make the scalar path avoid numpy's per-call overhead.
        self._flat_latency = self.latency_s.ravel().tolist()
        self._flat_power = self.power_w.ravel().tolist()
        sizes = [len(a) for a in self.axes]
        self._strides = [int(np.prod(sizes[k + 1:])) for k in range(4)]
        self._phase_stride = int(np.prod(sizes))
        # Offset of a cell's upper neighbour per axis; 0 on a single-point axis (for example a
        # table measured at one clock), where the interpolation weight is 0 anyway.
        self._upper = [stride if size > 1 else 0 for stride, size in zip(self._strides, sizes)]
        # The 8 (batch, context, SM) corners of a cell: flat offset and which neighbour on each axis.
        self._corners = [(kb * self._upper[0] + kc * self._upper[1] + ks * self._upper[2], kb, kc, ks)
                         for kb in (0, 1) for kc in (0, 1) for ks in (0, 1)]

    # -- lookups -----------------------------------------------------------------------------

    def bounds(self, field: str) -> tuple[float, float]:
        axis = self.axes[AXES.index(field)]
        return axis[0], axis[-1]

    def _outside(self, field: str, value: float, clamp: bool) -> float:
        """A value outside its axis: the clamped value, or ``OutOfProfileRange``."""
        axis = self.axes[AXES.index(field)]
        if not math.isfinite(value):
            raise OutOfProfileRange(f"{field} = {value!r} is not a finite number")
        if clamp:
            return min(max(value, axis[0]), axis[-1])
        raise OutOfProfileRange(
            f"{field} = {value:g} is outside the profile of {self.model} on {self.gpu} "
            f"({axis[0]:g}..{axis[-1]:g}); use clamp to answer at the edge")

    def lookup(self, phase: str, batch: float, context_tokens: float, sm_pct: float, clock_mhz: float,
               clamp: bool = False) -> Lookup:
        """Latency and power at one point (multilinear between grid points).

        Written for speed in plain Python: one bisection per axis, then the 8 (batch, context,
        SM) corners each interpolated along the clock axis.
        """
        if phase == "decode":
            index = self._phase_stride
        elif phase == "prefill":
            index = 0
        else:
            raise OutOfProfileRange(f"phase = {phase!r} is not one of {', '.join(PHASES)}")
        clamped = False
        weights = []
        for field, axis, stride, value in zip(AXES, self.axes, self._strides,
                                              (batch, context_tokens, sm_pct, clock_mhz)):
            if not axis[0] <= value <= axis[-1]:  # also catches NaN
                value = self._outside(field, float(value), clamp)
                clamped = True
            if len(axis) == 1:
                weights.append(0.0)
                continue
            i = bisect_right(axis, value) - 1
            if i >= len(axis) - 1:
                i = len(axis) - 2
            index += i * stride
            weights.append((value - axis[i]) / (axis[i + 1] - axis[i]))
        w_batch, w_context, w_sm, w_clock = weights
        wb, wc, ws = (1.0 - w_batch, w_batch), (1.0 - w_context, w_context), (1.0 - w_sm, w_sm)
        lat, pwr = self._flat_latency, self._flat_power
        step = self._upper[3]
        latency_s = power_w = 0.0
        for offset, kb, kc, ks in self._corners:
            w = wb[kb] * wc[kc] * ws[ks]
            j = index + offset
            l0, p0 = lat[j], pwr[j]
            latency_s += w * (l0 + w_clock * (lat[j + step] - l0))
            power_w += w * (p0 + w_clock * (pwr[j + step] - p0))
        return Lookup(latency_s, power_w, clamped)

    def lookup_many(self, phase: str, batch: npt.ArrayLike, context_tokens: npt.ArrayLike,
                    sm_pct: npt.ArrayLike, clock_mhz: npt.ArrayLike, clamp: bool = False) -> LookupMany:
        """Vectorised lookups; arguments broadcast against each other."""
        if phase not in PHASES:
            raise OutOfProfileRange(f"phase = {phase!r} is not one of {', '.join(PHASES)}")
        values = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in
                                       (batch, context_tokens, sm_pct, clock_mhz)))
        clamped = np.zeros(values[0].shape, dtype=bool)
        idx: list[npt.NDArray[np.intp]] = []
        wts: list[FloatArray] = []
        for field, axis, v in zip(AXES, self._np_axes, values):
            if not np.all(np.isfinite(v)):
                raise OutOfProfileRange(f"{field}: not every value is a finite number")
            outside = (v < axis[0]) | (v > axis[-1])
            if outside.any():
                if not clamp:
                    bad = float(v[outside].flat[0])
                    raise OutOfProfileRange(
                        f"{field} = {bad:g} is outside the profile of {self.model} on {self.gpu} "
                        f"({axis[0]:g}..{axis[-1]:g}); use clamp to answer at the edge")
                clamped |= outside
                v = np.clip(v, axis[0], axis[-1])
            if len(axis) == 1:
                idx.append(np.zeros(v.shape, dtype=np.intp))
                wts.append(np.zeros(v.shape))
                continue
            i = np.clip(np.searchsorted(axis, v, side="right") - 1, 0, len(axis) - 2)
            idx.append(i)
            wts.append((v - axis[i]) / (axis[i + 1] - axis[i]))
        p = PHASES.index(phase)
        lat = np.zeros(values[0].shape)
        pwr = np.zeros(values[0].shape)
        for corner in range(16):
            bits = [(corner >> k) & 1 for k in range(4)]
            w = np.ones(values[0].shape)
            for k in range(4):
                w = w * (wts[k] if bits[k] else 1.0 - wts[k])
            # A single-point axis has no upper neighbour: its weight there is 0, read the point itself.
            where = tuple(idx[k] + bits[k] * (len(self.axes[k]) > 1) for k in range(4))
            lat += w * self.latency_s[(p, *where)]
            pwr += w * self.power_w[(p, *where)]
        return LookupMany(lat, pwr, clamped)

    # -- files -------------------------------------------------------------------------------

    def to_csv(self, path: Path) -> None:
        """Write the table in the shipped format (header, then one row per grid point)."""
        out = io.StringIO()
        out.write(f"# {HEADER_TAG} gpu={self.gpu} model={self.model} tp={self.tp}\n")
        for note in self.notes:
            out.write(f"# {note}\n")
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(COLUMNS)
        for p, phase in enumerate(PHASES):
            for index in np.ndindex(*self.latency_s.shape[1:]):
                point = [_fmt(self.axes[k][index[k]]) for k in range(4)]
                writer.writerow([phase, *point, _fmt(self.latency_s[(p, *index)]),
                                 _fmt(self.power_w[(p, *index)])])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(out.getvalue(), encoding="utf-8")

    @classmethod
    def from_csv(cls, path: Path) -> ProfileTable:
        """Read and validate a table file; every problem names file, row and field."""
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ProfileError(f"{path}: cannot read profile: {exc.strerror}") from None
        return parse_table(text, str(path))


def _fmt(value: float) -> str:
    """Shortest text that reads back as exactly ``value``, so a table survives a round trip unchanged."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def _parse_header(lines: Iterable[str], source: str) -> tuple[dict[str, str], list[str]]:
    meta: dict[str, str] = {}
    notes: list[str] = []
    for n, line in enumerate(lines, start=1):
        body = line[1:].strip()
        if n == 1:
            tag, *pairs = body.split() or [""]
            if tag != HEADER_TAG:
                raise ProfileError(f"{source}: row 1: expected '# {HEADER_TAG} gpu=... model=... tp=...'")
            for pair in pairs:
                key, sep, value = pair.partition("=")
                if not sep:
                    raise ProfileError(f"{source}: row 1: malformed header field {pair!r}")
                meta[key] = value
        else:
            notes.append(body)
    for key in ("gpu", "model", "tp"):
        if key not in meta:
            raise ProfileError(f"{source}: row 1: header is missing field {key}")
    return meta, notes


def parse_table(text: str, source: str) -> ProfileTable:
    """Parse CSV text in the shipped format into a validated ``ProfileTable``."""
    lines = text.splitlines()
    n_header = 0
    while n_header < len(lines) and lines[n_header].startswith("#"):
        n_header += 1
    if n_header == 0:
        raise ProfileError(f"{source}: row 1: expected '# {HEADER_TAG} gpu=... model=... tp=...'")
    meta, notes = _parse_header(lines[:n_header], source)
    try:
        tp = int(meta["tp"])
    except ValueError:
        raise ProfileError(f"{source}: row 1: field tp = {meta['tp']!r} is not an integer") from None
    if tp < 1:
        raise ProfileError(f"{source}: row 1: field tp = {tp} must be at least 1")
    reader = csv.reader(lines[n_header:])
    header_row = n_header + 1
    columns = next(reader, None)
    if columns is None:
        raise ProfileError(f"{source}: row {header_row}: no column header")
    for name in COLUMNS:
        if name not in columns:
            raise ProfileError(f"{source}: row {header_row}: missing column {name}")
    col = {name: columns.index(name) for name in COLUMNS}

    phases: list[int] = []
    numbers: list[list[float]] = []
    row_numbers: list[int] = []
    for row_number, row in enumerate(reader, start=header_row + 1):
        if not row:
            continue
        if len(row) != len(columns):
            raise ProfileError(f"{source}: row {row_number}: expected {len(columns)} fields, got {len(row)}")
        phase = row[col["phase"]]
        if phase not in PHASES:
            raise ProfileError(f"{source}: row {row_number}: field phase = {phase!r} is not one of "
                               f"{', '.join(PHASES)}")
        phases.append(PHASES.index(phase))
        values: list[float] = []
        for name in COLUMNS[1:]:
            raw = row[col[name]]
            try:
                value = float(raw)
            except ValueError:
                raise ProfileError(f"{source}: row {row_number}: field {name} = {raw!r} is not a number") from None
            if not math.isfinite(value):
                raise ProfileError(f"{source}: row {row_number}: field {name} = {raw} is not finite")
            if name == "power_w" and value < 0:
                raise ProfileError(f"{source}: row {row_number}: field {name} = {raw} must not be negative")
            if name != "power_w" and value <= 0:
                raise ProfileError(f"{source}: row {row_number}: field {name} = {raw} must be positive")
            if name == "sm_pct" and value > 100:
                raise ProfileError(f"{source}: row {row_number}: field {name} = {raw} must be at most 100")
            values.append(value)
        numbers.append(values)
        row_numbers.append(row_number)
    if not numbers:
        raise ProfileError(f"{source}: no data rows")

    # Duplicates first, by row; then, with every row distinct, too few rows means a point is missing.
    first_row: dict[tuple[float, ...], int] = {}
    for row_number, phase_index, values in zip(row_numbers, phases, numbers):
        point = (phase_index, *values[:4])
        if point in first_row:
            raise ProfileError(f"{source}: row {row_number}: duplicate grid point (first at row {first_row[point]})")
        first_row[point] = row_number
    data = np.asarray(numbers)
    axes = [np.unique(data[:, k]) for k in range(4)]
    shape = (len(PHASES), *(len(a) for a in axes))
    if len(numbers) != math.prod(shape):
        # At most len(numbers) + 1 steps, however sparse the rows are.
        missing = next(pt for pt in itertools.product(range(len(PHASES)), *(a.tolist() for a in axes))
                       if pt not in first_row)
        where = " ".join(f"{name}={_fmt(v)}" for name, v in zip(AXES, missing[1:]))
        raise ProfileError(f"{source}: no row for grid point phase={PHASES[int(missing[0])]} {where} "
                           f"(the table must be a full grid over phase x {' x '.join(AXES)})")
    index = tuple([np.asarray(phases)] + [np.searchsorted(axes[k], data[:, k]) for k in range(4)])
    latency = np.empty(shape)
    power = np.empty(shape)
    latency[index] = data[:, 4]
    power[index] = data[:, 5]
    return ProfileTable(meta["gpu"], meta["model"], tp, [a.tolist() for a in axes], latency, power, notes)
