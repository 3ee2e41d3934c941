"""Cost model vs hand computation; Galvatron profile, cluster and plan readers on the real files."""
from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest

from nncompile.errors import InputError
from nncompile.parallel.cluster import GB_PER_S_TO_MB_PER_MS, cluster_from_dict, load_cluster
from nncompile.parallel.cost import CostModel, Setting, StageFigures, overlapped, state_fraction
from nncompile.parallel.model import LayerCost, ModelCost
from nncompile.parallel.plan import Plan, plan_from_json, plan_table, plan_to_json
from nncompile.parallel.profile import load_galvatron_profile
from nncompile.parallel.search import SearchOptions, search
from nncompile.parallel.strategy import Strategy

GALVATRON = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / "galvatron"
CLUSTERS = Path(__file__).resolve().parents[2] / "nncompile" / "parallel" / "clusters"
needs_data = pytest.mark.skipif(not GALVATRON.is_dir(), reason="../shared/datasets/galvatron not present")

CASES = [("gpt", "gpt-1.5b", "2x8-40gb"), ("gpt", "gpt-2.7b", "2x8-40gb"),
         ("gpt", "gpt-6.7b", "2x8-40gb"), ("llama2-7b", "llama2-7b", "1x8-36gb")]


def cluster4(overlap=1.5):
    return cluster_from_dict({
        "nodes": 1, "devices_per_node": 4, "memory_mb": 10_000,
        "allreduce_bandwidth": {"allreduce_size_2_consec_1": 100.0, "allreduce_size_2_consec_0": 50.0,
                                "allreduce_size_4_consec_1": 80.0},
        "p2p_bandwidth": {"pp_size_2": 10.0}, "overlap_coefficient": {"overlap_coe": overlap},
        "context_memory_mb": 100,
    })


LAYER = LayerCost("blk", fwd_ms_points=((1, 2.0),), param_mb=800.0, act_mb_per_sample={1: 40.0, 2: 24.0},
                  ckpt_act_mb_per_sample=5.0, boundary_mb_per_sample=4.0)


def test_layer_figures_match_hand_computation():
    cm = CostModel(ModelCost("m", (LAYER,) * 2), cluster4())
    setting = Setting(1, 16, 2)               # micro-batch of 8 samples
    bw = lambda gbps: gbps * GB_PER_S_TO_MB_PER_MS  # noqa: E731
    # TP 2 (consecutive ranks 0,1) x ZeRO-2 DP 2 (ranks 0,2: strided), no checkpointing: b = 4
    f = cm.layer(0, Strategy(2, 2), setting, 0)
    assert f.fwd == pytest.approx(4 * 2.0 / 2)
    assert f.bwd == pytest.approx(2 * f.fwd)
    assert f.comm == pytest.approx(4 * (2 * 1 / 2) * (4 * 4.0) / bw(100.0))        # 4 all-reduces of 16 MB
    grad_mb = 800.0 / 2 / 2                                                        # bf16 grads of a TP shard
    assert f.sync == pytest.approx(2 * (1 / 2) * grad_mb / bw(50.0))
    assert f.extra == pytest.approx(overlapped(f.sync, f.bwd, 1.5) - f.bwd)
    assert f.states_mb == pytest.approx(4 * 400.0 * (2 / 8 + 6 / 8 / 2))             # accumulation keeps grads
    assert f.act_mb == pytest.approx(24.0 * 4)
    assert f.transient_mb == 0.0
    # ZeRO-3 over 4 devices, checkpointed: b = 2
    g = cm.layer(0, Strategy(1, 4, sdp=True, ckpt=True), setting, 0)
    assert g.fwd == pytest.approx(4.0)
    assert g.bwd == pytest.approx(3 * 4.0)                                          # backward + recompute
    assert g.comm == pytest.approx(3 / 4 * 400.0 / bw(80.0))                        # forward all-gather
    assert g.states_mb == pytest.approx(4 * 800.0 * (1 / 8 + 7 / 8 / 4))
    assert g.act_mb == pytest.approx(5.0 * 2)
    assert g.transient_mb == pytest.approx(40.0 * 2)


