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
    assert all(p.compiled and not p._keys_ready and p.keygen_seconds is None
               for p in report.fhe_modules)


def test_report_string_is_a_table(report_and_model):
    report, _ = report_and_model
    text = str(report)
    assert text.startswith(f"FHE coverage: {report.coverage:.0%}")
    for word in ("partition", "PBS", "complexity", "fhe_partition_0", "fhe_partition_1",
                 "left in torch", "aten.sort.default", "no FHE lowering"):
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
    assert main(["explain", "tests.test_explain:make_model", "--inputset", str(path),
                 "--n-bits", "4"]) == 0
    out = capsys.readouterr().out
    assert "FHE coverage" in out and "fhe_partition_1" in out and "aten.sort.default" in out
