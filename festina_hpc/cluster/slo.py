"""Default SLOs: a model's TTFT and TBT targets on a GPU type, as multiples of its unloaded latency.

The simulator's workloads, festinad's gateway and festina-node's local controller all take a model's
SLO from ``default_slo`` with the multipliers of the config (defaults here), so one rule gives every
driver the same targets.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from festina_hpc.errors import TraceError
from festina_hpc.policy.types import Slo

if TYPE_CHECKING:
    from festina_hpc.profiles.store import ProfileStore

# SLOs as multiples of the unloaded latency at max clock (see default_slo).
DEFAULT_TTFT_MULTIPLIER = 5.0
DEFAULT_TBT_MULTIPLIER = 5.0
DEFAULT_REFERENCE_PROMPT_TOKENS = 1024
LONG_PROMPT_TOKENS = 8192  # where the TTFT SLO's per-token slope is measured


def default_slo(store: ProfileStore, gpu: str, model: str, ttft_multiplier: float = DEFAULT_TTFT_MULTIPLIER,
                tbt_multiplier: float = DEFAULT_TBT_MULTIPLIER,
                reference_prompt_tokens: int = DEFAULT_REFERENCE_PROMPT_TOKENS) -> Slo:
    """A model's SLO on ``gpu``: multiples of its unloaded latency at max clock and 100% SMs.

    TTFT SLO = ``ttft_multiplier`` x the profile's prefill latency of one
    prompt of ``reference_prompt_tokens``; TBT SLO = ``tbt_multiplier`` x the
    decode step latency at batch 1 with that much context. Splitwise (ISCA'24)
    states its SLOs this way, as slowdowns over the latency on an unloaded
    machine, and DistServe (OSDI'24) varies SLO strictness by one common
    scale; one rule gives every model a target in proportion to its size, and
    no policy is favoured by a hand-picked number per model. 5x leaves room for queueing, batching and lower clocks
    (the savings an energy-aware policy is after) while still failing a
    policy that lets requests wait behind long prefills. With 1024 tokens,
    llama-3.1-8b on h100-sxm-80gb gets about 0.22 s TTFT and 69 ms TBT.

    A prompt longer than the reference gets a TTFT SLO that grows with it:
    ``ttft_multiplier`` x the extra unloaded prefill time per token (the slope
    of the profile between the reference and ``LONG_PROMPT_TOKENS``, or the
    table's longest context if shorter). Without
    it, prompts beyond about 5,400-6,000 tokens (8-10% of the Azure code
    trace) would miss their SLO even on an idle GPU, for every policy alike.
    """
    if not (math.isfinite(ttft_multiplier) and ttft_multiplier > 0):
        raise TraceError(f"ttft_multiplier must be a positive number, got {ttft_multiplier!r}")
    if not (math.isfinite(tbt_multiplier) and tbt_multiplier > 0):
        raise TraceError(f"tbt_multiplier must be a positive number, got {tbt_multiplier!r}")
    if not 1 <= reference_prompt_tokens < LONG_PROMPT_TOKENS:
        raise TraceError(f"reference_prompt_tokens must be in 1..{LONG_PROMPT_TOKENS - 1}, "
                         f"got {reference_prompt_tokens}")
    prefill = store.predict(gpu, model, "prefill", batch=1, context_tokens=reference_prompt_tokens, sm_pct=100.0)
    decode = store.predict(gpu, model, "decode", batch=1, context_tokens=reference_prompt_tokens, sm_pct=100.0)
    long_tokens = int(min(LONG_PROMPT_TOKENS, store.table(gpu, model).bounds("context_tokens")[1]))
    long = store.predict(gpu, model, "prefill", batch=1, context_tokens=long_tokens, sm_pct=100.0)
    per_token_s = max(0.0, (long.latency_s - prefill.latency_s) / max(1, long_tokens - reference_prompt_tokens))
    return Slo(ttft_s=ttft_multiplier * prefill.latency_s, tbt_s=tbt_multiplier * decode.latency_s,
               ttft_s_per_token=ttft_multiplier * per_token_s, reference_prompt_tokens=reference_prompt_tokens)
