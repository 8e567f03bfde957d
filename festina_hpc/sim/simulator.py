"""The simulator: drives a policy over a request trace on a simulated cluster and measures the result.

``Simulation`` owns the cluster state and implements ``ClusterView`` over it,
so the policy reads live state without copies and answers with decisions
(data), which the simulation validates and carries out. A decision that breaks
the cluster's rules (an instance that does not fit, a GPU on another node, a
power-off of a busy node) is refused and counted, never half applied.

Slurm's power saving runs here, outside the policy and alike for every one
(``ClusterConfig.power_saving``): a node that holds no instance (none serving,
draining or loading) for ``suspend_time_s`` is suspended, as slurmctld
suspends a node idle for SuspendTime. The timer counts from when the node's
last instance went, or from when the node came up empty; one event per idle
spell, superseded by any start there. A suspended node draws ``standby_w``,
its GPUs nothing, and loses its host-memory model cache; a start on its GPUs
resumes it (``resume_time_s`` of static and GPU idle power before the
instance loads), as Slurm resumes a node a job is sent to. A policy may power
a node off sooner (``PowerOff``) or wake one ahead of need (``PowerOn``: the
node then counts idle from when it is up, so it keeps a node up only by using
it). Nodes below ``suspend_exc_nodes`` are never suspended (SuspendExcNodes).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from festina_hpc.cluster.figures import ClusterConfig, ColdStartModel
from festina_hpc.cluster.rate import RateMeter
from festina_hpc.config import POWER_SAVING_MODES
from festina_hpc.errors import ConfigError, FestinaError
from festina_hpc.policy.base import Policy
from festina_hpc.policy.limits import bounded, limit_placement, limit_plan, upkeep
from festina_hpc.policy.types import (
    NO_LIMITS,
    Action,
    ClusterView,
    Drop,
    EndedRequest,
    Ending,
    GpuSettings,
    InstancePhase,
    Migrate,
    ModelInfo,
    ModelLimits,
    MoveQueued,
    NodePower,
    Placement,
    Plan,
    PowerOff,
    PowerOn,
    Request,
    Route,
    Slo,
    StartInstance,
    StopInstance,
)
from festina_hpc.profiles.store import ProfileStore
from festina_hpc.sim.cluster import Activity, HbmModel, RequestRecord, SimGpu, SimInstance, SimNode
from festina_hpc.sim.engine import Event, EventKind, EventQueue

SAMPLE_PERIOD_S = 10.0  # power-over-time resolution of the result
DRAIN_LIMIT_S = 3600.0  # after the last arrival, requests still unfinished by then count as dropped


# The parts of a run's energy (SimResult.energy_parts_j), in J: GPU serving (dynamic), GPU idle
# (powered, nothing running), loads of cold starts, of migrations and of share restarts (GPU idle
# included where the GPU did nothing else), the static power of powered nodes, and the standby
# power of suspended ones.
ENERGY_PARTS = ("gpu_active_j", "gpu_idle_j", "cold_start_j", "migration_j", "share_restart_j",
                "node_static_j", "standby_j")
NODE_ENERGY_PARTS = ("node_static_j", "standby_j")


class InvalidDecision(FestinaError):
    """A policy decision that the cluster cannot carry out."""


@dataclass
class SimResult:
    """What one simulation measured; ``as_dict`` is ``result.json``."""

    policy: str
    energy_j: float
    energy_parts_j: dict[str, float]
    generated_tokens: int
    requests_total: int
    requests_completed: int
    requests_dropped: int
    slo_attainment: float
    ttft_attainment: float
    tbt_attainment: float
    ttft_p50_s: float
    ttft_p99_s: float
    tbt_p50_s: float
    tbt_p99_s: float
    gpu_hours_powered: float
    node_hours_powered: float
    migrations: int
    request_migrations: int  # queued requests moved between instances (MoveQueued)
    cold_starts: int
    invalid_decisions: int
    sim_time_s: float
    sim_wall_s: float
    events: int
    share_restarts: int = 0  # instances restarted at another SM share (a running MPS client's share is fixed)
    clock_changes: int = 0  # GPU clock changes carried out
    drop_reasons: dict[str, int] = field(default_factory=dict)
    clamped_lookups: int = 0
    per_model: dict[str, dict[str, float]] = field(default_factory=dict)
    power_timeline: list[tuple[float, float]] = field(default_factory=list)  # (time_s, cluster power_w)
    node_suspends: int = 0  # nodes power saving suspended (idle for suspend_time_s)
    node_wakes: int = 0  # nodes woken from off (by a start on them, or a policy's PowerOn)

    @property
    def energy_per_token_j(self) -> float:
        return self.energy_j / self.generated_tokens if self.generated_tokens else math.inf

    @property
    def gpu_energy_j(self) -> float:
        """What the GPUs drew (serving, idle, loads of every kind): the total less the nodes' own power."""
        return sum(j for part, j in self.energy_parts_j.items() if part not in NODE_ENERGY_PARTS)

    def as_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["energy_per_token_j"] = self.energy_per_token_j
        data["gpu_energy_j"] = self.gpu_energy_j
        return data


