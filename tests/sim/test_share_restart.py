"""Share restarts: an MPS client's SM share is fixed when its CUDA context is created, so unless a
site declares a live mechanism (``live_share_change``) a share change is a new instance at that
share, loaded beside (or, short of memory, after) the old one."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest

from festina_hpc.config import default_profiles_dir
from festina_hpc.policy.base import Policy, PolicyContext
from festina_hpc.policy.types import (
    ClusterView,
    GpuSettings,
    GpuView,
    InstancePhase,
    NodePower,
    Placement,
    Plan,
    Request,
    Route,
    StartInstance,
    StopInstance,
)
from festina_hpc.profiles.calibration_doc import SHARE_RESTARTS
from festina_hpc.sim.cluster import Activity, RequestRecord, SimInstance
from festina_hpc.sim.engine import Event
from festina_hpc.sim.simulator import ENERGY_PARTS, Simulation
from tests.policy.conftest import GPU, STORE, poisson_requests, request, simulation

MODEL = "llama-3.1-8b"
CHANGE_AT_S = 30.0


class ShareOnce(Policy):
    """One instance of MODEL on GPU 0 at 50% of its SMs and ``memory_fraction`` of its memory; at
    CHANGE_AT_S its control asks for ``new_pct`` (once), and asks again at every later tick (what a
    controller that re-sends its targets does)."""

    name = "share-once"

    def __init__(self, context: PolicyContext, memory_fraction: float, new_pct: float = 80.0):
        super().__init__(context)
        self.memory_fraction = memory_fraction
        self.new_pct = new_pct
        self.asked_s = math.nan
        self.old_id: int | None = None

    def place(self, request: Request, view: ClusterView) -> Placement:
        mine = [i for i in view.instances_of(request.model) if i.phase <= InstancePhase.READY]
        if not mine:
            return StartInstance(request.model, (0,), sm_pct=50.0, memory_fraction=self.memory_fraction)
        return Route(min(mine, key=lambda i: (i.phase is not InstancePhase.READY, i.id)).id)  # ready first

    def scale(self, view: ClusterView) -> Plan:
        return Plan()

    def control(self, gpu: GpuView, view: ClusterView) -> GpuSettings | None:
        if view.now_s < CHANGE_AT_S or not gpu.instances:
            return None
        if self.old_id is None:
            self.old_id, self.asked_s = gpu.instances[0], view.now_s
        if self.old_id not in gpu.instances or view.instance(self.old_id).phase is not InstancePhase.READY:
            return None
        return GpuSettings(sm_pct={self.old_id: self.new_pct})


class Recording(Simulation):
    """Logs when instances begin loading, become ready and are removed, and checks the SM books
    after every event: each GPU's allocation is what its instances reserve, and a restart's pair
    reserves the larger of its two shares."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.log: list[tuple[str, float, int]] = []

    def _begin_load(self, inst: SimInstance) -> list[Event]:
        self.log.append(("load", self._now, inst.id))
        return super()._begin_load(inst)

    def _instance_ready(self, inst: SimInstance) -> list[Event]:
        self.log.append(("ready", self._now, inst.id))
        return super()._instance_ready(inst)

    def _remove(self, inst: SimInstance) -> list[Event]:
        self.log.append(("removed", self._now, inst.id))
        return super()._remove(inst)

    def _handle(self, e: Event) -> Iterable[Event]:
        events = list(super()._handle(e))
        for gpu in self.gpu_list:
            residents = [self.live[i] for i in gpu.instances]
            assert gpu.sm_pct_allocated == pytest.approx(sum(i.sm_pct_reserved for i in residents))
            assert gpu.sm_pct_allocated <= 100 + 1e-9 and gpu.memory_fraction_allocated <= 1 + 1e-9
            for new in residents:
                old = self.live.get(new.restart_of) if new.restart_of is not None else None
                if old is not None:
                    assert old.sm_pct_reserved + new.sm_pct_reserved == pytest.approx(max(old.sm_pct, new.sm_pct))
        return events

    def when(self, what: str, instance_id: int) -> float:
        return next(t for w, t, i in self.log if w == what and i == instance_id)


def run_share_once(memory_fraction: float, live: bool = False, rate_per_s: float = 4.0,
                   duration_s: float = 120.0) -> tuple[Recording, ShareOnce, list[Request]]:
    requests = poisson_requests(np.random.default_rng(5), {MODEL: rate_per_s}, duration_s)
    policy = ShareOnce(PolicyContext(STORE, GPU, live_share_change=live), memory_fraction)
    template = simulation(policy, requests, gpus_per_node=1)
    sim = Recording(template.config, STORE, policy, requests, {MODEL: template.model_info[MODEL].slo},
                    live_share_change=live)
    return sim, policy, requests


