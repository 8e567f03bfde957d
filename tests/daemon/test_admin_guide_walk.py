"""docs/admin-guide.md walked on a local Slurm cluster, each step's ``festina`` output checked.

Every line of the guide's shell blocks that names ``festina``, ``festina-node`` or ``festinad`` is
either run here (``Cli.guide``, verbatim from the guide, with the guide's placeholders such as
``gpu07`` or ``ID`` replaced by this cluster's) or in ``NOT_RUNNABLE`` with why it cannot run on a
dev cluster; ``test_every_guide_command_is_walked_or_listed`` (no Slurm needed) fails when the guide
gains a line that is neither, so the guide cannot drift from what festina does.

Install: ``festina completion bash``. Configure: ``festina db upgrade``, the guide's two ``festina
models add`` lines, ``festina models list``, ``festina profiles list``. Tenants: keys for alice and
bob and an admin key in a mode-600 file; festinad (a subprocess, as systemd would run it, with
``require_keys = true``, on the dev cluster's shared database, with a signed channel to a node)
serves the catalogue to alice's key; bob's key is revoked and refused within
``key_cache_ttl_s``. Operate: ``festina status`` (text and ``--json``) shows both models'
instances and their SLO attainment; the admin commands without the admin key are refused, with it
``festina consolidate --dry-run`` prints a plan that frees a node, ``--apply --plan-id`` carries it
out through festinad (the node ends with no instance and no festina job) and the same plan applied
again is refused with nothing done; ``festina decisions`` lists the adoptions and the admin's
migration with its plan id, by node name; ``festina status`` then shows the freed node powered off
by Slurm's power saving; a node is drained and resumed, a GPU's clock locked and an instance drained
through festinad and festina-node; ``festina energy report --by model`` has both models' energy
from festina-node's live attribution; ``festina bench status --json`` renders 1,024 GPUs.
The CLI runs in-process (``main(argv)``, what the console script calls) with the config and
``SLURM_CONF`` in the environment, as an admin's shell has them.

A consolidation move is made certain: two users' serving jobs from the documented sbatch
template, llama with ``--gres=mps:50`` on n1 and mistral with ``mps:20`` on n2, run before
festinad starts; festinad adopts them and the requests go to them, so festinad places nothing
of its own that could take the room. One fits beside the other on that node's MPS GPU (this
Slurm confines a node's MPS jobs to one GPU: a share festinad's view puts on a node's other,
empty GPU stays pending, so a layout where the only room is there would be a failed move, not
a test of the CLI). festinad's own consolidation period is an hour, so the CLI's ``--apply``
is what moves it.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from festina_hpc.cli.main import main
from festina_hpc.devcluster import DevClusterConfig, free_ports
from festina_hpc.slurm.cli_backend import CliSlurmClient
from tests.daemon.live import ROOT, ask, daemon_config, festina_jobs, festinad, user_job, wait_http

GUIDE = ROOT / "docs" / "admin-guide.md"
FESTINA_WORDS = {"festina", "festina-node", "festinad"}
SHELL_FENCES = {"sh", "bash", "shell", "console"}
OPERATORS = {";", "&&", "||", "|", "(", ")"}
REDIRECTIONS = {">", ">>", "<", "2>", "&>"}

# The guide's lines that cannot run on a dev cluster, and why. A line here is checked to still be in the guide.
NOT_RUNNABLE = {
    # Creates a system user on the site's head node and GPU nodes: the dev cluster runs everything as root.
    "useradd --system --home /var/lib/festina festina",
    # Writes /etc/slurm on a GPU node: the dev cluster writes its own festina-node.path beside its slurm.conf.
    "echo /opt/festina/venv/bin/festina-node > /etc/slurm/festina-node.path",
    # systemd units on a real head node and GPU nodes: the walk starts festinad as the unit's ExecStart does, and
    # the dev cluster starts festina-node serve on every node (tests/daemon/test_dev_cluster_nodes.py and the like).
    "cp deploy/systemd/festinad.service /etc/systemd/system/ && systemctl enable --now festinad",
    "cp deploy/systemd/festina-node.service /etc/systemd/system/ && systemctl enable --now festina-node",
    "systemctl restart festinad",  # the walk starts festinad after the catalogue is written, which is the point
    "systemctl stop festinad",
    "systemctl start festinad",
    # The site's PostgreSQL database named festina; the walk's is the dev cluster's SQLite file.
    "pg_dump festina > festina-before-upgrade.sql",
}


def _tokens(line: str) -> list[str]:
    """Shell words and operators of ``line``, comments dropped (shlex, never a shell)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def guide_lines(text: str) -> list[str]:
    """The guide's shell-block lines that name festina, festina-node or festinad as a word (a command, its
    path, a unit, a user): continuation lines joined, the trailing comment dropped, spaces collapsed."""
    lines: list[str] = []
    fence: str | None = None
    pending = ""
    for raw in text.splitlines():
        if raw.startswith("```"):
            fence = None if fence is not None else raw[3:].strip()
            continue
        if fence not in SHELL_FENCES:
            continue
        joined = pending + raw.strip()
        if joined.endswith("\\"):
            pending = joined[:-1] + " "
            continue
        pending = ""
        line = " ".join(re.sub(r"(^|\s)#.*$", "", joined).split())
        if line and any(Path(word).name in FESTINA_WORDS for word in _tokens(line)):
            lines.append(line)
    return lines


