"""Renders ``profiles/CALIBRATION.md`` from a calibration report."""

from __future__ import annotations

from typing import TYPE_CHECKING

from festina_hpc.profiles import physics

if TYPE_CHECKING:
    from festina_hpc.profiles.calibrate import CalibrationReport


# Figures of the simulated cluster that are not GPU profiles ([cluster] in the config,
# festina_hpc/cluster/figures.py): kept here so that every physical figure's source is in one file.
CLUSTER_FIGURES = """## Cluster figures

Figures of the simulated cluster that no profile holds (`[cluster]` in the config,
`festina_hpc/cluster/figures.py`), with where each comes from.

- **Power saving** (`power_saving = "slurm"`, `suspend_time_s = 300`, `suspend_exc_nodes = 0`):
  Slurm's own mechanism (slurm.conf `SuspendTime`, `ResumeTimeout`, `SuspendExcNodes`;
  https://slurm.schedmd.com/power_save.html), applied to every policy alike: a node with no
  instance for `SuspendTime` is suspended, a job sent to a suspended node resumes it. 300 s is the
  `SuspendTime` of OpenHPC's example slurm.conf for an elastic cluster (PEARC'20 tutorial,
  `SuspendTime=300`, `ResumeTimeout=600`) and of other published examples; `"none"` keeps idle
  nodes on (the comparison without the platform's power saving).
- **Resume time** (`resume_time_s = 300`): from power-on to slurmd registered and the node
  serving: POST of a two-socket, eight-GPU server (memory training, the option ROMs of its NICs),
  OS boot, the NVIDIA driver and fabric manager. That takes several minutes on server-class GPU
  nodes, which is why sites raise Slurm's `ResumeTimeout` from its 60 s default
  (`DEFAULT_RESUME_TIMEOUT 60` in Slurm 25.11.7's src/common/read_config.h) to 300-600 s (OpenHPC's example: 600 s;
  github.com/jrwellshpc/slurm_power_saving: "increase the timeouts to 10 minutes"). A site
  measures it as the time from `scontrol update nodename=X state=power_up` to the node idle in
  `sinfo`. While it resumes a node draws its static power and its GPUs' idle power and serves
  nothing.
- **Standby power** (`standby_w = 30`): a powered-off server that stays plugged in keeps its
  baseboard management controller and standby rails on ("all core logic except for the service
  processor is shut down", Lenovo System x / IBM x3250 manuals; fans may keep running), and its
  power supplies have no-load losses (4-6 PSUs on an 8-GPU server). No vendor publishes the figure
  for an 8-GPU node; 30 W is an assumption (a BMC draws a few to about 10 W, the rest is standby
  rails and PSU losses). Measure it per site at the PDU outlets with the node powered off (a
  metered PDU reads it directly) and set `[cluster] standby_w`. A suspended node's GPUs draw
  nothing and its host-memory model cache is lost.
"""


# The simulator's hardware costs: fixed text (sources, not fits), kept when the file is rebuilt.
HARDWARE_COSTS: tuple[str, ...] = (
    '## Hardware costs in the simulator',
    '',
    'Costs of real hardware that the tables, measured one instance at a time, do not show; the',
    'simulator (`festina_hpc/sim/`) charges them. Each is a figure a site can re-measure.',
    '',
    '**Clock changes take time** (`[cluster] clock_change_s`, default 0.05 s). A locked SM clock asked',
    'for through NVML (`nvmlDeviceSetGpuLockedClocks`) takes effect after the call itself (10-20 ms)',
    'and the PLL and voltage ramp; Velicka, Vysocky and Riha (arXiv 2502.20075, "Methodology for GPU',
    'Frequency Switching Latency Measurement", with the LATEST tool) measure switching latencies of',
    'tens of milliseconds on A100 and GH200, depending mostly on the target clock. A step that starts',
    'before the change lands runs at the old clock; a second change asked for before the first lands',
    "replaces it; `clock_changes` in a result counts the changes carried out. Measure a site's figure",
    'with LATEST on its GPUs.',
    '',
    "**HBM bandwidth is shared by co-resident instances** (no new figure: the GPU's",
    '`memory_bandwidth_gbs` and the fitted `eff_memory`, `eff_compute`). The tables give an instance',
    "with at least 40% of the SMs the whole GPU's bandwidth, as if alone; under MPS co-residents'",
    "kernels run at once and contend for it. Each step's bytes (weights per GPU plus batch x context x",
    'KV bytes per token per GPU) over its latency alone, divided by the effective bandwidth, is its',
    'HBM load (0.23-0.44 for decode of the shipped models on H100: the fitted per-layer and',
    "per-sequence overheads are time the HBM idles). A step's memory time stretches by 1 + the sum of",
    "its co-residents' loads: exact when they stream all the time (two streams halve each other's",
    'bandwidth), first order in between, never below the saturated case (combined demand over the',
    'bandwidth), and its latency grows by smooth_max(t_compute, m t_memory) - smooth_max(t_compute,',
    't_memory), the roofline of `physics.py`. Two equal decoders on one H100 each slow by 5-19%; a',
    'prefill (compute-bound) by under 0.1%; an instance alone is unchanged. The stretch is fixed when',
    'a step starts; when an idle co-resident starts a step, decode runs in flight end at their next',
    'step boundary and start again at the new load. A stretched step keeps its dynamic energy (the',
    'same bytes and FLOPs at lower power): contention costs GPU idle and node static time and SLO,',
    'not extra dynamic energy. No public measurement of MPS co-located LLM decoders was found to fit',
    'this to; `festina profiles measure` on two co-resident servers would give it.',
    '',
    '**A GPU holding a loaded model idles above bare idle** (`gpus.toml` `idle_with_context_w`: H100',
    '96 W, A100 76 W). A CUDA context keeps the GPU in a higher DVFS state: Vadari (arXiv 2605.23918,',
    '"The Model Parking Tax", 18 days of telemetry on 14 H100s and controlled runs on H100, A100 and',
    'L40S) measures +26-50 W over bare idle on the HBM GPUs, independent of the memory allocated (under',
    '0.02 W/GB; a real Qwen2.5-7B within 0.5 W of empty tensors). The shipped figure is the low end,',
    '+26 W, on both. The simulator charges it to `gpu_idle_j` while a GPU holds a ready or draining',
    "instance and serves nothing (a step's profile power counts from the bare idle: the tables were",
    "fitted to power measured with a context held). `scripts/gpu-smoke` measures a site's figure",
    '(NVML power with no CUDA context, then with one held idle).',
)


