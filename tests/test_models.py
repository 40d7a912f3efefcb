"""Real-world model families end to end: attention, transformer encoders (both torch paths),
a tiny BERT, a GRU classifier; and the batch rules that decide where each value keeps the batch.

Numbers are checked in simulate against eager torch, with tolerances derived from the
quantization step (`quantization_tolerance`); the attention models (MultiheadAttention, encoder
layers, BERT) need `rounding_threshold_bits` to fit Concrete's parameter search.
"""

from __future__ import annotations

import inspect
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch._decomp import core_aten_decompositions
from torch.fx.experimental.proxy_tensor import make_fx

import fhe_backend
from fhe_backend.backend import compiled_graphs
from fhe_backend.lowering.batch import BATCH_MAJOR, BatchAt, MixesSamples
from fhe_backend.partition import batch_layouts
from tests.harness import compile_fhe, quantization_tolerance
from tests.test_explain import Branchy  # a data-dependent branch: a graph break at its `if`

aten = torch.ops.aten


def aten_graph(fn, *inputs):
    """Core ATen graph of `fn` on `inputs` (tensors it closes over become constants)."""
    return make_fx(fn, decomposition_table=core_aten_decompositions())(*inputs)


def layouts_by_target(fn, *inputs):
    graph_module = aten_graph(fn, *inputs)
    layouts = batch_layouts(graph_module)
    return graph_module, {
        node: layouts[node] for node in graph_module.graph.nodes if node.op == "call_function"
    }


# ---- batch rules -------------------------------------------------------------------------


def test_reshape_rule_follows_the_batch_through_merged_and_split_dims():
    def fn(x):  # x: (batch 4, seq 3, 8)
        seq_major = x.permute(1, 0, 2)  # (3, 4, 8): batch at dim 1
        rows = seq_major.reshape(12, 8)  # (3 * 4, 8): batch after 3 positions of dim 0
        heads = rows.reshape(3, 8, 4)  # (3, 4 * 2, 4): batch at dim 1, heads inside it
        back = heads.reshape(3, 4, 8).permute(1, 0, 2)  # batch-major again
        return back * 2

    _, layouts = layouts_by_target(fn, torch.randn(4, 3, 8))
    found = [layout for layout in layouts.values()]
    assert BatchAt(1, 1) in found and BatchAt(0, 3) in found
    assert all(isinstance(layout, BatchAt) for layout in found)
    assert found[-1] == BATCH_MAJOR


def test_a_view_that_splits_the_batch_across_dims_mixes_samples():
    _, layouts = layouts_by_target(lambda x: x.reshape(2, 8) + 1, torch.randn(4, 4))
    view = next(layout for layout in layouts.values())
    assert isinstance(view, MixesSamples) and "splits the batch" in view.why


def test_ops_without_a_lowering_mix_samples_only_when_they_touch_the_batch_dim():
    def fn(x):
        return torch.median(x, 0).values, torch.cumsum(x, 1), torch.cumsum(x, 0)

    graph_module, layouts = layouts_by_target(fn, torch.randn(5, 3))
    by_name = {node.target: layout for node, layout in layouts.items()}
    assert isinstance(by_name[aten.median.dim], MixesSamples)
    cumsums = [layout for node, layout in layouts.items() if node.target == aten.cumsum.default]
    assert cumsums[0] == BATCH_MAJOR  # along dim 1: per sample
    assert isinstance(cumsums[1], MixesSamples)  # along dim 0: across samples


def test_a_batch_rule_declared_with_a_lowering_decides(monkeypatch):
    from fhe_backend.lowering.registry import LOWERINGS, Lowering

    declared = MixesSamples("follows the rule declared with its lowering")
    monkeypatch.setitem(
        LOWERINGS,
        aten.cumsum.default,
        Lowering(fn=lambda ctx, x, dim: x, batch=lambda node, layouts: declared),
    )
    _, layouts = layouts_by_target(lambda x: torch.cumsum(x, 1) * 2, torch.randn(5, 3))
    assert list(layouts.values())[0] is declared


