"""Golden tests of every operator of issue 3 against eager torch, in simulate mode.

Each case is a tiny model compiled with `require_full_fhe=True` (so the operator really runs in
FHE, never in a silent torch fallback) and compared with eager torch by `assert_matches_torch`.
Inputs lie on the input quantizer's grid (`grid_inputs`), so input quantization is lossless and
discontinuous operators (floor, sign, comparisons, Threshold) are compared exactly; the
tolerance is a few output quantization steps.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fhe_backend
from tests.harness import assert_matches_torch, compile_fhe, grid_inputs, quantization_tolerance

FULL_FHE = {"require_full_fhe": True}
SHAPES = [(5,), (2, 3)]


class Lambda(nn.Module):
    """A module computing `fn(*inputs)` (with `modules` registered as children)."""

    def __init__(self, fn, *modules: nn.Module):
        super().__init__()
        self.fn = fn
        self.layers = nn.ModuleList(modules)

    def forward(self, *inputs):
        return self.fn(*inputs)


def check(
    model: nn.Module, shapes, n_bits: int = 5, steps: float = 4.0, options=None, integer_inputs: bool = False
):
    """Compile `model` on grid inputs of `shapes` (one per input) and compare with eager torch."""
    inputset = tuple(grid_inputs(shape, n_bits, seed=i) for i, shape in enumerate(shapes))
    inputs = tuple(x[2:6] for x in inputset)
    return assert_matches_torch(
        model, inputs, inputset, n_bits=n_bits, steps=steps, options={**FULL_FHE, **(options or {})}
    )


def check_shapes(fn, shapes, n_bits: int = 5, steps: float = 4.0):
    """Golden-test `fn` on several input shapes at once: one input and one output per shape."""
    model = Lambda(lambda *inputs: tuple(fn(x) for x in inputs))
    return check(model, shapes, n_bits=n_bits, steps=steps)


# ---- univariate operators -------------------------------------------------------------------

UNIVARIATE = {
    "identity": lambda x: nn.Identity()(x) * 1.0,
    "clip": lambda x: torch.clip(x, -0.75, 1.0),
    "clamp_min": lambda x: torch.clamp(x, min=0.25),
    "clamp_max": lambda x: x.clamp(max=-0.5),
    "round": lambda x: torch.round(x * 1.5),
    "floor": lambda x: torch.floor(x * 1.5),
    "minimum_constant": lambda x: torch.minimum(x, torch.tensor(0.5)),
    "maximum_constant": lambda x: torch.maximum(x, torch.tensor(-0.5)),
    "abs": torch.abs,
    "neg": torch.neg,
    "sign": torch.sign,
    "logical_or": lambda x: torch.logical_or(x > 1.0, x < -1.0).float(),
    "logical_not": lambda x: torch.logical_not(x > 0).float(),
    "gt": lambda x: (x > 0.25).float(),
    "ge": lambda x: (x >= 0.25).float(),
    "lt": lambda x: (x < 0.25).float(),
    "le": lambda x: (x <= 0.25).float(),
    "eq": lambda x: (x == 0.5).float(),
    "where": lambda x: torch.where(x > 0, x, 0.5 * x),
    "exp": torch.exp,
    "log": lambda x: torch.log(x.abs() + 0.5),
    "pow": lambda x: torch.pow(x, 2),
    "pow_cube": lambda x: x**3,
    "mul": lambda x: x * -1.5,
    "div": lambda x: x / 3,
    "rdiv": lambda x: 1 / (x.abs() + 1),
    "erf": torch.erf,
    "add_then_relu": lambda x: F.relu(x + 0.5) - 1,
    "to_dtype": lambda x: (x * 2).to(torch.int32).to(torch.float32),
}


@pytest.mark.parametrize("name", sorted(UNIVARIATE))
def test_univariate_operator(name):
    check_shapes(UNIVARIATE[name], SHAPES)


# ---- reductions and padding -------------------------------------------------------------------

REDUCTIONS = {
    "sum": lambda x: torch.sum(x, dim=-1),
    "sum_keepdim": lambda x: x.sum(dim=1, keepdim=True),
    "mean": lambda x: x.mean(dim=-1),
    "amax": lambda x: torch.amax(x, dim=-1),
    "amin_keepdim": lambda x: torch.amin(x, dim=-1, keepdim=True),
    "max_dim": lambda x: torch.max(x, dim=-1).values,
    "min_dim": lambda x: torch.min(-x, dim=1)[0],
    "pad": lambda x: F.pad(x, (1, 2)),
    "pad_value": lambda x: F.pad(x, (2, 0), value=0.3),
    "pad_crop": lambda x: F.pad(x, (-1, 1), value=-1.0),
}


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_reduction_and_pad(name):
    check_shapes(REDUCTIONS[name], [(4,), (2, 3)], n_bits=3)


def test_pad_two_dims_before_conv():
    conv = nn.Conv2d(1, 2, 3)
    check(Lambda(lambda x: conv(F.pad(x, (1, 1, 2, 0))), conv), [(1, 4, 4)], n_bits=4)


# ---- activations --------------------------------------------------------------------------------

ACTIVATIONS = {
    "CELU": nn.CELU(),
    "ELU": nn.ELU(),
    "GELU": nn.GELU(),
    "Hardshrink": nn.Hardshrink(),
    "Hardsigmoid": nn.Hardsigmoid(),
    "Hardswish": nn.Hardswish(),
    "Hardtanh": nn.Hardtanh(),
    "LeakyReLU": nn.LeakyReLU(0.1),
    "LogSigmoid": nn.LogSigmoid(),
    "Mish": nn.Mish(),
    "PReLU": nn.PReLU(init=0.2),
    "ReLU6": nn.ReLU6(),
    "ReLU": nn.ReLU(),
    "SELU": nn.SELU(),
    "Sigmoid": nn.Sigmoid(),
    "SiLU": nn.SiLU(),
    "Softplus": nn.Softplus(),
    "Softshrink": nn.Softshrink(),
    "Softsign": nn.Softsign(),
    "Tanh": nn.Tanh(),
    "Tanhshrink": nn.Tanhshrink(),
    "Threshold": nn.Threshold(0.25, -1.0),
    "GELU_tanh": nn.GELU(approximate="tanh"),
}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation(name):
    check_shapes(ACTIVATIONS[name], SHAPES)


def test_prelu_per_channel_slope():
    prelu = nn.PReLU(3)
    with torch.no_grad():
        prelu.weight.copy_(torch.tensor([0.1, -0.5, 2.0]))
    check(prelu, [(3, 4)])


# ---- shape operators ----------------------------------------------------------------------------

SHAPE_OPS = {
    "reshape": lambda x: x.reshape(x.shape[0], 4, 3) * 2,
    "view": lambda x: x.view(-1, 6, 2).relu(),
    "flatten": lambda x: torch.flatten(x, 1).relu(),
    "unsqueeze": lambda x: x.unsqueeze(1).relu(),
    "squeeze": lambda x: x[:, :1].squeeze(1).relu(),
    "transpose": lambda x: x.transpose(1, 2).relu(),
    "permute": lambda x: x.permute(0, 2, 1).sigmoid(),
    "cat": lambda x: torch.cat([x, x.relu()], dim=-1),
    "cat_scales": lambda x: torch.cat([x * 2, x.sigmoid()], dim=1),
    "expand": lambda x: x[:, :1].expand(-1, 3, -1).relu(),
    "to_float64": lambda x: x.to(torch.float64).relu(),
    "unfold": lambda x: nn.Unfold(2)(x.reshape(-1, 1, 3, 4)),
    "unfold_padded": lambda x: nn.Unfold(2, padding=1, stride=2)(x.reshape(-1, 2, 2, 3)),
    "slice_select": lambda x: x[:, 1:, ::2].relu() + x[:, 0:1, 0:2],
}


@pytest.mark.parametrize("name", sorted(SHAPE_OPS))
def test_shape_operator(name):
    check(Lambda(SHAPE_OPS[name]), [(3, 4)])


# ---- layers with constant weights ------------------------------------------------------------


def _batch_norm(module):
    with torch.no_grad():
        module.running_mean.uniform_(-1, 1)
        module.running_var.uniform_(0.5, 2)
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.5, 0.5)
    return module.eval()


LAYERS = {
    "Linear": (lambda: nn.Linear(6, 4), (6,)),
    "Linear_3d_input": (lambda: nn.Linear(4, 3), (2, 4)),
    "conv1d": (lambda: nn.Conv1d(2, 3, 3, padding=1), (2, 6)),
    "conv2d": (lambda: nn.Conv2d(2, 3, 3, padding=1, stride=2), (2, 5, 5)),
    "conv2d_groups": (lambda: nn.Conv2d(2, 4, 2, groups=2), (2, 4, 4)),
    "AvgPool2d": (lambda: nn.AvgPool2d(2), (2, 4, 4)),
    "AvgPool2d_padded": (lambda: nn.AvgPool2d(3, stride=1, padding=1), (1, 4, 4)),
    "MaxPool2d": (lambda: nn.MaxPool2d(2), (2, 4, 4)),
    "BatchNorm2d": (lambda: _batch_norm(nn.BatchNorm2d(2)), (2, 3, 3)),
    "BatchNorm3d": (lambda: _batch_norm(nn.BatchNorm3d(2)), (2, 2, 2, 3)),
    "BatchNorm1d": (lambda: _batch_norm(nn.BatchNorm1d(3)), (3,)),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_with_constant_weights(name):
    factory, shape = LAYERS[name]
    check(factory(), [shape], n_bits=5, steps=4.5)


# ---- encrypted with encrypted ---------------------------------------------------------------

BINARY = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "sub_alpha": lambda a, b: torch.sub(a, b, alpha=2),
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / (b.abs() + 1),
    "add_activations": lambda a, b: a.relu() + b.sigmoid(),
    "gt": lambda a, b: (a > b).float(),
    "le": lambda a, b: (a <= b).float(),
    "eq": lambda a, b: (a == b).float(),
    "maximum": torch.maximum,
    "minimum": torch.minimum,
    "where_both": lambda a, b: torch.where(a > b, a, b),
    "where_constant": lambda a, b: torch.where(b > 0, a, 0.5),
    "matmul": lambda a, b: a @ b.transpose(-1, -2),
}


@pytest.mark.parametrize("name", sorted(BINARY))
def test_encrypted_with_encrypted(name):
    check(Lambda(BINARY[name]), [(2, 3), (2, 3)], n_bits=4)


def test_attention_scores_batch_times_heads():
    """q @ k.transpose(-1, -2) with heads: dim 0 becomes batch * heads inside the circuit."""

    def scores(q, k):
        q = q.reshape(q.shape[0], 3, 2, 2).transpose(1, 2)
        k = k.reshape(k.shape[0], 3, 2, 2).transpose(1, 2)
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1)

    check(Lambda(scores), [(3, 4), (3, 4)], n_bits=5, steps=4.5)  # at 4 bits softmax errs 18% of its span


# ---- embedding, norms, layer norm, softmax ----------------------------------------------------


def test_embedding_encrypted_index():
    torch.manual_seed(0)
    embedding = nn.Embedding(10, 4)
    model = Lambda(lambda ids: F.gelu(embedding(ids)), embedding)
    inputset = torch.randint(0, 10, (100, 3))
    inputset[0] = 9
    assert_matches_torch(model, [inputset[1:5]], inputset, n_bits=5, options=FULL_FHE)


NORMALIZATIONS = {
    "vector_norm": (lambda: Lambda(lambda x: torch.linalg.vector_norm(x, dim=-1)), 4),
    "vector_norm_l1_keepdim": (
        lambda: Lambda(lambda x: torch.linalg.vector_norm(x, ord=1, dim=-1, keepdim=True)),
        4,
    ),
    "vector_norm_inf": (lambda: Lambda(lambda x: torch.linalg.vector_norm(x, ord=float("inf"), dim=-1)), 4),
    "LayerNorm": (lambda: nn.LayerNorm(4), 4.5),
    "LayerNorm_no_affine": (lambda: nn.LayerNorm(4, elementwise_affine=False), 4.5),
    "Softmax": (lambda: nn.Softmax(dim=-1), 4),
    "softmax_dim1": (lambda: Lambda(lambda x: torch.softmax(x, dim=1)), 4),
    "LogSoftmax": (lambda: nn.LogSoftmax(dim=-1), 4),
}


@pytest.mark.parametrize("name", sorted(NORMALIZATIONS))
def test_normalization(name):
    factory, steps = NORMALIZATIONS[name]
    check(factory(), [(2, 4)], n_bits=5, steps=steps)


# ---- graph structures ---------------------------------------------------------------------


def test_several_inputs_and_outputs_with_branches_and_residual():
    linear = nn.Linear(4, 4)

    def forward(a, b):
        hidden = linear(a).relu() + a  # residual
        branch = torch.sigmoid(b) * 2 - hidden.mean(dim=-1, keepdim=True)
        return hidden, branch

    compiled = check(Lambda(forward, linear), [(4,), (4,)], n_bits=5, steps=4.5)
    assert len(fhe_backend.partitions(compiled)) == 1


def test_python_loop_unrolled_by_dynamo():
    layers = [nn.Linear(3, 3) for _ in range(3)]

    def forward(x):
        for layer in layers:
            x = torch.tanh(layer(x)) + x
        return x

    check(Lambda(forward, *layers), [(3,)], n_bits=5, steps=4.5)


@pytest.mark.parametrize("name", ["add", "mul"])
def test_clear_input(name):
    model = Lambda(BINARY[name])
    compiled = check(
        model, [(3,), (3,)], n_bits=4, options={"inputs_encryption_status": ["encrypted", "clear"]}
    )
    assert fhe_backend.partitions(compiled)[0].encryption_status == ("encrypted", "clear")


# ---- real keys -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["maximum", "gt", "mul"])
def test_execute_equals_simulate(name, insecure_configuration):
    """Tiny circuits (<= 4-bit lookups) run with real keys and equal simulate."""
    inputset = tuple(grid_inputs((3,), 3, seed=i) for i in range(2))
    compiled = compile_fhe(
        Lambda(BINARY[name]),
        inputset,
        n_bits=3,
        fhe="simulate",
        configuration=insecure_configuration,
        **FULL_FHE,
    )
    inputs = tuple(x[2:5] for x in inputset)
    simulated = compiled(*inputs)
    partition = fhe_backend.partitions(compiled)[0]
    assert partition.statistics["max_tlu_bit_width"] <= 4
    fhe_backend.set_fhe_mode(compiled, "execute")
    executed = compiled(*inputs)
    assert torch.equal(simulated, executed)
    expected = Lambda(BINARY[name])(*inputs)
    assert float((executed - expected).abs().max()) <= quantization_tolerance(expected, 5)  # 5-bit outputs