def test_state_fractions_follow_the_mixed_precision_split():
    assert state_fraction("ddp", 8, 1, True) == 1.0
    assert state_fraction("zero2", 8, 1, True) == pytest.approx(1 / 8 + 7 / 64)
    assert state_fraction("zero3", 8, 1, True) == pytest.approx(1 / 8)
    assert state_fraction("zero3", 8, 4, True) == pytest.approx(1 / 8 + 7 / 64)
    assert state_fraction("zero2", 4, 1, False) == pytest.approx(1 / 4 + 3 / 16)
    assert state_fraction("zero3", 1, 1, True) == 1.0
    with pytest.raises(InputError):
        state_fraction("zero9", 2, 1, True)


def test_overlap_is_never_faster_than_either_part():
    for comm, compute in [(0, 5), (5, 0), (3, 5), (5, 3), (4, 4)]:
        t = overlapped(comm, compute, 1.3)
        assert max(comm, compute) <= t <= comm + compute + 1e-12


def test_pipeline_step_matches_hand_computation():
    cm = CostModel(ModelCost("m", (LAYER,)), cluster4())
    stages = [StageFigures(10.0, 6.0, 3.0, 0, 2), StageFigures(12.0, 7.0, 9.0, 0, 1)]
    # sum 22 + (m-1) * 12 + tail max(3 - 0, 9 - 6)
    assert cm.step_ms(stages, 4) == pytest.approx(22 + 3 * 12 + 3)
    assert cm.step_ms(stages[:1], 4) == pytest.approx(4 * 10 + 3)


def test_shared_cores_step_matches_hand_computation():
    """Ranks sharing cores: the longer of the average busy time and the sped-up critical path."""
    import dataclasses

    from nncompile.parallel.cost import PlanCost

    slow = dataclasses.replace(cluster4(), compute_speed=0.25)       # 4 ranks on one core's worth
    cm = CostModel(ModelCost("m", (LAYER,)), slow)
    stages = (StageFigures(10.0, 6.0, 3.0, 0, 2, 8.0), StageFigures(12.0, 7.0, 9.0, 0, 1, 10.0))
    cost = PlanCost(cm.step_ms(list(stages), 4), 0.0, stages, 1e9)
    # busy: 4 * 22 / 2 + tail 3 = 47; critical path, compute 2x faster: stages 6, 7 -> 13 + 3 * 7 + tail 6 = 40
    assert cm.shared_cores_step_ms(cost, 4) == pytest.approx(47.0)
    assert cm.shared_cores_step_ms(cost, 4) < cost.step_ms
    # one micro-batch: busy 22 / 2 + 3 = 14 < critical path 13 + tail 6 = 19 (vs 25 unshared)
    assert cm.shared_cores_step_ms(PlanCost(cm.step_ms(list(stages), 1), 0.0, stages, 1e9), 1) == pytest.approx(19.0)
    one = PlanCost(cm.step_ms(list(stages[:1]), 4), 0.0, stages[:1], 1e9)
    assert cm.shared_cores_step_ms(one, 4) == one.step_ms        # no pipeline: nothing changes
    # a real plan: the stages' compute is their forward + backward, never more than the whole
    plan = Plan(Setting(2, 16, 4), (1, 1), (Strategy(1, 2), Strategy(2, 1)))
    cost = CostModel(ModelCost("m", (LAYER,) * 2), slow).evaluate(plan)
    for st in cost.stages:
        assert 0 < st.compute <= st.per_microbatch
    # the critical path with 1x speed would be the plain 1F1B step: never exceeded
    assert CostModel(ModelCost("m", (LAYER,) * 2), slow).shared_cores_step_ms(cost, 4) <= cost.step_ms + 1e-9


def test_pipeline_memory_counts_inflight_microbatches():
    cm = CostModel(ModelCost("m", (LAYER,) * 4), cluster4())
    plan = Plan(Setting(2, 16, 4), (2, 2), (Strategy(1, 2),) * 4)
    cost = cm.evaluate(plan)
    layer = cm.layer(0, Strategy(1, 2), plan.setting, 0)
    assert [s.inflight for s in cost.stages] == [2, 1]
    for stage in cost.stages:
        expected = 100 + 2 * layer.states_mb + stage.inflight * 2 * layer.act_mb
        assert stage.memory_mb == pytest.approx(expected)
    gpipe = cm.evaluate(Plan(Setting(2, 16, 4, pipeline_type="gpipe"), (2, 2), (Strategy(1, 2),) * 4))
    assert [s.inflight for s in gpipe.stages] == [4, 4]


