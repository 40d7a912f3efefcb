"""Real-world model families end to end: attention, transformer encoders (both torch paths),
a tiny BERT, a GRU classifier; and the batch rules that decide where each value keeps the batch.

Numbers are checked in simulate against eager torch, with tolerances derived from the
quantization step (`quantization_tolerance`); the attention models need `rounding_threshold_bits`
to fit Concrete's parameter search.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from torch._decomp import core_aten_decompositions
from torch.fx.experimental.proxy_tensor import make_fx

import fhe_backend
from fhe_backend.lowering.batch import BATCH_MAJOR, BatchAt, MixesSamples
from fhe_backend.partition import batch_layouts
from tests.harness import compile_fhe, quantization_tolerance

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


# The whole encoder layer's circuit does not find Concrete parameters at the default error
# probability (NoParametersFound at every n_bits / rounding tried, 4 to 6 bits; the attention
# alone, and attention + residual or + LayerNorm, do compile): these tests run the integer
# program in `disable` at n_bits=8, where lookups wider than 16 bits defer the circuit.
ENCODER_OPTIONS = dict(n_bits=8, fhe="disable")


@pytest.fixture
def fast_path(request):
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(request.param)
    yield request.param
    torch.backends.mha.set_fastpath_enabled(enabled)


@pytest.mark.parametrize("fast_path", [True, False], indirect=True, ids=["fused", "slow"])
def test_transformer_encoder_layer_runs_in_fhe(fast_path):
    """nn.TransformerEncoderLayer(16, 2, 32, batch_first=True): in eval/no_grad the fused
    `_transformer_encoder_layer_fwd` (decomposed before partitioning) and the slow path both
    become ONE FHE partition with nothing left in torch."""
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    inputset = torch.randn(120, 6, 16)
    compiled = compile_fhe(model, inputset, **ENCODER_OPTIONS)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual, expected = compiled(inputset[:6]), model(inputset[:6])
    assert not [w for w in caught if "instead of FHE" in str(w.message)]
    assert len(fhe_backend.partitions(compiled)) == 1
    in_fhe = _fhe_targets(compiled)
    assert "aten._transformer_encoder_layer_fwd.default" not in in_fhe
    assert {"aten.native_layer_norm.default", "aten.bmm.default", "aten.relu.default"} <= in_fhe
    assert any("softmax" in target for target in in_fhe)
    _assert_close(actual, expected, ENCODER_OPTIONS["n_bits"], steps=8)


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
    constant of the traced batch size), so the whole encoder is one partition."""
    model = BertEncoder().eval()
    tokens = torch.randint(0, 30, (120, 6), generator=torch.Generator().manual_seed(0))
    compiled = compile_fhe(model, tokens, **ENCODER_OPTIONS)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual, expected = compiled(tokens[:4]), model(tokens[:4])
    assert not [w for w in caught if "instead of FHE" in str(w.message)]
    assert len(fhe_backend.partitions(compiled)) == 1
    assert {"aten.embedding.default", "aten.bmm.default", "aten.gelu.default"} <= _fhe_targets(compiled)
    _assert_close(actual, expected, ENCODER_OPTIONS["n_bits"], steps=8)


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
