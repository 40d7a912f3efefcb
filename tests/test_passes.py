"""Graph passes, each on a small ATen graph: the expected nodes, and eager equality."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
import torch.fx as fx
from torch._decomp import core_aten_decompositions
from torch.fx.experimental.proxy_tensor import make_fx

import fhe_backend
from fhe_backend.errors import PassError
from fhe_backend.lowering.quant import FAKE_QUANT, fake_quant_spec
from fhe_backend.passes import (
    DEFAULT_PASSES,
    PassManager,
    decompose_fused,
    detect_fake_quant,
    fold_constants,
    free_batch_views,
    masked_assign,
    masked_softmax,
    remove_identities,
    sizes_from_inputs,
)
from tests.harness import assert_matches_torch, compile_fhe

aten = torch.ops.aten


def aten_graph(fn, *inputs) -> fx.GraphModule:
    """Core ATen graph of `fn` (tensors it closes over become get_attr constants)."""
    return make_fx(fn, decomposition_table=core_aten_decompositions())(*inputs)


def targets(graph_module: fx.GraphModule):
    return [n.target for n in graph_module.graph.nodes if n.op == "call_function"]


def test_default_passes_order():
    assert list(DEFAULT_PASSES) == [
        decompose_fused,
        remove_identities,
        masked_assign,
        fold_constants,
        masked_softmax,
        detect_fake_quant,
        free_batch_views,
        sizes_from_inputs,
    ]


class _StepByAssignment(torch.nn.Module):
    """Concrete ML's step activation: a masked assignment (`index_put`)."""

    def forward(self, x):
        y = torch.zeros_like(x)
        y[torch.gt(x - 0.5, 0.0)] = 1.0
        return torch.relu(y * 2.0)


class _StepBySelect(torch.nn.Module):
    def forward(self, x):
        return torch.relu(torch.where(x - 0.5 > 0.0, 1.0, 0.0) * 2.0)


def test_masked_assignment_runs_as_a_select():
    """`y[mask] = value` compiles (index_put had no lowering) to the same program as the
    `torch.where` it means; an index_put of other shapes is left alone."""
    from fhe_backend.compile import compile_torch_model

    graph = masked_assign(aten_graph(_StepByAssignment(), torch.randn(4, 5)))
    assert aten.where.self in targets(graph) and aten.index_put.default not in targets(graph)
    rows = aten_graph(lambda x, i: x.index_put([i], torch.ones(5)), torch.randn(4, 5), torch.tensor([0, 2]))
    assert aten.index_put.default in targets(masked_assign(rows))

    inputset = torch.empty(200, 5).uniform_(-10, 10)
    by_assignment = compile_torch_model(_StepByAssignment(), inputset, n_bits=5)
    by_select = compile_torch_model(_StepBySelect(), inputset, n_bits=5)
    x_test = torch.empty(30, 5).uniform_(-10, 10).numpy()
    np.testing.assert_array_equal(by_assignment.forward(x_test, fhe="simulate"), by_select.forward(x_test))
    assert by_assignment.statistics["pbs_count"] == by_select.statistics["pbs_count"]


def test_remove_identities_drops_copies_keeps_layout_clones():
    def fn(x):
        y = x.detach().clone().to(torch.float32) * 2
        z = x[:, :1].expand(4, 3).clone()  # makes a non-contiguous tensor contiguous
        return y + z.view(12).view(4, 3)

    x = torch.randn(4, 3)
    graph_module = aten_graph(fn, x)
    assert aten.clone.default in targets(graph_module)
    result = remove_identities(graph_module)
    result.recompile()
    remaining = targets(result)
    assert aten.detach.default not in remaining and aten._to_copy.default not in remaining
    assert remaining.count(aten.clone.default) == 1  # only the clone of the expand stays
    torch.testing.assert_close(result(x), fn(x))


def test_fold_constants_folds_weight_transposes():
    weight, bias = torch.randn(3, 5), torch.randn(3)
    fn = lambda x: torch.nn.functional.linear(x, weight, bias)  # noqa: E731
    x = torch.randn(2, 5)
    graph_module = aten_graph(fn, x)
    assert aten.permute.default in targets(graph_module)
    result = fold_constants(graph_module)
    result.recompile()
    assert targets(result) == [aten.addmm.default]
    torch.testing.assert_close(result(x), fn(x))