def test_cluster_group_bandwidth_and_errors():
    c = cluster4()
    assert c.group_bandwidth((0, 1)) == pytest.approx(100.0 * GB_PER_S_TO_MB_PER_MS)
    assert c.group_bandwidth((0, 2)) == pytest.approx(50.0 * GB_PER_S_TO_MB_PER_MS)
    assert c.group_bandwidth((3,)) == float("inf")
    with pytest.raises(InputError, match="missing 'memory_mb'"):
        cluster_from_dict({"nodes": 1, "devices_per_node": 4, "allreduce_bandwidth": {}, "p2p_bandwidth": {}})
    with pytest.raises(InputError, match="unexpected all-reduce table key"):
        cluster_from_dict({"nodes": 1, "devices_per_node": 4, "memory_mb": 1,
                           "allreduce_bandwidth": {"bogus": 1}, "p2p_bandwidth": {}})


@needs_data
def test_shipped_clusters_resolve_the_dataset_tables():
    c = load_cluster("2x8-40gb")
    assert (c.num_devices, c.memory_mb, c.tp_limit) == (16, 40960, 8)
    inside, across = c.group_bandwidth(tuple(range(8))), c.group_bandwidth(tuple(range(0, 16, 2)))
    assert inside == pytest.approx(155.658 * GB_PER_S_TO_MB_PER_MS)
    assert across == pytest.approx(20.7724 * GB_PER_S_TO_MB_PER_MS)
    assert c.overlap_coe == pytest.approx(1.125552573612729)
    assert load_cluster("1x8-36gb").memory_mb == 36864
    assert load_cluster("cpu4-gloo").num_devices == 4


@needs_data
def test_shipped_clusters_carry_the_dataset_tables_verbatim():
    """The shipped files inline Galvatron's measured tables (an installed package has no dataset)."""
    hardware = GALVATRON / "hardware"
    for name, tag in (("2x8-40gb", "2nodes_8gpus_per_node"), ("1x8-36gb", "1nodes_8gpus_per_node")):
        shipped = json.loads((CLUSTERS / f"{name}.json").read_text())
        assert shipped["allreduce_bandwidth"] == json.loads((hardware / f"allreduce_bandwidth_{tag}.json").read_text())
        assert shipped["p2p_bandwidth"] == json.loads((hardware / f"p2p_bandwidth_{tag}.json").read_text())
        assert shipped["overlap_coefficient"] == json.loads((hardware / "overlap_coefficient.json").read_text())["overlap_coe"]


def test_shipped_clusters_load_from_anywhere(tmp_path):
    """Copied away from the source tree (as in site-packages), every shipped cluster still loads."""
    import importlib.resources
    import shutil

    names = sorted(p.name for p in importlib.resources.files("nncompile.parallel").joinpath("clusters").iterdir()
                   if p.name.endswith(".json"))
    assert names == ["1x8-36gb.json", "2x8-40gb.json", "cpu4-gloo.json"]
    for name in names:
        shutil.copy(CLUSTERS / name, tmp_path / name)
        here = load_cluster(name[:-len(".json")])
        away = load_cluster(tmp_path / name)
        assert away == here and away.num_devices in (4, 8, 16)


@needs_data
def test_profiles_read_as_they_are():
    m = load_galvatron_profile(GALVATRON / "gpt", "gpt-6.7b")
    layer = m.layers[0]
    assert m.num_layers == 32
    assert layer.param_mb == pytest.approx(768.859375)
    assert layer.fwd_ms(2) == pytest.approx(2 * 4.6243487675984705)
    assert layer.act_mb(4) == pytest.approx(128.0938720703125)
    assert layer.ckpt_act_mb_per_sample == 16.0
    assert m.vocab.states_mb("off", 1) == 6540.0
    # embedding + head time per sample from the whole-model runs: (T(6 layers) - 6 * 2 * layer) / 2
    assert m.vocab.fwd_ms("last", 1) == pytest.approx(
        ((83.93114852905275 - 12 * 4.6243487675984705) / 2 + (139.4233337402344 - 24 * 4.6243487675984705) / 2) / 2)
    llama = load_galvatron_profile(GALVATRON / "llama2-7b", "llama2-7b")
    assert llama.layers[0].fwd_ms(8) == pytest.approx(8 * 3.9369729995727534)
    assert llama.layers[0].fwd_ms(9) == pytest.approx(9 * 3.95926776462131)
    assert llama.vocab.states_mb("first", 4) == pytest.approx(775.68310546875)
    with pytest.raises(InputError, match="no such file"):
        load_galvatron_profile(GALVATRON / "gpt", "gpt-99b")


