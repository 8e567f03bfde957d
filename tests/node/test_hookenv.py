from __future__ import annotations

import pytest

from festina_hpc.node.errors import NodeInputError
from festina_hpc.node.hookenv import Directives, job_context, parse_comment, parse_gpu_list

# The prolog environment Slurm 22.05 gave an MPS job (notes/slurm-samples/hook-env-prolog-mps.txt), plus a comment.
PROLOG_MPS = {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25", "CUDA_VISIBLE_DEVICES": "0", "SLURMD_NODENAME": "n2",
              "SLURM_JOB_GPUS": "0", "SLURM_JOB_ID": "8", "SLURM_JOB_UID": "0", "SLURM_JOB_USER": "root",
              "SLURM_JOB_COMMENT": "festina:model=llama-3.1-8b,instance=12,clock_mhz=1410",
              "SLURM_SCRIPT_CONTEXT": "prolog_slurmd"}


def test_a_real_prolog_environment_is_read() -> None:
    ctx = job_context(PROLOG_MPS)
    assert (ctx.job_id, ctx.uid, ctx.user, ctx.node, ctx.gpus, ctx.mps_pct) == (8, 0, "root", "n2", (0,), 25)
    assert ctx.directives == Directives("llama-3.1-8b", "12", 1410)
    assert ctx.comment_ignored == ""


def test_a_task_environment_without_slurmd_nodename_uses_the_node_list() -> None:
    env = {k: v for k, v in PROLOG_MPS.items() if k != "SLURMD_NODENAME"} | {"SLURM_JOB_NODELIST": "n3"}
    assert job_context(env).node == "n3"


@pytest.mark.parametrize(("key", "value", "message"), [
    ("SLURM_JOB_ID", "8; reboot", "job id"),
    ("SLURM_JOB_ID", "", "job id"),
    ("SLURM_JOB_UID", "0 1", "SLURM_JOB_UID"),
    ("SLURM_JOB_USER", "root$(id)", "SLURM_JOB_USER"),
    ("SLURMD_NODENAME", "n1 n2", "node name"),
    ("SLURM_JOB_GPUS", "0;1", "GPU list"),
    ("SLURM_JOB_GPUS", "0,0", "names a GPU twice"),
    ("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "101", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"),
    ("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "`id`", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"),
])
def test_bad_environment_values_are_refused_naming_them(key: str, value: str, message: str) -> None:
    with pytest.raises(NodeInputError, match=message):
        job_context({**PROLOG_MPS, key: value})


@pytest.mark.parametrize("comment", [
    "festina:model=llama;touch /tmp/pwned,instance=1",
    "festina:model=m,instance=$(reboot)",
    "festina:model=m,clock_mhz=1410`id`",
    "festina:model=m,clock_mhz=99999",
    "festina:model=m,rm=-rf",
    "festina:model=m,model=n",
    "festina:model=m\ninstance=2",
    "festina:model=m,instance=1 && halt",
    "festina:model=m,port=0",
    "festina:model=m,port=70000",
    "festina:model=m,port=80;id",
])
def test_a_comment_with_shell_metacharacters_or_unknown_keys_is_ignored_whole(comment: str) -> None:
    directives, why = parse_comment(comment)
    assert directives == Directives()
    assert why


def test_a_users_own_comment_is_not_festinas_and_not_an_error() -> None:
    assert parse_comment("my experiment #3; see notes") == (Directives(), "")
    assert job_context({**PROLOG_MPS, "SLURM_JOB_COMMENT": "a;b"}).directives == Directives()


def test_gpu_lists() -> None:
    assert parse_gpu_list("0,1,3") == (0, 1, 3)
    with pytest.raises(NodeInputError):
        parse_gpu_list("0-3")


def test_festinads_comment_names_the_servers_port() -> None:
    assert parse_comment("festina:model=llama-3.1-8b,instance=7,port=20007") == \
        (Directives("llama-3.1-8b", "7", None, 20007), "")