def test_extreme_samples_follow_the_batch_inside_attention_views():
    """Concrete measures bounds on the samples holding each lookup's extremes (runtime's
    _bounding_samples): in a (seq, batch * heads, d) view the sample is found on dim 1, not
    taken from the sequence position on dim 0."""
    from fhe_backend.quantization.program import IntegerProgram

    program = IntegerProgram.__new__(IntegerProgram)
    values = np.zeros((3, 4 * 2, 5), dtype=np.int64)  # seq 3, batch 4 x heads 2, head_dim 5
    values[0, 2 * 2 + 1, 3] = 9  # maximum: sample 2 (head 1), at sequence position 0
    values[2, 1 * 2, 0] = -9  # minimum: sample 1 (head 0), at sequence position 2
    program.extreme_positions = set()
    assert program.record_extremes(values, BatchAt(1, 1)) == (-9, 9)
    assert {int(position * 4) for position in program.extreme_positions} == {1, 2}
    program.extreme_positions = set()
    program.record_extremes(values.transpose(1, 0, 2))  # batch-major: dim 0 by default
    assert {int(position * 4) for position in program.extreme_positions} == {1, 2}


class Attention(nn.Module):
    """nn.MultiheadAttention used as self-attention on batch-first inputs."""

    def __init__(self, embed: int = 8, heads: int = 2):
        super().__init__()
        self.attention = nn.MultiheadAttention(embed, heads, batch_first=True)

    def forward(self, x):
        return self.attention(x, x, x, need_weights=False)[0]


def test_multihead_attention_views_keep_the_batch_apart():
    """MHA's (seq, batch * heads, head_dim) views hold the batch at dim 1, not mixed."""
    torch.manual_seed(0)
    model = Attention(16, 2).eval()
    graph_module, layouts = layouts_by_target(model, torch.randn(4, 6, 16))
    assert not [n for n, layout in layouts.items() if isinstance(layout, MixesSamples)]
    seq_batch_heads = [
        n
        for n, layout in layouts.items()
        if layout == BatchAt(1, 1) and tuple(n.meta["val"].shape) == (6, 8, 8)
    ]
    assert seq_batch_heads, "no (seq, batch * heads, head_dim) view found"


# ---- attention and transformer encoders in FHE -------------------------------------------


ATTENTION_OPTIONS = dict(n_bits=6, rounding_threshold_bits=7)


def _run(model, inputset, inputs, **options):
    compiled = compile_fhe(model, inputset, fhe="simulate", **options)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = compiled(inputs)
        expected = model(inputs)
    fallbacks = [str(w.message) for w in caught if "instead of FHE" in str(w.message)]
    return compiled, actual, expected, fallbacks


def _assert_close(actual, expected, n_bits, steps=4.0):
    tolerance = quantization_tolerance(expected, n_bits, steps)
    error = float((actual - expected).abs().max())
    assert error <= tolerance, f"max error {error:.4g} > tolerance {tolerance:.4g}"


def _fhe_targets(compiled):
    return {
        str(node.target)
        for partition in fhe_backend.partitions(compiled)
        for node in partition.graph_module.graph.nodes
    }


def test_multihead_attention_runs_in_fhe():
    torch.manual_seed(0)
    model = Attention(8, 2).eval()
    inputset = torch.randn(100, 4, 8)
    compiled, actual, expected, fallbacks = _run(model, inputset, inputset[:6], **ATTENTION_OPTIONS)
    assert not fallbacks, fallbacks
    assert len(fhe_backend.partitions(compiled)) == 1
    in_fhe = _fhe_targets(compiled)
    assert "aten.bmm.default" in in_fhe and any("softmax" in t for t in in_fhe)
    _assert_close(actual, expected, ATTENTION_OPTIONS["n_bits"], steps=6)


# Whole encoder layers and BERT compile with the attention's options: the encrypted products
# (attention scores, softmax normalization, LayerNorm's rsqrt) keep narrow operands (at most 9
# bits at n_bits=6: the softmax's exponents also feed their sum), so Concrete's multiplication
# lookups stay at most 10 bits wide (test_products_keep_narrow_operands)
ENCODER_OPTIONS = ATTENTION_OPTIONS


def _mul_operand_widths(circuit) -> list:
    """Bit-widths of the operands of the circuit's encrypted multiplications (MLIR mul_eint /
    matmul_eint_eint): Concrete computes each product with lookups one bit wider."""
    return [
        int(width)
        for line in circuit.mlir.splitlines()
        if 'mul_eint"' in line or "matmul_eint_eint" in line
        for width in re.findall(r"E?s?int<(\d+)>", line.split(") -> ")[0])
    ]


