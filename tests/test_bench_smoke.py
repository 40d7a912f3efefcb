"""The benchmark harness, run as a user runs it: `fhe-backend bench` on the smallest target.

One real run (no --execute) with a relative `--out`, an error probability and a comparison
interpreter without Concrete ML; the plot and the tables are checked programmatically; a tiny
circuit is executed for real to check the encrypted figures (one sample, a batch, key sizes).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fhe_backend
from fhe_backend import OptionError
from fhe_backend.benchmarks.measure import BenchConfig, circuit_figures, compile_options, evaluate_modes
from fhe_backend.benchmarks.report import add_ratios, build_figure, log_ticks, markdown, tick_label
from fhe_backend.benchmarks.runner import concrete_ml_jobs, parse_configuration
from fhe_backend.benchmarks.targets import (
    BY_NAME,
    TARGETS,
    Target,
    concrete_ml_like_for_like,
    error_label,
    parse_error,
    rounding_label,
    select,
)
from fhe_backend.cli import main
from tests.conftest import KEY_CACHE
from tests.harness import compile_fhe


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One real run of the mlp target through the CLI, from another folder with a relative
    --out, at p_error=2**-40, compared with an interpreter that lacks Concrete ML."""
    folder = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        code = main(
            [
                "bench",
                "--targets",
                "mlp",
                "--out",
                "out",
                "--eval-samples",
                "120",
                "--error-probability",
                "p_error=2**-40",
                "--compare-python",
                sys.executable,
            ]
        )
    return code, folder / "out"