def _hand_written(x):
    return (torch.clamp(torch.round(x / 0.25 + 2), 0, 7) - 2) * 0.25


def _zero_point_after_round(x):
    return (torch.clamp(torch.round(x * 4.0) + 3, 0, 15) - 3) / 4.0


def _torch_ao(x):
    return torch.fake_quantize_per_tensor_affine(x, 0.1, 3, 0, 15)


@pytest.mark.parametrize(
    "fn, spec",
    [
        (_hand_written, (0.25, 2.0, 0, 7)),
        (_zero_point_after_round, (0.25, 3.0, 0, 15)),
        (_torch_ao, (0.1, 3.0, 0, 15)),
    ],
)
def test_detect_fake_quant_patterns(fn, spec):
    x = torch.randn(6, 4) * 2
    graph_module = fold_constants(aten_graph(lambda v: torch.relu(fn(v)), x))
    result = detect_fake_quant(graph_module)
    result.recompile()
    assert targets(result) == [FAKE_QUANT, aten.relu.default]
    found = fake_quant_spec(next(n for n in result.graph.nodes if n.target == FAKE_QUANT))
    assert (found.scale, found.zero_point, found.qmin, found.qmax) == pytest.approx(spec)
    torch.testing.assert_close(result(x), torch.relu(fn(x)))


def test_detect_fake_quant_leaves_other_rounding_alone():
    def fn(x):
        q = torch.round(x / 0.5)
        return torch.clamp(q, -2, 2) * 0.5 + q  # the integers are used twice: not a quantizer

    x = torch.randn(5, 3)
    result = detect_fake_quant(fold_constants(aten_graph(fn, x)))
    assert FAKE_QUANT not in targets(result)


def test_pass_manager_names_the_failing_pass():
    def broken(graph_module, settings):
        raise RuntimeError("boom")

    graph_module = aten_graph(lambda x: x + 1, torch.randn(2))
    with pytest.raises(PassError, match="'broken' failed: RuntimeError: boom"):
        PassManager([remove_identities, broken])(graph_module, None)


