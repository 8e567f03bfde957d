"""festinad's internal admin API: the consolidation plan now, applying exactly that plan, draining a model, nodes.

Mounted on the gateway's app by ``run_festinad`` (``add_admin_routes``) and used by
``festina consolidate`` and ``festina models remove --drain``:

- ``GET /admin/consolidate``: the plan ``policy.consolidate()`` returns for the live view now,
  summarised (migrations, the serving jobs they replace, nodes freed, energy saved over the
  policy's horizon) with a ``plan_id``, a digest of its actions;
- ``POST /admin/consolidate {"plan_id": ...}``: recomputes the plan and carries it out only
  if it is still the one named (409 otherwise: stale, or nothing to do), and never twice
  (409 naming when it was applied; the applied ids are also looked up in the decisions,
  whose reasons carry them, so a restarted festinad refuses them too). Every action is
  recorded in ``decisions`` by ``Festinad.execute``;
- ``POST /admin/drain-model {"model": ...}``: stops (drains, then cancels) the model's instances.
- ``POST /admin/node-control {"node": ..., "op": ..., "args": {...}}``: one signed request to that
  node's festina-node (``Festinad.control_node``: lock or reset a GPU's clock, set SM shares, drain an
  instance, status); 503 when ``[node_control]`` is off, 502 when the node refused or failed it.

Who may call them (``AdminApi._check``, run for ``/admin/*`` only, so ``/v1/*`` pays nothing for it):
with ``[gateway] require_keys = true``, an admin key (``festina keys create --role admin``): no key
or a bad one is 401, a user key 403. With keys off, a request from the loopback address (the head
node itself) or one carrying a valid admin key; anyone only where ``[daemon] admin_open = true`` says
so on purpose; others get 403 saying why. Refusals have the gateway's error shape. A reverse proxy
on the head node makes every request look local: run such a site with ``require_keys = true``.

Live consolidation moves an instance by start-then-cancel (see ``Festinad._migrate``), so a
"requeue" here is the source job replaced by a new one on the target node.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

from aiohttp import web

from festina_hpc.daemon.auth import Authenticator
from festina_hpc.daemon.festinad import Festinad
from festina_hpc.daemon.node_control import ADMIN_OPS, NodeControlError
from festina_hpc.policy.types import InstancePhase, Migrate, Plan, PowerOff, PowerOn
from festina_hpc.serve import openai
from festina_hpc.serve.server import error_response

APPLIED_MARK = "admin apply, plan "
LOOKBACK = timedelta(days=7)  # how far back the decisions are searched for an applied plan id


def plan_id(plan: Plan) -> str:
    """A short digest of the plan's actions (view ids), stable while the plan is the same."""
    text = json.dumps([repr(a) for a in plan.actions])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _horizon_figures(festinad: Festinad) -> tuple[float, float, float]:
    """(horizon_s, node static W, GPU idle W) of the policy, where it has them (festina's consolidator does)."""
    from festina_hpc.policy import festina as festina_policy

    horizon_s = float(getattr(festina_policy, "CONSOLIDATION_HORIZON_S", 0.0))
    context = festinad.policy.context
    node_w = float(getattr(context, "node_static_w", 0.0))
    spec = getattr(festinad.policy, "gpu_spec", None)
    idle_w = float(getattr(spec, "idle_w", 0.0))
    return horizon_s, node_w, idle_w


