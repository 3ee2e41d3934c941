"""The .nn frontend: dims and --set, expressions, params and initializers, weights files, sparsity,
blocks and repeat, names and locations, training section. Numbers are checked against NumPy/torch."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from nncompile.errors import NNError
from nncompile.frontend import parse, parse_text
from nncompile.ir import materialize, prune, run, verify


def model(body: str, dims: str = "", blocks: str = "") -> str:
    return f"{dims}\n{blocks}\nmodel m {{\n{body}\n}}\n"


def single_output(graph, inputs, weights=None):
    outs = run(graph, inputs, weights)
    return outs[graph.outputs[0]]


# dims ----------------------------------------------------------------------------------------------

def test_dims_defaults_and_set_override():
    src = model("input x: f32[B, 4 * d]\n y = relu(x)\n output y", dims="dim B = 8\ndim d = 16")
    assert parse_text(src).type_of("x").shape == (8, 64)
    assert parse_text(src, set={"B": 3, "d": 2}).type_of("x").shape == (3, 8)


def test_dim_without_default_needs_set():
    src = model("input x: f32[T, 4]\n output x", dims="dim T")
    assert parse_text(src, set={"T": 5}).type_of("x").shape == (5, 4)
    with pytest.raises(NNError, match="dimension 'T' has no value"):
        parse_text(src)


def test_integer_arithmetic_and_shape_queries():
    src = model("""
        dim heads = 4
        input x: f32[B, d]
        hd = d / heads
        y = reshape(x, [B, heads, hd])
        z = reshape(y, [y.shape[0], y.shape[-1] * y.shape[1]])
        n = x.numel + x.rank + 2 ** 3
        w = reshape(x, [n - 10, B * d / (n - 10)])
        output z, w""", dims="dim B = 2\ndim d = 8")
    g = parse_text(src)
    assert g.type_of("y").shape == (2, 4, 2)
    assert g.type_of("z").shape == (2, 8)
    assert g.type_of("w").shape == (16, 1)  # n = 16 + 2 + 8 = 26


# expressions -----------------------------------------------------------------------------------------

def test_infix_ops_map_to_ir_ops_and_compute_like_numpy():
    src = model("""
        input a: f32[3, 4]
        input b: f32[4]
        s = a + b
        t = a - b
        u = a * b
        v = a / (b * b + 1.0)
        w = 2.0 * a - 1.0
        q = 1.0 - a / 4
        r = -a ** 2
        k = 3.0 / (a * a + 1.0)
        output s, t, u, v, w, q, r, k""")
    g = parse_text(src)
    ops = [n.op for n in g.nodes]
    assert ops[:3] == ["add", "sub", "mul"]
    assert {"scale", "add_scalar", "pow_scalar", "neg", "div"} <= set(ops)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 4)).astype(np.float32)
    b = rng.normal(size=4).astype(np.float32)
    out = run(g, {"a": a, "b": b})
    expected = [a + b, a - b, a * b, a / (b * b + 1), 2 * a - 1, 1 - a / 4, -(a ** 2), 3 / (a * a + 1)]
    for name, want in zip(g.outputs, expected):
        np.testing.assert_allclose(out[name], want, rtol=1e-5, atol=1e-6)


def test_pipeline_and_positional_attributes():
    src = model("""
        input x: f32[2, 3, 4]
        y = x |> relu |> transpose(1, 2) |> reshape([2, 12])
        z = softmax(y, axis=-1)
        output z""")
    g = parse_text(src)
    assert [n.op for n in g.nodes] == ["relu", "transpose", "reshape", "softmax"]
    x = np.random.default_rng(1).normal(size=(2, 3, 4)).astype(np.float32)
    y = np.maximum(x, 0).transpose(0, 2, 1).reshape(2, 12)
    e = np.exp(y - y.max(-1, keepdims=True))
    np.testing.assert_allclose(single_output(g, {"x": x}), e / e.sum(-1, keepdims=True), rtol=1e-5)


def test_rebinding_gets_fresh_unique_names_and_locations():
    src = "model m {\n  input x: f32[2, 3]\n  x = relu(x)\n  x = tanh(x)\n  output x\n}\n"
    g = parse_text(src, filename="r.nn")
    names = [n.name for n in g.nodes]
    assert len(set(names)) == 2 and g.outputs == (names[-1],)
    relu = g.nodes[0]
    assert (relu.loc.file, relu.loc.line, relu.loc.col) == ("r.nn", 3, 7)
    assert relu.loc.source_line == "  x = relu(x)"
    assert g.inputs[0].loc.line == 2


def test_dtype_names_and_string_attributes():
    src = model("""
        input ids: i64[2, 3]
        f = cast(ids, dtype=f32)
        g = gelu(f, approximate="tanh")
        output g""")
    g = parse_text(src)
    assert g.type_of("f").dtype == "f32" and g.node("g").attrs["approximate"] == "tanh"


def test_optional_tensor_input_by_keyword():
    src = model("""
        input x: f32[2, 3]
        param w: f32[5, 3] = normal()
        param b: f32[5] = constant(0.5)
        y = linear(x, w, bias=b)
        output y""")
    g = parse_text(src)
    assert g.nodes[0].inputs == ("x", "w", "b")
    x = np.ones((2, 3), np.float32)
    weights = materialize(g)
    np.testing.assert_allclose(single_output(g, {"x": x}, weights), x @ weights["w"].T + 0.5, rtol=1e-6)


# parameters ------------------------------------------------------------------------------------------

def test_initializers_are_recorded_and_materialize():
    src = model("""
        param a: f32[4, 5] = constant(2.5)
        param b: f32[300, 200] = normal(std=0.02)
        param c: f32[300, 200] = kaiming_uniform()
        param d: f32[64, 32] = xavier_uniform(gain=2.0)
        param e: f32[7]
        buffer f: f32[3] = ones()
        y = a + a
        output y""")
    g = parse_text(src)
    inits = {p.name: (p.init.kind, dict(p.init.args), p.trainable) for p in g.params}
    assert inits["a"] == ("constant", {"value": 2.5}, True)
    assert inits["b"] == ("normal", {"mean": 0.0, "std": 0.02}, True)
    assert inits["e"][0] == "zeros" and inits["f"] == ("ones", {}, False)
    values = materialize(g)
    assert np.all(values["a"] == 2.5)
    assert abs(values["b"].std() - 0.02) < 0.001
    bound = math.sqrt(6.0 / 200)  # kaiming_uniform(a=0), fan_in = 200
    assert values["c"].max() <= bound and values["c"].max() > 0.95 * bound
    assert values["d"].max() <= 2.0 * math.sqrt(6.0 / 96)


def test_weights_file_overrides_initializers(tmp_path):
    w1 = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.savez(tmp_path / "w.npz", **{"fc.weight": w1, "fc.bias": np.ones(3, np.float32)})
    (tmp_path / "m.nn").write_text(model("""
        weights "w.npz"
        input x: f32[2, 4]
        fc = Linear(x, 3)
        other = Linear(fc, 2)
        output other, fc"""))
    g = parse(tmp_path / "m.nn")
    kinds = {p.name: p.init.kind for p in g.params}
    assert kinds["fc.weight"] == kinds["fc.bias"] == "given" and kinds["other.weight"] == "kaiming_uniform"
    verify(g)
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(run(g, {"x": x})["fc"], x @ w1.T + 1.0)


def test_load_initializer_and_safetensors(tmp_path):
    arr = np.random.default_rng(0).normal(size=(3, 2)).astype(np.float32)
    np.savez(tmp_path / "a.npz", first=arr)
    header = json.dumps({"p": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 24]}}).encode()
    (tmp_path / "b.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + (arr * 2).tobytes())
    (tmp_path / "m.nn").write_text("""
        model m {
            weights "b.safetensors"
            param q: f32[3, 2] = load("a.npz", "first")
            param p: f32[3, 2] = zeros()
            y = q + p
            output y
        }""")
    g = parse(tmp_path / "m.nn")
    q = g.param("q")
    assert q.init.kind == "file" and q.init.args["key"] == "first"
    np.testing.assert_allclose(run(g, {})["y"], arr * 3, rtol=1e-6)


def test_sparsity_declarations_become_types(tmp_path):
    mask = (np.arange(16).reshape(4, 4) % 3 == 0)
    np.save(tmp_path / "mask.npy", mask)
    (tmp_path / "s.nn").write_text("""
        model s {
            input x: f32[2, 8]
            param a: f32[8, 8] = kaiming_uniform() sparse(density=0.25, seed=3)
            param b: f32[8, 8] = normal() sparse(block=4, density=0.5)
            param c: f32[8, 8] = normal() sparse(block=[2, 4], density=0.5, seed=1)
            param d: f32[8, 8] = normal() sparse(nm=2:4)
            param e: f32[8, 8] = normal() sparse(n=1, m=4, seed=2)
            param f: f32[4, 4] = ones() sparse(mask="mask.npy")
            y = linear(x, a) + linear(x, b) + linear(x, c) + linear(x, d) + linear(x, e)
            g = Linear(x, 8, sparse=sparse(nm=2:4))
            h = Linear(x, 8, sparse=0.5)
            output y, g, h
        }""")
    g = parse(tmp_path / "s.nn")
    sp = {p.name: p.type.sparsity for p in g.params}
    assert (sp["a"].kind, sp["a"].density, sp["a"].seed) == ("unstructured", 0.25, 3)
    assert (sp["b"].kind, sp["b"].block, sp["b"].density) == ("block", (4, 4), 0.5)
    assert sp["c"].block == (2, 4) and sp["c"].seed == 1
    assert (sp["d"].kind, sp["d"].n, sp["d"].m) == ("nm", 2, 4)
    assert (sp["e"].n, sp["e"].m, sp["e"].seed) == (1, 4, 2)
    assert sp["f"].kind == "mask"
    assert sp["g.weight"].kind == "nm" and sp["g.bias"] is None
    assert sp["h.weight"].kind == "unstructured" and sp["h.weight"].density == 0.5
    values = materialize(g)
    assert np.count_nonzero(values["a"]) == 16
    assert np.array_equal(values["f"] != 0, mask)
    assert np.all((values["d"].reshape(-1, 4) != 0).sum(axis=1) == 2)


# blocks and repeat -----------------------------------------------------------------------------------

BLOCKS = """
block Mlp(x: tensor, d: int, hidden: int = 2 * d) {
    fc = Linear(x, hidden)
    proj = Linear(relu(fc), d)
    return proj
}
block Res(x: tensor) {
    y = Mlp(x, x.shape[-1])
    return x + y
}
block Split(a: tensor, b: tensor) {
    return b, a + b
}
"""


def test_block_instances_have_their_own_parameters():
    src = model("""
        input x: f32[2, 4]
        m1 = Mlp(x, 4)
        m2 = Mlp(m1, d=4, hidden=3)
        r = Res(m2, name="res")
        output r""", blocks=BLOCKS)
    g = parse_text(src)
    names = g.param_names
    assert names == ("m1.fc.weight", "m1.fc.bias", "m1.proj.weight", "m1.proj.bias",
                     "m2.fc.weight", "m2.fc.bias", "m2.proj.weight", "m2.proj.bias",
                     "res.y.fc.weight", "res.y.fc.bias", "res.y.proj.weight", "res.y.proj.bias")
    assert g.type_of("m1.fc.weight").shape == (8, 4) and g.type_of("m2.fc.weight").shape == (3, 4)
    values = materialize(g)
    assert not np.allclose(values["m1.fc.weight"], values["res.y.fc.weight"])  # same shape, own values
    # the residual block really adds its input: compare with numpy
    x = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)

    def mlp(h, p):
        h1 = np.maximum(h @ values[p + ".fc.weight"].T + values[p + ".fc.bias"], 0)
        return h1 @ values[p + ".proj.weight"].T + values[p + ".proj.bias"]
    h = mlp(mlp(x, "m1"), "m2")
    np.testing.assert_allclose(single_output(g, {"x": x}, values), h + mlp(h, "res.y"), rtol=1e-5, atol=1e-6)


def test_repeat_stacks_instances_with_distinct_parameters():
    src = model("""
        input x: f32[2, 4]
        h = repeat 3 Res(x)
        k = repeat n Linear(h, 4) as layers
        a, b = repeat 2 Split(x, k)
        output h, k, a, b""", dims="dim n = 2", blocks=BLOCKS)
    g = parse_text(src)
    names = set(g.param_names)
    for i in range(3):
        assert f"h.{i}.y.fc.weight" in names
    assert {"layers.0.weight", "layers.1.bias"} <= names and "layers.2.weight" not in names
    values = materialize(g)
    assert not np.allclose(values["h.0.y.fc.weight"], values["h.1.y.fc.weight"])
    x = np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)
    out = run(g, {"x": x}, values)
    k = out[g.outputs[1]]
    # Split twice: (x, k) -> (k, x + k) -> (x + k, x + 2k)
    np.testing.assert_allclose(out[g.outputs[2]], x + k, rtol=1e-6)
    np.testing.assert_allclose(out[g.outputs[3]], x + 2 * k, rtol=1e-5, atol=1e-6)


def test_block_params_in_block_and_default_from_earlier_argument():
    src = model("""
        input x: f32[2, 3]
        s = Scale(x)
        t = Scale(s, k=2.0)
        output t""", blocks="""
        block Scale(x: tensor, k: float = 0.5, width: int = x.shape[-1]) {
            param g: f32[width] = constant(3.0)
            return x * g * k
        }""")
    g = parse_text(src)
    assert g.param_names == ("s.g", "t.g")
    x = np.ones((2, 3), np.float32)
    np.testing.assert_allclose(single_output(g, {"x": x}), x * 3 * 0.5 * 3 * 2.0)


# layers against torch --------------------------------------------------------------------------------

torch = pytest.importorskip("torch")


def _torch_weights(module, prefix=""):
    return {prefix + k: v.detach().numpy().copy() for k, v in module.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def test_attention_layer_matches_torch_multihead_attention():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    src = model("input x: f32[2, 5, 16]\n a = MultiHeadAttention(x, heads=4, causal=true)\n output a")
    g = parse_text(src)
    x = torch.randn(2, 5, 16)
    mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    want = mha(x, x, x, attn_mask=mask, need_weights=False)[0].detach().numpy()
    got = single_output(g, {"x": x.numpy()}, _torch_weights(mha, "a."))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_norm_and_embedding_layers_match_torch():
    torch.manual_seed(1)
    bn, ln, emb = torch.nn.BatchNorm2d(3).eval(), torch.nn.LayerNorm(6), torch.nn.Embedding(10, 6)
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean, ln.weight, ln.bias):
            t.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    src = model("""
        input x: f32[2, 3, 4, 6]
        input ids: i64[2, 5]
        bn = BatchNorm(x)
        ln = LayerNorm(bn)
        emb = Embedding(ids, 10, 6)
        output ln, emb""")
    g = parse_text(src)
    assert g.param("bn.running_mean").trainable is False and g.param("bn.weight").trainable
    weights = {**_torch_weights(bn, "bn."), **_torch_weights(ln, "ln."), **_torch_weights(emb, "emb.")}
    x = torch.randn(2, 3, 4, 6)
    ids = torch.randint(0, 10, (2, 5))
    out = run(g, {"x": x.numpy(), "ids": ids.numpy()}, weights)
    np.testing.assert_allclose(out["ln"], ln(bn(x)).detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["emb"], emb(ids).detach().numpy(), rtol=1e-6)


def test_torch_state_dict_file_with_batch_norm_counters_loads(tmp_path):
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3)).eval()
    with torch.no_grad():
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2.0)
    state = {k.replace("0.", "conv.").replace("1.", "bn."): v.numpy() for k, v in net.state_dict().items()}
    assert "bn.num_batches_tracked" in state
    np.savez(tmp_path / "net.npz", **state)
    (tmp_path / "net.nn").write_text(model("""
        weights "net.npz"
        input x: f32[1, 2, 5, 5]
        conv = Conv2d(x, 3, kernel=3)
        bn = BatchNorm(conv)
        output bn"""))
    g = parse(tmp_path / "net.nn")
    x = torch.randn(1, 2, 5, 5)
    with torch.no_grad():
        want = net(x).numpy()
    np.testing.assert_allclose(single_output(g, {"x": x.numpy()}), want, rtol=1e-5, atol=1e-5)


def test_layer_parameter_shapes_follow_torch():
    src = model("""
        input x: f32[2, 3, 8, 8]
        c = Conv2d(x, 6, kernel=3, stride=2, padding=1, groups=3)
        f = flatten(c)
        fc = Linear(f, 5, bias=false)
        d = Dropout(fc, p=0.1)
        output d""")
    g = parse_text(src)
    conv = torch.nn.Conv2d(3, 6, 3, stride=2, padding=1, groups=3)
    assert g.type_of("c.weight").shape == tuple(conv.weight.shape)
    assert g.type_of("c").shape == (2, 6, 4, 4)
    assert g.type_of("fc.weight").shape == (5, 96) and not g.has("fc.bias")
    assert g.node(g.outputs[0]).attrs["training"] is False


def test_conv_same_padding_and_numpy_integer_settings():
    src = model("""
        input x: f32[B, 2, 9, 9]
        c = Conv2d(x, 4, kernel=[3, 5], padding="same", dilation=2)
        v = Conv2d(c, 4, kernel=3, padding="valid")
        output v""", dims="dim B = 1")
    g = parse_text(src, set={"B": np.int64(3)})
    assert g.node("c").attrs["padding"] == (2, 4) and g.type_of("c").shape == (3, 4, 9, 9)
    assert g.type_of("v").shape == (3, 4, 7, 7)
    with pytest.raises(NNError, match="padding=\"same\" needs stride=1"):
        parse_text(src.replace('padding="same"', 'padding="same", stride=2'))


# training section ------------------------------------------------------------------------------------

def test_training_section_builds_train_spec_and_loss_nodes():
    src = model("""
        input x: f32[B, 4]
        logits = Linear(x, 3)
        output logits
        train {
            input labels: i64[B]
            loss = cross_entropy(logits, labels)
            optimizer adamw(lr=3e-4, betas=[0.9, 0.95])
        }""", dims="dim B = 6")
    g = parse_text(src)
    assert g.train.loss == "loss" and g.train.label_inputs == ("labels",) and g.train.optimizer == "adamw"
    assert dict(g.train.hyper) == {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.01}
    assert g.node("loss").op == "cross_entropy" and g.type_of("loss").numel == 1
    verify(g)
    inference = prune(g)
    assert inference.train is None and "labels" not in inference.input_names
