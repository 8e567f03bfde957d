"""``festina profiles calibrate``: fit the analytical model to public measurements, write the tables.

Three public datasets, shipped under ``profiles/data/`` with their licenses:

- ML.ENERGY leaderboard v2 (vLLM, default clocks): energy per request, mean
  time per output token (TPOT) and batch size for many models on H100 80GB
  and A100-SXM4-40GB. Each row is predicted as continuous batching: per
  decode step of ``B`` sequences, ``B / output_tokens`` new prompts are
  prefilled, so TPOT = decode(B) + prefill(B / out) and energy per output
  token = tp * (decode energy + prefill energy) / B.
- SplitwiseSim's perf model (DGX-A100/H100 measurements of Llama-2-70B):
  prefill time (TTFT) and time per token (TBT) versus batch and prompt size.
- Perseus (SOSP'24): time and energy of forward passes of transformer
  pipeline stages versus SM clock on A100 and A40. Its forward passes are
  compute-bound like prefill; they fix the clock exponents (``alpha``, the
  share of compute time that scales with 1/clock, and the DVFS voltage
  curve: a floor voltage below a knee clock, rising linearly above it, with
  dynamic power ~ clock x voltage^2), which the other datasets (all at
  default clocks) cannot see.

Fitting is per chip family (H100; A100 40/80GB share one chip and one set of
parameters) with ``scipy.optimize.least_squares`` on log ratios of predicted
to measured values, every dataset weighted equally. Eight parameters per
family are shared by all models, so each model's profile follows from its
architecture; a leave-one-model-out refit reports how well the model
predicts models it has not seen. The report (``CALIBRATION.md``) gives the
median and worst relative error per dataset and metric.
"""

from __future__ import annotations

import csv
import datetime as _dt
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from festina_hpc import __version__
from festina_hpc.errors import ProfileError, UnknownProfileError
from festina_hpc.profiles import physics
from festina_hpc.profiles.physics import PhysicsParams
from festina_hpc.profiles.specs import Catalog, GpuSpec, ModelSpec
from festina_hpc.profiles.store import table_path
from festina_hpc.profiles.table import PHASES, ProfileTable

# GPU types that share a chip, and so fitted parameters.
FAMILY = {"h100-sxm-80gb": "h100", "a100-sxm-80gb": "a100", "a100-sxm-40gb": "a100"}
# Perseus data per family: A100 for both (no public H100 clock sweep; documented).
PERSEUS_GPU = {"a100": ("a100_sxm", 1410), "a40": ("a40", 1740)}
# ML.ENERGY v2 does not publish prompt lengths; its chat/code prompts are short
# conversation turns and code snippets. Prefill is a small share of each
# request's energy at these lengths, so the fit is insensitive to this figure.
MLENERGY_PROMPT_TOKENS = 256

# The table grid (SM clocks come from gpus.toml).
TABLE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TABLE_CONTEXTS = (128, 256, 512, 1024, 2048, 4096, 8192)
TABLE_SM_PCTS = (10, 20, 30, 40, 50, 60, 70, 80, 90, 100)

FIT_PARAMS = ("eff_compute", "eff_memory", "step_overhead_s", "layer_overhead_s", "seq_overhead_s",
              "power_compute_w", "power_memory_w", "power_overhead_w")


