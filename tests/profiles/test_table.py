"""festina_hpc.profiles.table: the CSV format, its validation and multilinear lookups."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from festina_hpc.errors import OutOfProfileRange, ProfileError
from festina_hpc.profiles.table import AXES, PHASES, ProfileTable, parse_table
from tests.conftest import make_table

# A 2-point grid on every axis: 2 phases x 16 points = 32 data rows, in file lines 4..35
# (line 1 is the festina-profile header, line 2 a note, line 3 the column names).
SMALL = {"batch": (1, 8), "context": (128, 1024), "sm_pct": (50, 100), "clock_mhz": (1380, 1980)}
FIRST_DATA_LINE = 4


def small_table_lines(tmp_path: Path) -> list[str]:
    path = tmp_path / "small.csv"
    make_table(**SMALL).to_csv(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[2].startswith("phase,") and len(lines) == FIRST_DATA_LINE - 1 + 32
    return lines


def set_field(lines: list[str], line_number: int, column: str, value: str) -> list[str]:
    """``lines`` with one field of the 1-based file line ``line_number`` replaced."""
    header = lines[FIRST_DATA_LINE - 2].split(",")
    fields = lines[line_number - 1].split(",")
    fields[header.index(column)] = value
    return [*lines[:line_number - 1], ",".join(fields), *lines[line_number:]]


def drop_column(lines: list[str], column: str) -> list[str]:
    k = lines[FIRST_DATA_LINE - 2].split(",").index(column)
    return [*lines[:FIRST_DATA_LINE - 2],
            *(",".join(f for i, f in enumerate(line.split(",")) if i != k) for line in lines[FIRST_DATA_LINE - 2:])]


def grid_point(table: ProfileTable, index: tuple[int, ...]) -> tuple[float, ...]:
    return tuple(table.axes[k][i] for k, i in enumerate(index))


# -- round trip ------------------------------------------------------------------------------


def test_csv_round_trip_is_exact_at_every_grid_point(tmp_path: Path) -> None:
    table = make_table()
    table.to_csv(tmp_path / "t.csv")
    loaded = ProfileTable.from_csv(tmp_path / "t.csv")
    assert (loaded.gpu, loaded.model, loaded.tp, loaded.notes) == (table.gpu, table.model, table.tp, table.notes)
    assert loaded.axes == table.axes
    assert np.array_equal(loaded.latency_s, table.latency_s)
    assert np.array_equal(loaded.power_w, table.power_w)
    for p, phase in enumerate(PHASES):
        for index in np.ndindex(*table.latency_s.shape[1:]):
            hit = loaded.lookup(phase, *grid_point(table, index))
            assert (hit.latency_s, hit.power_w, hit.clamped) == (
                table.latency_s[(p, *index)], table.power_w[(p, *index)], False)


def test_csv_round_trip_keeps_fractional_axis_values(tmp_path: Path) -> None:
    table = make_table(sm_pct=(100 / 3, 62.5, 100))
    table.to_csv(tmp_path / "t.csv")
    loaded = ProfileTable.from_csv(tmp_path / "t.csv")
    assert loaded.axes == table.axes
    loaded.to_csv(tmp_path / "again.csv")
    assert (tmp_path / "again.csv").read_bytes() == (tmp_path / "t.csv").read_bytes()


def test_csv_file_starts_with_header_and_columns(tmp_path: Path) -> None:
    make_table(**SMALL, notes=("made by a test", "params: hand-chosen")).to_csv(tmp_path / "t.csv")
    lines = (tmp_path / "t.csv").read_text(encoding="utf-8").splitlines()
    assert lines[:4] == ["# festina-profile gpu=h100-sxm-80gb model=llama-3.1-8b tp=1", "# made by a test",
                         "# params: hand-chosen", "phase,batch,context_tokens,sm_pct,clock_mhz,latency_s,power_w"]


def test_rows_in_any_order_and_blank_lines_make_the_same_table(tmp_path: Path) -> None:
    lines = small_table_lines(tmp_path)
    data = lines[FIRST_DATA_LINE - 1:]
    shuffled = [data[i] for i in np.random.default_rng(1).permutation(len(data))]
    text = "\n".join([*lines[:FIRST_DATA_LINE - 1], "", *shuffled[:10], "", *shuffled[10:], ""])
    table, reordered = parse_table("\n".join(lines), "a"), parse_table(text, "b")
    assert reordered.axes == table.axes
    assert np.array_equal(reordered.latency_s, table.latency_s)
    assert np.array_equal(reordered.power_w, table.power_w)


# -- lookups ---------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("axis", range(len(AXES)))
@pytest.mark.parametrize("weight", [0.5, 0.25])
def test_lookup_is_linear_between_neighbours_on_each_axis(phase: str, axis: int, weight: float) -> None:
    table = make_table()
    p = PHASES.index(phase)
    for index in np.ndindex(*table.latency_s.shape[1:]):
        if index[axis] == len(table.axes[axis]) - 1:
            continue
        upper = tuple(i + (k == axis) for k, i in enumerate(index))
        point = list(grid_point(table, index))
        point[axis] += weight * (table.axes[axis][index[axis] + 1] - point[axis])
        hit = table.lookup(phase, *point)
        for got, values in ((hit.latency_s, table.latency_s), (hit.power_w, table.power_w)):
            expected = (1 - weight) * values[(p, *index)] + weight * values[(p, *upper)]
            assert got == pytest.approx(expected, rel=1e-12), (AXES[axis], index)


def test_lookup_at_a_cell_centre_is_the_mean_of_its_16_corners() -> None:
    table = make_table()
    lower = (1, 0, 1, 4)
    centre = [(table.axes[k][i] + table.axes[k][i + 1]) / 2 for k, i in enumerate(lower)]
    corners = [tuple(i + d for i, d in zip(lower, delta)) for delta in itertools.product((0, 1), repeat=4)]
    hit = table.lookup("decode", *centre)
    assert hit.latency_s == pytest.approx(np.mean([table.latency_s[(1, *c)] for c in corners]), rel=1e-12)
    assert hit.power_w == pytest.approx(np.mean([table.power_w[(1, *c)] for c in corners]), rel=1e-12)


@pytest.mark.parametrize("phase", PHASES)
def test_scalar_lookup_matches_vectorised_lookup(phase: str) -> None:
    table = make_table()
    rng = np.random.default_rng(7)
    points = [rng.uniform(*table.bounds(field), size=500) for field in AXES]
    # Grid points and table edges too, where bracketing is most likely to go wrong.
    edges = [np.array(axis)[rng.integers(0, len(axis), size=100)] for axis in table.axes]
    points = [np.concatenate([p, e]) for p, e in zip(points, edges)]
    many = table.lookup_many(phase, *points)
    single = [table.lookup(phase, *point) for point in zip(*(p.tolist() for p in points))]
    assert np.allclose(many.latency_s, [s.latency_s for s in single], rtol=1e-12, atol=0)
    assert np.allclose(many.power_w, [s.power_w for s in single], rtol=1e-12, atol=0)
    assert not many.clamped.any()


def test_vectorised_lookup_broadcasts_its_arguments() -> None:
    table = make_table()
    many = table.lookup_many("decode", [1, 8, 64], 1024, 100, 1980)
    assert many.latency_s.shape == (3,)
    assert many.latency_s.tolist() == [table.lookup("decode", b, 1024, 100, 1980).latency_s for b in (1, 8, 64)]


def test_single_point_axis_answers_its_one_value() -> None:
    table = make_table(clock_mhz=(1980,))
    hit = table.lookup("prefill", 8, 1024, 100, 1980)
    assert hit.latency_s == table.latency_s[0, 1, 1, 2, 0]
    many = table.lookup_many("prefill", [8, 64], 1024, 100, 1980)
    assert many.latency_s.tolist() == [table.latency_s[0, 1, 1, 2, 0], table.latency_s[0, 2, 1, 2, 0]]


OUT_OF_RANGE = [  # (field, value) just outside the make_table() grid on each side of each axis
    ("batch", 0.5), ("batch", 257), ("context_tokens", 64), ("context_tokens", 4097),
    ("sm_pct", 20), ("sm_pct", 100.5), ("clock_mhz", 899), ("clock_mhz", 1995),
]
IN_RANGE = {"batch": 8, "context_tokens": 1024, "sm_pct": 50, "clock_mhz": 1380}


@pytest.mark.parametrize(("field", "value"), OUT_OF_RANGE)
def test_lookup_outside_the_grid_names_field_and_value(field: str, value: float) -> None:
    table = make_table()
    point = {**IN_RANGE, field: value}
    for lookup in (table.lookup, table.lookup_many):
        with pytest.raises(OutOfProfileRange) as info:
            lookup("decode", **point)
        message = str(info.value)
        assert message.startswith(f"{field} = {value:g} is outside"), message
        assert "llama-3.1-8b" in message and "h100-sxm-80gb" in message and "\n" not in message


@pytest.mark.parametrize(("field", "value"), OUT_OF_RANGE)
def test_clamped_lookup_answers_at_the_edge_and_says_so(field: str, value: float) -> None:
    table = make_table()
    low, high = table.bounds(field)
    edge = {**IN_RANGE, field: min(max(value, low), high)}
    hit = table.lookup("prefill", **{**IN_RANGE, field: value}, clamp=True)
    at_edge = table.lookup("prefill", **edge)
    assert (hit.latency_s, hit.power_w, hit.clamped) == (at_edge.latency_s, at_edge.power_w, True)
    many = table.lookup_many("prefill", **{**IN_RANGE, field: [value, edge[field]]}, clamp=True)
    assert many.latency_s.tolist() == [at_edge.latency_s] * 2
    assert many.clamped.tolist() == [True, False]


@pytest.mark.parametrize("field", AXES)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("clamp", [False, True])
def test_lookup_of_a_non_finite_value_raises_even_when_clamping(field: str, value: float, clamp: bool) -> None:
    table = make_table()
    point = {**IN_RANGE, field: value}
    with pytest.raises(OutOfProfileRange, match=f"^{field}"):
        table.lookup("decode", **point, clamp=clamp)
    with pytest.raises(OutOfProfileRange, match=f"^{field}"):
        table.lookup_many("decode", **{**point, field: [1.0, value]}, clamp=clamp)


def test_lookup_of_an_unknown_phase_raises() -> None:
    table = make_table()
    for lookup in (table.lookup, table.lookup_many):
        with pytest.raises(OutOfProfileRange, match="phase = 'decoding' is not one of prefill, decode"):
            lookup("decoding", **IN_RANGE)


# -- malformed files -------------------------------------------------------------------------

Edit = Callable[[list[str]], list[str]]

MALFORMED: list[tuple[str, Edit, str]] = [  # (case, edit of the small table's lines, expected message after "<file>: ")
    ("missing column", lambda ls: drop_column(ls, "power_w"), "row 3: missing column power_w"),
    ("negative power", lambda ls: set_field(ls, 10, "power_w", "-5"),
     "row 10: field power_w = -5 must not be negative"),
    ("SM share over 100", lambda ls: set_field(ls, 11, "sm_pct", "101"),
     "row 11: field sm_pct = 101 must be at most 100"),
    ("zero latency", lambda ls: set_field(ls, 8, "latency_s", "0"), "row 8: field latency_s = 0 must be positive"),
    ("NaN latency", lambda ls: set_field(ls, 7, "latency_s", "nan"), "row 7: field latency_s = nan is not finite"),
    ("infinite power", lambda ls: set_field(ls, 9, "power_w", "inf"), "row 9: field power_w = inf is not finite"),
    ("non-numeric value", lambda ls: set_field(ls, 12, "batch", "eight"),
     "row 12: field batch = 'eight' is not a number"),
    ("empty value", lambda ls: set_field(ls, 13, "sm_pct", ""), "row 13: field sm_pct = '' is not a number"),
    ("too few fields", lambda ls: [*ls[:4], ls[4].rsplit(",", 1)[0], *ls[5:]], "row 5: expected 7 fields, got 6"),
    ("too many fields", lambda ls: [*ls[:30], ls[30] + ",1", *ls[31:]],
     "row 31: expected 7 fields, got 8"),
    ("unknown phase", lambda ls: set_field(ls, 20, "phase", "decoding"),
     "row 20: field phase = 'decoding' is not one of prefill, decode"),
    ("error after blank lines", lambda ls: [*ls[:10], "", "", *set_field(ls, 11, "power_w", "x")[10:]],
     "row 13: field power_w = 'x' is not a number"),
    ("duplicate point", lambda ls: [*ls[:14], ls[8], *ls[15:]], "row 15: duplicate grid point"),
    ("duplicate point added", lambda ls: [*ls, ls[8]], "row 36: duplicate grid point"),
    ("duplicate after blank line", lambda ls: [*ls[:20], "", *ls[20:], ls[3]], "row 37: duplicate grid point"),
    ("incomplete grid", lambda ls: [*ls[:14], *ls[15:]],
     "no row for grid point phase=prefill batch=8 context_tokens=128 sm_pct=100 clock_mhz=1980"),
    ("point off the grid", lambda ls: set_field(ls, 35, "batch", "4"),
     "no row for grid point phase=prefill batch=4 context_tokens=128 sm_pct=50 clock_mhz=1380"),
    ("no data rows", lambda ls: ls[:3], "no data rows"),
    ("no column names", lambda ls: ls[:2], "row 3: no column header"),
    ("header tag", lambda ls: ["# vidur-profile gpu=h100-sxm-80gb model=llama-3.1-8b tp=1", *ls[1:]],
     "row 1: expected '# festina-profile gpu=... model=... tp=...'"),
    ("empty header line", lambda ls: ["#", *ls[1:]], "row 1: expected '# festina-profile"),
    ("no header line", lambda ls: ls[2:], "row 1: expected '# festina-profile"),
    ("header field without =", lambda ls: ["# festina-profile gpu=h100-sxm-80gb llama tp=1", *ls[1:]],
     "row 1: malformed header field 'llama'"),
    ("header without tp", lambda ls: ["# festina-profile gpu=h100-sxm-80gb model=llama-3.1-8b", *ls[1:]],
     "row 1: header is missing field tp"),
    ("tp not an integer", lambda ls: [ls[0].replace("tp=1", "tp=one"), *ls[1:]],
     "row 1: field tp = 'one' is not an integer"),
    ("tp zero", lambda ls: [ls[0].replace("tp=1", "tp=0"), *ls[1:]], "row 1: field tp = 0 must be at least 1"),
]


@pytest.mark.parametrize(("case", "edit", "expected"), MALFORMED, ids=[case for case, _, _ in MALFORMED])
def test_malformed_file_is_one_line_error_naming_file_row_and_field(
        tmp_path: Path, case: str, edit: Edit, expected: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(edit(small_table_lines(tmp_path))) + "\n", encoding="utf-8")
    with pytest.raises(ProfileError) as info:
        ProfileTable.from_csv(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {expected}"), message


def test_scattered_points_are_reported_without_building_their_grid() -> None:
    # 3000 rows with distinct values on every axis span a grid of 2 x 3000^4 points: far too many to allocate.
    rows = [f"decode,{i + 1},{i + 2},{i % 100 + 1},{i + 4},0.01,300" for i in range(3000)]
    text = "\n".join(["# festina-profile gpu=g model=m tp=1", ",".join(("phase", *AXES, "latency_s", "power_w")),
                      *rows])
    with pytest.raises(ProfileError, match="^t.csv: no row for grid point phase=prefill batch=1 context_tokens=2 "):
        parse_table(text, "t.csv")


def test_reported_row_is_the_file_line(tmp_path: Path) -> None:
    lines = small_table_lines(tmp_path)
    for line_number in range(FIRST_DATA_LINE, len(lines) + 1):
        text = "\n".join(set_field(lines, line_number, "clock_mhz", "fast"))
        with pytest.raises(ProfileError) as info:
            parse_table(text, "t.csv")
        assert str(info.value).startswith(f"t.csv: row {line_number}: field clock_mhz = 'fast'")


def test_unreadable_file_names_its_path(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=f"^{tmp_path / 'absent.csv'}: cannot read profile"):
        ProfileTable.from_csv(tmp_path / "absent.csv")