# The simulator's share restarts and their load model (sim/simulator.py ``_restart``); kept here so a
# rebuild of CALIBRATION.md keeps the section.
SHARE_RESTARTS: tuple[str, ...] = (
    "## Share restarts (an MPS client's SM share is fixed at its start)",
    '',
    "An MPS client's active-thread percentage is fixed when its CUDA context is created. NVIDIA's MPS",
    'documentation (docs.nvidia.com/deploy/mps, "nvidia-cuda-mps-control" and "Environment',
    'Variables"): `set_default_active_thread_percentage` "will only affect the next server" where one is',
    "already spawned, `set_active_thread_percentage <PID>` sets the limit of a server's clients created",
    "afterwards, and `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE` in a client's environment is read when its",
    "context is created; changing it does not affect an existing client or its contexts (NVIDIA's answer",
    'on its developer forum, "Can I dynamically change CUDA_MPS_ACTIVE_THREAD_PERCENTAGE to a running',
    'MPS process?": "You cannot edit the percentage assigned to a process today"). So unless a site',
    'declares an engine that can (`[gpu] live_share_change = true`), the simulator carries out a share',
    'change as a share restart: a replacement instance of the model on the same GPUs at the new share',
    "(same memory fraction, batch cap and chunk) starts and loads from the node's host memory, where the",
    "model's weights are since it is loaded there: the host-cache load, `[cluster] fast_load_init_s`",
    "(2 s, a started engine's set-up) + weights per GPU / `host_cache_gbs` (20 GB/s), for",
    'llama-3.1-8b 2.8 s. Its dynamic power while loading (`load_dynamic_w`) goes to `share_restart_j`,',
    "and so does its GPU's idle power where the GPU does nothing else; `share_restarts` counts them.",
    'The old instance serves until the replacement is ready, which then takes its queue; where the GPU',
    'lacks the memory for a second copy, the old one drains first (its queue waits in the replacement,',
    'which loads once the memory is free: downtime). Until the old one is gone the pair holds the larger',
    'of the two shares. A site whose engine starts slower than 2 s (vLLM with CUDA graph capture takes',
    "tens of seconds) should set `fast_load_init_s` to its measured restart time less the weights' load.",
)


def _pct(value: float) -> str:
    return f"{value:.1%}"