class MixedSignProduct(nn.Module):
    """LayerNorm: its centered values (signed) times the inverse deviation (non-negative)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(x * 3)


def test_products_keep_narrow_operands():
    """The correction term of a signed x non-negative product is a lookup, not a leveled
    multiplication that would give the product's operands the product's bit-width (LayerNorm's
    multiplication took 12-bit operands and Concrete found no parameters for whole encoder
    layers); the result equals the integer program exactly."""
    torch.manual_seed(0)
    model = MixedSignProduct().eval()
    inputset = torch.randn(100, 4, 8)
    compiled = compile_fhe(model, inputset, n_bits=5, p_error=2.0**-40)
    with torch.no_grad():
        simulated = compiled(inputset[:8])
        with fhe_backend.fhe_mode("disable"):
            disabled = compiled(inputset[:8])
    assert torch.equal(simulated, disabled)
    (partition,) = fhe_backend.partitions(compiled)
    widths = _mul_operand_widths(partition.circuit)
    assert widths and max(widths) <= 5 + 2, widths  # n_bits + 1 (sign shift) + 1 (Concrete)


class AttentionHead(nn.Module):
    """One attention head: softmax(q k^T / sqrt(d)) @ v, the probabilities (non-negative)
    times the values (signed), both encrypted."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v


def test_probabilities_times_signed_values_simulate_like_the_integer_program():
    """Concrete 2.11 miscomputes an encrypted matmul of a non-negative and a signed operand, as
    it does their element-wise product: an attention head's softmax @ v simulated up to 0.76
    off the integer program (random attention graphs, seed 82, whose weights and inputs this
    draws). The matmul now takes the same shift as the product
    (`lowering.elementwise.signed_product`): simulate equals disable."""
    torch.manual_seed(82)
    model = AttentionHead().eval()
    nn.Linear(4, 4)  # the random graph's output layer: drawn, so that the inputs are its own
    inputset = torch.randn(80, 4, 4)
    compiled = compile_fhe(model, inputset, n_bits=7, p_error=2.0**-40, fhe="simulate")
    with torch.no_grad():
        simulated = compiled(inputset[:5])
        with fhe_backend.fhe_mode("disable"):
            disabled = compiled(inputset[:5])
    assert torch.equal(simulated, disabled), float((simulated - disabled).abs().max())


@pytest.fixture(scope="module", params=[True, False], ids=["fused", "slow"])
def encoder_layer(request):
    """nn.TransformerEncoderLayer(16, 2, 32, batch_first=True) compiled in simulate on one
    torch path (fused eval fast path, or the slow path), with its eager outputs."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(request.param)
    try:
        torch.manual_seed(0)
        model = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
        inputset = torch.randn(100, 6, 16)
        yield _run(model, inputset, inputset[:6], **ENCODER_OPTIONS)
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def test_transformer_encoder_layer_runs_in_fhe(encoder_layer):
    """In eval/no_grad the fused `_transformer_encoder_layer_fwd` (decomposed before
    partitioning) and the slow path both become ONE FHE partition with nothing left in torch,
    whose circuit matches eager torch in simulate."""
    compiled, actual, expected, fallbacks = encoder_layer
    assert not fallbacks, fallbacks
    assert len(fhe_backend.partitions(compiled)) == 1
    in_fhe = _fhe_targets(compiled)
    assert "aten._transformer_encoder_layer_fwd.default" not in in_fhe
    assert {"aten.native_layer_norm.default", "aten.bmm.default", "aten.relu.default"} <= in_fhe
    assert any("softmax" in target for target in in_fhe)
    (partition,) = fhe_backend.partitions(compiled)
    assert partition.circuit is not None and max(_mul_operand_widths(partition.circuit)) <= 9
    _assert_close(actual, expected, ENCODER_OPTIONS["n_bits"], steps=6)


def tiny_bert():
    """A randomly initialised 1-layer BERT encoder (hidden 16, 2 heads, vocabulary 30)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    return BertModel(config).eval()


class BertEncoder(nn.Module):
    """The BERT model's last hidden state (default forward: token_type_ids from its buffer)."""

    def __init__(self):
        super().__init__()
        self.bert = tiny_bert()

    def forward(self, ids):
        return self.bert(ids).last_hidden_state


def test_tiny_bert_runs_in_fhe():
    """The token_type_ids buffer expanded to the calibration batch is folded to one row (no
    constant of the traced batch size), so the whole encoder (embeddings, attention, three
    LayerNorms, GELU MLP) is one partition, simulated within tolerance of eager torch."""
    model = BertEncoder().eval()
    tokens = torch.randint(0, 30, (100, 6), generator=torch.Generator().manual_seed(0))
    compiled, actual, expected, fallbacks = _run(model, tokens, tokens[:4], **ENCODER_OPTIONS)
    assert not fallbacks, fallbacks
    assert len(fhe_backend.partitions(compiled)) == 1
    assert {"aten.embedding.default", "aten.bmm.default", "aten.gelu.default"} <= _fhe_targets(compiled)
    _assert_close(actual, expected, ENCODER_OPTIONS["n_bits"], steps=6)