def summarise(festinad: Festinad, plan: Plan) -> dict[str, Any]:
    """The plan as the admin reads it: what moves where, which nodes empty, and the energy it saves."""
    view = festinad.view
    names = festinad.node_names
    migrations = []
    moving_from: dict[int, set[int]] = {}
    for action in plan.actions:
        if not isinstance(action, Migrate):
            continue
        inst = view.live.get(action.instance_id)
        source_node = inst.node if inst is not None else None
        target_node = view.gpu(action.gpus[0]).node if action.gpus else None
        if source_node is not None:
            moving_from.setdefault(source_node, set()).add(action.instance_id)
        migrations.append({
            "instance_id": action.instance_id, "model": inst.model if inst else None,
            "from_node": names[source_node] if source_node is not None else None,
            "to_node": names[target_node] if target_node is not None else None,
            "to_gpu_indexes": [list(view.node(view.gpu(g).node).gpus).index(g) for g in action.gpus],
            "sm_pct": action.sm_pct,
            "slurm_job_id": inst.slurm_job_id if inst else None})
    freed = []
    for node, moving in moving_from.items():
        on_node = {i for g in view.node(node).gpus for i in view.gpu(g).instances}
        if on_node <= moving:
            freed.append(node)
    powered_off = [a.node for a in plan.actions if isinstance(a, PowerOff)]
    horizon_s, node_w, idle_w = _horizon_figures(festinad)
    saved_j = sum(horizon_s * (node_w + len(view.node(n).gpus) * idle_w) for n in {*freed, *powered_off})
    load_energy = getattr(festinad.policy, "_load_energy_j", None)
    cost_j = 0.0
    if callable(load_energy):
        for m in migrations:
            if m["model"] is not None:
                cost_j += float(load_energy(view.model(str(m["model"]))))
    return {
        "plan_id": plan_id(plan) if plan else None,
        "reason": plan.reason,
        "actions": len(plan.actions),
        "migrations": migrations,
        "requeues": [{"slurm_job_id": m["slurm_job_id"], "from_node": m["from_node"], "to_node": m["to_node"]}
                     for m in migrations if m["slurm_job_id"] is not None],
        "power_off": [names[n] for n in powered_off],
        "power_on": [names[a.node] for a in plan.actions if isinstance(a, PowerOn)],
        "nodes_freed": sorted({names[n] for n in (*freed, *powered_off)}),
        "horizon_s": horizon_s,
        "energy_saved_j": round(saved_j - cost_j, 1),
        "energy_saved_gross_j": round(saved_j, 1),
        "migration_cost_j": round(cost_j, 1),
    }


def _error(status: int, message: str) -> web.Response:
    error_type = "invalid_request_error" if status < 500 else "server_error"
    return web.json_response(openai.error_body(message, error_type), status=status)  # the gateway's one shape


