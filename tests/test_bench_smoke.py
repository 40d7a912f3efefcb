"""Smoke test of the benchmark harness: `fhe-backend bench` on the smallest target, no --execute."""

from __future__ import annotations

import json

import pytest

from benchmarks.report import add_ratios
from benchmarks.targets import TARGETS, select
from fhe_backend import OptionError
from fhe_backend.cli import main


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One real run of the mlp target through the CLI, like a user would type it."""
    out = tmp_path_factory.mktemp("bench")
    code = main(["bench", "--targets", "mlp", "--out", str(out), "--eval-samples", "120"])
    return code, out


def test_bench_writes_json_with_sane_figures(bench_run):
    code, out = bench_run
    assert code == 0
    document = json.loads((out / "results.json").read_text())
    env = document["environment"]
    assert env["packages"]["torch"] and env["packages"]["concrete-python"]
    assert env["machine"]["cpu_count"] >= 1 and env["git"]["commit"]
    (row,) = document["results"]
    assert row["target"] == "mlp" and row["status"] == "ok", row.get("error")
    assert row["eval_samples"] == 120
    assert row["left_in_torch"] == []  # the whole MLP runs in FHE
    for key in ("float_accuracy", "disable_accuracy", "simulate_accuracy"):
        assert 0.8 <= row[key] <= 1.0, (key, row[key])
    # 6-bit quantization costs at most a few points of accuracy
    assert row["simulate_accuracy"] >= row["float_accuracy"] - 0.08
    assert row["pbs_count"] >= 64  # at least one lookup per hidden ReLU
    assert 6 <= row["max_tlu_bit_width"] <= row["max_bit_width"] <= 16
    assert row["complexity"] > 0 and row["compile_seconds"] > 0
    assert row["simulate_samples_per_second"] > 0 and row["peak_memory_mb"] > 50
    assert "keygen_seconds" not in row and "execute_seconds_per_sample" not in row


def test_bench_writes_table_and_plot(bench_run):
    _, out = bench_run
    table = (out / "results.md").read_text()
    assert "| target | float | disable | simulate |" in table
    assert "\n| mlp | 0.9" in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_target_selection():
    assert [t.name for t in select([""])] == [t.name for t in TARGETS]
    assert [t.name for t in select(["qat", "mlp"])] == ["mlp", "qat"]
    with pytest.raises(OptionError, match="unknown benchmark target"):
        select(["nope"])


def test_ratios_are_this_project_over_concrete_ml():
    rows = [{"target": "mlp", "status": "ok", "metric": "accuracy", "complexity": 2.0,
             "pbs_count": 100, "simulate_accuracy": 0.95, "execute_seconds_per_sample": None}]
    reference = {"mlp": {"target": "mlp", "status": "ok", "metric": "accuracy", "complexity": 8.0,
                         "pbs_count": 400, "simulate_accuracy": 0.97, "execute_seconds_per_sample": 3.0}}
    add_ratios(rows, reference)
    assert rows[0]["complexity_ratio"] == 0.25 and rows[0]["pbs_ratio"] == 0.25
    assert rows[0]["simulate_accuracy_difference"] == pytest.approx(-0.02)
    assert "execute_ratio" not in rows[0]
