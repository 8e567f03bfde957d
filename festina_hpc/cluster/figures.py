"""A cluster's physical figures: node and GPU power, Slurm's power saving, memory, loading, control timing.

``ClusterConfig`` is the ``[cluster]`` section of the config (``festina_hpc.config``); the simulator
models a cluster with it and the bound reads it. ``USABLE_MEMORY_FRAC`` is the share of a GPU's memory
an engine may fill with weights and KV cache, which the policies, festinad's cluster view and the
engine launcher all size instances by. ``ColdStartModel`` and its presets are the time to bring an
instance up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from festina_hpc.errors import TraceError
from festina_hpc.profiles.specs import ModelSpec

# Of a GPU's memory, the share an engine fills with weights and KV cache: vLLM's default
# gpu_memory_utilization (the rest is CUDA context, activations and fragmentation).
USABLE_MEMORY_FRAC = 0.9
GB = 1e9  # load bandwidths are in decimal GB/s, as storage and PCIe are quoted


@dataclass(frozen=True)
class ColdStartModel:
    """Time to bring up one model instance on idle GPUs: a fixed engine start plus loading the weights.

    load time = ``engine_init_s`` + weight bytes per GPU / ``load_bandwidth_gbs``:
    the instance's ``tp`` GPUs read their weight shards in parallel, each at
    ``load_bandwidth_gbs``. Use ``STANDARD_LOAD`` or ``FAST_LOAD`` (documented
    there) unless a site has its own measurements.
    """

    name: str
    engine_init_s: float  # process and CUDA context start, engine set-up, KV-cache allocation; size-independent
    load_bandwidth_gbs: float  # weight bytes into each GPU per second, in GB/s (1e9 bytes)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.engine_init_s) and self.engine_init_s >= 0):
            raise TraceError(f"cold start {self.name}: engine_init_s must be >= 0, got {self.engine_init_s!r}")
        if not (math.isfinite(self.load_bandwidth_gbs) and self.load_bandwidth_gbs > 0):
            raise TraceError(f"cold start {self.name}: load_bandwidth_gbs must be > 0, "
                             f"got {self.load_bandwidth_gbs!r}")

    def cold_start_s(self, model: ModelSpec, tp: int) -> float:
        """Seconds from starting an instance of ``model`` on ``tp`` GPUs until it can serve."""
        if tp < 1:
            raise TraceError(f"cold start of {model.name}: tp must be >= 1, got {tp}")
        return self.load_s(model.weights_bytes / tp)

    def load_s(self, weights_bytes_per_gpu: float) -> float:
        """Seconds to start an instance whose GPUs each load ``weights_bytes_per_gpu``."""
        return self.engine_init_s + weights_bytes_per_gpu / (self.load_bandwidth_gbs * GB)


# Safetensors from a node-local NVMe into a freshly started vLLM-style engine.
# 2.5 GB/s per GPU is at the fast end of what stock loaders reach: ServerlessLLM
# (Fu et al., OSDI'24) motivates with about 84 s for LLaMA-2-70B (~1.6 GB/s over
# the 138 GB checkpoint), and the InstantTensor benchmark in vLLM's docs has
# stock safetensors at 1.1 GB/s for a 30B model on one H200. 10 s of engine
# start is the low end for vLLM (CUDA graph capture and compilation can take
# longer). llama-3.1-8b: 10 + 16.1 GB / 2.5 = 16.4 s; llama-2-70b on 4 H100:
# 10 + 34.5 / 2.5 = 23.8 s. A policy whose saving rests on frequent cold starts
# should also be checked with a slower ColdStartModel.
STANDARD_LOAD = ColdStartModel("standard", engine_init_s=10.0, load_bandwidth_gbs=2.5)

# ServerlessLLM's multi-tier checkpoint loading: a loading-optimised format read
# from host DRAM (or local SSD) in pinned chunks, pipelined over PCIe, into an
# already started engine process. The paper reports 3.6-8.2x faster loading
# than PyTorch/Safetensors; 20 GB/s per GPU is 8x STANDARD (the top of that
# range) and under the ~25 GB/s of a PCIe Gen4 x16 link. 2 s for the rest of
# the start-up assumes a pre-started process. llama-3.1-8b: 2 + 16.1 / 20 =
# 2.8 s; llama-2-70b on 4 H100: 2 + 34.5 / 20 = 3.7 s.
#
# Cross-check of the fixed parts against production loads, Alibaba GenTD26
# basemodel_update_latency_anon.csv (Stable Diffusion base models, 2-7 GB, not
# LLMs; values may be scaled by the dataset's anonymisation): 7,531 loads on
# 123 containers over ~0.93 day; median 22.7 s, p90 42.0 s (min 1.33, p10 2.63,
# p25 3.14, p75 36.9, p99 51.8, max 79.4 s). The distribution is bimodal: 36%
# of loads take under 10 s (median 2.8 s, p10-p90 2.0-4.5 s), the rest median
# 34.7 s (p10-p90 20.7-44.2 s). FAST_LOAD gives 2.1-2.35 s for a 2-7 GB
# checkpoint, inside the fast mode; STANDARD_LOAD gives 10.8-12.8 s, between
# the modes: the slow mode most likely includes fetching from remote storage,
# which neither preset models (weights are assumed on the node).
FAST_LOAD = ColdStartModel("fast", engine_init_s=2.0, load_bandwidth_gbs=20.0)


@dataclass(frozen=True)
class ClusterConfig:
    """The cluster and its physical figures (documented defaults): the config's ``[cluster]``, the simulator's model."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_type: str = "h100-sxm-80gb"
    # Non-GPU power of a powered node (CPUs, DRAM, NICs, NVSwitches, fans, PSU losses). A DGX
    # H100 is rated 10.2 kW of which its 8 GPUs 5.6 kW; with GPUs near idle such a node draws
    # well over 1 kW. Taken as 150 W per GPU slot (1.2 kW for 8 GPUs), an assumption to set
    # per site in [cluster].
    node_static_w_per_gpu: float = 150.0
    # Slurm's power saving, given to every policy alike (outside the policies): "slurm" suspends a
    # node idle (no instance, nothing loading) for suspend_time_s (slurm.conf SuspendTime) and
    # resumes a suspended node a start needs; "none" keeps idle nodes on (a policy may still power
    # nodes off itself). See the simulator's module docstring and CALIBRATION.md "Cluster figures".
    power_saving: str = "slurm"
    suspend_time_s: float = 300.0  # SuspendTime as many sites set it (OpenHPC's example slurm.conf)
    # Power-on to slurmd registered and serving (BIOS/POST of a 2-CPU, 8-GPU server, OS boot,
    # driver and fabric bring-up): several minutes. Slurm's ResumeTimeout defaults to 60 s, which
    # such nodes overrun; sites set it to 300-600 s (CALIBRATION.md).
    resume_time_s: float = 300.0
    # A suspended (powered-off, still plugged in) node: its BMC, standby rails and the no-load
    # losses of its PSUs. No vendor publishes it for an 8-GPU server: an assumption, to be measured
    # per site at the PDU outlet with the node off (CALIBRATION.md).
    standby_w: float = 30.0
    suspend_exc_nodes: int = 0  # the first N nodes are never suspended (slurm.conf SuspendExcNodes)
    usable_memory_frac: float = USABLE_MEMORY_FRAC  # of GPU memory for weights and KV cache
    # Tokens per step, decode tokens plus a prefill chunk (vLLM's max_num_batched_tokens with
    # chunked prefill); a prefill chunk gets at least min_prefill_chunk of them.
    step_token_budget: int = 2048
    min_prefill_chunk: int = 256
    # Loading weights: engine start plus weights per GPU over the load bandwidth; the defaults
    # are the documented presets of sim/workload.py.
    load_init_s: float = STANDARD_LOAD.engine_init_s
    load_gbs: float = STANDARD_LOAD.load_bandwidth_gbs  # safetensors from local NVMe, per GPU
    fast_load_init_s: float = FAST_LOAD.engine_init_s
    fast_load_gbs: float = FAST_LOAD.load_bandwidth_gbs  # ServerlessLLM's multi-tier loading
    host_cache_gbs: float = 20.0  # reload from a node's host-memory cache
    host_cache_models: int = 4  # models a node keeps in host memory after unloading
    load_dynamic_w: float = 30.0  # GPU power above idle while loading weights
    # The local controller runs every period for GPUs whose load changed, and at once when a
    # request lands on a GPU below its max clock.
    control_period_s: float = 1.0
    # A locked-clock change takes effect this long after it is asked for: NVML's call costs 10-20 ms
    # and the PLL and voltage then ramp; Velicka et al. (arXiv 2502.20075) measure GPU frequency
    # switching latencies of tens of ms on A100 and GH200. Steps starting before then run at the old clock.
    clock_change_s: float = 0.05