def test_a_share_change_restarts_the_instance_and_the_old_one_serves_until_the_replacement_is_ready() -> None:
    sim, policy, requests = run_share_once(memory_fraction=0.4)  # room for a second copy
    result = sim.run()
    old = policy.old_id
    assert old is not None
    (new,) = {i for w, _, i in sim.log if w == "load"} - {old}
    loaded_s, ready_s = sim.when("load", new), sim.when("ready", new)
    assert loaded_s == policy.asked_s  # it loads at once, beside the old one
    weights = sim.model_info[MODEL].weights_bytes_per_gpu
    assert ready_s - loaded_s == pytest.approx(sim._host_cache_load.load_s(weights))  # from host memory
    assert sim.when("removed", old) >= ready_s  # the old one serves until then, and drains
    served_meanwhile = [rec for rec in sim.records if loaded_s < rec.first_token_s < ready_s]
    assert served_meanwhile  # no downtime: requests got their first token during the load
    assert (result.share_restarts, result.cold_starts, result.migrations) == (1, 1, 0)
    assert result.invalid_decisions == 0  # asking again for the share under way is no new decision
    assert result.energy_parts_j["share_restart_j"] > 0
    assert sum(result.energy_parts_j[p] for p in ENERGY_PARTS) == pytest.approx(result.energy_j)
    assert result.requests_completed == result.requests_total == len(requests)
    (inst,) = sim.instances()
    assert inst.id == new and inst.sm_pct == 80.0 and sim.gpu(0).sm_pct_allocated == 80.0


def test_a_restart_short_of_memory_drains_the_old_instance_first() -> None:
    """Two copies do not fit the GPU's memory: the old instance takes no new request, its queue
    moves to the replacement, which begins loading only once the old one has finished what it
    held and freed its memory. Requests wait meanwhile (the cost), none is lost."""
    sim, policy, requests = run_share_once(memory_fraction=0.6)
    result = sim.run()
    old = policy.old_id
    assert old is not None
    (new,) = {i for w, _, i in sim.log if w == "load"} - {old}
    assert sim.when("removed", old) == sim.when("load", new) >= policy.asked_s
    assert not [rec for rec in sim.records if sim.when("load", new) < rec.first_token_s < sim.when("ready", new)]
    assert (result.share_restarts, result.cold_starts, result.migrations, result.invalid_decisions) == (1, 1, 0, 0)
    assert result.energy_parts_j["share_restart_j"] > 0
    assert result.requests_completed == result.requests_total == len(requests)


def test_short_of_memory_the_old_instances_queue_moves_at_once_and_it_takes_no_new_request() -> None:
    sim = simulation("vllm", [request()], gpus_per_node=1)
    old = sim._start(StartInstance(MODEL, (0,), sm_pct=50.0, memory_fraction=0.6))[0]
    sim._instance_ready(old)
    old.queue.extend(RequestRecord(request(rid=i)) for i in range(1, 4))
    sim._next_step(old)  # admits them
    old.queue.extend(RequestRecord(request(rid=i)) for i in range(4, 6))
    events = sim._apply_settings(sim.gpu(0), GpuSettings(sm_pct={old.id: 30.0}))
    (new,) = [i for i in sim.instances() if i.id != old.id]
    assert not events and new.waits_for_memory and new.activity is Activity.IDLE  # not loading yet
    assert old.phase is InstancePhase.DRAINING and not old.queue and old.running == 3
    assert [r.request.id for r in new.queue] == [4, 5]
    assert sim.gpu(0).memory_fraction_allocated == pytest.approx(0.6)
    assert sim.gpu(0).sm_pct_allocated == 50.0  # the pair at the larger share until the old one is gone
    events = sim._remove(old)
    assert [e.payload for e in events] == [new.id] and new.activity is Activity.LOADING
    assert sim.gpu(0).sm_pct_allocated == 30.0 and sim.gpu(0).memory_fraction_allocated == pytest.approx(0.6)


def test_with_live_share_change_the_share_changes_in_place() -> None:
    sim, policy, requests = run_share_once(memory_fraction=0.4, live=True)
    result = sim.run()
    assert result.share_restarts == 0 and result.energy_parts_j["share_restart_j"] == 0.0
    assert [w for w, _, _ in sim.log] == ["load", "ready"]  # one instance throughout
    (inst,) = sim.instances()
    assert inst.sm_pct == 80.0 and result.invalid_decisions == 0
    assert result.requests_completed == len(requests)
    direct = simulation("vllm", [request()], live_share_change=True)
    inst = ready(direct, StartInstance(MODEL, (0,), sm_pct=50.0, memory_fraction=0.4))
    direct._apply_settings(direct.gpu(0), GpuSettings(sm_pct={inst.id: 80.0}))
    assert inst.sm_pct == 80.0 and direct.gpu(0).instances == [inst.id] and direct.share_restarts == 0


