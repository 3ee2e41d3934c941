"""The CUDA target on a GPU: every op == the NumPy interpreter, the examples == torch CUDA, training
steps == torch CUDA training. Skipped (module level) when ``torch.cuda.is_available()`` is False or nvcc
is missing; collecting this file needs neither.

References: ``nncompile.ir.run`` (the interpreter) for ops and gradients, torch on the GPU for the
examples (``examples/torch_models.py``) and for the optimizers. Tolerances are fp32 (the GEMM here
is exact fp32; compile with TF32 and they would need ~1e-3).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from nncompile.codegen.build_cuda import find_nvcc

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU (torch.cuda.is_available() is False)"),
    pytest.mark.skipif(find_nvcc() is None, reason="nvcc (CUDA toolkit) not installed"),
]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module", autouse=True)
def exact_torch():
    """torch's references in fp32: no TF32 in cuDNN convolutions or cuBLAS matmuls."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _close(got, ref, rtol=2e-4, atol=2e-5, what=""):
    got = got.detach().cpu().numpy() if hasattr(got, "detach") else np.asarray(got)
    ref = np.asarray(ref)
    scale = max(1.0, float(np.abs(ref).max())) if ref.size else 1.0
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol * scale, err_msg=what)


def _cuda(graph, **kw):
    from nncompile.driver import CompileOptions, compile_graph

    return compile_graph(graph, CompileOptions(target="cuda"), **kw)


# ops ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo():
    """The C++ backend's op zoo (tests/backend/test_codegen_ops.py), compiled once for the GPU."""
    from nncompile.ir import GraphBuilder

    cpu_zoo = _load("nnc_cpu_op_zoo", ROOT / "tests" / "backend" / "test_codegen_ops.py")
    b = GraphBuilder("zoo")
    b.output(*[build(b) for _, build in cpu_zoo._zoo_cases()])
    graph = b.build()
    return graph, _cuda(graph), cpu_zoo.random_inputs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zoo_matches_interpreter(zoo, seed):
    from nncompile.ir import run

    graph, model, random_inputs = zoo
    inputs = random_inputs(graph, seed)
    expected = run(graph, inputs, {k: v.cpu().numpy() for k, v in model.parameters().items()})
    got = model(**inputs)
    for name, value in zip(graph.outputs, got):
        _close(value, expected[name], what=f"output {name}")


def test_torch_cuda_tensors_in_and_out_zero_copy(zoo):
    graph, model, random_inputs = zoo
    inputs = {k: torch.from_numpy(np.asarray(v)).cuda() for k, v in random_inputs(graph, 3).items()}
    pointers = {k: v.data_ptr() for k, v in inputs.items()}
    got = model(**inputs)
    assert all(o.is_cuda for o in got)
    assert {k: v.data_ptr() for k, v in inputs.items()} == pointers
    numpy_got = model(**{k: v.cpu().numpy() for k, v in inputs.items()})
    assert isinstance(numpy_got[0], np.ndarray)
    for a, b in zip(got, numpy_got):
        np.testing.assert_array_equal(a.cpu().numpy(), b)


def test_bad_index_is_an_input_error():
    from nncompile.errors import InputError
    from nncompile.ir import GraphBuilder, Init, TensorType

    b = GraphBuilder("ids")
    w = b.param("w", TensorType((5, 3)), Init("normal"))
    b.output(b.op("embedding", [b.input("ids", TensorType((4,), "i64")), w]))
    model = _cuda(b.build())
    _close(model(np.array([0, 4, 2, 1])), model.parameters()["w"].cpu().numpy()[[0, 4, 2, 1]], rtol=0, atol=0)
    with pytest.raises(InputError, match="embedding"):
        model(np.array([0, 5, 2, 1]))


@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (7, 13, 5), (64, 64, 64), (130, 257, 33), (512, 384, 1000),
                                     (1030, 1025, 64)])     # the last one takes the 128x128 tiles