def guide_commands(line: str) -> list[list[str]]:
    """The festina commands of a guide line, each as argv: the line split at ``;``, ``&&``, ``|`` and
    parentheses, redirections dropped (the walk checks the output itself), other commands (``umask``,
    ``jq``) left to the walk."""
    commands: list[list[str]] = []
    segment: list[str] = []
    tokens = _tokens(line) + [";"]
    skip = False
    for token in tokens:
        if skip:
            skip = False
        elif token in REDIRECTIONS:
            skip = True
        elif token in OPERATORS:
            if segment and Path(segment[0]).name in FESTINA_WORDS:
                commands.append(segment)
            segment = []
        else:
            segment.append(token)
    return commands


def walked_lines() -> list[str]:
    """The guide lines this module's walk runs: the string given to every ``.guide(...)`` call below."""
    tree = ast.parse(Path(__file__).read_text())
    return [node.args[0].value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "guide"
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)]


def test_every_guide_command_is_walked_or_listed() -> None:
    in_guide = guide_lines(GUIDE.read_text())
    walked = walked_lines()
    assert len(in_guide) > 20 and walked, (in_guide, walked)  # the parser found the blocks, the walk its calls
    neither = [line for line in in_guide if line not in walked and line not in NOT_RUNNABLE]
    assert not neither, f"guide lines neither walked nor in NOT_RUNNABLE (with why): {neither}"
    gone = [line for line in [*walked, *NOT_RUNNABLE] if line not in in_guide]
    assert not gone, f"walked or listed but no longer in {GUIDE.name}: {gone}"
    assert not set(walked) & NOT_RUNNABLE
    # Every walked line has a festina command the walk can run in-process.
    assert all(guide_commands(line) and all(argv[0] == "festina" for argv in guide_commands(line))
               for line in walked), walked


def test_the_guide_parser_reads_shell_lines() -> None:
    text = ("text `festina x`\n```toml\nfestina = 1\n```\n```sh\nfestina models add m --a 'b c' \\\n"
            "    --d e   # why\nls /tmp\n(umask 077; festina keys create --user u > ~/k)\n"
            "cp a.service /etc && systemctl enable --now festinad\n```\n")
    assert guide_lines(text) == ["festina models add m --a 'b c' --d e",
                                 "(umask 077; festina keys create --user u > ~/k)",
                                 "cp a.service /etc && systemctl enable --now festinad"]
    assert guide_commands("festina models add m --a 'b c' --d e") == [["festina", "models", "add", "m", "--a",
                                                                       "b c", "--d", "e"]]
    assert guide_commands("(umask 077; festina keys create --user u > ~/k)") == [
        ["festina", "keys", "create", "--user", "u"]]
    assert guide_commands("festina a; festina b x | jq .y") == [["festina", "a"], ["festina", "b", "x"]]
    assert guide_commands("cp a.service /etc && systemctl enable --now festinad") == []


