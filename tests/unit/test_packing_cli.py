"""``nncompile memplan``: figures, exit codes, offsets file and located errors."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from nncompile.cli import main
from nncompile.solvers.packing import Buffer, validate

MINIMALLOC = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / "minimalloc"
EXAMPLE = "id,lower,upper,size\nb1,0,3,4\nb2,3,9,4\nb3,0,9,4\nb4,9,21,4\nb5,0,21,4\n"


@pytest.fixture
def example(tmp_path):
    path = tmp_path / "input.12.csv"
    path.write_text(EXAMPLE)
    return path


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def read_offsets(path: Path) -> tuple[list[Buffer], dict]:
    rows = list(csv.DictReader(path.open()))
    buffers = [Buffer(r["id"], int(r["lower"]), int(r["upper"]), int(r["size"])) for r in rows]
    return buffers, {r["id"]: int(r["offset"]) for r in rows}


def test_fits_at_capacity_writes_offsets(example, tmp_path, capsys):
    out = tmp_path / "offsets.csv"
    assert main(["memplan", str(example), "--capacity", "12", "-o", str(out), "--json"]) == 0
    figures = last_json(capsys.readouterr().out)
    assert figures["buffers"] == 5 and figures["lower_bound"] == 12 and figures["arena"] == 12
    assert figures["status"] == "optimal" and figures["fits"] is True and figures["ratio"] == 1.0
    assert {"seconds", "method"} <= set(figures)
    buffers, offsets = read_offsets(out)
    assert validate(buffers, offsets, capacity=12) == 12


def test_does_not_fit_exits_1(example, capsys):
    assert main(["memplan", str(example), "--capacity", "11", "--json"]) == 1
    figures = last_json(capsys.readouterr().out)
    assert figures["status"] == "infeasible" and figures["fits"] is False


def test_minimize_without_capacity(example, capsys):
    for method in ("greedy", "search", "cpsat", "auto"):
        assert main(["memplan", str(example), "--method", method, "--json"]) == 0
        figures = last_json(capsys.readouterr().out)
        assert figures["arena"] >= 12
        if method != "greedy":
            assert figures["arena"] == 12 and figures["status"] == "optimal"


def test_old_headers_with_inclusive_end(tmp_path, capsys):
    path = tmp_path / "old.csv"
    path.write_text("id,begin,end,size,alignment\na,0,1,3,4\nb,1,2,3,4\nc,3,3,5,1\n")
    out = tmp_path / "o.csv"
    assert main(["memplan", str(path), "-o", str(out), "--json"]) == 0
    # a [0,2) and b [1,3) overlap (end inclusive); offsets aligned to 4 -> arena 7
    assert last_json(capsys.readouterr().out)["arena"] == 7
    rows = list(csv.DictReader(out.open()))
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    offsets = {r["id"]: int(r["offset"]) for r in rows}
    assert validate([Buffer("a", 0, 2, 3, 4), Buffer("b", 1, 3, 3, 4), Buffer("c", 3, 4, 5)], offsets) == 7


@pytest.mark.parametrize("text, line, message", [
    ("id,lower,upper\n1,2,3\n", 1, "missing column(s) size"),
    ("id,lower,upper,size\n1,2,3,4\n2,5,x,4\n", 3, "upper must be an integer"),
    ("id,lower,upper,size\n1,2,3,-4\n", 2, "size must be >= 0"),
    ("id,lower,upper,size\n1,3,3,4\n", 2, "empty lifetime"),
    ("id,lower,upper,size\n1,3,5,4\n1,0,2,4\n", 3, "duplicate id"),
    ("id,lower,upper,size\n1,3,5\n", 2, "expected 4 fields"),
])
def test_bad_csv_is_located(tmp_path, capsys, text, line, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    assert main(["memplan", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:{line}: error:" in err and message in err
    assert "Traceback" not in err


def test_missing_file(tmp_path, capsys):
    assert main(["memplan", str(tmp_path / "nope.csv")]) == 2
    assert "cannot read trace" in capsys.readouterr().err


@pytest.mark.skipif(not MINIMALLOC.exists(), reason="minimalloc dataset absent")
def test_dataset_example(capsys):
    assert main(["memplan", str(MINIMALLOC / "input.12.csv"), "--capacity", "12", "--json"]) == 0
    assert last_json(capsys.readouterr().out)["fits"] is True