def test_gemm_shapes(m, n, k):
    from nncompile.ir import GraphBuilder, Init, TensorType, run

    b = GraphBuilder("gemm")
    x = b.input("x", TensorType((m, k)))
    w = b.param("w", TensorType((n, k)), Init("normal", {"std": 0.1}))
    y = b.input("y", TensorType((3, k, n)))
    b.output(b.op("linear", [x, w]), b.op("matmul", [b.op("expand", [b.op("unsqueeze", [x], {"axis": 0})], {"shape": (3, m, k)}), y]))
    graph = b.build()
    model = _cuda(graph)
    rng = np.random.default_rng(0)
    inputs = {"x": rng.standard_normal((m, k)).astype(np.float32), "y": rng.standard_normal((3, k, n)).astype(np.float32)}
    expected = run(graph, inputs, {"w": model.parameters()["w"].cpu().numpy()})
    for value, name in zip(model(**inputs), graph.outputs):
        _close(value, expected[name], rtol=1e-4, atol=1e-4)


def test_tf32_gemm_is_close(monkeypatch):
    """The TF32 (WMMA) GEMM, used for large tiles, within TF32 rounding of the exact product."""
    from nncompile.ir import GraphBuilder, Init, TensorType, run

    monkeypatch.setenv("NNCOMPILE_CUDA_TF32", "1")
    b = GraphBuilder("gemm_tf32")
    x = b.input("x", TensorType((1000, 300)))
    w = b.param("w", TensorType((1100, 300)), Init("normal", {"std": 0.1}))
    b.output(b.op("linear", [x, w]))
    graph = b.build()
    model = _cuda(graph)
    inputs = {"x": np.random.default_rng(0).standard_normal((1000, 300)).astype(np.float32)}
    expected = run(graph, inputs, {"w": model.parameters()["w"].cpu().numpy()})[graph.outputs[0]]
    _close(model(**inputs), expected, rtol=1e-2, atol=1e-2)


def _training_outputs_match(graph, seed=0):
    """The training module's loss and gradients == the interpreter on the training graph."""
    from nncompile.autodiff import training_graph
    from nncompile.driver import TrainOptions
    from nncompile.ir import run

    model = _cuda(graph, train=TrainOptions.from_graph(graph))
    tg = training_graph(graph)
    rng = np.random.default_rng(seed)
    inputs = {}
    for item in tg.graph.inputs:
        t = item.type
        if item.name == tg.step_input:
            inputs[item.name] = np.array(0, dtype=np.int64)
        elif t.dtype == "i64":
            inputs[item.name] = rng.integers(0, 5, t.shape)
        else:
            inputs[item.name] = rng.standard_normal(t.shape).astype(np.float32)
    params = {k: v.cpu().numpy().copy() for k, v in model.parameters().items()}
    expected = run(tg.graph, inputs, params)
    trainer = model._trainer
    args = [inputs[name] for name, _ in trainer.inputs]
    loss = model.train_step(*args)   # forward + backward, then the optimizer
    _close(np.float32(loss), expected[tg.loss], rtol=1e-4)
    for param, grad in trainer.grads().items():
        _close(grad, expected[tg.grads[param]], rtol=1e-3, atol=1e-4, what=f"gradient of {param}")


def test_backward_ops_match_interpreter():
    """conv (groups, stride, dilation) / pool / batch-norm / mse gradients."""
    compile_test = _load("nnc_cuda_compile_test", Path(__file__).parent / "test_cuda_compile.py")
    _training_outputs_match(compile_test.backward_zoo_graph())


def test_gpt_gradients_match_interpreter():
    """embedding, layer norm, attention (sdpa_grad), cross-entropy gradients."""
    import nncompile as nnc

    dims = {"B": 2, "T": 16, "d": 64, "heads": 4, "layers": 1, "vocab": 5}
    _training_outputs_match(nnc.parse(EXAMPLES / "gpt.nn", set=dims))


# examples against torch CUDA --------------------------------------------------------------------------


sys.path.insert(0, str(EXAMPLES))


def _example(name, dims):
    import nncompile as nnc
    from torch_models import Gpt, LeNet, Mlp

    graph = nnc.parse(EXAMPLES / f"{name}.nn", set=dims)
    if name == "mlp":
        module = Mlp()
    elif name == "lenet":
        module = LeNet()
    else:
        module = Gpt(dims["vocab"], dims["T"], dims["d"], dims["heads"], dims["layers"])
    return graph, module.cuda()