@needs_data
@pytest.mark.parametrize("folder,name,cluster", CASES)
def test_search_beats_or_matches_galvatron_plans_within_memory(folder, name, cluster):
    model = load_galvatron_profile(GALVATRON / folder, name)
    c = load_cluster(cluster)
    cm = CostModel(model, c)
    for path in sorted(glob.glob(str(GALVATRON / folder / f"galvatron_config_{name}_*.json"))):
        theirs = plan_from_json(json.loads(Path(path).read_text()), c.num_devices, model.num_layers)
        their_cost = cm.evaluate(theirs)
        assert their_cost.fits, path
        # searched plans and the hand-written 3D examples alike, at their own global batch size
        ours = search(model, c, SearchOptions(global_bsz=theirs.setting.global_bsz))
        assert ours.cost.fits and ours.cost.max_memory_mb <= c.memory_mb
        assert ours.cost.throughput >= their_cost.throughput * (1 - 1e-9)
        # the plan we write reads back to the same cost
        again = plan_from_json(plan_to_json(ours.plan, ours.cost), c.num_devices, model.num_layers)
        assert cm.evaluate(again).step_ms == pytest.approx(ours.cost.step_ms)
        assert "step" in plan_table(ours.plan, cm)


def test_plan_reader_rejects_bad_plans():
    good = {"pp_deg": 2, "tp_sizes_enc": "1,1,2,2", "dp_types_enc": "0,0,1,0", "global_bsz": 8, "chunks": 2,
            "pp_division": "2,2"}
    plan = plan_from_json(good, 4, 4)
    assert plan.strategies[2] == Strategy(2, 1, True, False, True)
    for bad, message in [({**good, "pp_deg": 3}, "does not divide"),
                         ({**good, "tp_sizes_enc": "1,1,2"}, "expected 4"),
                         ({**good, "pp_division": "1,2"}, "pp_division"),
                         ({**good, "tp_sizes_enc": "1,1,3,3"}, "tp 3"),
                         ({**good, "pipeline_type": "zigzag"}, "pipeline_type"),
                         ({k: v for k, v in good.items() if k != "global_bsz"}, "missing 'global_bsz'"),
                         ({**good, "dp_types_enc": "0,x,0,0"}, "non-integer")]:
        with pytest.raises(InputError, match=message):
            plan_from_json(bad, 4, 4)


def test_profile_chain_measures_a_torch_model():
    import torch

    from nncompile.parallel.calibrate import _saved_mb, profile_chain
    from nncompile.parallel.runner_model import TinyGPT

    lin = torch.nn.Linear(4, 8).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    # linear saves its input (3x4); relu saves its output (3x8); the weight is not an activation
    assert _saved_mb(lambda: torch.relu(lin(x)), lin) * 2**20 == (3 * 4 + 3 * 8) * 8
    model = TinyGPT(vocab=64, d_model=32, n_head=4, n_layer=3, seq=8)
    cost = profile_chain(model, batch_sizes=(1, 2))
    block_bytes = sum(p.numel() * 8 for p in model.blocks[0].parameters())
    layer = cost.layers[0]
    assert cost.num_layers == 3
    assert layer.param_mb * 2**20 == block_bytes
    assert layer.boundary_mb_per_sample * 2**20 == 8 * 32 * 8
    assert layer.act_mb(1) > 4 * layer.boundary_mb_per_sample        # a block keeps several tensors
    assert all(ms > 0 for _, ms in layer.fwd_ms_points)
    assert cost.vocab.fwd_ms("last", 2) > 0


def test_layer_from_static_counts():
    layer = LayerCost.from_counts("l", flops_per_sample=2e12, device_tflops=100.0, param_bytes=2**30,
                                  act_bytes_per_sample={1: 2**20}, boundary_bytes_per_sample=2**19)
    assert layer.fwd_ms(3) == pytest.approx(3 * 20.0)
    assert layer.param_mb == 1024.0 and layer.act_mb(2) == 0.5 and layer.ckpt_act_mb_per_sample == 0.5
    with pytest.raises(InputError):
        LayerCost.from_counts("l", 1.0, 0.0, 1.0, {1: 1.0}, 1.0)


