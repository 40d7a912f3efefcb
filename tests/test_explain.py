"""fhe_backend.explain: per-partition circuit figures, torch nodes with reasons, coverage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import fhe_backend
from fhe_backend.cli import main


class SortInTheMiddle(nn.Module):
    """linear-relu-linear (FHE), a sort (no lowering: torch), then a linear (FHE)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.sort(self.encoder(x), dim=1).values)


def make_model() -> nn.Module:
    """Factory used by the CLI test ('tests.test_explain:make_model')."""
    torch.manual_seed(0)
    return SortInTheMiddle()


@pytest.fixture(scope="module")
def report_and_model():
    model = make_model()
    inputset = torch.randn(150, 8)
    return fhe_backend.explain(model, inputset, n_bits=4), model


def test_report_partitions(report_and_model):
    report, _ = report_and_model
    assert len(report.partitions) == 2
    encoder, head = report.partitions
    assert encoder.ops == {"addmm": 2, "relu": 1}
    assert head.ops == {"addmm": 1}
    assert encoder.input_shapes == [(1, 8)] and encoder.output_shapes == [(1, 6)]
    assert head.input_shapes == [(1, 6)] and head.output_shapes == [(1, 3)]
    assert encoder.pbs_count == 8  # one lookup per hidden neuron
    assert head.pbs_count == 0  # a lone linear layer is leveled
    assert encoder.max_tlu_bit_width >= 4 and encoder.max_bit_width >= encoder.max_tlu_bit_width
    assert encoder.complexity > head.complexity > 0


def test_report_torch_nodes_and_coverage(report_and_model):
    report, _ = report_and_model
    sort_nodes = [n for n in report.torch_nodes if n.op == "aten.sort.default"]
    assert len(sort_nodes) == 1 and "no FHE lowering" in sort_nodes[0].reason
    assert sort_nodes[0].source.endswith(".py:" + sort_nodes[0].source.split(":")[-1])
    assert report.coverage == pytest.approx(report.fhe_ops / (report.fhe_ops + len(report.torch_nodes)))
    assert 0.5 < report.coverage < 1
    assert report.samples == 150 and not report.warnings


def test_report_generates_no_keys(report_and_model):
    report, _ = report_and_model
    assert len(report.fhe_modules) == 2
    assert all(
        p.compiled and not p.runner.keys_ready and p.keygen_seconds is None for p in report.fhe_modules
    )


def test_report_string_is_a_table(report_and_model):
    report, _ = report_and_model
    text = str(report)
    assert text.startswith(f"FHE coverage: {report.coverage:.0%}")
    for word in (
        "partition",
        "PBS",
        "complexity",
        "fhe_partition_0",
        "fhe_partition_1",
        "left in torch",
        "aten.sort.default",
        "no FHE lowering",
    ):
        assert word in text


def test_not_marked_reason_and_small_inputset_warning():
    model = make_model()
    with pytest.warns(UserWarning, match="inputset has 40 samples"):
        report = fhe_backend.explain(model, torch.randn(40, 8), n_bits=4, module_names=["encoder"])
    assert [p.module for p in report.partitions] == ["encoder"]
    reasons = report.reasons()
    assert reasons.get("not in a module marked for FHE", 0) >= 2  # the sort and the head
    assert any("40 samples" in w for w in report.warnings)


def test_cli_explain_factory_and_inputset(tmp_path, capsys):
    path = tmp_path / "inputs.npy"
    np.save(path, np.random.default_rng(0).normal(size=(120, 8)).astype(np.float32))
    assert main(["explain", "tests.test_explain:make_model", "--inputset", str(path), "--n-bits", "4"]) == 0
    out = capsys.readouterr().out
    assert "FHE coverage" in out and "fhe_partition_1" in out and "aten.sort.default" in out


def test_report_coverage_by_compute():
    """Coverage by multiply-accumulates as well as by op count: the sort (no MACs) in torch
    costs ops but no compute; the head left in torch costs its matmul."""
    model = make_model()
    inputset = torch.randn(120, 8)
    report = fhe_backend.explain(model, inputset, n_bits=4, module_names=["encoder"])
    encoder, head = 8 * 8 + 8 * 6, 6 * 3  # per sample
    assert report.fhe_macs == 120 * encoder and report.torch_macs == 120 * head
    assert report.compute_coverage == pytest.approx(encoder / (encoder + head))
    assert report.compute_coverage > report.coverage  # the sort and the head: 2 of 5 ops
    assert "multiply-accumulates" in str(report)


class Branchy(nn.Module):
    """A data-dependent branch: dynamo breaks the graph at the `if`."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 64), nn.Linear(64, 10)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h) if h.sum() > 0 else -self.b(h)  # marker: graph break


def test_report_graph_breaks_with_reason_and_line():
    torch.manual_seed(0)
    report = fhe_backend.explain(Branchy(), torch.randn(120, 16), n_bits=4)
    (graph_break,) = report.graph_breaks
    line = next(
        i for i, text in enumerate(open(__file__), 1) if "marker: graph break" in text and "next(" not in text
    )
    assert graph_break.source.endswith(f"test_explain.py:{line}")
    assert graph_break.reason
    assert report.graph_count == 2
    assert len(report.partitions) == 2  # each graph calibrated on what reaches it, compiled
    assert "1 graph break(s)" in str(report) and graph_break.source in str(report)


class GRUClassifier(nn.Module):
    """GRU over a sequence, then a linear head on the last step."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def test_report_says_why_nothing_reached_the_backend():
    """Dynamo skips a frame with an nn.GRU: no graph reaches the backend. The report says so,
    why, and what to do, instead of an empty table."""
    torch.manual_seed(0)
    report = fhe_backend.explain(GRUClassifier(), torch.randn(120, 5, 4), n_bits=4)
    assert not report.partitions and report.graph_count == 0
    for words in (
        "no graph of this model reached the fhe backend",
        "GRU",
        "fullgraph=True",
        "allow_rnn",
        "in the clear",
    ):
        assert words in report.not_captured, report.not_captured
    assert str(report).count("NOTHING RUNS IN FHE") == 1


def test_report_with_allow_rnn_names_the_recurrent_layer_left_in_torch():
    torch.manual_seed(0)
    with torch._dynamo.config.patch(allow_rnn=True):
        report = fhe_backend.explain(GRUClassifier(), torch.randn(120, 5, 4), n_bits=4)
    assert [p.module for p in report.partitions] == [""] and report.partitions[0].ops.get("addmm") == 1
    rnn_nodes = [n for n in report.torch_nodes if n.module == "rnn"]
    assert rnn_nodes and all("recurrent layer 'rnn'" in n.reason for n in rnn_nodes)
    assert all(n.module == "rnn" for n in report.torch_nodes)
    assert "recurrent layer 'rnn'" in str(report)