def _document(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_bench_writes_json_with_sane_figures(bench_run):
    code, out = bench_run
    assert code == 0
    document = _document(out)
    env = document["environment"]
    assert env["packages"]["torch"] and env["packages"]["concrete-python"]
    assert env["machine"]["cpu_count"] >= 1 and env["git"]["commit"]
    assert len(env["load_average_start"]) == 3 and len(env["load_average_end"]) == 3
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
    # inputs are compressed by default (as Concrete ML): 64 encrypted values in a few KB, where
    # uncompressed LWE ciphertexts take at least 64 * 8 * 512 bytes
    assert 0 < row["input_ciphertext_bytes"] <= 64 * 64 and row["bootstrap_key_bytes"] > 0


def test_rows_are_compiled_at_the_error_probability_asked(bench_run):
    _, out = bench_run
    (row,) = _document(out)["results"]
    assert row["error_probability"] == "p_error=2^-40" and row["rounding"] == "exact 6"
    assert row["options"]["p_error"] == 2.0**-40
    assert 0 < row["circuit_p_error"] <= 2.0**-40 * (1 + 1e-9)  # what Concrete's optimizer met
    assert row["error_bound_per_inference"] == pytest.approx(row["circuit_p_error"] * row["pbs_count"])


def test_relative_out_reaches_the_comparison_process(bench_run):
    """Issue 21 item 1: the comparison process, run in the repository, gets absolute paths."""
    _, out = bench_run
    job = json.loads((out / "concrete_ml_job.json").read_text())
    assert Path(job["models"]).is_absolute() and (Path(job["models"]) / "mlp.pt").is_file()
    # mlp at p_error=2**-40 with exact 6-bit rounding is Concrete ML's default compilation too:
    # one job serves the like-for-like row and the defaults row
    (compilation,) = job["targets"]
    assert compilation["options"] == {"n_bits": 6, "rounding_threshold_bits": 6, "p_error": 2.0**-40}
    assert compilation["aliases"] == ["mlp (Concrete ML defaults)"]
    # written by the other process, which read the job: it says what is missing there
    written = json.loads((out / "concrete_ml_results.json").read_text())
    (result,) = written["results"]
    assert result["status"] == "unavailable" and "concrete-ml is not importable" in result["error"]
    reference = {r["key"]: r for r in _document(out)["concrete_ml"]["results"]}
    assert set(reference) == {"mlp", "mlp (Concrete ML defaults)"}
    assert (
        reference["mlp (Concrete ML defaults)"]["error_probability"] == "p_error=2^-40 (Concrete ML default)"
    )
    assert "FileNotFoundError" not in (out / "results.md").read_text()


def test_concrete_ml_results_of_an_earlier_run_are_reused_only_for_the_same_compilation(bench_run, tmp_path):
    """--concrete-ml-results: a compilation that is the same in an earlier run's folder (job,
    execute settings, trained weights, data) is read from it, not run again; other weights or
    other settings are not reused."""
    import shutil

    from fhe_backend.benchmarks.runner import compare_with_concrete_ml, reusable_results

    _, out = bench_run
    earlier = tmp_path / "earlier"
    shutil.copytree(out, earlier)
    results_path = earlier / "concrete_ml_results.json"
    written = json.loads(results_path.read_text())
    written["results"][0].update(status="ok", pbs_count=576, complexity=1.07e11)
    results_path.write_text(json.dumps(written))
    job = json.loads((out / "concrete_ml_job.json").read_text())
    config = BenchConfig(
        execute=job["execute"], samples=job["samples"], eval_samples=job["eval_samples"], out=out
    )

    reused, _ = reusable_results(earlier, job["targets"], config)
    assert set(reused) == {"mlp"} and reused["mlp"]["pbs_count"] == 576
    assert reused["mlp"]["reused_from"] == str(earlier)
    # the same figures reach the report's reference, aliases included, without running anything
    row = _document(out)["results"][0]
    target = BY_NAME["mlp"].with_error(parse_error("p_error=2**-40"))
    again = tmp_path / "again"
    shutil.copytree(out / "models", again / "models")
    reference, _ = compare_with_concrete_ml(
        "/nonexistent/python", [(target, "mlp")], [row], BenchConfig(eval_samples=120, out=again), earlier
    )
    assert reference["mlp"]["complexity"] == 1.07e11
    assert reference["mlp (Concrete ML defaults)"]["same_as"] == "mlp"
    assert json.loads((again / "concrete_ml_results.json").read_text())["results"][0]["pbs_count"] == 576

    other_settings = BenchConfig(execute=job["execute"], samples=job["samples"], eval_samples=50, out=out)
    assert reusable_results(earlier, job["targets"], other_settings)[0] == {}
    weights = torch.load(earlier / "models" / "mlp.pt")
    first = next(iter(weights))
    weights[first] = weights[first] + 1e-3
    torch.save(weights, earlier / "models" / "mlp.pt")
    assert reusable_results(earlier, job["targets"], config)[0] == {}


def _tables(text: str):
    """The markdown tables of a report: (header cells, [row cells])."""
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            if current is None:
                current = (cells, [])
                tables.append(current)
            elif not set("".join(cells)) <= set("-"):
                current[1].append(cells)
        else:
            current = None
    return tables


def _assert_every_row_names_its_settings(text: str) -> int:
    tables = _tables(text)
    for header, rows in tables:
        assert "error probability" in header and "rounding" in header, header
        error, rounding = header.index("error probability"), header.index("rounding")
        for cells in rows:
            assert re.match(r"(global_)?p_error=(2\^-\d+|[\d.e+-]+)", cells[error]), cells
            assert re.match(r"(exact|approximate) (\d+|auto)$|none$", cells[rounding]), cells
    return len(tables)


def test_bench_writes_tables_naming_settings_and_caveats(bench_run):
    _, out = bench_run
    table = (out / "results.md").read_text()
    assert "| target | error probability | rounding | float | disable | simulate |" in table
    assert "\n| mlp | p_error=2^-40 | exact 6 | 0.9" in table
    assert _assert_every_row_names_its_settings(table) == 3  # results, against Concrete ML, ratios
    assert "Concrete ML defaults | p_error=2^-40 (Concrete ML default) | exact 6" in table
    assert re.search(r"load average [\d.]+ \(1 min\) when the run started and [\d.]+ when it ended", table)
    assert "No encrypted run" in table and "over 120 samples" in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the plot -------------------------------------------------------------------------------


def _visible_labels(figure, axis, which="x"):
    """(text, window extent) of the visible, non-empty tick labels of an axis."""
    renderer = figure.canvas.get_renderer()
    getter = getattr(axis, f"get_{which}ticklabels")
    low, high = sorted(getattr(axis, f"get_{which}lim")())
    ticks = getattr(axis, f"get_{which}ticks")()
    labels = [
        (label.get_text(), label.get_window_extent(renderer))
        for tick, label in zip(ticks, getter())
        if label.get_visible() and low <= tick <= high
    ]
    minor = [label.get_text() for label in getter(minor=True) if label.get_visible() and label.get_text()]
    return [(text, box) for text, box in labels if text], minor


def _assert_readable_log_axis(figure, axis, which="x"):
    assert getattr(axis, f"get_{which}scale")() == "log"
    labels, minor = _visible_labels(figure, axis, which)
    assert minor == []  # no labels on minor ticks (issue 21: "2×10¹⁰ 3×10⁴×10¹⁰ 6×10¹⁰")
    assert len(labels) >= 2
    texts = [text for text, _ in labels]
    assert len(set(texts)) == len(texts)
    for text in texts:  # plain numbers, "2e10" or "20"
        assert re.fullmatch(r"\d+(\.\d+)?(e-?\d+)?", text), text
    boxes = sorted((box for _, box in labels), key=lambda b: b.x0 if which == "x" else b.y0)
    for first, second in zip(boxes, boxes[1:]):  # no two labels overlap
        assert (first.x1 <= second.x0) if which == "x" else (first.y1 <= second.y0), texts
    return texts


def test_plot_of_a_real_run_has_readable_log_ticks_and_settings_in_the_legend(bench_run):
    import matplotlib.pyplot as plt

    _, out = bench_run
    document = _document(out)
    figure = build_figure(document["results"])
    try:
        figure.canvas.draw()
        (axis,) = figure.axes
        texts = _assert_readable_log_axis(figure, axis)
        low, high = axis.get_xlim()
        assert all(low <= float(t) <= high for t in texts)
        legend = [t.get_text() for t in axis.get_legend().get_texts()]
        assert legend == ["fhe_backend: p_error=2^-40, rounding exact 6"]
    finally:
        plt.close(figure)


def _row(key, complexity, execute, keygen, accuracy, error, rounding, **extra):
    return dict(
        target=key.split("@")[0],
        key=key,
        status="ok",
        metric="accuracy",
        complexity=complexity,
        pbs_count=64,
        simulate_accuracy=accuracy,
        execute_seconds_per_sample=execute,
        keygen_seconds=keygen,
        execute_samples=3,
        eval_samples=450,
        error_probability=error,
        rounding=rounding,
        **extra,
    )


@pytest.fixture
def executed_rows():
    """Rows of a run with --execute and a comparison (figures of issue 18's measurements)."""
    rows = [
        _row("mlp_fast@p_error=2^-40", 7.9e10, 6.8, 9.0, 0.96, "p_error=2^-40", "approximate auto"),
        _row("cnn_fast@p_error=2^-40", 4.3e11, 27.4, 10.0, 0.95, "p_error=2^-40", "approximate auto"),
        _row("cnn@global_p_error=1e-05", 3.5e11, 21.0, 8.0, 0.97, "global_p_error=1e-05", "exact 6"),
    ]
    like = dict(role="like for like", compiler="Concrete ML")
    reference = {
        "mlp_fast@p_error=2^-40": _row(
            "mlp_fast@p_error=2^-40", 7.9e10, 11.8, 20.0, 0.97, "p_error=2^-40", "approximate 6", **like
        ),
        "cnn_fast@p_error=2^-40": _row(
            "cnn_fast@p_error=2^-40", 4.3e11, 29.6, 25.0, 0.97, "p_error=2^-40", "approximate 6", **like
        ),
        "cnn@global_p_error=1e-05": _row(
            "cnn@global_p_error=1e-05", 3.4e11, 25.0, 24.0, 0.97, "global_p_error=1e-05", "exact 6", **like
        ),
        "cnn (Concrete ML defaults)": _row(
            "cnn (Concrete ML defaults)",
            5.7e11,
            96.0,
            27.0,
            0.97,
            "p_error=2^-40 (Concrete ML default)",
            "exact 6",
            role="Concrete ML defaults",
            compiler="Concrete ML",
        ),
    }
    add_ratios(rows, reference)
    return rows, reference


def test_plot_with_execute_has_a_time_panel_ours_beside_concrete_ml(executed_rows):
    import matplotlib.pyplot as plt

    rows, reference = executed_rows
    figure = build_figure(rows, reference)
    try:
        figure.canvas.draw()
        accuracy_axis, time_axis = figure.axes
        _assert_readable_log_axis(figure, accuracy_axis)
        legend = [t.get_text() for t in accuracy_axis.get_legend().get_texts()]
        assert set(legend) == {
            "fhe_backend: p_error=2^-40, rounding approximate auto",
            "fhe_backend: global_p_error=1e-05, rounding exact 6",
            "Concrete ML (like for like): p_error=2^-40, rounding approximate 6",
            "Concrete ML (like for like): global_p_error=1e-05, rounding exact 6",
            "Concrete ML defaults: p_error=2^-40 (Concrete ML default), rounding exact 6",
        }
        # one group of bars per row of ours, each naming its error probability and roundings
        ticks = [label.get_text() for label in time_axis.get_xticklabels()]
        assert ticks[0] == "mlp_fast@p_error=2^-40\np_error=2^-40\nours: approximate auto\nCML: approximate 6"
        assert "global_p_error=1e-05" in ticks[2] and "ours: exact 6" in ticks[2]
        bars = {t.get_text(): c for t, c in zip(time_axis.get_legend().get_texts(), time_axis.containers)}
        assert set(bars) == {
            "fhe_backend: execute s/sample",
            "Concrete ML (like for like): execute s/sample",
            "fhe_backend: keygen s",
            "Concrete ML (like for like): keygen s",
        }
        heights = {name: [bar.get_height() for bar in container] for name, container in bars.items()}
        assert heights["fhe_backend: execute s/sample"] == [6.8, 27.4, 21.0]
        assert heights["Concrete ML (like for like): execute s/sample"] == [11.8, 29.6, 25.0]
        assert heights["Concrete ML (like for like): keygen s"] == [20.0, 25.0, 24.0]
        # ours and Concrete ML's bars of a target stand side by side, inside its group
        ours = bars["fhe_backend: execute s/sample"][0]
        theirs = bars["Concrete ML (like for like): execute s/sample"][0]
        assert ours.get_x() + ours.get_width() == pytest.approx(theirs.get_x())
        assert time_axis.get_yscale() == "linear"  # 6.8 to 29.6 s: no log needed
    finally:
        plt.close(figure)


def test_log_ticks_are_few_and_inside_any_range():
    rng = np.random.default_rng(0)
    for _ in range(300):
        low = 10 ** rng.uniform(-3, 12)
        high = low * 10 ** rng.uniform(0.002, 9)
        ticks = log_ticks(low, high)
        assert 2 <= len(ticks) <= 8, (low, high, ticks)
        assert all(low <= t <= high for t in ticks) and ticks == sorted(set(ticks))
        labels = [tick_label(t) for t in ticks]
        assert len(set(labels)) == len(labels), (low, high, labels)
    assert log_ticks(6e10, 5e11) == [1e11, 2e11, 5e11]
    assert [tick_label(t) for t in log_ticks(2.1e10, 6.5e10)] == ["3e10", "4e10", "5e10", "6e10"]


def test_markdown_with_execute_states_medians_and_every_rows_settings(executed_rows):
    rows, reference = executed_rows
    env = {
        "command": "fhe-backend bench --execute --samples 3",
        "date": "today",
        "machine": {"processor": "a CPU", "cpu_count": 2, "memory_gib": 24, "python": "3.11"},
        "packages": {},
        "git": {},
        "load_average_start": [5.5, 5, 4],
        "load_average_end": [7.25, 6, 5],
        "config": {"samples": 3},
    }
    text = markdown(rows, env, reference, {"concrete-ml": "1.9.0"})
    assert _assert_every_row_names_its_settings(text) == 3
    assert "execute s/sample** is the median of 3 encrypted sample(s)" in text
    assert "load average 5.5 (1 min) when the run started and 7.2 when it ended" in text
    # the defaults row comes once, after the row of its target
    ((_, comparison),) = [t for t in _tables(text) if "compiler" in t[0]]
    whos = [(cells[0], cells[1]) for cells in comparison]
    assert whos[-2:] == [
        ("cnn@global_p_error=1e-05", "Concrete ML (like for like)"),
        ("cnn", "Concrete ML defaults"),
    ]
    assert rows[0]["execute_ratio"] == pytest.approx(6.8 / 11.8)


# ---- settings of the comparison -------------------------------------------------------------


def test_error_probability_specs():
    assert parse_error("p_error=2**-40") == {"p_error": 2.0**-40}
    assert parse_error("p_error=2^-40") == {"p_error": 2.0**-40}
    assert parse_error(" global_p_error=1e-5 ") == {"global_p_error": 1e-5}
    assert parse_error("default") == {}
    for bad in ("p_error=2", "q_error=0.1", "global_p_error=abc", "p_error"):
        with pytest.raises(OptionError, match="--error-probability"):
            parse_error(bad)
    assert error_label({"p_error": 2.0**-40}) == "p_error=2^-40"
    assert error_label({}, {"p_error": None, "global_p_error": None}) == "global_p_error=1e-05 (default)"
    assert (
        error_label({}, {"p_error": 2.0**-40}, "Concrete ML default") == "p_error=2^-40 (Concrete ML default)"
    )
    assert (
        rounding_label({"rounding_threshold_bits": {"n_bits": "auto", "method": "approximate"}})
        == "approximate auto"
    )
    assert rounding_label({"rounding_threshold_bits": 6}) == "exact 6"
    assert rounding_label({}) == "none"


def test_concrete_ml_gets_our_error_probability_and_its_approximate_rounding():
    ours = {"p_error": None, "global_p_error": None}
    auto = {"n_bits": 6, "rounding_threshold_bits": {"n_bits": "auto", "method": "approximate"}}
    assert concrete_ml_like_for_like(auto, ours) == {
        "n_bits": 6,
        "rounding_threshold_bits": {"n_bits": 6, "method": "approximate"},
        "global_p_error": 1e-5,
    }  # ours at Concrete's default budget: made explicit for Concrete ML
    assert concrete_ml_like_for_like({"rounding_threshold_bits": "auto", "p_error": 2.0**-40}, ours) == {
        "rounding_threshold_bits": {"n_bits": 6, "method": "approximate"},
        "p_error": 2.0**-40,
    }
    assert concrete_ml_like_for_like(
        {"rounding_threshold_bits": {"n_bits": 5, "method": "approximate"}, "global_p_error": 1e-5}, ours
    ) == {"rounding_threshold_bits": {"n_bits": 5, "method": "approximate"}, "global_p_error": 1e-5}
    assert concrete_ml_like_for_like({"n_bits": 6, "rounding_threshold_bits": 6}, {"p_error": 2.0**-40}) == {
        "n_bits": 6,
        "rounding_threshold_bits": 6,
        "p_error": 2.0**-40,
    }


def test_comparison_jobs_like_for_like_and_defaults_rows():
    variants = [
        (BY_NAME[name].with_error(error), f"{name}@{label}")
        for name in ("mlp_fast", "qat_fast")
        for error, label in (({"p_error": 2.0**-40}, "p"), ({"global_p_error": 1e-5}, "g"))
    ]
    rows = [{"key": key, "status": "ok"} for _, key in variants]
    rows[-1]["status"] = "error"  # a row of ours that failed gets no Concrete ML row
    jobs = {job["key"]: job for job in concrete_ml_jobs(variants, rows)}
    assert set(jobs) == {
        "mlp_fast@p",
        "mlp_fast@g",
        "mlp_fast (Concrete ML defaults)",
        "qat_fast@p",
        "qat_fast (Concrete ML defaults)",
    }
    assert jobs["mlp_fast@g"]["options"] == {
        "n_bits": 6,
        "global_p_error": 1e-5,
        "rounding_threshold_bits": {"n_bits": 6, "method": "approximate"},
    }
    assert jobs["mlp_fast@g"]["error_probability"] == "global_p_error=1e-05"
    defaults = jobs["mlp_fast (Concrete ML defaults)"]
    assert defaults["options"] == {"n_bits": 6, "rounding_threshold_bits": 6}  # Concrete ML picks p_error
    assert defaults["role"] == "Concrete ML defaults" and defaults["rounding"] == "exact 6"
    assert defaults["error_probability"] == "p_error=2^-40 (Concrete ML default)"
    assert jobs["qat_fast (Concrete ML defaults)"]["options"] == {}
    assert jobs["qat_fast@p"]["options"] == {
        "p_error": 2.0**-40,
        "rounding_threshold_bits": {"n_bits": 6, "method": "approximate"},
    }


def test_precision_search_targets_give_concrete_ml_the_same_bounds_without_the_search():
    """Concrete ML has no precision search: like for like, it compiles at the bounds our search
    starts from (n_bits 6, approximate rounding 6), at the same error probability."""
    target = BY_NAME["mlp_small"].with_error({"p_error": 2.0**-40})
    assert "precision_search" in target.options
    assert concrete_ml_like_for_like(target.options, {"p_error": None, "global_p_error": None}) == {
        "n_bits": 6,
        "rounding_threshold_bits": {"n_bits": 6, "method": "approximate"},
        "p_error": 2.0**-40,
    }
    assert "precision_search" not in BY_NAME["qat_small"].concrete_ml_defaults
    assert rounding_label(target.options) == "approximate 6 + search (mse 0.01)"
    assert rounding_label(BY_NAME["qat_small"].options) == "approximate 6 + search (accuracy 0.0)"


def test_target_selection():
    assert [t.name for t in select([""])] == [t.name for t in TARGETS]
    assert [t.name for t in select(["qat", "mlp"])] == ["mlp", "qat"]
    with pytest.raises(OptionError, match="unknown benchmark target"):
        select(["nope"])


def test_ratios_are_this_project_over_concrete_ml():
    rows = [
        {
            "target": "mlp",
            "status": "ok",
            "metric": "accuracy",
            "complexity": 2.0,
            "pbs_count": 100,
            "simulate_accuracy": 0.95,
            "execute_seconds_per_sample": None,
        }
    ]
    reference = {
        "mlp": {
            "target": "mlp",
            "status": "ok",
            "metric": "accuracy",
            "complexity": 8.0,
            "pbs_count": 400,
            "simulate_accuracy": 0.97,
            "execute_seconds_per_sample": 3.0,
        }
    }
    add_ratios(rows, reference)
    assert rows[0]["complexity_ratio"] == 0.25 and rows[0]["pbs_ratio"] == 0.25
    assert rows[0]["simulate_accuracy_difference"] == pytest.approx(-0.02)
    assert "execute_ratio" not in rows[0]


# ---- encrypted figures on a tiny circuit -----------------------------------------------------

INSECURE = {
    "enable_unsafe_features": True,
    "use_insecure_key_cache": True,
    "insecure_key_cache_location": KEY_CACHE,
}


def test_configuration_option_reaches_concrete_and_is_checked():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    inputset = torch.rand(100, 6)
    target = Target("tiny", "tiny", "digits", "mlp", {"n_bits": 3})
    sizes = {}
    for compress in (False, True):
        config = BenchConfig(configuration=dict(INSECURE, compress_input_ciphertexts=compress))
        compiled = compile_fhe(model, inputset, **compile_options(target, config))
        with torch.no_grad():
            compiled(inputset[:1])
        sizes[compress] = circuit_figures(fhe_backend.partitions(compiled))["input_ciphertext_bytes"]
    assert sizes[True] * 10 < sizes[False]  # seeded input ciphertexts: a fraction of the size
    with pytest.raises(OptionError, match="not JSON"):
        parse_configuration("{compress")
    with pytest.raises(OptionError, match="concrete.fhe.Configuration rejects"):
        parse_configuration('{"no_such_option": 1}')
    assert parse_configuration('{"approximate_rounding_config": {"logical_clipping": false}}') == {
        "approximate_rounding_config": {"logical_clipping": False}
    }


def _tiny_run():
    """A tiny compiled MLP as the bench sees it: (run(mode, x), x, reference, score, partitions)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    x = torch.rand(120, 4)
    options = compile_options(
        Target("tiny", "tiny", "digits", "mlp", {"n_bits": 3}), BenchConfig(configuration=INSECURE)
    )
    compiled = compile_fhe(model, x, **options)
    with torch.no_grad():
        compiled(x[:1])
        reference = model(x[:6])
    partitions = fhe_backend.partitions(compiled)

    def run(mode, inputs):
        fhe_backend.set_fhe_mode(compiled, mode)
        with torch.no_grad():
            return compiled(inputs)

    def score(outputs, rows):  # agreement of the predicted class with float
        return float((outputs.argmax(-1) == reference[rows].argmax(-1)).float().mean())

    return run, x, reference, score, partitions


def test_simulate_runs_report_the_mean_and_spread_of_every_run():
    import statistics

    from benchmarks.report import _display

    run, x, reference, score, partitions = _tiny_run()
    row = {"target": "tiny"}
    config = BenchConfig(simulate_runs=3, eval_samples=6)
    evaluate_modes(row, run, x[:6], reference, score, partitions, config, lambda step: None)
    runs = row["simulate_accuracy_runs"]
    assert len(runs) == 3 and all(0 <= a <= 1 for a in runs)
    assert row["simulate_accuracy"] == pytest.approx(statistics.mean(runs))
    assert row["simulate_accuracy_sd"] == pytest.approx(statistics.stdev(runs))
    assert "disable_accuracy_runs" not in row  # disable is deterministic: one run
    assert " ± " in _display(row)["simulate_cell"]
    single = {"target": "tiny"}
    evaluate_modes(single, run, x[:6], reference, score, partitions, BenchConfig(eval_samples=6), print)
    assert (
        "simulate_accuracy_runs" not in single
        and _display(single)["simulate_cell"] == single["simulate_accuracy"]
    )


def test_execute_times_one_sample_and_a_batch_with_key_sizes():
    run, x, reference, score, partitions = _tiny_run()
    row = {}
    config = BenchConfig(execute=True, samples=2, batch=3, eval_samples=6)
    evaluate_modes(row, run, x[:6], reference, score, partitions, config, lambda step: None)
    assert row["execute_samples"] == 2 and len(row["execute_seconds_all"]) == 2
    assert row["execute_max_difference_to_simulate"] == 0  # exact: encrypted equals simulated
    assert row["execute_batch"] == 3 and row["execute_batch_seconds_per_sample"] > 0
    for key in ("execute_cores_busy", "execute_batch_cores_busy"):
        assert 0 < row[key] <= (os.cpu_count() or 1) + 0.5, (key, row[key])
    assert row["keygen_seconds"] > 0
    circuit = partitions[0].circuit
    # what a client sends a server: at least the uncompressed keys' worth of bytes, roughly
    assert row["evaluation_key_serialized_bytes"] >= 0.3 * (
        circuit.size_of_bootstrap_keys + circuit.size_of_keyswitch_keys
    )
    assert math.isfinite(row["simulate_samples_per_second"])


def test_seed_draws_another_split_and_other_weights_on_both_sides(tmp_path):
    """`--seed` reaches the split and the training, and what Concrete ML is given (the saved
    weights and data); the same seed gives the same row; a seed numpy cannot take is refused."""
    from fhe_backend.benchmarks import models
    from fhe_backend.benchmarks.measure import measure_digits

    target = BY_NAME["mlp"]
    rows, saved = {}, {}
    for name, seed in (("first", 0), ("again", 0), ("other", 1)):
        config = BenchConfig(out=tmp_path / name, eval_samples=30, seed=seed)
        rows[name] = measure_digits(target, config, lambda step: None)
        folder = config.out / "models"
        saved[name] = (dict(np.load(folder / "digits.npz")), torch.load(folder / f"{target.name}.pt"))
    assert BenchConfig().seed == models.SEED == 0
    for same in (True, False):
        (data, weights), (other_data, other_weights) = saved["first"], saved["again" if same else "other"]
        assert np.array_equal(data["y_test"], other_data["y_test"]) is same
        assert all(torch.equal(weights[k], other_weights[k]) for k in weights) is same
    assert rows["first"]["float_accuracy"] == rows["again"]["float_accuracy"]
    assert rows["first"]["disable_accuracy"] == rows["again"]["disable_accuracy"]
    with pytest.raises(SystemExit, match="--seed must be in"):
        main(["bench", "--targets", "mlp", "--seed", "-1", "--out", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()


def test_default_rows_label_the_budget_the_backend_passes():
    """A row compiled with no error option is labelled with the budget the backend gives
    Concrete (benchmarks.targets runs without fhe_backend in Concrete ML's environment, so it
    keeps its own copy of the constant)."""
    from fhe_backend.benchmarks.targets import CONCRETE_DEFAULT_GLOBAL_P_ERROR, effective_error
    from fhe_backend.settings import DEFAULT_GLOBAL_P_ERROR

    assert CONCRETE_DEFAULT_GLOBAL_P_ERROR == DEFAULT_GLOBAL_P_ERROR
    assert effective_error({}) == ("global_p_error", DEFAULT_GLOBAL_P_ERROR, True)