def test_latency_is_paid_once_per_message():
    base = cluster4()
    slow = cluster_from_dict({
        "nodes": 1, "devices_per_node": 4, "memory_mb": 10_000, "latency_ms": 0.5,
        "allreduce_bandwidth": {"allreduce_size_2_consec_1": 100.0, "allreduce_size_2_consec_0": 50.0,
                                "allreduce_size_4_consec_1": 80.0},
        "p2p_bandwidth": {"pp_size_2": 10.0}, "overlap_coefficient": {"overlap_coe": 1.5}, "context_memory_mb": 100})
    model = ModelCost("m", (LAYER,) * 2)
    setting = Setting(1, 16, 2)
    fast_fig = CostModel(model, base).layer(0, Strategy(2, 2, sdp=True, ckpt=True), setting, 0)
    slow_fig = CostModel(model, slow).layer(0, Strategy(2, 2, sdp=True, ckpt=True), setting, 0)
    # 6 TP all-reduces (2 forward, 2 backward, 2 recompute) + 1 ZeRO-3 all-gather per micro-batch
    assert slow_fig.comm - fast_fig.comm == pytest.approx(7 * 0.5)
    assert slow_fig.sync - fast_fig.sync == pytest.approx(0.5)
    a, b = Strategy(1, 4), Strategy(2, 2)
    assert (CostModel(model, slow).transition(0, a, b, setting, 0)
            - CostModel(model, base).transition(0, a, b, setting, 0)) == pytest.approx(2 * 0.5)


def _write(path: Path, data) -> None:
    path.write_text(json.dumps(data))


def test_profile_reader_on_synthetic_files(tmp_path):
    _write(tmp_path / "toy.json", {"num_hidden_layers": 3, "hidden_size": 64, "num_attention_heads": 4,
                                   "max_position_embeddings": 128})
    _write(tmp_path / "computation_profiling_bf16_toy_all.json",
           {"layertype_0_bsz1_seq128": 2.0, "layertype_0_bsz4_seq128": 1.0, "layertype_other_bsz1_seq128": 0.5,
            "layertype_0_bsz1_seq999": 50.0})
    per_tp = {"1": 100.0, "2": 60.0}
    _write(tmp_path / "memory_profiling_bf16_toy_all.json", {
        "layertype_0_sp": {"128": {"parameter_size": 8.0, "tp_activation_per_bsz_dict": {"1": 4.0, "2": 2.5,
                                                                                      "checkpoint": 0.25}}},
        "other_memory_pp_off_sp": {"128": {"model_states": per_tp, "activation": {"1": 3.0, "2": 2.0}}},
        "other_memory_pp_on_first_sp": {"128": {"model_states": per_tp, "activation": {"1": 1.0, "2": 0.5}}},
        "other_memory_pp_on_last_sp": {"128": {"model_states": per_tp, "activation": {"1": 2.0, "2": 1.0}}}})
    model = load_galvatron_profile(tmp_path, "toy")
    layer = model.layers[0]
    assert model.num_layers == 3
    assert layer.fwd_ms(1) == 2.0 and layer.fwd_ms(4) == 4.0                 # per-sample points, this seq only
    assert layer.fwd_ms(2) == pytest.approx(2 * (2.0 - 1.0 / 3))             # interpolated per sample
    assert layer.act_mb(2) == 2.5 and layer.act_mb(4) == pytest.approx(1.25)  # unmeasured degrees scale 1/tp
    assert layer.boundary_mb_per_sample == pytest.approx(128 * 64 * 2 / 2**20)
    assert model.vocab.states_mb("first", 2) == 60.0 and model.vocab.fwd_ms("last", 1) == 0.5
    # a memory profile without the per-layer entry is reported, naming the folder
    _write(tmp_path / "memory_profiling_bf16_toy_all.json", {"other_memory_pp_off": {}})
    with pytest.raises(InputError, match="no usable memory_profiling"):
        load_galvatron_profile(tmp_path, "toy")
    (tmp_path / "memory_profiling_bf16_toy_all.json").write_text("{ broken")
    with pytest.raises(InputError, match="not valid JSON"):
        load_galvatron_profile(tmp_path, "toy")