class Simulation:
    """One run of ``policy`` over ``requests``; ``run()`` returns the ``SimResult``."""

    def __init__(self, config: ClusterConfig, store: ProfileStore, policy: Policy, requests: Sequence[Request],
                 slos: Mapping[str, Slo], limits: Mapping[str, ModelLimits] | None = None,
                 live_share_change: bool = False):
        if config.power_saving not in POWER_SAVING_MODES:
            raise ConfigError(f"cluster.power_saving = {config.power_saving!r} must be one of "
                              f"{', '.join(POWER_SAVING_MODES)}")
        self.config = config
        self.live_share_change = live_share_change  # [gpu]: whether a running instance's SM share can change
        self.store = store
        self.policy = policy
        self.spec = store.gpu(config.gpu_type)
        self._gpu_type = self.spec.name
        self.node_list: list[SimNode] = []
        self.gpu_list: list[SimGpu] = []
        for n in range(config.nodes):
            ids = range(n * config.gpus_per_node, (n + 1) * config.gpus_per_node)
            self.node_list.append(SimNode(n, ids))
            self.gpu_list.extend(SimGpu(g, n, self.spec) for g in ids)
        # Free GPUs per node, so finding free GPUs walks nodes in order and stops early.
        self._free: list[set[int]] = [set(node.gpus) for node in self.node_list]
        self.model_info: dict[str, ModelInfo] = {}
        self.tables = {}
        self._hbm: dict[str, HbmModel] = {}
        physics = store.physics(self._gpu_type)
        for name in sorted({r.model for r in requests} | set(slos)):
            spec = store.model(name)
            # The catalogue's bounds, applied to the policy's decisions as festinad applies them (policy/limits.py).
            bound = (limits or {}).get(spec.name, NO_LIMITS)
            self.model_info[spec.name] = ModelInfo.on_gpu(spec, self._gpu_type, slos[spec.name], bound)
            self.tables[spec.name] = store.table(self._gpu_type, spec.name)
            self._hbm[spec.name] = HbmModel.of(self.spec, spec, physics)
        self.records = [RequestRecord(r) for r in requests]
        self.live: dict[int, SimInstance] = {}
        self._by_model: dict[str, list[SimInstance]] = {m: [] for m in self.model_info}
        self._bounded = bounded(self)
        self._model_rate = {m: RateMeter() for m in self.model_info}
        self._next_instance = 0
        self._now = 0.0
        self.events = EventQueue()
        self._dirty: set[int] = set()
        self._outstanding = 0
        self._arrivals_left = len(requests)
        self.cold_starts = 0
        self.share_restarts = 0
        self.clock_changes = 0
        self._clock_pending: dict[int, tuple[int, float]] = {}  # GPU id -> (clock asked for, when it lands)
        self.migrations = 0
        self.request_migrations = 0
        self.invalid_decisions = 0
        self.clamped_lookups = 0
        self.drop_reasons: Counter[str] = Counter()
        self.node_suspends = 0
        self.node_wakes = 0
        self._power_saving = config.power_saving == "slurm"
        self._idle_nodes: list[SimNode] = []  # nodes left empty by the event being handled
        self._timeline: list[tuple[float, float]] = []
        self._last_sample = (0.0, 0.0)
        self._controls = type(policy).control is not Policy.control
        c = config
        self._standard_load = ColdStartModel("standard", c.load_init_s, c.load_gbs)
        self._fast_load = ColdStartModel("fast", c.fast_load_init_s, c.fast_load_gbs)
        self._host_cache_load = ColdStartModel("host cache", c.fast_load_init_s, c.host_cache_gbs)

    # -- ClusterView ------------------------------------------------------------------------------

    @property
    def now_s(self) -> float:
        return self._now

    @property
    def gpu_type(self) -> str:
        return self._gpu_type

    def model(self, name: str) -> ModelInfo:
        return self.model_info[name]

    def models(self) -> Iterable[ModelInfo]:
        return self.model_info.values()

    def instance(self, instance_id: int) -> SimInstance:
        return self.live[instance_id]

    def instances(self) -> Iterable[SimInstance]:
        return self.live.values()

    def instances_of(self, model: str) -> Sequence[SimInstance]:
        return self._by_model.get(model, ())

    def gpu(self, gpu_id: int) -> SimGpu:
        return self.gpu_list[gpu_id]

    def gpus(self) -> Sequence[SimGpu]:
        return self.gpu_list

    def node(self, node_id: int) -> SimNode:
        return self.node_list[node_id]

    def nodes(self) -> Sequence[SimNode]:
        return self.node_list

    def free_gpus(self) -> Iterator[int]:
        for free in self._free:
            yield from sorted(free)

    def model_rate_per_s(self, model: str) -> float:
        return self._model_rate[model].rate_per_s(self._now)

    # -- running ----------------------------------------------------------------------------------

    def run(self) -> SimResult:
        started = time.perf_counter()
        q = self.events
        q.push(q.event(r.arrival_s, EventKind.ARRIVAL, rec) for r, rec in zip(
            (rec.request for rec in self.records), self.records))
        q.push([q.event(0.0, EventKind.SCALE_TICK), q.event(0.0, EventKind.CONSOLIDATE_TICK),
                q.event(SAMPLE_PERIOD_S, EventKind.SAMPLE)])
        if self._controls:
            q.push([q.event(0.0, EventKind.CONTROL_TICK)])
        if self._power_saving:
            self._idle_nodes.extend(self.node_list)  # every node starts on and empty
        q.push(self._idle_timers())
        last_arrival = self.records[-1].request.arrival_s if self.records else 0.0
        end_s = q.run(self._handle, until_s=last_arrival + DRAIN_LIMIT_S,
                      done=lambda: self._arrivals_left == 0 and self._outstanding == 0)
        self._now = max(end_s, last_arrival)
        return self._result(time.perf_counter() - started)

    def _handle(self, e: Event) -> Iterable[Event]:
        events = self._dispatch(e)
        if self._idle_nodes:
            return [*events, *self._idle_timers()]
        return events

    def _dispatch(self, e: Event) -> Iterable[Event]:
        if e.kind >= EventKind.CONTROL_TICK and self._arrivals_left == 0 and self._outstanding == 0:
            # The run ends with its last request; a periodic tick (or a suspend) due later must not
            # stretch the measured window, or energy would depend on the tick periods.
            return ()
        kind = e.kind
        if kind is EventKind.STEP_DONE or kind is EventKind.INSTANCE_READY:
            inst = self.live.get(e.payload)
            if inst is None or e.version != inst.version:
                return ()  # superseded: not an event of this run, so it does not move the clock either
        if kind is EventKind.NODE_SUSPEND and e.version != self.node_list[e.payload].idle_version:
            return ()  # the node was used (or powered off or on) since the timer was set
        self._now = e.time_s
        if self._clock_pending:
            self._land_clocks()
        if kind is EventKind.STEP_DONE:
            return self._step_done(self.live[e.payload])
        if kind is EventKind.ARRIVAL:
            return self._arrival(e.payload)
        if kind is EventKind.INSTANCE_READY:
            return self._instance_ready(self.live[e.payload])
        if kind is EventKind.NODE_READY:
            return self._node_ready(self.node_list[e.payload])
        if kind is EventKind.NODE_SUSPEND:
            self._suspend(self.node_list[e.payload])
            return ()
        if kind is EventKind.SAMPLE:
            self._sample()
            return self._again(e, SAMPLE_PERIOD_S)
        if kind is EventKind.CONTROL_TICK:
            events = self._control_tick()
            return [*events, *self._again(e, self.config.control_period_s)]
        if kind is EventKind.SCALE_TICK:
            events = self._execute(self.policy.scale(self))
            if self._bounded:
                events += self._execute(upkeep(self).plan)
            return [*events, *self._again(e, self.policy.scale_period_s)]
        if kind is EventKind.CONSOLIDATE_TICK:
            events = self._execute(self.policy.consolidate(self))
            return [*events, *self._again(e, self.policy.consolidate_period_s)]
        raise AssertionError(f"unhandled event kind {kind}")

    def _again(self, e: Event, period_s: float) -> list[Event]:
        """Reschedule a periodic event while there is anything left to serve."""
        if self._arrivals_left == 0 and self._outstanding == 0:
            return []
        return [self.events.event(e.time_s + period_s, e.kind)]

    # -- requests ---------------------------------------------------------------------------------

    def _arrival(self, record: RequestRecord) -> Iterable[Event]:
        self._arrivals_left -= 1
        self._outstanding += 1
        r = record.request
        self._model_rate[r.model].note(self._now)
        return self._place(record)

    def _place(self, record: RequestRecord) -> list[Event]:
        """Ask the policy where an outstanding request goes, and carry that out."""
        r = record.request
        decision: Placement = self.policy.place(r.arrival(), self)  # not its output length: its future
        if self._bounded:
            decision = limit_placement(decision, self)[0]
        events: list[Event] = []
        if isinstance(decision, StartInstance):
            if decision.model != r.model:
                return self._drop(record, f"started {decision.model} for a {r.model} request")
            try:
                inst, events = self._start(decision)
            except InvalidDecision:
                self.invalid_decisions += 1
                return self._drop(record, "invalid start")
            decision = Route(inst.id)
        if isinstance(decision, Drop):
            return self._drop(record, decision.reason)
        inst_or_none = self.live.get(decision.instance_id)
        if inst_or_none is None or inst_or_none.phase > InstancePhase.READY or inst_or_none.model != r.model:
            self.invalid_decisions += 1
            return self._drop(record, "routed to an instance that cannot take it")
        inst = inst_or_none
        inst.queue.append(record)
        inst.note_arrival(self._now)
        inst.last_busy_s = self._now
        self._dirty.update(inst.gpus)
        if self._controls and inst.phase is InstancePhase.READY:
            # A node's controller watches its queues: a request landing on a slowed-down GPU gets
            # its decision now, not at the next periodic tick (a burst must not wait a tick).
            for g in inst.gpus:
                gpu = self.gpu_list[g]
                if gpu.clock_mhz < self.spec.max_clock_mhz:
                    events.extend(self._control_gpu(gpu))
        if inst.phase is InstancePhase.READY:
            if inst.activity is Activity.IDLE:
                events.extend(self._next_step(inst))
            elif inst.activity is Activity.DECODE:
                events.extend(self._interrupt(inst))
        return events

    def _drop(self, record: RequestRecord, reason: str) -> list[Event]:
        record.dropped = True
        self._outstanding -= 1
        self.drop_reasons[reason] += 1
        r = record.request
        self.policy.feedback((EndedRequest(r.model, r.prompt_tokens, 0, Ending.REFUSED),))
        return []

    def _finish(self, records: Iterable[RequestRecord]) -> None:
        """Count the records' requests done, and tell the policy what they generated and how fast."""
        done = []
        for rec in records:
            self._outstanding -= 1
            r = rec.request
            tbt_s = (rec.finish_s - rec.first_token_s) / (r.output_tokens - 1) if r.output_tokens > 1 else None
            done.append(EndedRequest(r.model, r.prompt_tokens, r.output_tokens, Ending.COMPLETED,
                                     rec.first_token_s - r.arrival_s, tbt_s))
        if done:
            self.policy.feedback(done)

    # -- serving ----------------------------------------------------------------------------------

    def _lookup(self, inst: SimInstance, phase: str, batch: float, context: float) -> tuple[float, float]:
        table = inst.table
        clock = self.gpu_list[inst.gpus[0]].clock_mhz
        hit = table.lookup(phase, batch, context, inst.sm_pct, clock, clamp=True)
        if hit.clamped:
            self.clamped_lookups += 1
        return hit.latency_s, hit.power_w

    def _set_dynamic(self, inst: SimInstance, dynamic_w: float) -> None:
        if dynamic_w == inst.dynamic_w:
            return
        delta = dynamic_w - inst.dynamic_w
        inst.dynamic_w = dynamic_w
        for g in inst.gpus:
            gpu = self.gpu_list[g]
            gpu.integrate(self._now)
            gpu.active_w = max(0.0, gpu.active_w + delta)

    def _share_hbm(self, inst: SimInstance, latency_s: float, power_w: float, step_bytes: float,
                   flops: float, starting: bool, events: list[Event]) -> tuple[float, float]:
        """The step's latency and power with the HBM bandwidth its co-residents draw (HbmModel)."""
        hbm = self._hbm[inst.model]
        inst.hbm_load = step_bytes / (latency_s * hbm.bandwidth_bps)  # alone: what it costs the others
        others_load = 0.0
        for g in inst.gpus:
            ids = self.gpu_list[g].instances
            if len(ids) > 1:
                others_load = max(others_load, sum(self.live[i].hbm_load for i in ids if i != inst.id))
                if starting:
                    # Co-residents' decode runs were timed without this step: they end at their next
                    # step boundary and start again at the new load (an arrival does the same).
                    for i in ids:
                        other = self.live[i]
                        if i != inst.id and other.activity is Activity.DECODE:
                            events.extend(self._interrupt(other))
        if others_load <= 0.0:
            return latency_s, power_w
        clock = self.gpu_list[inst.gpus[0]].clock_mhz
        stretched_s = latency_s + hbm.stretch_s(step_bytes, flops, inst.sm_pct, clock, others_load)
        # The same bytes and FLOPs: the dynamic energy is the step's alone, spread over the longer step.
        idle_w = self.spec.idle_w
        return stretched_s, idle_w + (power_w - idle_w) * latency_s / stretched_s

    def _next_step(self, inst: SimInstance) -> list[Event]:
        """Start the instance's next step at a step boundary (now)."""
        starting = inst.activity is Activity.IDLE or inst.activity is Activity.LOADING
        if inst.pending_batch_cap is not None:
            inst.batch_cap, inst.pending_batch_cap = inst.pending_batch_cap, None
        idle_w = self.spec.idle_w
        if inst.queue:
            inst.admit()
        inst.version += 1
        inst.activity_start_s = self._now
        if inst.prefill_queue:
            # A mixed step: one token for each decoding sequence, then a chunk of prompts.
            decoding = inst.decoding
            limit = min(inst.chunk_tokens, self.config.step_token_budget)
            budget = max(min(self.config.min_prefill_chunk, limit),
                         min(limit, self.config.step_token_budget - decoding))
            inst.chunk = inst.take_chunk(budget)
            tokens = sum(take for _, take in inst.chunk)
            chunk_context = tokens / len(inst.chunk)
            prefill_s, prefill_w = self._lookup(inst, "prefill", len(inst.chunk), chunk_context)
            decode_s, decode_w = 0.0, idle_w
            hbm = self._hbm[inst.model]
            # The step's HBM reads and FLOPs, as profiles/physics.py counts them for the lookups.
            step_bytes = hbm.weights_bytes + tokens * hbm.kv_bytes_per_token
            flops = tokens * (hbm.flops_per_token + 2.0 * hbm.attention_width * chunk_context)
            if decoding:
                # One forward pass: the chunk's prefill already pays the step overhead and reads the
                # weights, so the decode sequences add only what their batch adds over batch 1.
                context = inst.mean_context(0.5)
                batch_s, decode_w = self._lookup(inst, "decode", decoding, context)
                decode_s = max(0.0, batch_s - self._lookup(inst, "decode", 1, context)[0])
                step_bytes += decoding * context * hbm.kv_bytes_per_token
                flops += decoding * (hbm.flops_per_token + 4.0 * hbm.attention_width * context)
            latency_s = prefill_s + decode_s
            power_w = (prefill_w * prefill_s + decode_w * decode_s) / latency_s
            events: list[Event] = []
            latency_s, power_w = self._share_hbm(inst, latency_s, power_w, step_bytes, flops, starting, events)
            inst.activity = Activity.PREFILL
            inst.step_decoding = decoding
            inst.steps_planned = 1
            inst.step_latency_s = latency_s
            self._set_dynamic(inst, power_w - idle_w)
            events.append(self.events.event(self._now + latency_s, EventKind.STEP_DONE, inst.id, inst.version))
            return events
        if inst.decoding:
            steps = inst.steps_to_next_finish()
            batch = inst.decoding
            context = inst.mean_context(steps / 2)
            latency_s, power_w = self._lookup(inst, "decode", batch, context)
            hbm = self._hbm[inst.model]
            step_bytes = hbm.weights_bytes + batch * context * hbm.kv_bytes_per_token
            flops = batch * (hbm.flops_per_token + 4.0 * hbm.attention_width * context)
            events = []
            latency_s, power_w = self._share_hbm(inst, latency_s, power_w, step_bytes, flops, starting, events)
            inst.activity = Activity.DECODE
            inst.steps_planned = steps
            inst.step_latency_s = latency_s
            self._set_dynamic(inst, power_w - idle_w)
            events.append(self.events.event(self._now + steps * latency_s, EventKind.STEP_DONE, inst.id,
                                            inst.version))
            return events
        inst.activity = Activity.IDLE
        inst.hbm_load = 0.0
        self._set_dynamic(inst, 0.0)
        inst.last_busy_s = self._now
        if inst.phase is InstancePhase.DRAINING:
            return self._remove(inst)
        return []

    def _interrupt(self, inst: SimInstance) -> list[Event]:
        """A request arrived during a decode run: end the run at the next step boundary."""
        done = max(1, math.ceil((self._now - inst.activity_start_s) / inst.step_latency_s - 1e-9))
        if done >= inst.steps_planned:
            return []
        inst.steps_planned = done
        inst.version += 1
        end_s = inst.activity_start_s + done * inst.step_latency_s
        return [self.events.event(end_s, EventKind.STEP_DONE, inst.id, inst.version)]

    def _step_done(self, inst: SimInstance) -> list[Event]:
        if inst.activity is Activity.PREFILL:
            if inst.step_decoding:
                self._finish(inst.advance(1, self._now))
            self._finish(inst.start_decoding(inst.finish_chunk(), self._now))
        elif inst.activity is Activity.DECODE:
            self._finish(inst.advance(inst.steps_planned, self._now))
        self._dirty.update(inst.gpus)
        return self._next_step(inst)

    # -- instances --------------------------------------------------------------------------------

    def _check_start(self, decision: StartInstance | Migrate, model: str,
                     evicted: Sequence[SimInstance] = ()) -> SimNode:
        info = self.model_info.get(model)
        if info is None:
            raise InvalidDecision(f"unknown model {model}")
        if len(decision.gpus) != info.tp or len(set(decision.gpus)) != info.tp:
            raise InvalidDecision(f"{model} needs {info.tp} distinct GPUs, got {decision.gpus}")
        if not all(0 <= g < len(self.gpu_list) for g in decision.gpus):
            raise InvalidDecision(f"no such GPU in {decision.gpus}")
        nodes = {self.gpu_list[g].node for g in decision.gpus}
        if len(nodes) != 1:
            raise InvalidDecision(f"GPUs {decision.gpus} span nodes {sorted(nodes)}")
        if not 0 < decision.sm_pct <= 100 or not 0 < decision.memory_fraction <= 1:
            raise InvalidDecision("sm_pct or memory_fraction out of range")
        usable = self.spec.memory_bytes * self.config.usable_memory_frac
        for g in decision.gpus:
            gpu = self.gpu_list[g]
            gone = [i for i in evicted if g in i.gpus]
            sm_pct = gpu.sm_pct_allocated - sum(i.sm_pct_reserved for i in gone)
            memory_fraction = gpu.memory_fraction_allocated - sum(i.memory_fraction_reserved for i in gone)
            if sm_pct + decision.sm_pct > 100 + 1e-6:
                raise InvalidDecision(f"GPU {g}: SM shares would exceed 100%")
            if memory_fraction + decision.memory_fraction > 1 + 1e-6:
                raise InvalidDecision(f"GPU {g}: memory fractions would exceed 1")
        if info.weights_bytes_per_gpu >= decision.memory_fraction * usable:
            raise InvalidDecision(f"{model} weights do not fit in {decision.memory_fraction:g} of a GPU")
        return self.node_list[nodes.pop()]

    def _start(self, decision: StartInstance | Migrate, model: str | None = None,
               migration_of: int | None = None) -> tuple[SimInstance, list[Event]]:
        name = decision.model if isinstance(decision, StartInstance) else model
        assert name is not None
        evicted = self._evictees(decision.evict if isinstance(decision, StartInstance) else ())
        node = self._check_start(decision, name, evicted)
        node.idle_version += 1  # in use: a pending suspend is off
        victim_events: list[Event] = []
        for victim in evicted:
            victim_events.extend(self._remove(victim))
        info = self.model_info[name]
        usable = self.spec.memory_bytes * self.config.usable_memory_frac
        kv_tokens = int((decision.memory_fraction * usable - info.weights_bytes_per_gpu)
                        / info.kv_bytes_per_token_per_gpu)
        batch_cap = decision.batch_cap if isinstance(decision, StartInstance) else 256
        inst = SimInstance(self._next_instance, info, self.tables[name], tuple(decision.gpus), node.id,
                           decision.sm_pct, batch_cap, decision.memory_fraction, kv_tokens, self._now)
        inst.chunk_tokens = self.config.step_token_budget
        self._next_instance += 1
        inst.migration_of = migration_of
        self._add(inst)
        events: list[Event] = victim_events
        if node.power is NodePower.OFF:
            events.extend(self._power_on(node))
        if node.power is NodePower.ON:
            events.extend(self._begin_load(inst))
        if migration_of is None:
            self.cold_starts += 1
        else:
            self.migrations += 1
        return inst, events

    def _add(self, inst: SimInstance) -> None:
        """Put a new instance on its GPUs, holding the SM share and memory it reserves there."""
        self.live[inst.id] = inst
        self._by_model[inst.model].append(inst)
        for g in inst.gpus:
            gpu = self.gpu_list[g]
            gpu.integrate(self._now)
            gpu.instances.append(inst.id)
            gpu.sm_pct_allocated += inst.sm_pct_reserved
            gpu.memory_fraction_allocated += inst.memory_fraction_reserved
            self._free[gpu.node].discard(g)
            self._dirty.add(g)

    def _evictees(self, instance_ids: Iterable[int]) -> list[SimInstance]:
        """The instances a start may stop first: each must be ready and hold no request."""
        victims: list[SimInstance] = []
        for i in dict.fromkeys(instance_ids):
            inst = self.live.get(i)
            if (inst is None or inst.phase is not InstancePhase.READY or inst.activity is not Activity.IDLE
                    or inst.holds_work or inst.restarted_by is not None or inst.restart_of is not None):
                raise InvalidDecision(f"instance {i} is not idle and cannot be evicted")
            victims.append(inst)
        return victims

    def _load_s(self, inst: SimInstance) -> float:
        # A share restart reloads a model that its node has just served: its weights are in the
        # node's host memory (page cache) whatever the cache's capacity.
        if inst.share_restart or self.node_list[inst.node].has_cached(inst.model):
            loader = self._host_cache_load
        else:
            loader = self._fast_load if self.policy.fast_load else self._standard_load
        return loader.load_s(inst.info.weights_bytes_per_gpu)

    def _begin_load(self, inst: SimInstance) -> list[Event]:
        load_s = self._load_s(inst)
        inst.ready_at_s = self._now + load_s
        inst.activity = Activity.LOADING
        inst.version += 1
        for g in inst.gpus:
            gpu = self.gpu_list[g]
            gpu.integrate(self._now)
            gpu.loading_w += self.config.load_dynamic_w
            self._refresh_loading(gpu)
        return [self.events.event(inst.ready_at_s, EventKind.INSTANCE_READY, inst.id, inst.version)]

    def _refresh_loading(self, gpu: SimGpu) -> None:
        """Which energy bucket a GPU's loads and idle go to (call after integrating)."""
        loading = [self.live[i] for i in gpu.instances if self.live[i].activity is Activity.LOADING]
        gpu.busy_loading_only = bool(loading) and len(loading) == len(gpu.instances)
        gpu.loading_is_migration = bool(loading) and all(i.migration_of is not None for i in loading)
        gpu.holds_context = len(loading) < len(gpu.instances) and any(
            self.live[i].phase is InstancePhase.READY or self.live[i].phase is InstancePhase.DRAINING
            for i in gpu.instances)
        gpu.loading_is_share_restart = bool(loading) and all(i.share_restart for i in loading)

    def _instance_ready(self, inst: SimInstance) -> list[Event]:
        inst.phase = InstancePhase.READY
        inst.activity = Activity.IDLE
        for g in inst.gpus:
            gpu = self.gpu_list[g]
            gpu.integrate(self._now)
            gpu.loading_w = max(0.0, gpu.loading_w - self.config.load_dynamic_w)
            self._refresh_loading(gpu)
            self._dirty.add(g)
        self.node_list[inst.node].remember(inst.model, self.config.host_cache_models)
        events: list[Event] = []
        # A migration's target, or a share restart's replacement, takes over from the instance it replaces.
        source_id = inst.migration_of if inst.migration_of is not None else inst.restart_of
        source = self.live.get(source_id) if source_id is not None else None
        if source is not None and source.phase <= InstancePhase.READY:
            inst.queue.extend(source.take_queue())
            source.replaced_by = inst.id
            events.extend(self._stop(source))
        inst.migration_of = None  # (a replacement keeps restart_of until the old one is gone: _hand_over)
        events.extend(self._next_step(inst))
        return events

    def _stop(self, inst: SimInstance) -> list[Event]:
        if inst.phase is InstancePhase.LOADING:
            # Nothing was admitted yet: its queue goes back to another instance or is dropped.
            queue = inst.take_queue()
            events = self._remove(inst)
            for record in queue:
                events.extend(self._place(record))  # placed again, not a new arrival
            return events
        inst.phase = InstancePhase.DRAINING
        if inst.activity is Activity.IDLE and not inst.holds_work:
            return self._remove(inst)
        return []

    def _stop_asked(self, inst: SimInstance) -> list[Event]:
        """A policy's StopInstance: an instance whose restart is under way stops with its
        replacement (that is this instance at its new share, not another one)."""
        replacement = self.live.get(inst.restarted_by) if inst.restarted_by is not None else None
        if replacement is None or replacement.phase is not InstancePhase.LOADING:
            return self._stop(inst)  # a ready replacement takes over its reservations when it is gone
        inst.restarted_by = None  # the restart is off: its removal hands nothing over
        return [*self._stop(inst), *self._stop(replacement)]

    def _remove(self, inst: SimInstance) -> list[Event]:
        inst.phase = InstancePhase.STOPPED
        inst.version += 1
        self._set_dynamic(inst, 0.0)
        was_loading = inst.activity is Activity.LOADING
        for g in inst.gpus:
            gpu = self.gpu_list[g]
            gpu.integrate(self._now)
            if was_loading:
                gpu.loading_w = max(0.0, gpu.loading_w - self.config.load_dynamic_w)
            gpu.instances.remove(inst.id)
            gpu.sm_pct_allocated = max(0.0, gpu.sm_pct_allocated - inst.sm_pct_reserved)
            gpu.memory_fraction_allocated = max(0.0, gpu.memory_fraction_allocated - inst.memory_fraction_reserved)
            self._refresh_loading(gpu)
            if not gpu.instances and self.node_list[gpu.node].power is not NodePower.OFF:
                self._free[gpu.node].add(g)
            self._dirty.add(g)
        del self.live[inst.id]
        self._by_model[inst.model].remove(inst)
        if self._power_saving:
            self._idle_nodes.append(self.node_list[inst.node])  # its timer is set once the event is handled
        if inst.restart_of is not None:  # a replacement gone before the old one: nothing to hand over
            old = self.live.get(inst.restart_of)
            if old is not None and old.restarted_by == inst.id:
                old.restarted_by = None
        replacement = self.live.get(inst.restarted_by) if inst.restarted_by is not None else None
        if replacement is None:
            return []
        return self._hand_over(replacement)

    # -- share restarts ---------------------------------------------------------------------------

    def _change_share(self, inst: SimInstance, sm_pct: float) -> list[Event]:
        """An SM share change where a running instance's share is fixed (``live_share_change``
        False). Asked again for the share a restart under way is loading at, nothing more happens;
        any other share for an instance being restarted is refused (the pending restart stands: a
        replacement's load, once begun, is not undone), and so is a share for a replacement whose
        old instance still holds its share. An instance whose engine has not started yet (it
        waits for its node) starts at the new share; one loading, or draining, keeps its share
        until it stops; a ready one is restarted at the new share."""
        pending = self.live.get(inst.restarted_by) if inst.restarted_by is not None else None
        if pending is not None and pending.restart_of == inst.id:
            if abs(pending.sm_pct - sm_pct) < 1e-6:
                return []
            raise InvalidDecision(f"instance {inst.id} is being restarted at another share")
        if abs(sm_pct - inst.sm_pct) < 1e-6:
            return []
        if inst.restart_of is not None:
            raise InvalidDecision(f"instance {inst.id} restarts {inst.restart_of}, which still holds its share")
        self._check_share_room(inst, sm_pct)
        if inst.phase is InstancePhase.LOADING and inst.activity is not Activity.LOADING:
            for g in inst.gpus:
                self.gpu_list[g].sm_pct_allocated += sm_pct - inst.sm_pct_reserved
            inst.sm_pct = inst.sm_pct_reserved = sm_pct
            return []
        if inst.phase is not InstancePhase.READY:
            raise InvalidDecision(f"instance {inst.id} runs at {inst.sm_pct:g}% until it stops")
        return self._restart(inst, sm_pct)

    def _check_share_room(self, inst: SimInstance, sm_pct: float) -> None:
        if any(self.gpu_list[g].sm_pct_allocated - inst.sm_pct + sm_pct > 100 + 1e-6 for g in inst.gpus):
            raise InvalidDecision(f"instance {inst.id}: SM shares would exceed 100%")

    def _restart(self, old: SimInstance, sm_pct: float) -> list[Event]:
        """Restart a ready instance at ``sm_pct``: a replacement of its model on its GPUs, with its
        memory fraction, batch cap, chunk and arrival-rate estimate, loads from the node's host
        memory (the model is loaded there); the old one serves until the replacement is ready,
        which then takes its queue as a migration's target does (``_instance_ready``). Where a GPU
        lacks the memory for a second copy, the old one drains first: it takes no new request,
        its queue moves to the replacement, which loads once the old one has freed its memory
        (``_hand_over``): requests wait meanwhile, the real cost of such a restart. The pair counts
        in its GPUs' SM shares at the larger of the two (see ``sim/cluster.py``)."""
        usable = [1.0 - self.gpu_list[g].memory_fraction_allocated >= old.memory_fraction - 1e-6 for g in old.gpus]
        room = all(usable)
        new = SimInstance(self._next_instance, old.info, old.table, old.gpus, old.node, sm_pct,
                          old.pending_batch_cap or old.batch_cap, old.memory_fraction, old.kv_capacity_tokens,
                          self._now)
        self._next_instance += 1
        new.chunk_tokens = old.chunk_tokens
        new.inherit_rate(old)
        new.restart_of, old.restarted_by = old.id, new.id
        new.share_restart = True
        new.sm_pct_reserved = max(0.0, sm_pct - old.sm_pct)
        new.memory_fraction_reserved = old.memory_fraction if room else 0.0
        new.waits_for_memory = not room
        self._add(new)
        self.share_restarts += 1
        if room:
            return self._begin_load(new)
        new.queue.extend(old.take_queue())
        return self._stop(old)

    def _hand_over(self, new: SimInstance) -> list[Event]:
        """The old instance of a restart is gone: its replacement takes its whole share and memory
        fraction, and starts loading if it waited for that memory."""
        for g in new.gpus:
            gpu = self.gpu_list[g]
            gpu.integrate(self._now)
            gpu.sm_pct_allocated += new.sm_pct - new.sm_pct_reserved
            gpu.memory_fraction_allocated += new.memory_fraction - new.memory_fraction_reserved
            self._dirty.add(g)
        new.sm_pct_reserved, new.memory_fraction_reserved = new.sm_pct, new.memory_fraction
        new.restart_of = None  # its restart is over: it may be restarted in turn
        if not new.waits_for_memory:
            return []
        new.waits_for_memory = False
        return self._begin_load(new)

    # -- nodes ------------------------------------------------------------------------------------

    def _integrate_node(self, node: SimNode) -> None:
        dt = self._now - node.last_s
        if dt > 0 and node.power is not NodePower.OFF:
            node.powered_s += dt
        node.last_s = self._now

    def _idle_timers(self) -> list[Event]:
        """A suspend event for each node left empty and on by the event just handled (and only
        those: no scan of the cluster), due suspend_time_s from now. A waking node gets its timer
        when it is up; nodes below suspend_exc_nodes get none."""
        events = []
        for node in dict.fromkeys(self._idle_nodes):
            if (node.power is NodePower.ON and node.id >= self.config.suspend_exc_nodes
                    and not any(self.gpu_list[g].instances for g in node.gpus)):
                node.idle_since_s = self._now
                node.idle_version += 1
                events.append(self.events.event(self._now + self.config.suspend_time_s, EventKind.NODE_SUSPEND,
                                                 node.id, node.idle_version))
        self._idle_nodes.clear()
        return events

    def _suspend(self, node: SimNode) -> None:
        """Power saving: a node idle for suspend_time_s goes off (its timer was superseded otherwise)."""
        if node.power is NodePower.ON and not any(self.gpu_list[g].instances for g in node.gpus):
            self._power_off(node)
            self.node_suspends += 1

    def _power_on(self, node: SimNode) -> list[Event]:
        if node.power is not NodePower.OFF:
            return []
        self._integrate_node(node)
        self.node_wakes += 1
        node.idle_version += 1
        node.power = NodePower.WAKING
        node.ready_at_s = self._now + self.config.resume_time_s
        for g in node.gpus:
            gpu = self.gpu_list[g]
            gpu.integrate(self._now)
            gpu.powered = True
            if not gpu.instances:
                self._free[node.id].add(g)
        return [self.events.event(node.ready_at_s, EventKind.NODE_READY, node.id)]

    def _node_ready(self, node: SimNode) -> list[Event]:
        # An earlier resume's event (the node was powered off while waking, then resumed) is stale.
        if node.power is not NodePower.WAKING or self._now < node.ready_at_s:
            return []
        self._integrate_node(node)
        node.power = NodePower.ON
        if self._power_saving:
            self._idle_nodes.append(node)  # up with nothing to load (a policy's PowerOn): idle from now
        events: list[Event] = []
        for g in node.gpus:
            for i in list(self.gpu_list[g].instances):
                inst = self.live[i]
                if (inst.phase is InstancePhase.LOADING and inst.activity is not Activity.LOADING
                        and not inst.waits_for_memory):
                    events.extend(self._begin_load(inst))
        return events

    def _power_off(self, node: SimNode) -> None:
        if node.power is NodePower.OFF:
            return
        if any(self.gpu_list[g].instances for g in node.gpus):
            raise InvalidDecision(f"node {node.id} holds instances")
        self._integrate_node(node)
        node.power = NodePower.OFF
        node.idle_version += 1
        node.cache.clear()
        for g in node.gpus:
            gpu = self.gpu_list[g]
            gpu.integrate(self._now)
            gpu.powered = False
            self._free[node.id].discard(g)

    # -- plans and control ------------------------------------------------------------------------

    def _execute(self, plan: Plan) -> list[Event]:
        if self._bounded:
            plan = limit_plan(plan, self).plan
        events: list[Event] = []
        for action in plan.actions:
            try:
                events.extend(self._apply(action))
            except InvalidDecision:
                self.invalid_decisions += 1
        return events

    def _apply(self, action: Action) -> list[Event]:
        if isinstance(action, StartInstance):
            return self._start(action)[1]
        if isinstance(action, StopInstance):
            inst = self.live.get(action.instance_id)
            if inst is None:
                raise InvalidDecision(f"no instance {action.instance_id}")
            return self._stop_asked(inst)
        if isinstance(action, Migrate):
            source = self.live.get(action.instance_id)
            if source is None or source.phase is not InstancePhase.READY or source.restarted_by is not None:
                raise InvalidDecision(f"instance {action.instance_id} is not serving or is being restarted")
            return self._start(action, model=source.model, migration_of=source.id)[1]
        if isinstance(action, MoveQueued):
            return self._move_queued(action)
        if isinstance(action, PowerOff):
            self._power_off(self._node_of(action.node))
            return []
        if isinstance(action, PowerOn):
            return self._power_on(self._node_of(action.node))
        raise InvalidDecision(f"unknown action {action!r}")

    def _move_queued(self, action: MoveQueued) -> list[Event]:
        source = self.live.get(action.from_instance)
        target = self.live.get(action.to_instance)
        if (source is None or target is None or source is target or source.model != target.model
                or source.phase > InstancePhase.READY or target.phase > InstancePhase.READY or action.count < 1):
            raise InvalidDecision(f"cannot move requests from {action.from_instance} to {action.to_instance}")
        n = min(action.count, len(source.queue))
        if n == 0:
            return []
        moved = [source.queue.pop() for _ in range(n)]
        target.queue.extend(reversed(moved))
        self.request_migrations += n
        target.last_busy_s = self._now
        self._dirty.update(source.gpus)
        self._dirty.update(target.gpus)
        if target.phase is InstancePhase.READY:
            if target.activity is Activity.IDLE:
                return self._next_step(target)
            if target.activity is Activity.DECODE:
                return self._interrupt(target)
        return []

    def _node_of(self, node_id: int) -> SimNode:
        if not 0 <= node_id < len(self.node_list):
            raise InvalidDecision(f"no node {node_id}")
        return self.node_list[node_id]

    def _land_clocks(self) -> None:
        """Carry out the clock changes due by now (before the event at now reads any clock)."""
        for g, (clock, due_s) in list(self._clock_pending.items()):
            if due_s <= self._now:
                del self._clock_pending[g]
                self.gpu_list[g].clock_mhz = clock
                self.clock_changes += 1

    def _control_tick(self) -> list[Event]:
        dirty, self._dirty = self._dirty, set()
        events: list[Event] = []
        for g in sorted(dirty):
            events.extend(self._control_gpu(self.gpu_list[g]))
        return events

    def _control_gpu(self, gpu: SimGpu) -> list[Event]:
        if not gpu.instances:
            # An empty GPU goes back to default clocks; nothing runs on it, so the ramp costs nothing.
            self._clock_pending.pop(gpu.id, None)
            if gpu.clock_mhz != self.spec.max_clock_mhz:
                gpu.clock_mhz = self.spec.max_clock_mhz
                self.clock_changes += 1
            return []
        settings = self.policy.control(gpu, self)
        if settings is not None:
            return self._apply_settings(gpu, settings)
        return []

    def _apply_settings(self, gpu: SimGpu, settings: GpuSettings) -> list[Event]:
        """New settings take effect at each instance's next step boundary (a safe point); a new clock
        lands clock_change_s after it is asked for, so steps starting before then run at the old one; an
        SM share, unless ``live_share_change``, by a share restart (``_change_share``)."""
        events: list[Event] = []
        if settings.clock_mhz is not None:
            supported = self.spec.supported_clocks_mhz
            clock = min(supported, key=lambda c: abs(c - settings.clock_mhz))  # type: ignore[operator]
            pending = self._clock_pending.get(gpu.id)
            if pending is not None and pending[0] == clock:
                pass  # already on its way: asking again does not restart the ramp
            elif clock == gpu.clock_mhz:
                self._clock_pending.pop(gpu.id, None)  # back to the clock it runs at: the change is called off
            else:
                # A change still on its way is replaced: the GPU ramps to the latest clock asked for.
                self._clock_pending[gpu.id] = (clock, self._now + self.config.clock_change_s)
        # Batch caps and chunks first: a share restart's replacement starts with them (and an old
        # instance that a restart stops at once is no longer there to take them).
        for instance_id, cap in settings.batch_cap.items():
            inst = self.live.get(instance_id)
            if inst is None or cap < 1:
                self.invalid_decisions += 1
                continue
            inst.pending_batch_cap = cap
        for instance_id, chunk in settings.chunk_tokens.items():
            inst = self.live.get(instance_id)
            if inst is None or gpu.id not in inst.gpus or chunk < 1:
                self.invalid_decisions += 1
                continue
            inst.chunk_tokens = chunk  # read at the next step boundary
        # Shrinking shares first lets one settings object move SMs from one instance to another.
        def growth(item: tuple[int, float]) -> float:
            inst = self.live.get(item[0])
            return item[1] - inst.sm_pct if inst is not None else 0.0

        for instance_id, sm_pct in sorted(settings.sm_pct.items(), key=growth):
            inst = self.live.get(instance_id)
            if inst is None or gpu.id not in inst.gpus or not 0 < sm_pct <= 100:
                self.invalid_decisions += 1
                continue
            if not self.live_share_change:
                try:
                    events.extend(self._change_share(inst, sm_pct))
                except InvalidDecision:
                    self.invalid_decisions += 1
                continue
            if any(self.gpu_list[g].sm_pct_allocated - inst.sm_pct + sm_pct > 100 + 1e-6 for g in inst.gpus):
                self.invalid_decisions += 1
                continue
            # The step in flight keeps the latency it started with; the next step runs at the new share.
            for g in inst.gpus:
                self.gpu_list[g].sm_pct_allocated += sm_pct - inst.sm_pct
            inst.sm_pct = inst.sm_pct_reserved = sm_pct
        return events

    # -- measuring --------------------------------------------------------------------------------

    def _total_energy_j(self) -> tuple[float, dict[str, float]]:
        parts = dict.fromkeys(ENERGY_PARTS, 0.0)
        for gpu in self.gpu_list:
            gpu.integrate(self._now)
            parts["gpu_active_j"] += gpu.energy_active_j
            parts["gpu_idle_j"] += gpu.energy_idle_j
            parts["cold_start_j"] += gpu.energy_cold_start_j
            parts["migration_j"] += gpu.energy_migration_j
            parts["share_restart_j"] += gpu.energy_share_restart_j
        static_w = self.config.node_static_w_per_gpu * self.config.gpus_per_node
        for node in self.node_list:
            self._integrate_node(node)
            parts["node_static_j"] += static_w * node.powered_s
            parts["standby_j"] += self.config.standby_w * (self._now - node.powered_s)
        return sum(parts.values()), parts

    def _sample(self) -> None:
        energy_j, _ = self._total_energy_j()
        last_s, last_j = self._last_sample
        if self._now > last_s:
            self._timeline.append((self._now, (energy_j - last_j) / (self._now - last_s)))
        self._last_sample = (self._now, energy_j)

    def _result(self, wall_s: float) -> SimResult:
        energy_j, parts = self._total_energy_j()
        records = self.records
        n = len(records)
        completed = [rec for rec in records if not rec.dropped and not math.isnan(rec.finish_s)]
        ttft = np.array([rec.first_token_s - rec.request.arrival_s for rec in completed])
        tbt = np.array([(rec.finish_s - rec.first_token_s) / (rec.request.output_tokens - 1)
                        if rec.request.output_tokens > 1 else 0.0 for rec in completed])
        ttft_slo = np.array([self.model_info[rec.request.model].slo.ttft_for(rec.request.prompt_tokens)
                             for rec in completed])
        tbt_slo = np.array([self.model_info[rec.request.model].slo.tbt_s for rec in completed])
        ttft_ok = ttft <= ttft_slo
        tbt_ok = tbt <= tbt_slo
        per_model: dict[str, dict[str, float]] = {}
        for name in self.model_info:
            mask = np.array([rec.request.model == name for rec in completed], dtype=bool)
            total = sum(1 for rec in records if rec.request.model == name)
            if total:
                per_model[name] = {"requests": total,
                                   "slo_attainment": float(np.sum(ttft_ok[mask] & tbt_ok[mask]) / total)}
        gpu_powered_s = sum(node.powered_s for node in self.node_list) * self.config.gpus_per_node

        def pct(values: np.ndarray, q: float) -> float:
            return float(np.percentile(values, q)) if len(values) else math.nan

        return SimResult(
            policy=self.policy.name, energy_j=energy_j, energy_parts_j=parts,
            generated_tokens=int(sum(rec.request.output_tokens for rec in completed)),
            requests_total=n, requests_completed=len(completed), requests_dropped=n - len(completed),
            slo_attainment=float(np.sum(ttft_ok & tbt_ok) / n) if n else 1.0,
            ttft_attainment=float(np.sum(ttft_ok) / n) if n else 1.0,
            tbt_attainment=float(np.sum(tbt_ok) / n) if n else 1.0,
            ttft_p50_s=pct(ttft, 50), ttft_p99_s=pct(ttft, 99), tbt_p50_s=pct(tbt, 50), tbt_p99_s=pct(tbt, 99),
            gpu_hours_powered=gpu_powered_s / 3600, node_hours_powered=sum(n.powered_s for n in self.node_list) / 3600,
            migrations=self.migrations, request_migrations=self.request_migrations,
            cold_starts=self.cold_starts, invalid_decisions=self.invalid_decisions,
            share_restarts=self.share_restarts, clock_changes=self.clock_changes,
            node_suspends=self.node_suspends, node_wakes=self.node_wakes,
            sim_time_s=self._now, sim_wall_s=wall_s, events=self.events.handled,
            drop_reasons=dict(self.drop_reasons), clamped_lookups=self.clamped_lookups, per_model=per_model,
            power_timeline=self._timeline)


if TYPE_CHECKING:

    def _is_a_cluster_view(simulation: Simulation) -> ClusterView:
        return simulation  # mypy checks that Simulation implements the protocol
