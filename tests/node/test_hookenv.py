from __future__ import annotations

import logging
import sys

import pytest

from festina_hpc.node.errors import NodeInputError
from festina_hpc.node.hookenv import (
    Directives,
    HookLogFormatter,
    escape_controls,
    job_context,
    parse_comment,
    parse_gpu_list,
    shown,
)

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
    ("SLURM_JOB_ID", "8; reboot", "SLURM_JOB_ID"),
    ("SLURM_JOB_ID", "", "SLURM_JOB_ID"),
    ("SLURM_JOB_ID", "0", "SLURM_JOB_ID"),
    ("SLURM_JOB_ID", "4294967296", "SLURM_JOB_ID"),
    ("SLURM_JOB_ID", "٨", "SLURM_JOB_ID"),  # an Arabic-Indic eight: a digit to str.isdigit and int()
    ("SLURM_JOB_ID", "8\n2026-12-07T10:00:00 prolog job=9", "SLURM_JOB_ID"),
    ("SLURM_JOB_UID", "9" * 100_000, "SLURM_JOB_UID"),
    ("SLURM_JOB_UID", "0 1", "SLURM_JOB_UID"),
    ("SLURM_JOB_USER", "root$(id)", "SLURM_JOB_USER"),
    ("SLURMD_NODENAME", "n1 n2", "SLURMD_NODENAME"),
    ("SLURMD_NODENAME", "n" * 100_000, "SLURMD_NODENAME"),
    ("SLURM_JOB_GPUS", "0;1", "SLURM_JOB_GPUS"),
    ("SLURM_JOB_GPUS", "0,0", "names a GPU twice"),
    ("SLURM_JOB_GPUS", "١", "SLURM_JOB_GPUS"),
    ("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "101", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"),
    ("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "`id`", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"),
    ("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "0", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"),
    ("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "5" * 100_000, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"),
])
def test_bad_environment_values_are_refused_naming_them(key: str, value: str, message: str) -> None:
    with pytest.raises(NodeInputError, match=message) as refused:
        job_context({**PROLOG_MPS, key: value})
    # One short printable line, whatever the value: its control characters escaped, a long one cut.
    assert str(refused.value).isprintable() and len(str(refused.value)) < 200


def test_a_100000_digit_job_id_is_one_short_reason_with_its_length() -> None:
    with pytest.raises(NodeInputError) as refused:
        job_context({**PROLOG_MPS, "SLURM_JOB_ID": "1" * 100_000})
    assert str(refused.value) == (f"hook environment: SLURM_JOB_ID {'1' * 64!r}... (100000 chars) is not a number "
                                  f"in 1..4294967295")


def test_a_newline_in_the_job_id_is_shown_escaped() -> None:
    with pytest.raises(NodeInputError) as refused:
        job_context({**PROLOG_MPS, "SLURM_JOB_ID": "8\nforged"})
    assert "SLURM_JOB_ID '8\\nforged'" in str(refused.value)


@pytest.mark.parametrize(("value", "expected"), [
    ("plain", "'plain'"),
    ("a\nb\r\x1b[2J", "'a\\nb\\r\\x1b[2J'"),
    ("x" * 70, f"{'x' * 64!r}... (70 chars)"),
])
def test_shown_quotes_escapes_and_cuts(value: str, expected: str) -> None:
    assert shown(value) == expected


def test_escape_controls_keeps_one_line() -> None:
    assert escape_controls("a\nb\u2028c\x00 d") == "a\\nb\\u2028c\\x00 d"
    assert escape_controls("plain text") == "plain text"


def record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("bad\n2026-12-07 festina-node[1] INFO forged")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("festina_hpc.node", logging.ERROR, __file__, 1, msg, args, exc_info)


def test_the_hook_log_formatter_writes_one_line_per_record() -> None:
    line = HookLogFormatter("%(levelname)s %(message)s").format(record("job %s: %s", "8\nforged", "x" * 5000))
    assert "\n" not in line and line.startswith("ERROR job 8\\nforged: ")
    assert line.endswith("... (5015 chars)")  # the escaped message: 'job 8\\nforged: ' and 5000 x


def test_the_hook_log_formatter_keeps_a_traceback_under_a_prefix() -> None:
    text = HookLogFormatter("%(levelname)s %(message)s").format(record("internal", exc=True))
    first, *rest = text.splitlines()
    assert first == "ERROR internal" and rest
    assert all(line.startswith(HookLogFormatter.TRACE_PREFIX) for line in rest)
    # The exception's own newline starts a line, but under the prefix: it cannot pass for a record.
    assert rest[-2:] == ["  | ValueError: bad", "  | 2026-12-07 festina-node[1] INFO forged"]


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