def is_loopback(remote: str | None) -> bool:
    """Whether a peer address is this host's loopback (127.0.0.0/8, ::1, or 127.x mapped into IPv6)."""
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:  # a Unix socket's peer, or none: not known to be local
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminApi:
    """The handlers (see the module docstring); one apply at a time. ``auth``: the gateway's key checks
    (None: no keys at all, as with ``require_keys = false``); ``admin_open``: ``[daemon] admin_open``."""

    def __init__(self, festinad: Festinad, auth: Authenticator | None = None, admin_open: bool = False) -> None:
        self.festinad = festinad
        self.auth = auth
        self.admin_open = admin_open
        self._applied: dict[str, str] = {}  # plan id -> when (ISO)
        self._lock = asyncio.Lock()

    def routes(self, app: web.Application) -> None:
        # One table, every entry guarded: a route added here cannot be left open by mistake.
        for method, path, handler in (("GET", "/admin/consolidate", self.get_plan),
                                      ("POST", "/admin/consolidate", self.apply),
                                      ("POST", "/admin/drain-model", self.drain_model),
                                      ("POST", "/admin/node-control", self.node_control)):
            app.router.add_route(method, path, self._guarded(handler))

    def _guarded(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                await self._check(request)
            except openai.ApiError as exc:
                return error_response(exc)
            return await handler(request)
        return guarded

    async def _check(self, request: web.Request) -> None:
        """Return when the request may use the admin API; else raise its 401 or 403 (module docstring)."""
        header = request.headers.get("Authorization")
        if self.auth is not None and self.auth.config.require_keys:
            tenant = await self.auth.authenticate(header)  # 401: no key, or not a valid one
            if tenant.role != "admin":
                raise openai.ApiError(403, f"API key of {tenant.user_name}/{tenant.account} is a {tenant.role} key: "
                                           "festinad's admin API needs an admin key "
                                           "(`festina keys create --role admin`)",
                                      error_type="permission_error", code="admin_key_required")
            return
        if self.admin_open or is_loopback(request.remote):
            return
        if self.auth is not None and header is not None:
            tenant = await self.auth.authenticate(header)  # a bad fk_... key is 401 here too
            if tenant.key_id is not None and tenant.role == "admin":
                return
        raise openai.ApiError(403, f"festinad's admin API does not answer {request.remote or 'this peer'}: with "
                                   "[gateway] require_keys = false it answers the loopback address (run the "
                                   "command on the head node) or an admin key; [daemon] admin_open = true opens "
                                   "it to every address", error_type="permission_error", code="admin_not_local")

    async def get_plan(self, request: web.Request) -> web.Response:
        plan = self.festinad.policy.consolidate(self.festinad.view)
        return web.json_response(summarise(self.festinad, plan))

    def _applied_at(self, wanted: str) -> str | None:
        if wanted in self._applied:
            return self._applied[wanted]
        store = self.festinad.store
        since = self.festinad._now() - LOOKBACK
        for row in store.decisions(since=since, limit=100_000):
            if f"{APPLIED_MARK}{wanted}" in row.reason:
                return row.decided_at.isoformat(timespec="seconds")
        return None

    async def apply(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "body is not JSON")
        wanted = body.get("plan_id") if isinstance(body, dict) else None
        if not isinstance(wanted, str) or not wanted:
            return _error(400, f"plan_id = {wanted!r} must be the plan_id that --dry-run printed")
        async with self._lock:
            when = self._applied_at(wanted)
            if when is not None:
                return _error(409, f"plan {wanted} was already applied at {when}: nothing done "
                                   "(run `festina consolidate --dry-run` for the plan now)")
            plan = self.festinad.policy.consolidate(self.festinad.view)
            if not plan:
                return _error(409, f"plan {wanted} is not the plan now: the policy has nothing to consolidate; "
                                   "nothing done")
            current = plan_id(plan)
            if current != wanted:
                return _error(409, f"plan {wanted} is stale: the policy now proposes plan {current}; nothing done "
                                   "(review it with `festina consolidate --dry-run`)")
            summary = summarise(self.festinad, plan)
            self._applied[wanted] = self.festinad._now().isoformat(timespec="seconds")
            await self.festinad.execute(replace(plan, reason=f"{plan.reason} ({APPLIED_MARK}{wanted})"))
        moved = [m for m in summary["migrations"] if m["instance_id"] not in self.festinad.view.live]
        summary["applied"] = True
        summary["migrations_done"] = len(moved)
        summary["migrations_failed"] = len(summary["migrations"]) - len(moved)
        return web.json_response(summary)

    async def drain_model(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "body is not JSON")
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str) or not model:
            return _error(400, f"model = {model!r} must name a model")
        instances = [i for i in self.festinad.view.live.values()
                     if i.model == model and i.phase is not InstancePhase.STOPPED]
        for inst in instances:
            await self.festinad.stop_instance(inst, "model removed from the catalogue")
        return web.json_response({"model": model, "stopped": sorted(i.id for i in instances)})


    async def node_control(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "body must be a JSON object")
        node, op, args = body.get("node"), body.get("op"), body.get("args", {})
        if not isinstance(node, str) or node not in self.festinad.node_names:
            return _error(400, f"node = {node!r} is not a node of the cluster")
        if op not in ADMIN_OPS:
            return _error(400, f"op = {op!r} is not one of {', '.join(ADMIN_OPS)}")
        if not isinstance(args, dict):
            return _error(400, "args must be a JSON object")
        if self.festinad.node_control is None:
            return _error(503, "festinad has no channel to the nodes: set [node_control] port")
        try:
            result = await self.festinad.control_node(node, op, args)
        except NodeControlError as exc:
            return _error(502, str(exc))
        return web.json_response({"node": node, "op": op, "result": result})


def add_admin_routes(app: web.Application, festinad: Festinad, auth: Authenticator | None = None,
                     admin_open: bool = False) -> AdminApi:
    api = AdminApi(festinad, auth, admin_open)
    api.routes(app)
    return api
