"""``torch.compile`` traces a model with ``W4A4Linear`` layers (the PyTorch backend on the CPU) in one graph, and the
compiled model computes what the eager one does."""

from pathlib import Path

import torch

from deepcompressor.config import load_config
from deepcompressor.nn.w4a4_linear import synthetic_w4a4_linear

ROOT = Path(__file__).resolve().parents[1]


def test_a_model_with_w4a4_layers_compiles_in_one_graph():
    cfg = load_config([str(ROOT / "configs/models/infinity-tiny.yaml"), str(ROOT / "configs/svdquant/int4.yaml")])
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(
        synthetic_w4a4_linear(torch.nn.Linear(256, 512), cfg.quant, 8, True, gen, name="fc1", backend="torch"),
        torch.nn.GELU(approximate="tanh"),
        synthetic_w4a4_linear(torch.nn.Linear(512, 256), cfg.quant, 8, True, gen, name="fc2", backend="torch"),
    )
    x = torch.randn(2, 5, 256, generator=gen)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break is an error
    assert torch.equal(compiled(x), model(x))


def test_the_triton_path_is_one_custom_op_that_compiles():
    """Explicit Triton backends (run here by the interpreter, as on a GPU) go through
    ``torch.ops.deepcompressor.w4a4_linear``: equal to the direct kernel call, traced by torch.compile in one graph
    through its fake implementation."""
    from deepcompressor.kernels.w4a4_dispatch import linear_forward

    cfg = load_config([str(ROOT / "configs/models/infinity-tiny.yaml"), str(ROOT / "configs/svdquant/int4.yaml")])
    gen = torch.Generator().manual_seed(1)
    layer = synthetic_w4a4_linear(torch.nn.Linear(128, 64), cfg.quant, 16, True, gen, name="fc", backend="int")
    x = torch.randn(3, 7, 128, generator=gen)
    direct = linear_forward(x.reshape(-1, 128), layer.operands(x.dtype), "int").reshape(3, 7, 64)
    assert torch.equal(layer(x), direct)
    op = torch.ops.deepcompressor.w4a4_linear
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    assert torch.equal(compiled(x), direct)
    assert len(graphs) == 1 and any(node.target in (op, op.default) for node in graphs[0].graph.nodes)