def render(report: CalibrationReport, date: str, prompt_tokens: int) -> str:
    out = [
        "# Profile calibration",
        "",
        f"Generated by `festina profiles calibrate` on {date}; do not edit by hand. Rebuild with",
        "`festina profiles calibrate` (reads `profiles/data/`, rewrites `calibration.toml`, every",
        "`<gpu>/<model>.csv` and this file).",
        "",
        "## Method",
        "",
        "The tables are computed from one analytical model (`festina_hpc/profiles/physics.py`):",
        "roofline latency (prefill compute-bound, ~1/(clock x SM share); decode memory-bound, barely",
        "clock-sensitive) plus per-step and per-sequence serving overheads, and board power = idle +",
        "dynamic parts (compute ~ SM share x f V(f)^2, memory streaming, busy overhead ~ f V(f)^2),",
        "capped at TDP. Its parameters are fitted per chip family and shared by every model, so a",
        "model's table follows from its architecture (`models.toml`) and the GPU's facts",
        "(`gpus.toml`), not from its own data points.",
        "",
        "1. **Clock response** from Perseus (SOSP'24) forward passes on A100 and A40 (time and energy",
        "   versus SM clock): T(f) = T0 (alpha/f + 1 - alpha), P(f) = a + b f V(f)^2 per stage, where the",
        "   voltage V stays at a floor below a knee clock and rises linearly to the max clock (DVFS);",
        "   alpha, floor and knee are shared by all stages. The A100 values (relative to the max clock)",
        "   are used for both A100 and H100: no public H100 clock sweep exists in the data; a site",
        "   re-measures with `festina profiles measure`.",
        "2. **Everything else** by least squares on log(predicted/measured) against ML.ENERGY v2",
        "   (energy per output token and TPOT versus batch, default clocks) and SplitwiseSim (TTFT and",
        "   TBT of Llama-2-70B versus batch and prompt length), each (dataset, metric) weighted equally.",
        f"   ML.ENERGY rows are predicted as continuous batching with {prompt_tokens}-token prompts",
        "   (ML.ENERGY does not publish prompt lengths): per decode step of B sequences, B/out new",
        "   prompts are prefilled.",
        "3. **Held-out check**: each model is left out in turn, the family refitted without it, and",
        "   its rows predicted; the held-out median shows how the model does on models it has not seen.",
        "",
        "Fixed assumptions (not fitted): roofline overlap p-norm k = "
        f"{physics.SMOOTH_MAX_K:g}; a memory-bound kernel reaches full HBM bandwidth at "
        f"{physics.SM_SATURATION:.0%} of the SMs (MPS share); NCCL all-reduce latency "
        f"{physics.ALLREDUCE_LATENCY_S * 1e6:g} us per call, two per layer; FP16/BF16 weights and KV cache.",
        "The A100-SXM4-80GB table uses the A100 chip's parameters with the 80GB part's bandwidth",
        "(2039 GB/s) and memory; ML.ENERGY measured the 40GB part (1555 GB/s).",
        "",
        "## Errors against the measurements",
        "",
        "Relative error |predicted/measured - 1| per row of each dataset.",
        "",
        report.markdown_summary(),
        "",
        "SplitwiseSim's worst TTFT errors come from single rows that contradict their neighbours (for",
        "example Llama-2-70B TP2 batch 64 with 512-token prompts: 0.36 s measured against 2.4 s at",
        "batch 32); they are kept, not filtered.",
        "",
        "## ML.ENERGY energy per token, per model",
        "",
        "| gpu | model | n | median err | worst err |",
        "|---|---|---:|---:|---:|",
    ]
    for row in report.per_model:
        out.append(f"| {row.gpu} | {row.metric} | {row.n} | {_pct(row.median_rel_err)} | {_pct(row.worst_rel_err)} |")
    out += ["", "## Fitted parameters", "", "| parameter | " + " | ".join(report.params) + " |",
            "|---|" + "---:|" * len(report.params)]
    for name in physics.PARAM_NAMES:
        out.append(f"| {name} | " + " | ".join(f"{getattr(p, name):.4g}" for p in report.params.values()) + " |")
    out += ["", "Perseus clock fits (the A100 row is used):", "",
            "| gpu | alpha (clock_time_frac) | voltage_floor | voltage_knee_frac |", "|---|---:|---:|---:|"]
    for gpu, fit in report.clock_fits.items():
        out.append(f"| {gpu} | {fit.clock_time_frac:.3f} | {fit.voltage_floor:.3f} | {fit.voltage_knee_frac:.3f} |")
    out += ["", "## Physical sanity (Llama-3.1-8B, decode batch 64 at 1024 tokens; prefill 2048 tokens)", "",
            "| gpu | 70% clock (MHz) | decode latency change | decode power change | prefill latency x at 50% SMs |",
            "|---|---:|---:|---:|---:|"]
    for check in report.sanity:
        out.append(f"| {check['gpu']} | {check['clock_70pct_mhz']} | {check['decode_latency_change']:+.1%} | "
                   f"{check['decode_power_change']:+.1%} | {check['prefill_latency_ratio_sm50']:.2f} |")
    out += ["", CLUSTER_FIGURES.rstrip("\n"), "", *HARDWARE_COSTS, "", *SHARE_RESTARTS, "", "## Tables written", ""]
    out += [f"- `{t}`" for t in report.tables] + [""]
    return "\n".join(out)