@pytest.mark.parametrize("name, dims", [("mlp", {"B": 32}), ("lenet", {"B": 8}),
                                        ("gpt", {"B": 2, "T": 32, "d": 64, "heads": 4, "layers": 2, "vocab": 128})])
def test_example_matches_torch_cuda(name, dims):
    graph, module = _example(name, dims)
    model = _cuda(graph)
    module.load_state_dict({k: v.clone() for k, v in model.parameters().items()})
    rng = np.random.default_rng(0)
    if name == "gpt":
        inputs = [torch.from_numpy(rng.integers(0, dims["vocab"], (dims["B"], dims["T"]))).cuda(),
                  torch.arange(dims["T"]).cuda()]
    else:
        inputs = [torch.from_numpy(rng.standard_normal(graph.inputs[0].type.shape).astype(np.float32)).cuda()]
    with torch.no_grad():
        expected = module(*inputs)
    _close(model(*inputs), expected.cpu().numpy(), rtol=1e-3, atol=1e-4)


def _torch_optimizer(name, params, hyper):
    hyper = dict(hyper)
    if "betas" in hyper:
        hyper["betas"] = tuple(hyper["betas"])
    return {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name](params, **hyper)


@pytest.mark.parametrize("name, dims, optimizer", [
    ("mlp", {"B": 16}, None),
    ("mlp", {"B": 16}, ("adamw", {"lr": 3e-4, "weight_decay": 0.01})),
    ("gpt", {"B": 2, "T": 16, "d": 64, "heads": 4, "layers": 2, "vocab": 128}, ("sgd", {"lr": 0.05, "momentum": 0.9})),
])
def test_training_matches_torch_cuda(name, dims, optimizer):
    import torch.nn.functional as F

    from nncompile.driver import TrainOptions

    graph, module = _example(name, dims)
    train = TrainOptions.from_graph(graph, optimizer)
    model = _cuda(graph, train=train)
    module.load_state_dict({k: v.clone() for k, v in model.parameters().items()})
    opt = _torch_optimizer(train.optimizer, module.parameters(), dict(train.hyper))
    rng = np.random.default_rng(1)
    if name == "gpt":
        batches = [((torch.from_numpy(rng.integers(0, 128, (2, 16))).cuda(), torch.arange(16).cuda()),
                    torch.from_numpy(rng.integers(0, 128, (2, 16))).cuda()) for _ in range(4)]
        loss_fn = lambda logits, y: F.cross_entropy(logits.reshape(-1, 128), y.reshape(-1))  # noqa: E731
    else:
        batches = [((torch.from_numpy(rng.standard_normal((16, 784)).astype(np.float32)).cuda(),),
                    torch.from_numpy(rng.integers(0, 10, 16)).cuda()) for _ in range(4)]
        loss_fn = F.cross_entropy
    ours, theirs = [], []
    for step in range(20):
        inputs, labels = batches[step % 4]
        ours.append(model.train_step(*inputs, labels))
        opt.zero_grad()
        loss = loss_fn(module(*inputs), labels)
        loss.backward()
        opt.step()
        theirs.append(loss.item())
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-5)
    state = module.state_dict()
    for key, value in model.parameters().items():
        _close(value, state[key].cpu().numpy(), rtol=0, atol=1e-3, what=key)
    assert ours[-1] < ours[0]


def test_gradient_accumulation_matches_the_cpu_target():
    """Two micro-batches accumulated on the GPU == the same on the (independently tested) CPU target."""
    import nncompile as nnc

    graph, _ = _example("mlp", {"B": 8})
    optimizer = ("adam", {"lr": 1e-3})
    gpu = nnc.compile(graph, train=True, optimizer=optimizer, target="cuda")
    cpu = nnc.compile(graph, train=True, optimizer=optimizer)
    cpu.load_weights({k: v.cpu().numpy() for k, v in gpu.parameters().items()})
    rng = np.random.default_rng(2)
    x = rng.standard_normal((16, 784)).astype(np.float32)
    y = rng.integers(0, 10, 16)
    for _ in range(3):
        np.testing.assert_allclose(gpu.train_step(x, y, accumulate=2), cpu.train_step(x, y, accumulate=2), rtol=1e-4)
    for key, value in cpu.parameters().items():
        _close(gpu.parameters()[key], value, rtol=0, atol=1e-4, what=key)
