"""Input checks that run before any Slurm argv is built."""

from __future__ import annotations

import pytest

from festina_hpc.slurm import validate
from festina_hpc.slurm.errors import SlurmInputError


@pytest.mark.parametrize(("value", "expected"), [(1, 1), ("42", 42), (2**31, 2**31)])
def test_job_id_accepts(value: int | str, expected: int) -> None:
    assert validate.job_id(value) == expected


@pytest.mark.parametrize("value", [0, -1, "0x1", "12_3", "1 NodeList=n2", "", True, 1.5, "١٢"])
def test_job_id_refuses(value: object) -> None:
    with pytest.raises(SlurmInputError, match="is not a positive integer"):
        validate.job_id(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(("case", "value"), [
    ("100,000 digits", "9" * 100_000),
    ("a newline then a forged record", "12\nJobId=13 NodeList=n2" + "x" * 200),
    ("one past Slurm's 32-bit ids", str(2**32)),
])
def test_job_id_refuses_long_input_in_one_short_line(case: str, value: int | str) -> None:
    # int() of a 100,000-digit string raised ValueError (Python's digit limit), not SlurmInputError.
    with pytest.raises(SlurmInputError, match="is not a positive integer") as err:
        validate.job_id(value)
    message = str(err.value)
    assert "\n" not in message and len(message) < 200, (case, message[:300])
    if isinstance(value, str) and len(value) > 40:
        assert f"({len(repr(value))} chars)" in message, message


def test_job_id_refuses_a_huge_int_without_printing_it() -> None:
    with pytest.raises(SlurmInputError, match="integer of 332193 bits") as err:
        validate.job_id(10**100_000)
    assert len(str(err.value)) < 200


def test_job_id_accepts_the_largest_slurm_id() -> None:
    assert validate.job_id(str(2**32 - 1)) == 2**32 - 1


@pytest.mark.parametrize("value", ["n1", "gpu-07.cluster", "node_3"])
def test_node_name_accepts(value: str) -> None:
    assert validate.node_name(value) == value


@pytest.mark.parametrize("value", ["", "-n1", "n1 State=DOWN", "n[1-2]", "n1,n2", "a" * 64])
def test_node_name_refuses(value: str) -> None:
    with pytest.raises(SlurmInputError, match="is not a plain host name"):
        validate.node_name(value)


@pytest.mark.parametrize(("value", "message"), [
    ("", "must not be empty"), ("   ", "must not be empty"), ("two\nlines", "one printable line"),
    ("x" * 257, "one printable line"),
])
def test_reason_refuses(value: str, message: str) -> None:
    with pytest.raises(SlurmInputError, match=message):
        validate.reason(value)


def test_reason_keeps_spaces() -> None:
    assert validate.reason("GPU 1 lost [festina]") == "GPU 1 lost [festina]"