def ready(sim: Simulation, decision: StartInstance) -> SimInstance:
    inst = sim._start(decision)[0]
    sim._instance_ready(inst)
    return inst


def test_a_restart_under_way_takes_no_other_share_and_a_loading_instance_keeps_its_own() -> None:
    sim = simulation("vllm", [request()], models=["mistral-7b"])
    a = ready(sim, StartInstance(MODEL, (0,), sm_pct=40.0, memory_fraction=0.3))
    b = ready(sim, StartInstance("mistral-7b", (0,), sm_pct=40.0, memory_fraction=0.2))  # room for three copies
    sim._apply_settings(sim.gpu(0), GpuSettings(sm_pct={a.id: 60.0}))
    (new,) = [i for i in sim.instances_of(MODEL) if i.id != a.id]
    assert sim.gpu(0).sm_pct_allocated == 100.0  # others 40 + the pair at max(40, 60)
    sim._apply_settings(sim.gpu(0), GpuSettings(sm_pct={a.id: 60.0}))  # the restart under way
    assert sim.invalid_decisions == 0 and sim.share_restarts == 1
    sim._apply_settings(sim.gpu(0), GpuSettings(sm_pct={a.id: 50.0}))  # another share: refused
    sim._apply_settings(sim.gpu(0), GpuSettings(sm_pct={new.id: 50.0}))  # the replacement is loading
    assert sim.invalid_decisions == 2 and sim.share_restarts == 1
    sim._apply_settings(sim.gpu(0), GpuSettings(sm_pct={b.id: 10.0}))
    assert sim.share_restarts == 2 and sim.invalid_decisions == 2
    assert sim.gpu(0).sm_pct_allocated == 100.0  # a shrink frees nothing until the old copy is gone


def test_a_share_change_that_does_not_fit_is_refused_whole() -> None:
    sim = simulation("vllm", [request()], models=["mistral-7b"])
    a = ready(sim, StartInstance(MODEL, (0,), sm_pct=50.0, memory_fraction=0.4))
    ready(sim, StartInstance("mistral-7b", (0,), sm_pct=40.0, memory_fraction=0.4))
    sim._apply_settings(sim.gpu(0), GpuSettings(sm_pct={a.id: 70.0}))
    assert sim.invalid_decisions == 1 and sim.share_restarts == 0 and len(sim.live) == 2


def test_stopping_an_instance_whose_restart_is_under_way_stops_the_replacement_too() -> None:
    sim = simulation("vllm", [request()])
    old = ready(sim, StartInstance(MODEL, (0,), sm_pct=50.0, memory_fraction=0.4))
    sim._apply_settings(sim.gpu(0), GpuSettings(sm_pct={old.id: 30.0}))
    assert len(sim.live) == 2
    sim._execute(Plan((StopInstance(old.id),)))
    assert not sim.live and sim.gpu(0).sm_pct_allocated == 0.0 and sim.gpu(0).memory_fraction_allocated == 0.0
    assert 0 in sim.free_gpus()


def test_an_instance_that_waits_for_its_node_starts_at_the_new_share() -> None:
    """Its engine has not started yet: nothing to restart."""
    sim = simulation("vllm", [request()])
    sim.node(0).power = NodePower.OFF
    inst = sim._start(StartInstance(MODEL, (0,), sm_pct=50.0, memory_fraction=0.4))[0]
    assert inst.activity is not Activity.LOADING
    sim._apply_settings(sim.gpu(0), GpuSettings(sm_pct={inst.id: 30.0}))
    assert inst.sm_pct == 30.0 and sim.gpu(0).sm_pct_allocated == 30.0 and sim.share_restarts == 0


def test_calibration_md_documents_the_share_restart_as_its_renderer_writes_it() -> None:
    shipped = (Path(default_profiles_dir()) / "CALIBRATION.md").read_text(encoding="utf-8")
    assert "\n".join(SHARE_RESTARTS) in shipped


def test_a_restart_takes_the_chunk_and_batch_cap_asked_for_with_it() -> None:
    """Settings that come with a share change are the replacement's; the old instance, stopped at
    once (idle, short of memory), is no reason to refuse them."""
    sim = simulation("vllm", [request()], gpus_per_node=1)
    old = ready(sim, StartInstance(MODEL, (0,), sm_pct=50.0, memory_fraction=0.6))
    sim._apply_settings(sim.gpu(0), GpuSettings(sm_pct={old.id: 30.0}, chunk_tokens={old.id: 512},
                                                batch_cap={old.id: 64}))
    (new,) = sim.instances()
    assert old.id not in sim.live and new.sm_pct == 30.0 and sim.invalid_decisions == 0
    assert (new.chunk_tokens, new.batch_cap) == (512, 64)