# The catalogue names the guide's `models add` lines give, and their profiles (which festinad serves).
PROFILES = {"llama8b": "llama-3.1-8b", "mistral": "mistral-7b"}
# Where the consolidation plan puts both users' jobs (KEPT) and the node it frees.
KEPT, FREED = "n2", "n1"


class Cli:
    """``festina ARGS`` in-process: (exit status, stdout, stderr); ``guide(line)`` runs a line of the guide."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys
        self.in_guide = guide_lines(GUIDE.read_text())
        self.walked: list[str] = []
        self.err: list[str] = []  # the last guide line's commands' stderr

    def guide(self, line: str, placeholders: dict[str, str] | None = None) -> list[str]:
        """The stdout of each festina command of ``line`` (a line of the guide, verbatim), run in order, each
        required to succeed; ``placeholders`` replaces the guide's example words (``{"gpu07": "n1"}``)."""
        assert line in self.in_guide, f"not a line of {GUIDE.name}: {line!r}"
        words = placeholders or {}
        outs, self.err = [], []
        for argv in guide_commands(line):
            assert argv[0] == "festina", argv
            code, out, err = self(*(words.get(word, word) for word in argv[1:]))
            assert code == 0, (line, out, err)
            outs.append(out)
            self.err.append(err)
        self.walked.append(line)
        return outs

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        captured = self.capsys.readouterr()
        return code, captured.out, captured.err

    def ok(self, *argv: str) -> str:
        code, out, err = self(*argv)
        assert code == 0, (argv, out, err)
        return out

    def json(self, *argv: str) -> Any:
        return json.loads(self.ok(*argv, "--json"))


def _until(what: str, probe: Callable[[], Any], timeout_s: float, log: Path, every_s: float = 0.5) -> Any:
    """``probe()``'s first truthy answer within ``timeout_s`` (a loaded machine is slow, never wrong)."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = probe()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s\n{log.read_text()[-4000:]}")
        time.sleep(every_s)


def _instances(status: dict[str, Any]) -> list[dict[str, Any]]:
    """Every instance in ``festina status --json``, with its node's name and its GPU's index."""
    return [{**inst, "node": node["name"], "gpu": gpu["index"]} for node in status["nodes"] for gpu in node["gpus"]
            for inst in gpu["instances"]]


def _slurm_state(cfg: DevClusterConfig) -> str:
    """Jobs (with why they pend) and each node's GRES use: what an assertion needs to say why a job did not run."""
    env = {**os.environ, "SLURM_CONF": str(cfg.slurm_conf)}
    jobs = subprocess.run(["squeue", "-h", "-o", "%i %T %r %N %b %k"], capture_output=True, text=True, env=env)
    nodes = subprocess.run(["scontrol", "show", "node", "-d"], capture_output=True, text=True, env=env)
    return jobs.stdout + "".join(line + "\n" for line in nodes.stdout.splitlines()
                                 if "NodeName" in line or "Gres" in line or "State" in line)