class GenericQat(torch.nn.Module):
    """A plain torch QAT model: 3-bit fake-quantizers of its own (Concrete ML's import_qat)."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 8)
        self.fc2 = torch.nn.Linear(8, 3)

    @staticmethod
    def quantize(x, scale):
        return (torch.clamp(torch.round(x / scale + 4), 0, 7) - 4) * scale

    def forward(self, x):
        x = self.quantize(x, 0.5)
        x = self.quantize(torch.relu(self.fc1(x)), 0.25)
        return self.fc2(x)


def test_generic_qat_model_uses_its_own_quantizers():
    torch.manual_seed(0)
    model = GenericQat().eval()
    x = torch.randn(150, 6)
    compiled = compile_fhe(model, x, n_bits=8, fhe="simulate")
    with torch.no_grad():
        actual, expected = compiled(x[:30]), model(x[:30])
    (partition,) = fhe_backend.partitions(compiled)
    graph_targets = targets(partition.graph_module)
    assert graph_targets.count(FAKE_QUANT) == 2
    assert aten.round.default not in graph_targets
    quantizer = partition.program.input_quantizers[0]
    assert (quantizer.scale, quantizer.zero_point, quantizer.n_bits) == (0.5, 4.0, 3)
    # one lookup per hidden neuron (the input needs none); weights re-quantized at 8 bits
    assert partition.statistics["pbs_count"] == 8
    # re-quantized weights may flip a hidden value at a rounding boundary: one 0.25 step
    errors = (actual - expected).abs()
    assert float(errors.max()) <= 2 * 0.25 * float(model.fc2.weight.detach().abs().max())
    assert float(errors.median()) <= 0.01 * float(expected.abs().max())


@pytest.fixture(scope="module")
def gpt2_mlp():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(config).eval()
    return model.transformer.h[0].mlp


def test_convert_conv1d_to_linear(gpt2_mlp):
    import copy

    from fhe_backend.conv1d import convert_conv1d_to_linear, is_conv1d

    x = torch.randn(3, 5, 16)
    converted = convert_conv1d_to_linear(copy.deepcopy(gpt2_mlp))
    assert isinstance(converted.c_fc, torch.nn.Linear) and isinstance(converted.c_proj, torch.nn.Linear)
    assert (converted.c_fc.in_features, converted.c_fc.out_features) == (16, 64)
    assert not any(is_conv1d(m) for m in converted.modules())
    with torch.no_grad():
        torch.testing.assert_close(converted(x), gpt2_mlp(x))
        single = convert_conv1d_to_linear(gpt2_mlp.c_fc)
        torch.testing.assert_close(single(x), gpt2_mlp.c_fc(x))


def test_gpt2_conv1d_mlp_compiles_and_matches(gpt2_mlp):
    from tests.harness import assert_matches_torch

    torch.manual_seed(0)
    inputset = torch.randn(120, 8, 16)
    compiled = assert_matches_torch(
        gpt2_mlp, [inputset[:4]], inputset, n_bits=6, steps=4, expect_partitions=1
    )
    graph = fhe_backend.partitions(compiled)[0].graph_module.graph
    assert [str(n.target) for n in graph.nodes].count("aten.addmm.default") == 2


def test_free_batch_views_lets_batch_keeping_reshapes_follow_the_batch():
    x = torch.randn(2, 4, 2, 2)
    kept = aten_graph(lambda t: t.flatten(1) * 2, x)
    merged = aten_graph(lambda t: t.reshape(8, 4) * 2, x)  # merges the batch into dim 0
    for graph_module in (kept, merged):
        free_batch_views(graph_module).recompile()
    assert [list(n.args[1]) for n in kept.graph.nodes if n.target == aten.view.default] == [[-1, 16]]
    assert [list(n.args[1]) for n in merged.graph.nodes if n.target == aten.view.default] == [[8, 4]]
    torch.testing.assert_close(kept(x), x.flatten(1) * 2)
    other = torch.randn(5, 4, 2, 2)
    torch.testing.assert_close(kept(other), other.flatten(1) * 2)
    with pytest.raises(RuntimeError):
        merged(other)  # still only fits the traced batch


class MaskedScores(torch.nn.Module):
    """softmax(x + mask) with a constant causal mask (-inf above the diagonal, dtype-min in one
    fully masked row), as attention computes it."""

    def __init__(self, size: int = 4, safe: bool = False):
        super().__init__()
        mask = torch.full((size, size), float("-inf")).triu(1)
        mask[-1] = torch.finfo(torch.float32).min
        mask[0, 0] = 0.25  # a finite mask value is added to the scores
        self.register_buffer("mask", mask)
        self.softmax = torch.ops.aten._safe_softmax.default if safe else torch.softmax

    def forward(self, x):
        return self.softmax(x + self.mask, -1)


def _softmax_rewritten(fn, x: torch.Tensor) -> fx.GraphModule:
    """`fn` traced as the backend traces it, constants folded, masked softmaxes rewritten: no
    softmax is left."""
    graph_module = make_fx(fn, decomposition_table=fhe_backend.backend.DECOMPOSITIONS)(x)
    graph_module = masked_softmax(fold_constants(graph_module))
    graph_module.recompile()
    assert not {aten._softmax.default, aten._safe_softmax.default} & set(targets(graph_module))
    return graph_module


@pytest.mark.parametrize("safe", [False, True])
def test_masked_softmax_rewrites_infinite_masks_exactly(safe):
    model = MaskedScores(safe=safe)
    x = torch.randn(3, 2, 4, 4)
    graph_module = _softmax_rewritten(model, x)
    expected = torch.softmax(x + model.mask, -1)  # the dtype-min row: 1/4 everywhere
    torch.testing.assert_close(expected[..., -1, :], torch.full((3, 2, 4), 0.25))
    result = graph_module(x)
    assert torch.isfinite(result).all()
    torch.testing.assert_close(result, expected)


def test_masked_softmax_runs_in_fhe():
    torch.manual_seed(0)
    model = MaskedScores()
    inputset = torch.randn(200, 2, 4, 4)
    # simulate, at an error probability low enough that no bootstrap error is drawn in practice
    compiled = assert_matches_torch(
        model,
        [inputset[:16]],
        inputset,
        n_bits=6,
        steps=4,
        mode="simulate",
        options={"global_p_error": 1e-6},
        expect_partitions=1,
    )
    assert fhe_backend.partitions(compiled)[0].statistics["pbs_count"] > 0
    with torch.no_grad():
        simulated = compiled(inputset[:16])
        fhe_backend.set_fhe_mode(compiled, "disable")
        assert torch.equal(simulated, compiled(inputset[:16]))


def test_masked_softmax_of_a_row_of_minus_infinity_gives_zeros():
    mask = torch.zeros(3, 3)
    mask[1] = float("-inf")
    graph_module = _softmax_rewritten(
        lambda x: torch.ops.aten._safe_softmax.default(x + mask, -1), torch.randn(2, 3, 3)
    )
    x = torch.randn(2, 3, 3)
    result = graph_module(x)
    torch.testing.assert_close(result[:, 1], torch.zeros(2, 3))
    torch.testing.assert_close(result[:, [0, 2]], torch.softmax(x[:, [0, 2]], -1))


class FilledScores(torch.nn.Module):
    """nanoGPT's causal attention softmax: `scores.masked_fill(mask, -inf)` (or the `where`
    with the scores first, `keep_first`), the mask made in forward from a constant."""

    def __init__(self, size: int = 4, keep_first: bool = False):
        super().__init__()
        self.size, self.keep_first = size, keep_first

    def forward(self, x):
        masked = torch.triu(torch.ones(self.size, self.size, dtype=torch.bool), 1)
        if self.keep_first:
            x = torch.where(~masked, x, torch.tensor(float("-inf")))
        else:
            x = x.masked_fill(masked, float("-inf"))
        return torch.softmax(x, -1)


@pytest.mark.parametrize("keep_first", [False, True])
def test_masked_fill_softmax_is_rewritten_exactly_and_runs_in_fhe(keep_first):
    model = FilledScores(keep_first=keep_first)
    x = torch.randn(3, 2, 4, 4)
    graph_module = _softmax_rewritten(model, x)
    torch.testing.assert_close(graph_module(x), model(x))
    torch.manual_seed(0)
    inputset = torch.randn(200, 2, 4, 4)
    compiled = assert_matches_torch(
        model, [inputset[:16]], inputset, n_bits=6, steps=4, mode="simulate", expect_partitions=1
    )
    with torch.no_grad():
        simulated = compiled(inputset[:16])
        fhe_backend.set_fhe_mode(compiled, "disable")
        assert torch.equal(simulated, compiled(inputset[:16]))


def test_an_infinite_value_outside_a_softmax_is_refused_naming_the_node():
    """A -inf mask that no softmax consumes (here a log-softmax) has no quantized range: the
    error names the node and says where masks are understood, not "cannot convert NaN"."""

    class LogFilled(torch.nn.Module):
        def forward(self, x):
            masked = torch.triu(torch.ones(3, 3, dtype=torch.bool), 1)
            return torch.log_softmax(x.masked_fill(masked, float("-inf")), -1).exp()

    inputset = torch.randn(60, 3, 3)
    with pytest.raises(fhe_backend.LoweringError, match=r"node '_log_softmax'.*not finite.*masked_fill"):
        compiled = compile_fhe(LogFilled(), inputset, n_bits=6)
        with torch.no_grad():
            compiled(inputset[:2])


def test_fold_constants_keeps_a_batch_broadcast_constant_as_one_row():
    """BERT's token_type_ids buffer expanded to the traced batch and embedded: folded to the
    one row every sample adds, not to a constant of the traced batch size."""
    table = torch.randn(2, 3)
    ids = torch.zeros(1, 5, dtype=torch.long)

    def fn(x):  # x: (batch, 5, 3)
        return x + torch.nn.functional.embedding(ids.expand(x.shape[0], 5), table)

    x = torch.randn(4, 5, 3)
    graph_module = fold_constants(aten_graph(fn, x))
    graph_module.recompile()
    (constant,) = [n for n in graph_module.graph.nodes if n.op == "get_attr"]
    value = getattr(graph_module, constant.target)
    assert tuple(value.shape) == (1, 5, 3)
    for batch in (4, 7):  # the graph no longer bakes the traced batch of 4
        other = torch.randn(batch, 5, 3)
        assert torch.equal(graph_module(other), fn(other))


def test_fold_constants_keeps_whole_constants_that_are_not_broadcasts():
    table = torch.randn(4, 3)  # batch-many different rows: a real constant, folded whole
    graph_module = fold_constants(aten_graph(lambda x: x + table * 2, torch.randn(4, 3)))
    (constant,) = [n for n in graph_module.graph.nodes if n.op == "get_attr"]
    assert tuple(getattr(graph_module, constant.target).shape) == (4, 3)


def _fused_layer_args(layer: torch.nn.TransformerEncoderLayer):
    attention = layer.self_attn
    return (
        attention.embed_dim,
        attention.num_heads,
        attention.in_proj_weight,
        attention.in_proj_bias,
        attention.out_proj.weight,
        attention.out_proj.bias,
        False,
        layer.norm_first,
        layer.norm1.eps,
        layer.norm1.weight,
        layer.norm1.bias,
        layer.norm2.weight,
        layer.norm2.bias,
        layer.linear1.weight,
        layer.linear1.bias,
        layer.linear2.weight,
        layer.linear2.bias,
    )


@pytest.mark.parametrize("norm_first", [False, True])
def test_decompose_fused_transformer_layer_equals_the_fused_kernel(norm_first):
    """aten._transformer_encoder_layer_fwd (the eval fast path of nn.TransformerEncoderLayer)
    becomes ordinary ops (no fused node left) that compute what the kernel computes."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, norm_first=norm_first).eval()
    args = _fused_layer_args(layer)
    fused = lambda x: aten._transformer_encoder_layer_fwd(x, *args)  # noqa: E731
    x = torch.randn(3, 6, 16)
    with torch.no_grad():
        graph_module = make_fx(fused)(x)
        assert aten._transformer_encoder_layer_fwd.default in targets(graph_module)
        graph_module = decompose_fused(graph_module)
        graph_module.recompile()
        assert aten._transformer_encoder_layer_fwd.default not in targets(graph_module)
        assert {aten.native_layer_norm.default, aten._softmax.default, aten.bmm.default} <= set(
            targets(graph_module)
        )
        torch.testing.assert_close(graph_module(x), fused(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(graph_module(x), layer(x), rtol=1e-5, atol=1e-5)


def _pool_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(18, 3),
    ).eval()


def test_sizes_read_from_an_fhe_region_come_from_the_inputs():
    """With symbolic dimensions (`dynamic=True`, or dynamo recompiling `nn.Sequential.forward`
    for a second Sequential), `flatten` reads its sizes from the pool before it. Those reads used
    to cut the FHE region in two (a decryption between two circuits) and change the program;
    they are now computed from the inputs' sizes: one partition, the same results as with
    static shapes."""
    x = torch.randn(120, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    options = {"inputset": x, "fhe": "disable", "n_bits": 6}
    results = {}
    for dynamic in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(_pool_model(), backend="fhe", dynamic=dynamic, options=options)
        with torch.no_grad():
            results[dynamic] = compiled(x[:7])
        (partition,) = fhe_backend.partitions(compiled)
        sizes = [
            n
            for n in partition.graph_module.graph.nodes
            if n.op == "placeholder" and n.name not in partition.stats
        ]
        assert len(sizes) == (2 if dynamic else 0)  # the batch, and the flattened size
    assert torch.equal(results[True], results[False])


def test_a_size_read_that_still_cuts_the_region_warns(monkeypatch):
    """A size `sizes_from_inputs` cannot rebuild (here: as if floor division had no
    counterpart) still cuts the FHE region; the cut is not silent."""
    monkeypatch.setattr(importlib.import_module("fhe_backend.passes.sizes_from_inputs"), "OPERATORS", {})
    x = torch.randn(120, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = torch.compile(
        _pool_model(), backend="fhe", dynamic=True, options={"inputset": x, "fhe": "disable"}
    )
    with (
        pytest.warns(
            UserWarning, match=r"the FHE region is cut after 'avg_pool2d': the size\(s\) 'sym_size_int_"
        ),
        torch.no_grad(),
    ):
        compiled(x[:7])
    assert len(fhe_backend.partitions(compiled)) == 2