class GRUClassifier(nn.Module):
    """GRU over a sequence, then a linear head on the last step."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def test_gru_classifier_runs_its_head_in_fhe_and_warns_that_the_rnn_is_in_the_clear():
    torch.manual_seed(0)
    model = GRUClassifier().eval()
    inputset = torch.randn(120, 5, 4)
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = compile_fhe(model, inputset, n_bits=6, fhe="simulate")
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            actual, expected = compiled(inputset[:8]), model(inputset[:8])
    messages = [str(w.message) for w in caught if "instead of FHE" in str(w.message)]
    assert len(messages) == 1, messages  # one warning for the whole recurrent layer
    assert "recurrent layer 'rnn'" in messages[0] and "in the clear" in messages[0]
    (partition,) = fhe_backend.partitions(compiled)
    assert "aten.addmm.default" in {str(n.target) for n in partition.graph_module.graph.nodes}
    _assert_close(actual, expected, 6)


# ---- graph breaks ------------------------------------------------------------------------


class ItemAndPrint(nn.Module):
    """`.item()` and a print between two layers: two graph breaks; the second layer's input has
    the first one's shape, so calibrating it on the inputset would go unnoticed."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.a(x)) * 3
        peak = h.max().item()
        print("peak activation", peak)
        return self.b(h)


BREAK_INPUTSET = torch.randn(120, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=[Branchy, ItemAndPrint], ids=["branch", "item-print"])
def model_with_breaks(request):
    """The model compiled with an inputset, its first call in simulate and eager torch."""
    torch.manual_seed(0)
    model = request.param().eval()
    compiled = compile_fhe(model, BREAK_INPUTSET, n_bits=6, fhe="simulate")
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = compiled(BREAK_INPUTSET[:8])
    with torch.no_grad():
        expected = model(BREAK_INPUTSET[:8])
    calibration_warnings = [str(w.message) for w in caught if "calibrat" in str(w.message)]
    assert not calibration_warnings, calibration_warnings  # no fallback to the call's inputs
    return model, compiled, actual, expected


def test_each_graph_after_a_break_is_calibrated_on_the_values_that_reach_it(model_with_breaks):
    """The graph after the break takes `h` (the first layer's ReLU output): it is calibrated
    on h over the inputset (by running the compiled model on it), not on the inputset itself,
    and the whole model matches eager torch in simulate."""
    model, compiled, actual, expected = model_with_breaks
    graphs = [g for g in compiled_graphs(compiled) if g.partitions]
    assert len(graphs) >= 2, "no graph break"
    with torch.no_grad():
        h = torch.relu(model.a(BREAK_INPUTSET)) * (3 if isinstance(model, ItemAndPrint) else 1)
    (after,) = graphs[-1].partitions
    after = after.primary or after
    (input_node,) = after.program.tensor_inputs
    stats = after.stats[input_node.name]
    assert stats.low == pytest.approx(float(h.min()), abs=1e-5)
    assert stats.high == pytest.approx(float(h.max()), rel=1e-5)
    _assert_close(actual, expected, 6)


def test_explain_reports_the_graph_breaks_with_their_line(model_with_breaks):
    model = model_with_breaks[0]
    report = fhe_backend.explain(model, BREAK_INPUTSET, n_bits=4)
    assert report.graph_breaks and report.graph_count >= 2
    source = inspect.getsourcefile(type(model))
    assert all(b.source.startswith(f"{source}:") for b in report.graph_breaks), report.graph_breaks


class ShiftedBranch(nn.Module):
    """A branch the inputset never takes (inputs far above zero take the second one)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h) if x.mean() < 5 else self.c(h)


def test_a_graph_the_inputset_never_reaches_warns_and_calibrates_on_its_first_call():
    torch.manual_seed(0)
    inputset = torch.randn(100, 4)
    compiled = compile_fhe(ShiftedBranch().eval(), inputset, n_bits=4, fhe="disable")
    with torch.no_grad():
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*calibrat")
            compiled(inputset[:4])  # the inputset's branch: calibrated by the replay
        with pytest.warns(UserWarning, match="the inputset never reached this graph"):
            compiled(inputset[:4] + 10)