@dataclass
class Group:
    """Observations that share (dataset, GPU, model, tp): predicted with one vectorised call."""

    dataset: str
    gpu: GpuSpec
    model: ModelSpec
    tp: int
    batch: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    measured: dict[str, np.ndarray]  # metric -> values

    @property
    def family(self) -> str:
        return FAMILY[self.gpu.name]

    def predict(self, params: PhysicsParams) -> dict[str, np.ndarray]:
        if self.dataset == "mlenergy-v2":
            decode_ctx = self.prompt_tokens + self.output_tokens / 2.0
            t_dec, p_dec = physics.step(self.gpu, self.model, self.tp, params, "decode", self.batch, decode_ctx,
                                        100.0, self.gpu.max_clock_mhz)
            new_prompts = self.batch / self.output_tokens
            t_pre, p_pre = physics.step(self.gpu, self.model, self.tp, params, "prefill", new_prompts,
                                        self.prompt_tokens, 100.0, self.gpu.max_clock_mhz)
            energy = self.tp * (t_dec * p_dec + t_pre * p_pre) / self.batch
            return {"energy_per_token_j": energy, "tbt_s": t_dec + t_pre}
        t_pre, _ = physics.step(self.gpu, self.model, self.tp, params, "prefill", self.batch, self.prompt_tokens,
                                100.0, self.gpu.max_clock_mhz)
        t_dec, _ = physics.step(self.gpu, self.model, self.tp, params, "decode", self.batch,
                                self.prompt_tokens + self.output_tokens / 2.0, 100.0, self.gpu.max_clock_mhz)
        return {"ttft_s": t_pre, "tbt_s": t_dec}


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read calibration data: {exc.strerror}") from None


def _resolve(catalog: Catalog, gpu_name: str, model_name: str) -> tuple[GpuSpec, ModelSpec] | None:
    try:
        return catalog.gpu(gpu_name), catalog.model(model_name)
    except UnknownProfileError:
        return None  # a model or GPU we do not ship: its rows are not used


def _groups(rows: Iterable[tuple[str, GpuSpec, ModelSpec, int, float, float, float, dict[str, float]]]
            ) -> list[Group]:
    collected: dict[tuple[str, str, str, int], list[Any]] = defaultdict(list)
    specs: dict[tuple[str, str, str, int], tuple[GpuSpec, ModelSpec]] = {}
    for dataset, gpu, model, tp, batch, prompt, out, measured in rows:
        key = (dataset, gpu.name, model.name, tp)
        collected[key].append((batch, prompt, out, measured))
        specs[key] = (gpu, model)
    groups = []
    for key, items in sorted(collected.items()):
        gpu, model = specs[key]
        metrics = items[0][3].keys()
        groups.append(Group(key[0], gpu, model, key[3],
                            np.array([i[0] for i in items]), np.array([i[1] for i in items]),
                            np.array([i[2] for i in items]),
                            {m: np.array([i[3][m] for i in items]) for m in metrics}))
    return groups


def load_mlenergy(data_dir: Path, catalog: Catalog) -> list[Group]:
    path = data_dir / "mlenergy_leaderboard_v2" / "DERIVED_llm_configs_flat.csv"
    rows = []
    for row in _read_csv(path):
        specs = _resolve(catalog, row["GPU"], row["Model"])
        if specs is None or specs[0].name not in FAMILY:
            continue
        out = float(row["Avg Output Tokens"])
        rows.append(("mlenergy-v2", *specs, int(row["TP"]), float(row["Avg BS (reqs)"]),
                     float(MLENERGY_PROMPT_TOKENS), out,
                     {"energy_per_token_j": float(row["Energy/req (J)"]) / out, "tbt_s": float(row["Avg TPOT (s)"])}))
    return _groups(rows)


def load_splitwise(data_dir: Path, catalog: Catalog) -> list[Group]:
    """Median of the repeats of each configuration; power-capped H100 rows are left out."""
    path = data_dir / "splitwise_sim" / "perf_model.csv"
    repeats: dict[tuple[str, str, int, int, int, int], list[tuple[float, float]]] = defaultdict(list)
    for row in _read_csv(path):
        key = (row["hardware"], row["model"], int(row["tensor_parallel"]), int(row["batch_size"]),
               int(row["prompt_size"]), int(row["token_size"]))
        repeats[key].append((float(row["prompt_time"]) / 1000.0, float(row["token_time"]) / 1000.0))
    rows = []
    for (hardware, model, tp, batch, prompt, out), values in repeats.items():
        specs = _resolve(catalog, hardware, model)
        if specs is None or specs[0].name not in FAMILY:
            continue
        ttft, tbt = np.median(np.array(values), axis=0)
        rows.append(("splitwise-sim", *specs, tp, float(batch), float(prompt), float(out),
                     {"ttft_s": float(ttft), "tbt_s": float(tbt)}))
    return _groups(rows)


