"""A simulated serving engine: continuous batching paced by the profile's predicted step latencies.

On machines without a GPU, ``festina serve`` runs this engine in place of
vLLM so that the gateway, the router and the node controller see the
latencies the real GPU would give. It follows the simulator's model of vLLM
(``sim/cluster.py``): at each step boundary it applies pending settings
(clock, batch cap, prefill chunk; the SM share is fixed at start, see
``EngineSettings``),
admits waiting requests FIFO up to the batch cap, and runs one step: up to
``chunk_tokens`` prompt tokens of the admitted prompts prefill in one forward
pass (chunked prefill; a prompt's first token comes at the end of the step
that prefills its last chunk) while every decoding sequence gets one token;
without prompts to prefill a step is a pure decode step. A step takes the profile's latency (``ProfileStore.
predict``) at the instance's batch, mean context, SM share and clock, times
``time_scale`` (1.0 is real time; tests may stretch steps so timer jitter is
small against them). The KV cache never limits admission (the batch cap does).

Lookups outside the table (a 5-word prompt below the shortest profiled
context) answer at the table's edge and are counted as clamped. Energy is an
estimate: profile power x step time while busy, the GPU's idle power while
idle, over the instance's tp GPUs, as if the instance were alone on them.
Busy and idle seconds are model time (wall time / ``time_scale``).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

from festina_hpc.cluster.rate import RateMeter
from festina_hpc.errors import FestinaError
from festina_hpc.profiles.store import ProfileStore

# Output text: deterministic filler words, so every run of a request gives the same text.
FILLER_WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")


def filler_token(index: int) -> str:
    """The text of output token ``index`` (0-based)."""
    return " " + FILLER_WORDS[index % len(FILLER_WORDS)]


class SettingsError(FestinaError):
    """A setting (SM share, clock, batch cap) outside what the GPU or engine accepts."""


class ShareFixedError(SettingsError):
    """A new SM share for a running instance: a share is fixed when the instance starts."""


class EngineStopped(FestinaError):
    """The engine stopped before the request finished."""


@dataclass(frozen=True)
class EngineSettings:
    """The instance's knobs: clock, batch cap and chunk change at the next step boundary, the share never.

    An MPS client's active-thread percentage is fixed when its CUDA context is created
    (``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` in its environment, or the control daemon's default
    then); NVIDIA offers no way to change it for a running process. So the engine takes
    ``sm_pct`` at start only (``festina serve --sm-pct``, which festinad derives from the job's
    MPS share), and another share means another instance.
    """

    sm_pct: float = 100.0  # MPS active-thread percentage the instance started with; fixed for its life
    clock_mhz: int = 0  # the GPU's SM clock; 0 means the GPU's max clock
    batch_cap: int = 256  # max sequences admitted at once (vLLM's max_num_seqs)
    # Prompt tokens one step may prefill (vLLM's max_num_batched_tokens with chunked prefill); the
    # local controller shrinks it so decoding sequences wait less behind a long prompt.
    chunk_tokens: int = 2048


@dataclass(frozen=True)
class EngineStats:
    """Counters since the engine started; seconds and joules are model time (see module docstring)."""

    requests_received: int
    requests_finished: int
    requests_aborted: int  # cancelled by the client or stopped by shutdown
    prompt_tokens: int
    generated_tokens: int
    steps: int
    clamped_lookups: int
    busy_s: float
    idle_s: float
    busy_energy_j: float
    idle_energy_j: float
    power_w: float  # estimated draw now, over all tp GPUs
    running: int
    waiting: int
    settings: EngineSettings

    @property
    def energy_j(self) -> float:
        return self.busy_energy_j + self.idle_energy_j


_END = None  # queued after a generation's last token


class Generation:
    """One request inside the engine; iterate it for ``(text, finish_reason)`` per token."""

    def __init__(self, request_id: int, prompt_tokens: int, max_tokens: int):
        self.id = request_id
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.generated = 0
        self.prefilled = 0  # prompt tokens prefilled so far (chunked prefill)
        self.finish_reason: str | None = None
        self.cancelled = False
        self._tokens: asyncio.Queue[tuple[str, str | None] | None] = asyncio.Queue()
        self._error: Exception | None = None

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.generated

    def cancel(self) -> None:
        """The client is gone: the engine frees the slot at the next step boundary."""
        self.cancelled = True

    def _emit(self) -> bool:
        """Produce the next token; True when it was the last."""
        text = filler_token(self.generated)
        self.generated += 1
        last = self.generated >= self.max_tokens
        if last:
            self.finish_reason = "length"
        self._tokens.put_nowait((text, self.finish_reason))
        if last:
            self._tokens.put_nowait(_END)
        return last

    def _abort(self, error: Exception) -> None:
        self._error = error
        self._tokens.put_nowait(_END)

    async def __aiter__(self) -> AsyncIterator[tuple[str, str | None]]:
        while True:
            item = await self._tokens.get()
            if item is _END:
                if self._error is not None:
                    raise self._error
                return
            yield item


class SimulatedEngine:
    """Continuous batching for one model instance on ``gpu_type``, paced by the profile."""

    def __init__(self, store: ProfileStore, model: str, gpu_type: str, settings: EngineSettings = EngineSettings(),
                 time_scale: float = 1.0, clock: Callable[[], float] = time.monotonic):
        if not time_scale > 0:
            raise SettingsError(f"time_scale = {time_scale!r} must be positive")
        self.store = store
        self.gpu_spec = store.gpu(gpu_type)
        self.model_spec = store.model(model)
        self.model = self.model_spec.name
        self.gpu_type = self.gpu_spec.name
        self.table = store.table(self.gpu_type, self.model)  # fails now on a missing profile, not at a request
        self.tp = self.table.tp
        self.time_scale = time_scale
        self._clock = clock
        self._settings = self._checked(settings, EngineSettings())
        self._pending: EngineSettings | None = None
        self._ids = itertools.count()
        self._waiting: deque[Generation] = deque()
        self._running: list[Generation] = []  # admitted; a generation with generated == 0 is prefilling
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._idle_since: float | None = None
        self._started_at = 0.0
        self._counts = {"received": 0, "finished": 0, "aborted": 0, "prompt": 0, "generated": 0, "steps": 0,
                        "clamped": 0}
        self._busy_s = 0.0
        self._busy_energy_j = 0.0
        self._power_w = self.gpu_spec.idle_w * self.tp
        self._rate = RateMeter(clock())  # arrivals (the local controller plans with their rate)

    # -- settings -----------------------------------------------------------------------------------

    @property
    def settings(self) -> EngineSettings:
        """The settings in force (pending ones apply at the next step)."""
        return self._settings

    @property
    def pending_settings(self) -> EngineSettings | None:
        return self._pending

    def update_settings(self, sm_pct: float | None = None, clock_mhz: int | None = None,
                        batch_cap: int | None = None, chunk_tokens: int | None = None) -> EngineSettings:
        """Validate and queue new settings for the next step boundary; returns what will apply.

        ``sm_pct`` may only repeat the share the engine started with: another one raises
        ``ShareFixedError`` (see ``EngineSettings``) and nothing else of the call applies.
        """
        base = self._pending or self._settings
        if sm_pct is not None:
            self._checked(replace(base, sm_pct=sm_pct), base)  # a malformed share is a plain SettingsError
            if abs(float(sm_pct) - self._settings.sm_pct) > 1e-9:
                raise ShareFixedError(f"sm_pct = {sm_pct!r}: this instance runs at {self._settings.sm_pct:g}% and "
                                      f"an SM share is fixed at start; start a new instance at that share")
        changes = {k: v for k, v in (("sm_pct", sm_pct), ("clock_mhz", clock_mhz), ("batch_cap", batch_cap),
                                     ("chunk_tokens", chunk_tokens)) if v is not None}
        new = self._checked(replace(base, **changes), base)  # type: ignore[arg-type]
        self._pending = new
        self._wakeup.set()  # an idle engine has no step boundary coming: apply it now
        return new

    def _checked(self, s: EngineSettings, base: EngineSettings) -> EngineSettings:
        if isinstance(s.sm_pct, bool) or not isinstance(s.sm_pct, (int, float)) or not 0 < s.sm_pct <= 100:
            raise SettingsError(f"sm_pct = {s.sm_pct!r} must be a number in (0, 100]")
        lo, hi = self.table.bounds("sm_pct")
        if s.sm_pct < lo:
            raise SettingsError(f"sm_pct = {s.sm_pct!r} is below the profile's smallest SM share {lo:g}")
        clock = s.clock_mhz or self.gpu_spec.max_clock_mhz
        if isinstance(s.clock_mhz, bool) or not isinstance(s.clock_mhz, int) or \
                clock not in self.gpu_spec.supported_clocks_mhz:
            raise SettingsError(f"clock_mhz = {s.clock_mhz!r} is not a supported clock of {self.gpu_type} "
                                f"({self.gpu_spec.min_clock_mhz}..{self.gpu_spec.max_clock_mhz} MHz in steps of "
                                f"{self.gpu_spec.clock_step_mhz})")
        if isinstance(s.batch_cap, bool) or not isinstance(s.batch_cap, int) or s.batch_cap < 1:
            raise SettingsError(f"batch_cap = {s.batch_cap!r} must be an integer >= 1")
        if isinstance(s.chunk_tokens, bool) or not isinstance(s.chunk_tokens, int) or s.chunk_tokens < 1:
            raise SettingsError(f"chunk_tokens = {s.chunk_tokens!r} must be an integer >= 1")
        return EngineSettings(sm_pct=float(s.sm_pct), clock_mhz=clock, batch_cap=s.batch_cap,
                              chunk_tokens=s.chunk_tokens)

    # -- requests ----------------------------------------------------------------------------------

    def submit(self, prompt_tokens: int, max_tokens: int) -> Generation:
        if self._task is None or self._task.done():
            raise EngineStopped("the engine is not running")
        gen = Generation(next(self._ids), prompt_tokens, max_tokens)
        self._counts["received"] += 1
        self._counts["prompt"] += prompt_tokens
        now = self._clock()
        self._rate.note(now)
        self._waiting.append(gen)
        self._wakeup.set()
        return gen

    @property
    def in_flight(self) -> int:
        return len(self._waiting) + len(self._running)

    @property
    def pending_prompt_tokens(self) -> int:
        """Prompt tokens still to prefill: queued requests' and admitted ones' remaining chunks."""
        return sum(g.prompt_tokens - g.prefilled for g in (*self._waiting, *self._running) if not g.generated)

    @property
    def arrival_rate_per_s(self) -> float:
        """Recent arrivals per second of model time (exponentially weighted over wall time, half-life
        RATE_HALF_LIFE_S): a stretched test clock reports the rate the GPU would see."""
        return self._rate.rate_per_s(self._clock()) * self.time_scale

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        self._started_at = self._clock()
        self._idle_since = self._started_at
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"engine {self.model}")

    async def drain(self, timeout_s: float) -> bool:
        """Wait until nothing is in flight, up to ``timeout_s``; True when drained."""
        deadline = self._clock() + timeout_s
        while self.in_flight and self._clock() < deadline:
            await asyncio.sleep(min(0.01, max(0.0, deadline - self._clock())))
        return not self.in_flight

    async def stop(self) -> None:
        """Stop stepping; whatever is still in flight ends with ``EngineStopped``."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        error = EngineStopped("the server is shutting down")
        for gen in [*self._running, *self._waiting]:
            self._counts["aborted"] += 1
            gen._abort(error)
        self._running.clear()
        self._waiting.clear()
        self._mark_idle()

    # -- stats -------------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        elapsed_s = (self._clock() - self._started_at) / self.time_scale if self._task else 0.0
        idle_s = max(0.0, elapsed_s - self._busy_s)
        c = self._counts
        return EngineStats(
            requests_received=c["received"], requests_finished=c["finished"], requests_aborted=c["aborted"],
            prompt_tokens=c["prompt"], generated_tokens=c["generated"], steps=c["steps"],
            clamped_lookups=c["clamped"], busy_s=self._busy_s, idle_s=idle_s, busy_energy_j=self._busy_energy_j,
            idle_energy_j=idle_s * self.gpu_spec.idle_w * self.tp, power_w=self._power_w,
            running=len(self._running), waiting=len(self._waiting), settings=self._settings)

    def _mark_idle(self) -> None:
        self._power_w = self.gpu_spec.idle_w * self.tp

    # -- stepping ----------------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            self._drop_cancelled()
            if self._pending is not None:
                self._settings, self._pending = self._pending, None
            if not self._waiting and not self._running:
                self._mark_idle()
                self._wakeup.clear()
                await self._wakeup.wait()
                deadline = loop.time()
                continue
            self._admit()
            chunk = self._take_chunk()
            decoding = [g for g in self._running if g.generated > 0]
            latency_s, power_w = self._step_cost(chunk, decoding)
            self._power_w = power_w * self.tp
            # Pace against a deadline, not a sleep per step, so timer overshoot does not accumulate;
            # after a long stall (a blocked loop) start afresh rather than emit a burst.
            deadline = max(deadline, loop.time() - latency_s * self.time_scale) + latency_s * self.time_scale
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            self._busy_s += latency_s
            self._busy_energy_j += power_w * self.tp * latency_s
            self._counts["steps"] += 1
            for g, take in chunk:
                g.prefilled += take
            # Decoding sequences get a token; a prompt gets its first once its last chunk is in.
            emitting = [g for g in self._running if not g.cancelled
                        and (g.generated > 0 or g.prefilled >= max(1, g.prompt_tokens))]
            finished = [g for g in emitting if g._emit()]
            self._counts["generated"] += len(emitting)
            if finished:
                self._counts["finished"] += len(finished)
                done = set(map(id, finished))
                self._running = [g for g in self._running if id(g) not in done]

    def _drop_cancelled(self) -> None:
        for queue_name in ("_running", "_waiting"):
            queue = getattr(self, queue_name)
            if any(g.cancelled for g in queue):
                kept = [g for g in queue if not g.cancelled]
                self._counts["aborted"] += len(queue) - len(kept)
                setattr(self, queue_name, kept if queue_name == "_running" else deque(kept))

    def _admit(self) -> None:
        room = self._settings.batch_cap - len(self._running)
        while self._waiting and room > 0:
            self._running.append(self._waiting.popleft())
            room -= 1

    def _take_chunk(self) -> list[tuple[Generation, int]]:
        """This step's prefill: up to ``chunk_tokens`` prompt tokens of the admitted prompts, oldest first."""
        budget = self._settings.chunk_tokens
        chunk = []
        for g in self._running:
            if budget <= 0:
                break
            if g.generated == 0:
                take = min(max(1, g.prompt_tokens) - g.prefilled, budget)
                chunk.append((g, take))
                budget -= take
        return chunk

    def _predict(self, phase: str, batch: int, context_tokens: float) -> tuple[float, float]:
        s = self._settings
        p = self.store.predict(self.gpu_type, self.model, phase, batch, round(context_tokens), s.sm_pct,
                               s.clock_mhz, clamp=True)
        if p.clamped:
            self._counts["clamped"] += 1
        return p.latency_s, p.power_w

    def _step_cost(self, chunk: list[tuple[Generation, int]], decoding: list[Generation]) -> tuple[float, float]:
        """(latency_s, power_w per GPU) of one step, as the simulator costs it."""
        decode_context = sum(g.context_tokens for g in decoding) / len(decoding) if decoding else 0.0
        if not chunk:
            return self._predict("decode", len(decoding), decode_context)
        prompt = sum(take for _, take in chunk) / len(chunk)
        prefill_s, prefill_w = self._predict("prefill", len(chunk), prompt)
        if not decoding:
            return prefill_s, prefill_w
        # One forward pass: the prefill already pays the step overhead and the weight reads, so the
        # decoding sequences add only what their batch adds over a batch of one.
        batch_s, decode_w = self._predict("decode", len(decoding), decode_context)
        decode_s = max(0.0, batch_s - self._predict("decode", 1, decode_context)[0])
        latency_s = prefill_s + decode_s
        return latency_s, (prefill_w * prefill_s + decode_w * decode_s) / latency_s
