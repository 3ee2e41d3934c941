"""``nncompile remat``: summary, --json figures, SCHEDULE.json checked by an independent simulator."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from nncompile.cli import main

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / "remat-graphs"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="remat-graphs dataset not present")


def replay(graph_path: Path, schedule: list[dict]) -> tuple[int, bool]:
    """Run SCHEDULE.json against the node-link file directly: (peak bytes, valid)."""
    data = json.loads(graph_path.read_text())
    key = "id" if "id" in data["nodes"][0] else "name"
    size = {node[key]: node.get("cost_ram", node.get("out_cost")) for node in data["nodes"]}
    inputs = {node[key]: set() for node in data["nodes"]}
    for link in data["links"]:
        source = link.get("source", link.get("0"))
        target = link.get("target", link.get("1"))
        inputs[target].add(source)
    resident, computed = set(), set()
    live = peak = 0
    for step in schedule:
        node = step["node"]
        if step["op"] == "compute":
            if not inputs[node] <= resident or node in resident:
                return peak, False
            resident.add(node)
            computed.add(node)
            live += size[node]
            peak = max(peak, live)
        elif step["op"] == "free":
            if node not in resident:
                return peak, False
            resident.remove(node)
            live -= size[node]
        else:
            return peak, False
    return peak, computed == set(size)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["remat", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


@needs_data
@pytest.mark.parametrize("name, budget", [("unet_b32_train", "0.7"), ("random_layered_n100", "0.9"),
                                          ("resnet50_b256_train", "50%")])
def test_schedule_json_replays_under_budget(tmp_path, capsys, name, budget):
    graph = DATA / f"{name}.json"
    out = tmp_path / "schedule.json"
    code, stdout, _ = run_cli(capsys, graph, "--budget", budget, "-o", out, "--json")
    assert code == 0
    figures = json.loads(stdout.strip().splitlines()[-1])
    for field in ("nodes", "budget_bytes", "peak_bytes", "overhead", "status", "seconds"):
        assert field in figures
    assert "overhead" in stdout and "planned peak" in stdout
    peak, valid = replay(graph, json.loads(out.read_text()))
    assert valid
    assert peak == figures["max_live_bytes"] <= figures["peak_bytes"] <= figures["budget_bytes"]
    assert figures["overhead"] >= 1.0


@needs_data
def test_exact_flag_reports_status_and_gap(capsys):
    code, stdout, _ = run_cli(capsys, DATA / "vgg16_b256_train.json", "--budget", "0.9", "--exact",
                              "--time-limit", "20", "--json")
    assert code == 0
    figures = json.loads(stdout.strip().splitlines()[-1])
    assert figures["status"] == "optimal" and figures["method"] == "exact"
    assert figures["overhead"] == pytest.approx(1.0197, abs=5e-4)


def test_bad_inputs_exit_2_with_a_message(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"nodes": [1, 2')
    code, _, err = run_cli(capsys, bad, "--budget", "0.5")
    assert code == 2 and f"{bad}:1:" in err and "invalid JSON" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, tmp_path / "missing.json", "--budget", "0.5")
    assert code == 2 and "cannot read graph file" in err
    good = tmp_path / "g.json"
    good.write_text(json.dumps({"nodes": [{"id": 0, "cost_cpu": 1, "cost_ram": 4},
                                          {"id": 1, "cost_cpu": 1, "cost_ram": 4}],
                                "links": [{"source": 0, "target": 1}]}))
    code, _, err = run_cli(capsys, good, "--budget", "lots")
    assert code == 2 and "budget 'lots'" in err
    code, _, err = run_cli(capsys, good, "--budget", "0.5")
    assert code == 2 and "infeasible" in err and "8 bytes" in err
    with pytest.raises(SystemExit) as info:
        main(["remat", str(good)])
    assert info.value.code == 2
