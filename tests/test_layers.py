"""The package's layering, read from the source (``ast``): what the simulator, festinad and festina-node
share lives once, in ``festina_hpc.cluster``, and only the simulator's own front ends import ``sim/``.

``sim/`` builds on the shared core like the daemon and the node do; were ``daemon/``, ``node/`` or
``serve/`` to import it, a compute node would need the simulator (and numpy's trace code) to serve,
and a figure changed for the simulator would silently change the live system.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "festina_hpc"
SIM = "festina_hpc.sim"
# Front ends that run the simulator: the whole of ``festina sim``, and the two ``festina bench``
# commands that bench it (the simulator's speed, and a policy's decision cost on a simulated cluster).
MAY_IMPORT_SIM: dict[str, frozenset[str] | None] = {
    "festina_hpc/cli/sim.py": None,  # anywhere in the module
    "festina_hpc/cli/bench.py": frozenset({"bench_sim", "bench_policy"}),  # only in these commands
}
# What the drivers share, and the one module that defines each.
DEFINED_ONCE = {
    "USABLE_MEMORY_FRAC": "festina_hpc/cluster/figures.py",
    "ClusterConfig": "festina_hpc/cluster/figures.py",
    "ColdStartModel": "festina_hpc/cluster/figures.py",
    "STANDARD_LOAD": "festina_hpc/cluster/figures.py",
    "FAST_LOAD": "festina_hpc/cluster/figures.py",
    "RATE_HALF_LIFE_S": "festina_hpc/cluster/rate.py",
    "decayed_rate": "festina_hpc/cluster/rate.py",
    "RateMeter": "festina_hpc/cluster/rate.py",
    "default_slo": "festina_hpc/cluster/slo.py",
    "DEFAULT_TTFT_MULTIPLIER": "festina_hpc/cluster/slo.py",
    "DEFAULT_TBT_MULTIPLIER": "festina_hpc/cluster/slo.py",
}
RATE_MODULE = "festina_hpc/cluster/rate.py"


def modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE.parent).as_posix(), ast.parse(path.read_text(), filename=str(path))


def module_name(rel: str) -> str:
    parts = rel.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(node: ast.Import | ast.ImportFrom, rel: str) -> list[str]:
    """The absolute module names an import statement names (``from x import y``: ``x`` and ``x.y``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module_name(rel).split(".")
        if not rel.endswith("__init__.py"):
            package = package[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def imports_with_function(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, str | None]]:
    """Every import of a module, with the name of the top-level function it sits in (None: module level)."""
    for top in tree.body:
        name = top.name if isinstance(top, ast.FunctionDef | ast.AsyncFunctionDef) else None
        for node in ast.walk(top):
            if isinstance(node, ast.Import | ast.ImportFrom):
                yield node, name


def sim_imports_outside_sim() -> list[str]:
    found = []
    for rel, tree in modules():
        if rel.startswith("festina_hpc/sim/"):
            continue
        allowed = MAY_IMPORT_SIM.get(rel, frozenset())
        for node, function in imports_with_function(tree):
            if not any(name == SIM or name.startswith(SIM + ".") for name in imported(node, rel)):
                continue
            if allowed is None or function in allowed:
                continue
            found.append(f"{rel}:{node.lineno} ({function or 'module level'})")
    return found


def test_no_module_outside_sim_imports_the_simulator() -> None:
    assert sim_imports_outside_sim() == []


def test_the_check_sees_relative_and_lazy_imports() -> None:
    # What the walk would report, on snippets of the forms it must catch.
    lazy = ast.parse("def f():\n    from festina_hpc.sim.workload import default_slo\n")
    relative = ast.parse("from ..sim import cluster\n")
    bare = ast.parse("import festina_hpc.sim.cluster as c\n")
    (node, function), = imports_with_function(lazy)
    assert function == "f" and SIM + ".workload" in imported(node, "festina_hpc/node/main.py")
    (node, _), = imports_with_function(relative)
    assert SIM in imported(node, "festina_hpc/daemon/gateway.py")
    (node, _), = imports_with_function(bare)
    assert imported(node, "festina_hpc/config.py") == [SIM + ".cluster"]


def top_level_definitions(tree: ast.Module) -> Iterator[str]:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            yield node.name
        elif isinstance(node, ast.Assign):
            yield from (t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            yield node.target.id


@pytest.mark.parametrize("name", sorted(DEFINED_ONCE))
def test_what_the_drivers_share_is_defined_once(name: str) -> None:
    where = [rel for rel, tree in modules() if name in set(top_level_definitions(tree))]
    assert where == [DEFINED_ONCE[name]]


def test_only_the_rate_meter_decays_a_rate() -> None:
    # A driver that used the half-life or the decay itself would keep a second rate estimate.
    users = sorted({rel for rel, tree in modules() if rel != RATE_MODULE for node in ast.walk(tree)
                    if isinstance(node, ast.Name) and node.id in {"RATE_HALF_LIFE_S", "decayed_rate"}})
    assert users == []
