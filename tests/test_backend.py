"""The `fhe` backend end to end: registration, options, issue-2 operators, digits, real keys."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points

import numpy as np
import pytest
import torch
from torch import nn

import fhe_backend
from fhe_backend.demo import DigitsCNN, DigitsMLP, accuracy, load_digits_split, train
from tests.harness import as_tuple, assert_matches_torch, compile_fhe, grid_inputs, quantization_tolerance

F = nn.functional


class Lambda(nn.Module):
    """Wraps a function of tensors as a module (parameters given as submodules)."""

    def __init__(self, fn, **modules):
        super().__init__()
        self.fn = fn
        self.parts = nn.ModuleDict(modules)

    def forward(self, *x):
        return self.fn(self.parts, *x)


def _linear(*shape):
    return nn.Linear(*shape)


# (name, module, input shape). Inputs are normal; each op sits after a linear layer where it
# needs an accumulator, so rescaling paths are exercised too.
torch.manual_seed(0)  # the layers below get the same weights whatever was imported before
ISSUE_2_OPERATORS = [
    ("linear", Lambda(lambda p, x: p["l"](x), l=_linear(6, 5)), (6,)),
    ("linear_3d", Lambda(lambda p, x: p["l"](x), l=_linear(6, 5)), (3, 6)),
    ("matmul_constant", Lambda(lambda p, x: x @ p["l"].weight.T, l=_linear(6, 4)), (2, 6)),
    ("conv1d", nn.Conv1d(2, 3, 3, padding=1, stride=2), (2, 9)),
    ("conv2d", nn.Conv2d(2, 4, 3, padding=1), (2, 6, 6)),
    ("conv2d_stride_dilation", nn.Conv2d(2, 2, 3, stride=2, dilation=2, padding=2), (2, 7, 7)),
    ("conv2d_groups", nn.Conv2d(4, 4, 3, groups=2), (4, 5, 5)),
    ("relu", Lambda(lambda p, x: F.relu(p["l"](x)), l=_linear(6, 6)), (6,)),
    ("relu6", Lambda(lambda p, x: F.relu6(3 * p["l"](x)), l=_linear(6, 6)), (6,)),
    ("sigmoid", Lambda(lambda p, x: torch.sigmoid(p["l"](x)), l=_linear(6, 6)), (6,)),
    ("tanh", Lambda(lambda p, x: torch.tanh(p["l"](x)), l=_linear(6, 6)), (6,)),
    ("gelu", Lambda(lambda p, x: F.gelu(p["l"](x)), l=_linear(6, 6)), (6,)),
    ("silu", Lambda(lambda p, x: F.silu(p["l"](x)), l=_linear(6, 6)), (6,)),
    ("leaky_relu", Lambda(lambda p, x: F.leaky_relu(p["l"](x), 0.1), l=_linear(6, 6)), (6,)),
    ("hardtanh", Lambda(lambda p, x: F.hardtanh(2 * p["l"](x)), l=_linear(6, 6)), (6,)),
    ("add_sub_mul_div_constant", Lambda(lambda p, x: (x + 1.5) * 2 - torch.arange(6.0) / 4), (6,)),
    ("residual_add", Lambda(lambda p, x: x + F.relu(p["l"](x)), l=_linear(6, 6)), (6,)),
    ("encrypted_sub", Lambda(lambda p, x: p["a"](x) - p["b"](x), a=_linear(6, 4), b=_linear(6, 4)), (6,)),
    ("sum", Lambda(lambda p, x: p["l"](x).sum(-1, keepdim=True), l=_linear(6, 6)), (6,)),
    ("mean", Lambda(lambda p, x: x.mean(dim=(1, 2))), (3, 4, 4)),
    ("avg_pool2d", nn.AvgPool2d(2), (2, 6, 6)),
    ("max_pool2d", nn.MaxPool2d(2), (2, 6, 6)),
    ("batch_norm", Lambda(lambda p, x: F.relu(p["bn"](x)), bn=nn.BatchNorm2d(3)), (3, 4, 4)),
    (
        "flatten_view_reshape",
        Lambda(lambda p, x: p["l"](x.flatten(1)).view(-1, 2, 2).reshape(-1, 4), l=_linear(12, 4)),
        (3, 4),
    ),
    ("permute_transpose", Lambda(lambda p, x: F.relu(x.permute(0, 2, 1)).transpose(1, 2)), (3, 4)),
    ("unsqueeze_squeeze", Lambda(lambda p, x: torch.sigmoid(x.unsqueeze(1)).squeeze(1)), (5,)),
    ("cat", Lambda(lambda p, x: torch.cat([F.relu(p["l"](x)), x], dim=1), l=_linear(6, 3)), (6,)),
]


def _randomize_batch_norm(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
            layer.weight.data.uniform_(0.5, 1.5)
            layer.bias.data.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("name, module, shape", ISSUE_2_OPERATORS, ids=[o[0] for o in ISSUE_2_OPERATORS])
def test_operator_matches_torch_in_simulate(name, module, shape):
    _randomize_batch_norm(module)
    inputset = torch.randn(200, *shape)
    assert_matches_torch(module, [torch.randn(7, *shape)], inputset, n_bits=7, steps=12)


# ---- registration ---------------------------------------------------------------------------


def test_backend_registered_on_import_and_by_entry_point():
    assert "fhe" in torch._dynamo.list_backends(exclude_tags=())
    names = {ep.name: ep.value for ep in entry_points(group="torch_dynamo_backends")}
    assert names.get("fhe") == "fhe_backend.backend:fhe_backend"


def test_entry_point_works_without_importing_the_package():
    code = (
        "import torch, sys\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())\n"
        "c = torch.compile(m, backend='fhe', options={'inputset': torch.randn(50, 4), 'n_bits': 4})\n"
        "c(torch.randn(2, 4))\n"
        "assert 'fhe_backend' in sys.modules\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


# ---- options --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, words",
    [
        ({"bits": 4}, ["bits", "allowed options"]),
        ({"n_bits": "eight"}, ["n_bits", "eight"]),
        ({"n_bits": {"op_inputs": 4}}, ["n_bits", "op_weights"]),
        ({"n_bits": {"op_inputs": 4, "op_weights": 4, "outputs": 3}}, ["n_bits", "outputs"]),
        ({"rounding_threshold_bits": {"n_bits": 4, "method": "floor"}}, ["rounding_threshold_bits", "floor"]),
        ({"rounding_threshold_bits": 0}, ["rounding_threshold_bits", "0"]),
        ({"p_error": 0.01, "global_p_error": 0.01}, ["p_error", "global_p_error"]),
        ({"p_error": 2}, ["p_error", "2"]),
        ({"fhe": "fast"}, ["fhe", "fast", "simulate"]),
        ({"configuration": "cpu"}, ["configuration", "Configuration"]),
        ({"inputs_encryption_status": ["clear"]}, ["inputs_encryption_status", "encrypted"]),
        ({"output_extra_weight_bits": 9}, ["output_extra_weight_bits", "0..8"]),
        ({"output_extra_weight_bits": True}, ["output_extra_weight_bits", "True"]),
        ({"pool_sum_bits": -1}, ["pool_sum_bits", "0..8", "average pool"]),
    ],
)
def test_bad_options_raise_value_error_naming_the_option(options, words):
    model = nn.Sequential(nn.Linear(4, 2))
    compiled = torch.compile(model, backend="fhe", options=options)
    with pytest.raises(Exception) as info:
        compiled(torch.randn(3, 4))
    error = info.value
    while not isinstance(error, ValueError) and error.__cause__ is not None:
        error = error.__cause__
    assert isinstance(error, ValueError), repr(info.value)
    for word in words:
        assert word in str(error)


def test_settings_parse_concrete_ml_n_bits_semantics():
    settings = fhe_backend.FheSettings.from_options({"n_bits": 3})
    assert (settings.n_bits.op_inputs, settings.n_bits.op_weights, settings.n_bits.model_outputs) == (3, 3, 5)
    settings = fhe_backend.FheSettings.from_options(
        {
            "n_bits": {"op_inputs": 4, "op_weights": 3},
            "rounding_threshold_bits": {"n_bits": 5, "method": "approximate"},
        }
    )
    assert settings.n_bits.model_inputs == 5 and settings.rounding_threshold_bits.method == "approximate"


# ---- run modes, batch sizes, inspection -----------------------------------------------------


@pytest.fixture(scope="module")
def small_compiled():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="fhe", options={"inputset": torch.randn(300, 5), "n_bits": 6})
    with torch.no_grad():
        compiled(torch.randn(4, 5))
    return model, compiled, fhe_backend.partitions(compiled)  # kept alive across dynamo resets


def test_any_batch_size_runs(small_compiled):
    model, compiled, (partition,) = small_compiled
    for batch in (1, 3, 17):
        x = torch.randn(batch, 5)
        with torch.no_grad():
            assert compiled(x).shape == model(x).shape


def test_partitions_expose_mode_circuit_and_statistics(small_compiled):
    model, compiled, (partition,) = small_compiled
    stats = partition.statistics
    for key in ("pbs_count", "max_bit_width", "max_tlu_bit_width", "complexity", "input_shape"):
        assert key in stats
    assert stats["pbs_count"] == 8  # one lookup per ReLU, none on input or output
    assert stats["input_shape"] == [(1, 5)]
    assert partition.circuit is not None and partition.mode == "simulate"


def test_modes_switch_without_recompiling(small_compiled):
    model, compiled, (partition,) = small_compiled
    x = torch.randn(6, 5)
    circuit = partition.circuit
    with torch.no_grad():
        simulated = compiled(x)
        fhe_backend.set_fhe_mode(compiled, "disable")
        disabled = compiled(x)
        fhe_backend.set_fhe_mode(compiled, "torch")
        float_result = compiled(x)
        fhe_backend.set_fhe_mode(compiled, "simulate")
        assert torch.allclose(float_result, model(x), atol=1e-6)
    assert torch.equal(simulated, disabled)  # default p_error: simulate equals the clear program
    assert partition.circuit is circuit
    with pytest.raises(ValueError, match="allowed modes"):
        partition.mode = "gpu"


def test_calibrates_on_first_call_without_inputset_and_warns():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid()).eval()
    compiled = torch.compile(model, backend="fhe", options={"n_bits": 6})
    x = torch.randn(150, 4)
    with pytest.warns(UserWarning, match="representative inputset"):
        with torch.no_grad():
            result = compiled(x)
    assert (result - model(x)).abs().max() < 0.05


def test_tiny_circuit_execute_equals_simulate(insecure_configuration, tmp_path):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    compiled = compile_fhe(
        model,
        torch.randn(100, 3),
        n_bits=3,
        rounding_threshold_bits=4,
        configuration=insecure_configuration,
        key_cache_dir=str(tmp_path),
    )
    x = torch.randn(3, 3)
    with torch.no_grad():
        simulated = compiled(x)
        (partition,) = fhe_backend.partitions(compiled)
        assert partition.statistics["max_tlu_bit_width"] <= 4
        fhe_backend.set_fhe_mode(compiled, "execute")
        executed = compiled(x)
    assert torch.equal(executed, simulated)
    assert any(tmp_path.iterdir()), "keys were not written to key_cache_dir"


# ---- digits ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


@pytest.mark.parametrize("factory", [DigitsMLP, DigitsCNN], ids=["mlp", "cnn"])
def test_digits_simulate_accuracy_within_two_points_of_float(digits, factory):
    x_train, x_test, y_train, y_test = digits
    model = train(factory(), x_train, y_train, epochs=25)
    compiled = compile_fhe(model, x_train, n_bits=6, rounding_threshold_bits=6)
    float_accuracy = accuracy(model, x_test, y_test)
    simulate_accuracy = accuracy(compiled, x_test, y_test)
    assert float_accuracy > 0.85
    assert simulate_accuracy >= float_accuracy - 0.02, (float_accuracy, simulate_accuracy)
    (partition,) = fhe_backend.partitions(compiled)
    assert partition.statistics["max_tlu_bit_width"] <= 7


def test_multiple_outputs_keep_their_structure():
    model = Lambda(lambda p, x: (F.relu(p["l"](x)), torch.sigmoid(x)), l=_linear(4, 3))
    inputset = grid_inputs((4,), 5, samples=200)  # lossless input quantization: 4.5 steps suffice
    # the unrounded 11-bit accumulator has crypto parameters at a per-lookup budget; within the
    # default global_p_error=1e-5 Concrete finds none and the partition falls back to rounding
    options = {"p_error": 1e-5}
    compiled = assert_matches_torch(model, [inputset[2:7]], inputset, n_bits=5, steps=4.5, options=options)
    with torch.no_grad():
        assert len(as_tuple(compiled(torch.randn(2, 4)))) == 2


def test_quantized_program_is_integer_and_deterministic(small_compiled):
    _, compiled, (partition,) = small_compiled
    q = partition.program.quantize_inputs(torch.randn(4, 5))
    out = partition.run_integers(q, "disable")
    assert all(np.issubdtype(np.asarray(o).dtype, np.integer) for o in out)
    assert all(np.array_equal(a, b) for a, b in zip(out, partition.run_integers(q, "disable")))


def test_whole_gpt2_block_with_causal_attention_runs_in_fhe():
    """A GPT-2 block (LayerNorm, causal SDPA attention, MLP) marked by name: the scores, the
    masked softmax and both attention matmuls run in FHE; logits match eager torch."""
    from fhe_backend.benchmarks.models import tiny_gpt2, token_batches

    model, tokens = tiny_gpt2(), token_batches()
    compiled = torch.compile(
        model,
        backend="fhe",
        options={
            "module_names": ["transformer.h.0"],
            "inputset": tokens,
            "n_bits": 8,
            "fhe": "disable",
            "rounding_threshold_bits": {"n_bits": 8, "method": "approximate"},
        },
    )
    with torch.no_grad():
        expected, actual = model(tokens[:4]).logits, compiled(tokens[:4]).logits
    assert float((actual - expected).abs().max()) <= quantization_tolerance(expected, 8, steps=8)
    assert bool((actual.argmax(-1) == expected.argmax(-1)).all())
    in_fhe = {
        str(node.target)
        for partition in fhe_backend.partitions(compiled)
        for node in partition.graph_module.graph.nodes
    }
    assert {"aten.bmm.default", "aten.exp.default", "aten.amax.default"} <= in_fhe