async def _requests(url: str, per_model: int, key: str | None) -> list[tuple[str, Any]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        asks = [ask(session, url, name, stream=i % 2 == 0, key=key) for i in range(per_model) for name in PROFILES]
        return list(await asyncio.gather(*asks))


@pytest.mark.slurm
def test_admin_guide_walk(power_cluster: DevClusterConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = power_cluster
    slurm = CliSlurmClient(cfg.slurm_conf)
    port = free_ports(1, start=23100)
    # festinad on the dev cluster's one database, the nodes' (`festina dev-cluster up` prints it): their energy
    # readings are what `festina energy report` reads.
    config = daemon_config(tmp_path, port, free_ports(1, start=25100), db_url=cfg.database_url,
                           reconcile_period_s=1.0, consolidate_period_s=3600.0)
    # Keys required ("Tenants"), revocations seen within a second; festinad's signed channel reaches the node that
    # keeps its instances (each dev-cluster node has a control port of its own, festinad one: KEPT's; the plan frees
    # the other, asserted below).
    with config.open("a") as toml:
        toml.write(f"[gateway]\nrequire_keys = true\nkey_cache_ttl_s = 1.0\n[node_control]\n"
                  f"port = {cfg.node_control_port(KEPT)}\nauth = \"munge\"\nmunge_socket = \"{cfg.munge_socket}\"\n")
    # The admin's shell: /etc/festina/festina.toml and Slurm's own config, here the test's.
    monkeypatch.setenv("FESTINA_CONFIG", str(config))
    monkeypatch.setenv("SLURM_CONF", str(cfg.slurm_conf))
    for name in ("FESTINA_URL", "FESTINA_DB_URL", "FESTINA_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    festina = Cli(capsys)
    log = tmp_path / "festinad.log"
    url = f"http://127.0.0.1:{port}"

    # -- Install -----------------------------------------------------------------------------------------------
    [script] = festina.guide("festina completion bash > /etc/bash_completion.d/festina")
    assert "_FESTINA_COMPLETE=bash_complete" in script and "complete " in script, script[:500]

    # -- Configure ---------------------------------------------------------------------------------------------
    assert " at " in festina.guide("festina db upgrade")[0]
    [added] = festina.guide("festina models add llama8b --profile llama-3.1-8b --gpu-type h100 --engine vllm "
                            "--engine-args '--max-model-len 8192' --ttft-slo-s 1.0 --tbt-slo-s 0.1 --max-instances 4 "
                            "--account llm")
    assert "added llama8b (llama-3.1-8b on h100-sxm-80gb, vllm, TTFT 1 s, TBT 0.1 s)" in added
    [added] = festina.guide("festina models add mistral --profile mistral-7b --gpu-type h100 --engine vllm "
                            "--ttft-slo-s 1.0 --tbt-slo-s 0.1")
    assert "added mistral (mistral-7b on h100-sxm-80gb, vllm" in added
    listed = festina.guide("festina models list")[0].splitlines()
    assert len(listed) == 3 and listed[1].split()[:4] == ["llama8b", "llama-3.1-8b", "h100-sxm-80gb", "vllm"]
    assert listed[2].split()[:2] == ["mistral", "mistral-7b"]
    assert "mistral-7b" in festina.guide("festina profiles list")[0]

    # -- Tenants: API keys -------------------------------------------------------------------------------------
    # stdout: the token alone, for scripts; what the key is goes to stderr.
    [alice_key] = [out.strip() for out in festina.guide("festina keys create --user alice --account proj1")]
    alice_said = festina.err[0]
    assert re.fullmatch(r"fk_\S+", alice_key) and "user key" in alice_said and "for alice/proj1" in alice_said
    [bob_key] = [out.strip() for out in festina.guide(
        "festina keys create --user bob --account proj2 --models llama8b,mistral --rate-limit 5/s --expires 90d")]
    bob_said = festina.err[0]
    bob_prefix = bob_said.split("(")[1].split(")")[0]
    assert bob_prefix.startswith("fk_") and bob_key.startswith(bob_prefix) and "for bob/proj2" in bob_said, bob_said
    assert "models llama-3.1-8b, mistral-7b, rate 5/s, expires 20" in bob_said, bob_said  # names resolved
    old_umask = os.umask(0o077)  # the guide's `(umask 077; ... > ~/.festina-admin-key)`
    try:
        [admin] = festina.guide("(umask 077; festina keys create --user root --account ops --role admin "
                                "> ~/.festina-admin-key)")
        key_file = tmp_path / ".festina-admin-key"
        key_file.write_text(admin)
    finally:
        os.umask(old_umask)
    assert re.fullmatch(r"fk_\S+\n", admin) and "admin key" in festina.err[0] and "for root/ops" in festina.err[0]
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    [keys] = festina.guide("festina keys list")
    # "id, prefix (fk_ and 8 characters), user, account, role, state, rate, expiry"
    assert keys.split()[:8] == ["ID", "PREFIX", "USER", "ACCOUNT", "ROLE", "STATE", "RATE/S", "EXPIRES"], keys
    rows = {line.split()[2]: line.split() for line in keys.splitlines()[1:]}
    assert all(re.fullmatch(r"fk_\S{8}", row[1]) for row in rows.values()), rows
    assert rows["alice"][3:6] == ["proj1", "user", "active"] and rows["bob"][3:6] == ["proj2", "user", "active"]
    assert rows["root"][3:5] == ["ops", "admin"] and rows["bob"][1] == bob_prefix and rows["bob"][6] == "5", rows

    # Two users' serving jobs (see the module docstring), allocated before festinad starts (their nodes may still be
    # resuming: festinad counts their shares before it places anything).
    first_user = user_job(cfg, tmp_path, "user-1", "llama-3.1-8b", "n1", 50)
    small_user = user_job(cfg, tmp_path, "user-2", "mistral-7b", "n2", 20)
    users = {first_user, small_user}
    _until("the users' jobs allocated", lambda: all(
        (job := slurm.get_job(j)) is not None and job.state in ("RUNNING", "CONFIGURING") for j in users), 30, log)
    proc = festinad(config, cfg, log)
    try:
        asyncio.run(wait_http(url, 60))
        _until("the users' jobs adopted and ready", lambda: users <= {
            i["slurm_job_id"] for i in _instances(festina.json("status")) if i["phase"] == "ready"}, 60, log)
        # -- Operate: requests under the catalogue names with alice's key, then `festina status` ------------------
        results = asyncio.run(_requests(url, 2, alice_key))
        assert [kind for kind, _ in results] == ["ok"] * len(results), (results, log.read_text()[-3000:])
        results = asyncio.run(_requests(url, 2, alice_key))  # warm instances: these are the ones within their SLOs
        assert [kind for kind, _ in results] == ["ok"] * len(results), results
        # Keys are required; bob's key works until it is revoked, then is refused within key_cache_ttl_s.
        assert asyncio.run(_requests(url, 1, None)) == [("error", 401)] * len(PROFILES)
        assert [kind for kind, _ in asyncio.run(_requests(url, 1, bob_key))] == ["ok"] * len(PROFILES)
        [revoked] = festina.guide("festina keys revoke fk_3hQ9xZ1a", {"fk_3hQ9xZ1a": bob_prefix})
        assert f"revoked key {rows['bob'][0]} ({bob_prefix}) of bob/proj2" in revoked, revoked
        _until("bob's revoked key refused", lambda: asyncio.run(_requests(url, 1, bob_key)) == [
            ("error", 401)] * len(PROFILES), 10, log)

        def served() -> dict[str, Any] | None:
            status = festina.json("status")
            models = {m["model"]: m for m in status["models"]}
            counted = all(models.get(p, {}).get("requests", 0) >= 4 for p in PROFILES.values())
            return status if counted else None  # the request records are flushed every second

        _until("status shows every request", served, 30, log)
        # `festina status --json | jq .models`: the walk is jq.
        [as_json] = festina.guide("festina status --json | jq .models")
        status = json.loads(as_json)
        instances = _instances(status)
        assert {i["model"] for i in instances} >= set(PROFILES.values()), instances
        assert users <= {i["slurm_job_id"] for i in instances}, instances  # the users' jobs, adopted
        assert all(i["phase"] == "ready" and i["sm_pct"] > 0 for i in instances), instances
        for m in status["models"]:
            assert m["requests"] >= 4 and 0 <= m["slo_met"] <= m["requests"]
            assert m["attainment"] == pytest.approx(m["slo_met"] / m["requests"])
        [text] = festina.guide("festina status")
        assert "MODEL" in text and "ATTAINMENT" in text and "llama-3.1-8b" in text and "mistral-7b" in text

        # -- consolidate --dry-run, then --apply exactly that plan, with the admin key -----------------------------
        code, out, err = festina("consolidate", "--dry-run")
        assert code == 2 and "FESTINA_API_KEY" in err, (out, err)  # require_keys: /admin/* wants an admin key
        monkeypatch.setenv("FESTINA_API_KEY", key_file.read_text().strip())  # `export FESTINA_API_KEY=$(cat ...)`
        plan = festina.json("consolidate", "--dry-run")
        assert plan["plan_id"] and plan["migrations"] and plan["nodes_freed"] == [FREED], plan
        [dry] = festina.guide("festina consolidate --dry-run")
        assert f"plan {plan['plan_id']} (" in dry and f"nodes freed: {', '.join(plan['nodes_freed'])}" in dry
        for move in plan["migrations"]:
            assert f"{move['from_node']} -> {move['to_node']}" in dry
        # --dry-run did nothing; a plan id that is not the plan now is refused, nothing done.
        on_source = {i["id"]: i["node"] for i in _instances(festina.json("status"))}
        assert all(on_source.get(m["instance_id"]) == m["from_node"] for m in plan["migrations"]), on_source
        code, out, err = festina("consolidate", "--apply", "--plan-id", "000000000000")
        assert code == 2 and "is stale: the policy now proposes plan " + plan["plan_id"] in err, (out, err)
        [out] = festina.guide("festina consolidate --apply --plan-id ID", {"ID": plan["plan_id"]})
        assert f"plan {plan['plan_id']} (" in out and "applied" in out
        assert f"migrations done: {len(plan['migrations'])}, failed: 0" in out, (out, _slurm_state(cfg))
        # The same plan again: refused in one line, nothing done.
        code, out, err = festina("consolidate", "--apply", "--plan-id", plan["plan_id"])
        assert code == 2 and out == "", (out, err)
        assert f"plan {plan['plan_id']} was already applied at" in err and len(err.strip().splitlines()) == 1

        # The freed nodes: no instance in `festina status`, no festina job in Slurm (the sources were cancelled).
        freed = set(plan["nodes_freed"])

        def emptied() -> dict[str, Any] | None:
            status = festina.json("status")
            on_freed = [i for i in _instances(status) if i["node"] in freed]
            in_slurm = [j for j in festina_jobs(slurm).values() if freed & set(j.nodes)]
            return status if not on_freed and not in_slurm else None

        status = _until("the freed nodes empty", emptied, 30, log)
        moved = {m["model"] for m in plan["migrations"]}
        assert moved <= {i["model"] for i in _instances(status)}  # still served, elsewhere
        results = asyncio.run(_requests(url, 1, alice_key))
        assert [kind for kind, _ in results] == ["ok"] * len(results), results

        # -- decisions: what happened, with the reasons, by node name and GPU index ---------------------------------
        trail = festina.json("decisions", "--since", "1h")["decisions"]
        kinds = {d["kind"] for d in trail}
        assert {"scale", "migration"} <= kinds, kinds  # the adoptions (an instance more) and the move
        migrations = [d for d in trail if d["kind"] == "migration"]
        assert len(migrations) == len(plan["migrations"]), migrations  # once: the refused second apply did nothing
        assert all(f"admin apply, plan {plan['plan_id']}" in d["reason"] for d in migrations), migrations
        for job in users:
            assert any(f"adopt job {job} of " in d["reason"] for d in trail), trail
        [listing] = festina.guide("festina decisions --since 1h")
        assert f"admin apply, plan {plan['plan_id']}" in listing and "migration" in listing
        assert len(listing.strip().splitlines()) == len(trail)
        assert "node_id=" not in listing and "gpu_id=" not in listing, listing  # names, not database ids
        assert re.search(r" n[1-4] gpu[0-9]", listing), listing

        # The emptied node is suspended by Slurm's power saving after SuspendTime ("Operate"): status shows it off.
        _until("a freed node powered off", lambda: any(
            not n["powered"] for n in festina.json("status")["nodes"] if n["name"] in freed), 60, log)

        # -- nodes: drain and resume (Slurm), a clock and an instance drain through festinad and festina-node ------
        spare = cfg.node_names[-1]  # a node nothing runs on
        drained, resumed = festina.guide('festina nodes drain gpu07 --reason "NVLink errors, ticket 4711"; '
                                         "festina nodes resume gpu07", {"gpu07": spare})
        assert drained.strip() == f"drained {spare}: NVLink errors, ticket 4711" and f"resumed {spare}" in resumed
        assert "DRAIN" not in {n.name: n for n in slurm.list_nodes()}[spare].flags
        [locked] = festina.guide("festina nodes set-clock gpu07 0 1410", {"gpu07": KEPT})
        assert locked.strip() == f"{KEPT} GPU 0: clock locked at 1410 MHz", locked
        # The node's answer (what it locked). Its own controller sets that GPU's clock again at its next tick, and
        # `festina status` shows the controller's clocks, not this lock ("Head-to-node control" says so).
        # The user's job that stayed on KEPT: its server drains, finishes what it holds, and the job ends.
        kept = next(i for i in _instances(festina.json("status")) if i["slurm_job_id"] in users)
        assert kept["node"] == KEPT, kept
        gpu = str(kept["gpu"])
        [draining] = festina.guide("festina nodes drain-instance gpu07 0 4711",
                                   {"gpu07": KEPT, "0": gpu, "4711": str(kept["slurm_job_id"])})
        assert f"{KEPT} GPU {gpu}: job {kept['slurm_job_id']}'s server (pid " in draining, draining
        _until("the drained instance's job ended", lambda: (job := slurm.get_job(kept["slurm_job_id"])) is None
               or job.state not in ("RUNNING", "CONFIGURING"), 30, log)

        # -- energy: festina-node's live attribution, per model --------------------------------------------------
        def energy_by_model() -> dict[str, float] | None:
            rows = json.loads(festina.ok("energy", "report", "--by", "model", "--format", "json"))["rows"]
            energy = {r["model"]: float(r["energy_j"] or 0.0) for r in rows}
            return energy if all(energy.get(p, 0.0) > 0 for p in PROFILES.values()) else None

        by_model = _until("both models' energy attributed", energy_by_model, 30, log, every_s=1.0)
        [table] = festina.guide("festina energy report --by model")
        assert "GPU energy by model" in table and all(p in table for p in PROFILES.values()), (table, by_model)

        # The other reports its comment names answer live too: the nodes' counters, the days, the jobs, and the
        # tenants (alice's key's account, charged for the requests she sent; what account quotas count).
        def report(by: str) -> list[dict[str, Any]]:
            rows: list[dict[str, Any]] = json.loads(festina.ok("energy", "report", "--by", by, "--format",
                                                               "json"))["rows"]
            return rows

        assert sum(float(r["energy_j"] or 0.0) for r in report("node")) > 0
        assert sum(float(r["attributed_energy_j"]) for r in report("day")) > 0
        assert {first_user, small_user} <= {r["job_id"] for r in report("job")}
        _until("proj1 charged as a tenant", lambda: any(
            r["account"] == "proj1" and float(r["energy_j"] or 0.0) > 0 for r in report("tenant")), 30, log)
        assert any(r["user_name"] == "alice" and float(r["energy_j"] or 0.0) > 0 for r in report("user"))
        [accounts] = festina.guide("festina energy report --by account")
        assert "GPU energy by account" in accounts and "proj1" in accounts, accounts
        [bench] = festina.guide("festina bench status --json")
        figures = json.loads(bench)
        assert figures["gpus"] == 1024 and figures["instances"] > 1024 and figures["render_s"] > 0, figures
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        for job in festina_jobs(slurm):
            slurm.cancel(job)

    # -- Upgrade the database (festinad stopped, as the guide does it) ---------------------------------------------
    upgraded, current = festina.guide("festina db upgrade && festina db current")
    assert "(head)" in current and current.split(": at ")[1] == upgraded.split(": at ")[1], (upgraded, current)

    # Every line of the guide that names festina ran here, but for those listed as not runnable.
    assert sorted(festina.walked) == sorted(set(festina.in_guide) - NOT_RUNNABLE)