@dataclass(frozen=True)
class ClockFit:
    """Perseus fit for one GPU: shared clock exponents and the resulting errors."""

    gpu: str
    clock_time_frac: float
    voltage_floor: float
    voltage_knee_frac: float
    errors: dict[str, tuple[int, float, float]]  # metric -> (n, median, worst) relative error


def fit_perseus(data_dir: Path, gpu_key: str, max_clock_mhz: int) -> ClockFit:
    """Fit T(f) = T0 (alpha/f + 1 - alpha), P(f) = a + b f V(f)^2 per forward stage; alpha and V(f) shared."""
    folder = data_dir / "perseus_sosp24"
    stages: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for path in sorted(folder.glob(f"*+{gpu_key}_bf16.csv")):
        by_stage: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
        for row in _read_csv(path):
            if row["instruction"] == "forward":
                by_stage[row["stage"]].append((float(row["frequency"]), float(row["time"]), float(row["energy"])))
        for points in by_stage.values():
            arr = np.array(sorted(points))
            stages.append((arr[:, 0] / max_clock_mhz, arr[:, 1], arr[:, 2]))
    if not stages:
        raise ProfileError(f"{folder}: no Perseus forward-stage rows for {gpu_key}")

    def unpack(x: np.ndarray) -> tuple[float, float, float, np.ndarray]:
        return x[0], x[1], x[2], x[3:].reshape(len(stages), 3)

    def model(x: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        alpha, floor, knee, per_stage = unpack(x)
        out = []
        for (f, _, _), (t0, a, b) in zip(stages, per_stage):
            t = t0 * (alpha / f + 1 - alpha)
            out.append((t, t * (a + b * physics.clock_power_factor(f, floor, knee))))
        return out

    def residuals(x: np.ndarray) -> np.ndarray:
        res = [np.log(np.concatenate([t / s[1], e / s[2]])) for (t, e), s in zip(model(x), stages)]
        return np.concatenate(res)

    x0 = [0.8, 0.8, 0.7]
    for _, t, e in stages:
        p = e[-1] / t[-1]
        x0 += [t[-1], 0.4 * p, 0.6 * p]
    lower = [0.0, 0.3, 0.3] + [0.0] * (3 * len(stages))
    upper = [1.0, 1.0, 0.99] + [np.inf] * (3 * len(stages))
    fit = least_squares(residuals, x0, bounds=(lower, upper))
    alpha, floor, knee, _ = unpack(fit.x)
    predicted = model(fit.x)
    time_err = np.concatenate([np.abs(t / s[1] - 1) for (t, _), s in zip(predicted, stages)])
    energy_err = np.concatenate([np.abs(e / s[2] - 1) for (_, e), s in zip(predicted, stages)])
    return ClockFit(gpu_key, float(alpha), float(floor), float(knee),
                    {"time_s": _summary(time_err), "energy_j": _summary(energy_err)})


def _summary(rel_err: np.ndarray) -> tuple[int, float, float]:
    return len(rel_err), float(np.median(rel_err)), float(np.max(rel_err))


def _initial(gpu: GpuSpec) -> PhysicsParams:
    return PhysicsParams(eff_compute=0.5, eff_memory=0.7, step_overhead_s=0.005, layer_overhead_s=1e-4,
                         seq_overhead_s=2e-4,
                         power_compute_w=0.5 * gpu.tdp_w, power_memory_w=0.2 * gpu.tdp_w,
                         power_overhead_w=0.2 * gpu.tdp_w, voltage_floor=0.8, voltage_knee_frac=0.7,
                         clock_time_frac=0.8)


def _bounds(gpu: GpuSpec) -> tuple[list[float], list[float]]:
    lower = [0.05, 0.2, 1e-4, 0.0, 0.0, 0.0, 0.0, 0.0]
    upper = [0.95, 0.95, 0.05, 1e-3, 2e-3, gpu.tdp_w, gpu.tdp_w, gpu.tdp_w]
    return lower, upper


def fit_family(groups: Sequence[Group], clock: ClockFit) -> PhysicsParams:
    """Least squares on log(predicted/measured), each (dataset, metric) weighted equally."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for g in groups:
        for metric, values in g.measured.items():
            counts[(g.dataset, metric)] += len(values)
    fixed = {"voltage_floor": clock.voltage_floor, "voltage_knee_frac": clock.voltage_knee_frac,
             "clock_time_frac": clock.clock_time_frac}
    reference_gpu = max((g.gpu for g in groups), key=lambda gpu: gpu.memory_gib)

    def params_of(x: np.ndarray) -> PhysicsParams:
        return PhysicsParams(**dict(zip(FIT_PARAMS, (float(v) for v in x))), **fixed)

    def residuals(x: np.ndarray) -> np.ndarray:
        params = params_of(x)
        parts = []
        for g in groups:
            predicted = g.predict(params)
            for metric, measured in g.measured.items():
                weight = 1.0 / np.sqrt(counts[(g.dataset, metric)])
                parts.append(weight * np.log(predicted[metric] / measured))
        return np.concatenate(parts)

    start = _initial(reference_gpu)
    x0 = [getattr(start, name) for name in FIT_PARAMS]
    fit = least_squares(residuals, x0, bounds=_bounds(reference_gpu), x_scale="jac")
    return params_of(fit.x)


@dataclass(frozen=True)
class ErrorRow:
    dataset: str
    gpu: str
    metric: str
    n: int
    median_rel_err: float
    worst_rel_err: float
    held_out_median_rel_err: float | None = None  # leave-one-model-out


def error_rows(groups: Sequence[Group], params_by_family: dict[str, PhysicsParams],
               held_out: dict[tuple[str, str, str], np.ndarray] | None = None) -> list[ErrorRow]:
    errors: dict[tuple[str, str, str], list[np.ndarray]] = defaultdict(list)
    for g in groups:
        predicted = g.predict(params_by_family[g.family])
        for metric, measured in g.measured.items():
            errors[(g.dataset, g.gpu.name, metric)].append(np.abs(predicted[metric] / measured - 1))
    rows = []
    for (dataset, gpu, metric), parts in sorted(errors.items()):
        err = np.concatenate(parts)
        held = held_out.get((dataset, gpu, metric)) if held_out else None
        rows.append(ErrorRow(dataset, gpu, metric, len(err), float(np.median(err)), float(np.max(err)),
                             None if held is None else float(np.median(held))))
    return rows


def leave_one_model_out(groups: Sequence[Group], clock: ClockFit) -> dict[tuple[str, str, str], np.ndarray]:
    """Refit without each model in turn and collect the errors on the left-out model."""
    errors: dict[tuple[str, str, str], list[np.ndarray]] = defaultdict(list)
    for name in sorted({g.model.name for g in groups}):
        train = [g for g in groups if g.model.name != name]
        test = [g for g in groups if g.model.name == name]
        if not train or not {g.dataset for g in test} <= {g.dataset for g in train}:
            continue  # the left-out model is a dataset's only model: nothing to hold out against
        params = fit_family(train, clock)
        for g in test:
            predicted = g.predict(params)
            for metric, measured in g.measured.items():
                errors[(g.dataset, g.gpu.name, metric)].append(np.abs(predicted[metric] / measured - 1))
    return {k: np.concatenate(v) for k, v in errors.items()}


def build_table(gpu: GpuSpec, model: ModelSpec, params: PhysicsParams, notes: Sequence[str]) -> ProfileTable:
    tp = model.tp_on(gpu.name)
    clocks = sorted(gpu.table_clocks_mhz)
    b = np.array(TABLE_BATCHES, dtype=float)[:, None, None, None]
    c = np.array(TABLE_CONTEXTS, dtype=float)[None, :, None, None]
    s = np.array(TABLE_SM_PCTS, dtype=float)[None, None, :, None]
    f = np.array(clocks, dtype=float)[None, None, None, :]
    shape = (len(TABLE_BATCHES), len(TABLE_CONTEXTS), len(TABLE_SM_PCTS), len(clocks))
    latency, power = [], []
    for phase in PHASES:
        lat, pwr = physics.step(gpu, model, tp, params, phase, b, c, s, f)
        latency.append(np.broadcast_to(lat, shape))
        power.append(np.broadcast_to(pwr, shape))
    axes = [TABLE_BATCHES, TABLE_CONTEXTS, TABLE_SM_PCTS, clocks]
    return ProfileTable(gpu.name, model.name, tp, axes, _significant(np.stack(latency)),
                        _significant(np.stack(power)), notes)


def _significant(values: np.ndarray, digits: int = 6) -> np.ndarray:
    """Round to ``digits`` significant digits: the model is not that exact, and the files stay small."""
    return np.array([float(f"{v:.{digits}g}") for v in values.ravel()]).reshape(values.shape)


@dataclass
class CalibrationReport:
    clock_fits: dict[str, ClockFit]
    params: dict[str, PhysicsParams]  # per GPU type
    errors: list[ErrorRow]
    per_model: list[ErrorRow]  # ML.ENERGY energy per token, per (GPU, model)
    tables: list[str]
    sanity: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "clock_fits": {k: {"clock_time_frac": v.clock_time_frac, "voltage_floor": v.voltage_floor,
                               "voltage_knee_frac": v.voltage_knee_frac,
                               "errors": {m: dict(zip(("n", "median_rel_err", "worst_rel_err"), e))
                                          for m, e in v.errors.items()}}
                           for k, v in self.clock_fits.items()},
            "params": {k: v.as_dict() for k, v in self.params.items()},
            "errors": [vars(r) for r in self.errors],
            "per_model": [vars(r) for r in self.per_model],
            "tables": self.tables,
            "sanity": self.sanity,
        }

    def markdown_summary(self) -> str:
        lines = ["| dataset | gpu | metric | n | median err | worst err | held-out median |",
                 "|---|---|---|---:|---:|---:|---:|"]
        for r in self.errors:
            held = "-" if r.held_out_median_rel_err is None else f"{r.held_out_median_rel_err:.1%}"
            lines.append(f"| {r.dataset} | {r.gpu} | {r.metric} | {r.n} | {r.median_rel_err:.1%} | "
                         f"{r.worst_rel_err:.1%} | {held} |")
        for gpu, fit in self.clock_fits.items():
            for metric, (n, med, worst) in fit.errors.items():
                lines.append(f"| perseus-sosp24 | {gpu} | {metric} vs clock | {n} | {med:.1%} | {worst:.1%} | - |")
        return "\n".join(lines)


def sanity_checks(catalog: Catalog, params: dict[str, PhysicsParams]) -> list[dict[str, Any]]:
    """Physical facts the tables must show, per GPU type, for the report."""
    rows = []
    for gpu_name, p in params.items():
        gpu = catalog.gpu(gpu_name)
        model = catalog.model("llama-3.1-8b")
        tp = model.tp_on(gpu_name)
        f70 = gpu.supported_clocks_mhz[min(range(len(gpu.supported_clocks_mhz)),
                                           key=lambda i: abs(gpu.supported_clocks_mhz[i] - 0.7 * gpu.max_clock_mhz))]
        t_hi, p_hi = physics.step(gpu, model, tp, p, "decode", 64, 1024, 100, gpu.max_clock_mhz)
        t_lo, p_lo = physics.step(gpu, model, tp, p, "decode", 64, 1024, 100, f70)
        pre_hi, _ = physics.step(gpu, model, tp, p, "prefill", 1, 2048, 100, gpu.max_clock_mhz)
        pre_half, _ = physics.step(gpu, model, tp, p, "prefill", 1, 2048, 50, gpu.max_clock_mhz)
        rows.append({"gpu": gpu_name, "model": model.name, "clock_70pct_mhz": f70,
                     "decode_latency_change": float(t_lo / t_hi - 1), "decode_power_change": float(p_lo / p_hi - 1),
                     "prefill_latency_ratio_sm50": float(pre_half / pre_hi)})
    return rows


def calibrate(profiles_dir: Path, data_dir: Path, out_dir: Path,
              progress: Callable[[str], None] = lambda _: None) -> CalibrationReport:
    """Fit, write ``calibration.toml``, every table and ``CALIBRATION.md``; return the report."""
    catalog = Catalog.load(profiles_dir)
    groups = load_mlenergy(data_dir, catalog) + load_splitwise(data_dir, catalog)
    clock_fits = {key: fit_perseus(data_dir, *PERSEUS_GPU[key]) for key in PERSEUS_GPU}
    family_params: dict[str, PhysicsParams] = {}
    held_out: dict[tuple[str, str, str], np.ndarray] = {}
    for family in sorted(set(FAMILY.values())):
        members = [g for g in groups if g.family == family]
        # H100 has no public clock sweep: it takes the A100's clock exponents (see CALIBRATION.md).
        clock = clock_fits["a100"]
        progress(f"fitting {family} on {sum(len(g.batch) for g in members)} configurations")
        family_params[family] = fit_family(members, clock)
        held_out.update(leave_one_model_out(members, clock))
    params = {gpu: family_params[family] for gpu, family in FAMILY.items() if gpu in catalog.gpus}
    errors = error_rows(groups, family_params, held_out)
    per_model = []
    for g in groups:
        if g.dataset == "mlenergy-v2":
            per_model += [ErrorRow(g.dataset, g.gpu.name, f"{g.model.name} tp{g.tp}", r.n, r.median_rel_err,
                                   r.worst_rel_err) for r in error_rows([g], family_params)
                          if r.metric == "energy_per_token_j"]

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "calibration.toml").write_text(physics.params_table(params), encoding="utf-8")
    tables = []
    for gpu_name in sorted(params):
        gpu = catalog.gpu(gpu_name)
        for model in catalog.models.values():
            notes = [f"made by: festina profiles calibrate (festina-hpc {__version__})",
                     f"model: analytical roofline + power model (festina_hpc/profiles/physics.py) with the "
                     f"parameters fitted for {gpu_name} in calibration.toml",
                     "fitted to: ML.ENERGY leaderboard v2, SplitwiseSim perf_model, Perseus SOSP'24 "
                     "(profiles/data, see profiles/CALIBRATION.md for errors)",
                     f"tp={model.tp_on(gpu_name)}: latency_s is per step; power_w is per GPU"]
            table = build_table(gpu, model, params[gpu_name], notes)
            path = table_path(out_dir, gpu_name, model.name)
            table.to_csv(path)
            tables.append(str(path.relative_to(out_dir)))
    report = CalibrationReport(clock_fits, params, errors, per_model, tables, sanity_checks(catalog, params))
    (out_dir / "CALIBRATION.md").write_text(render_markdown(report), encoding="utf-8")
    return report


def render_markdown(report: CalibrationReport) -> str:
    from festina_hpc.profiles.calibration_doc import render

    return render(report, _dt.date.today().isoformat(), MLENERGY_PROMPT_TOKENS)
