"""Writing the results: results.json (every figure and the environment), results.md, a plot.

Every row names the error probability and the rounding it was compiled with
(`error_probability`, `rounding`); Concrete ML's rows come twice per target when compared:
like for like (same error probability, its approximate rounding where ours is approximate or
"auto"), which the ratios use, and with Concrete ML's defaults.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .targets import DEFAULTS_SUFFIX

PACKAGES = (
    "fhe-backend",
    "torch",
    "concrete-python",
    "brevitas",
    "transformers",
    "peft",
    "numpy",
    "scikit-learn",
    "matplotlib",
)
# (ratio column, figure, description); ratio = this project / Concrete ML
RATIOS = (
    ("complexity_ratio", "complexity", "complexity"),
    ("pbs_ratio", "pbs_count", "PBS"),
    ("compile_ratio", "compile_seconds", "compile s"),
    ("keygen_ratio", "keygen_seconds", "keygen s"),
    ("keygen_cpu_ratio", "keygen_cpu_seconds", "keygen CPU s"),
    ("execute_ratio", "execute_seconds_per_sample", "execute s/sample"),
    ("execute_cpu_ratio", "execute_cpu_seconds_per_sample", "execute CPU s/sample"),
    ("evaluation_keys_ratio", "evaluation_key_serialized_bytes", "eval keys"),
    ("input_ciphertext_ratio", "input_ciphertext_bytes", "input ct"),
    ("simulate_throughput_ratio", "simulate_samples_per_second", "simulate samples/s"),
)
SETTING_COLUMNS = (("error probability", "error_probability"), ("rounding", "rounding"))
MAIN_COLUMNS = (
    ("target", "key"),
    *SETTING_COLUMNS,
    ("float", "float_accuracy"),
    ("disable", "disable_accuracy"),
    ("simulate", "simulate_cell"),
    ("execute", "execute_accuracy"),
    ("PBS", "pbs_count"),
    ("max bits", "max_bit_width"),
    ("max TLU bits", "max_tlu_bit_width"),
    ("complexity", "complexity"),
    ("compile s", "compile_seconds"),
    ("keygen s", "keygen_seconds"),
    ("execute s/sample", "execute_seconds_per_sample"),
    ("simulate samples/s", "simulate_samples_per_second"),
    ("input ct B", "input_ciphertext_bytes"),
    ("eval keys MiB", "evaluation_keys_mib"),
    ("peak MiB", "peak_memory_mb"),
    ("status", "status"),
)
COMPARISON_COLUMNS = (
    ("target", "key"),
    ("compiler", "who"),
    *SETTING_COLUMNS,
    ("simulate", "simulate_cell"),
    ("PBS", "pbs_count"),
    ("max TLU bits", "max_tlu_bit_width"),
    ("complexity", "complexity"),
    ("compile s", "compile_seconds"),
    ("keygen s", "keygen_seconds"),
    ("execute s/sample", "execute_seconds_per_sample"),
    ("execute CPU s/sample", "execute_cpu_seconds_per_sample"),
    ("input ct B", "input_ciphertext_bytes"),
    ("eval keys MiB", "evaluation_keys_mib"),
    ("status", "status"),
)


def environment(argv: Sequence[str]) -> Dict[str, Any]:
    """Machine, package versions, git commit and command line of this run."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["fhe-backend", "bench", *argv]),
        "machine": {
            "platform": platform.platform(),
            "processor": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "memory_gib": _memory_gib(),
            "python": sys.version.split()[0],
        },
        "packages": versions,
        "git": _git(),
        "load_average_start": load_average(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _memory_gib() -> Optional[float]:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _git() -> Dict[str, Any]:
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> Optional[str]:
        try:
            return subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def load_average() -> Optional[List[float]]:
    """The machine's 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def row_key(row: Dict[str, Any]) -> str:
    """The name of a row: its target, with the error probability when several were run."""
    return row.get("key") or row["target"]


def add_ratios(rows: List[Dict[str, Any]], reference: Dict[str, Dict[str, Any]]) -> None:
    """Add this-project / Concrete ML ratio columns (and the accuracy difference) to each row,
    against Concrete ML's row of the same key: the like-for-like compilation."""
    for row in rows:
        other = reference.get(row_key(row))
        if not other or other.get("status") != "ok" or row.get("status") != "ok":
            continue
        for column, figure, _ in RATIOS:
            mine, theirs = row.get(figure), other.get(figure)
            if isinstance(mine, (int, float)) and isinstance(theirs, (int, float)) and theirs:
                row[column] = mine / theirs
        if (
            other.get("metric") == row.get("metric")
            and row.get("simulate_accuracy") is not None
            and other.get("simulate_accuracy") is not None
        ):
            row["simulate_accuracy_difference"] = row["simulate_accuracy"] - other["simulate_accuracy"]


def write_all(
    out: Path,
    rows: List[Dict[str, Any]],
    env: Dict[str, Any],
    reference: Optional[Dict[str, Dict[str, Any]]] = None,
    comparison_info: Optional[Dict[str, Any]] = None,
) -> Dict[str, Path]:
    """Write results.json, results.md and results.png under `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "results.png"}
    document = {"environment": env, "results": rows}
    if reference is not None:
        document["concrete_ml"] = {"environment": comparison_info or {}, "results": list(reference.values())}
    paths["json"].write_text(json.dumps(document, indent=2, default=_json_default))
    paths["markdown"].write_text(markdown(rows, env, reference, comparison_info))
    plot(rows, paths["plot"], reference)
    return paths


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value).replace("|", "\\|")


def _table(rows: List[Dict[str, Any]], columns: Sequence[tuple]) -> List[str]:
    lines = ["| " + " | ".join(title for title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for _, key in columns) + " |")
    return lines


def _display(row: Dict[str, Any], who: Optional[str] = None) -> Dict[str, Any]:
    """A row with the derived cells of the tables (compiler, evaluation keys in MiB)."""
    size = row.get("evaluation_key_serialized_bytes")
    accuracy, spread = row.get("simulate_accuracy"), row.get("simulate_accuracy_sd")
    return dict(
        row,
        key=row_key(row),
        who=who or row.get("compiler", "fhe_backend"),
        evaluation_keys_mib=size / 2**20 if isinstance(size, (int, float)) else None,
        # the mean of several simulate runs, ± their standard deviation
        simulate_cell=accuracy if spread is None else f"{_cell(accuracy)} ± {_cell(spread)}",
    )


def _who(row: Dict[str, Any]) -> str:
    """fhe_backend / Concrete ML (like for like) / Concrete ML defaults."""
    if row.get("role") == "Concrete ML defaults":
        return "Concrete ML defaults"
    if row.get("compiler") == "Concrete ML" or row.get("role"):
        return "Concrete ML (like for like)"
    return row.get("compiler", "fhe_backend")


def comparison_rows(rows: List[Dict[str, Any]], reference: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Our rows each followed by Concrete ML's like-for-like row, and Concrete ML's defaults row
    after the last row of each target."""
    ordered: List[Dict[str, Any]] = []
    last_of_target = {row["target"]: row_key(row) for row in rows}
    for row in rows:
        ordered.append(_display(row))
        other = reference.get(row_key(row))
        if other is not None:
            shown = dict(other, key=row_key(row))
            if other.get("reused_from"):
                shown["status"] = f"{other.get('status')} (reused)"
            ordered.append(_display(shown, _who(other)))
        defaults = reference.get(row["target"] + DEFAULTS_SUFFIX)
        if defaults is not None and last_of_target[row["target"]] == row_key(row):
            shown = dict(defaults, key=row["target"])
            if defaults.get("same_as"):
                shown["status"] = f"{defaults.get('status')} (= like for like row {defaults['same_as']})"
            ordered.append(_display(shown, "Concrete ML defaults"))
    return ordered


def timing_notes(
    rows: List[Dict[str, Any]], env: Dict[str, Any], reference: Optional[Dict[str, Dict[str, Any]]] = None
) -> List[str]:
    """How the times were taken: machine load, what each time is a median of."""
    machine = env["machine"]
    start, end = env.get("load_average_start"), env.get("load_average_end")
    load = (
        f"load average {start[0]:.1f} (1 min) when the run started and {end[0]:.1f} when it ended"
        if start and end
        else "load average unknown"
    )
    lines = [
        "## How the times were taken",
        "",
        f"- **Machine load.** Times are wall-clock seconds on {machine['cpu_count']} cores "
        f"({machine['processor']}) with {load}. A load above the number of cores means other "
        "processes competed for them: times then vary by tens of percent between runs. "
        "Compare ratios from the same run, not times across runs; CPU seconds (this process's "
        "threads) depend less on the load than wall-clock seconds.",
    ]
    everything = rows + list((reference or {}).values())
    counts = sorted({r["execute_samples"] for r in everything if r.get("execute_samples")})
    config = env.get("config", {})
    if counts:
        count = counts[0] if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
        lines.append(
            f"- **execute s/sample** is the median of {count} encrypted sample(s) run one "
            f"by one (`--samples {config.get('samples', '?')}`; every time is in "
            "results.json, `execute_seconds_all`); **keygen s** and **compile s** are one run "
            "each."
        )
    else:
        lines.append(
            "- No encrypted run (`--execute` not given): no keygen or execute times; "
            "**compile s** is one run."
        )
    evaluated = sorted({r["eval_samples"] for r in everything if r.get("eval_samples")})
    if evaluated:
        lines.append(
            f"- **simulate samples/s** is the throughput over {'/'.join(map(str, evaluated))} "
            "samples after a 2-sample warm-up; accuracies are over the same samples."
        )
    runs = sorted({len(r["simulate_accuracy_runs"]) for r in everything if r.get("simulate_accuracy_runs")})
    if runs:
        lines.append(
            f"- **simulate** accuracy is the mean of {'/'.join(map(str, runs))} simulate runs ± their "
            "standard deviation (`--simulate-runs`; Concrete's simulator draws bootstrap errors and "
            "approximate rounding's slips at random; each run is in results.json, "
            "`simulate_accuracy_runs`)."
        )
    if any(r.get("execute_batch") for r in everything):
        lines.append(
            "- **cores busy** is the process's CPU time over the wall time of the encrypted "
            f"runs: 1.0 is one core, {machine['cpu_count']} would be every core."
        )
    return lines


def markdown(
    rows: List[Dict[str, Any]],
    env: Dict[str, Any],
    reference: Optional[Dict[str, Dict[str, Any]]] = None,
    comparison_info: Optional[Dict[str, Any]] = None,
) -> str:
    """The results as markdown tables, with the environment, the timing caveats and the errors."""
    machine, packages, git = env["machine"], env["packages"], env["git"]
    configuration = env.get("config", {}).get("configuration")
    lines = [
        "# fhe-backend benchmark results",
        "",
        f"`{env['command']}` on {env['date']}: {machine['processor']}, {machine['cpu_count']} cores, "
        f"{machine['memory_gib']} GiB, Python {machine['python']}; commit "
        f"{(git.get('commit') or 'unknown')[:10]}{' (dirty)' if git.get('dirty') else ''}; "
        + ", ".join(f"{name} {version}" for name, version in packages.items() if version)
        + ".",
        "",
        "Accuracy columns are top-1 accuracy on the digits test split; for `gpt2_mlp` they are the "
        "top-1 next-token agreement with the float model; `lora_step` reports losses below. "
        "**error probability** is what each row was compiled with (`p_error`: per table lookup; "
        "`global_p_error`: per inference); **rounding** is `rounding_threshold_bits` (method and "
        "bits; `auto`: searched per lookup)."
        + (
            f" Every compilation used `concrete.fhe.Configuration(**{configuration})`."
            if configuration
            else ""
        ),
        "",
    ]
    lines += _table([_display(r) for r in rows], MAIN_COLUMNS)
    lora = [r for r in rows if r.get("metric") == "training-step loss" and r.get("status") == "ok"]
    if lora:
        lines += [
            "",
            "LoRA training step (loss of the batch; LoRA gradients' relative L2 error against the float step):",
            "",
        ]
        lines += _table(
            [_display(r) for r in lora],
            (
                ("target", "key"),
                *SETTING_COLUMNS,
                ("float loss", "float_loss"),
                ("disable loss", "disable_loss"),
                ("simulate loss", "simulate_loss"),
                ("simulate gradient error", "simulate_gradient_error"),
                ("simulate step s", "simulate_step_seconds"),
                ("execute step s", "execute_step_seconds"),
            ),
        )
    if reference is not None:
        info = comparison_info or {}
        reused = sorted({str(r["reused_from"]) for r in reference.values() if r.get("reused_from")})
        lines += [
            "",
            f"## Against Concrete ML {info.get('concrete-ml', '')} "
            f"(python {info.get('python', '?')}, torch {info.get('torch', '?')}), "
            + (
                f"rows marked reused read from {', '.join(reused)} (same jobs, weights, data)"
                if reused
                else "same run"
            ),
            "",
            "Each row of this project is followed by Concrete ML compiled like for like (the "
            "same error probability and `n_bits`; its approximate rounding where ours rounds "
            "approximately or searches the precision with `auto`), and each target ends with "
            "Concrete ML at its defaults (its own error probability, the options of issue 9).",
            "",
        ]
        lines += _table(comparison_rows(rows, reference), COMPARISON_COLUMNS)
        compared = [_display(r) for r in rows if row_key(r) in reference]
        lines += [
            "",
            "Ratios are this project / Concrete ML like for like (the row above each of "
            "ours; lower is better, except throughput); accuracy difference in points of "
            "simulate accuracy.",
            "",
        ]
        lines += _table(
            [
                dict(
                    r,
                    cml_rounding=reference[row_key(r)].get("rounding"),
                    cml_status=reference[row_key(r)].get("status"),
                )
                for r in compared
            ],
            (
                ("target", "key"),
                ("error probability", "error_probability"),
                ("rounding", "rounding"),
                ("CML rounding", "cml_rounding"),
                ("accuracy diff", "simulate_accuracy_difference"),
            )
            + tuple((title, column) for column, _, title in RATIOS)
            + (("CML status", "cml_status"),),
        )
    batch_rows = [r for r in rows + list((reference or {}).values()) if r.get("execute_batch")]
    if batch_rows:
        lines += ["", "## One sample against a batch (encrypted)", ""]
        lines += _table(
            [
                dict(
                    _display(r, _who(r) if r.get("compiler") == "Concrete ML" else None),
                    speedup=r["execute_seconds_per_sample"] / r["execute_batch_seconds_per_sample"],
                )
                for r in batch_rows
            ],
            (
                ("target", "key"),
                ("compiler", "who"),
                *SETTING_COLUMNS,
                ("1 sample s", "execute_seconds_per_sample"),
                ("cores busy (1 sample)", "execute_cores_busy"),
                ("batch", "execute_batch"),
                ("batch s/sample", "execute_batch_seconds_per_sample"),
                ("cores busy (batch)", "execute_batch_cores_busy"),
                ("speed-up", "speedup"),
            ),
        )
    lines += [""] + timing_notes(rows, env, reference)
    failed = [r for r in rows if r.get("status") != "ok"]
    failed += [r for r in (reference or {}).values() if r.get("status") not in ("ok", None)]
    if failed:
        lines += ["", "## Not measured", ""]
        lines += [
            f"- `{row_key(r)}`{' (Concrete ML)' if r in (reference or {}).values() else ''}: "
            f"{r.get('status')}: {str(r.get('error', '')).splitlines()[0] if r.get('error') else ''}"
            for r in failed
        ]
    return "\n".join(lines) + "\n"


# ---- the plot -------------------------------------------------------------------------------


def log_ticks(low: float, high: float, most: int = 8) -> List[float]:
    """Readable ticks of a log axis over [low, high]: 1-2-5 steps of each decade, thinned to
    whole decades on wide ranges and refined on narrow ones (at least 2 ticks, at most `most`)."""
    import math

    def ticks(subs: Sequence[float], every: int = 1) -> List[float]:
        first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
        return [
            sub * 10.0**exponent
            for exponent in range(first, last + 1)
            if (exponent - first) % every == 0
            for sub in subs
            if low <= sub * 10.0**exponent <= high
        ]

    finest = (1, 1.2, 1.4, 1.6, 1.8, 2, 2.5, 3, 3.5, 4, 4.5, 5, 6, 7, 8, 9)  # 2+ ticks per factor 1.5
    for subs in ((1, 2, 5), (1, 1.5, 2, 3, 4, 5, 6, 8), finest):
        found = ticks(subs)
        if len(found) > most:
            every = 1
            while len(ticks((1,), every)) > most:
                every += 1
            return ticks((1,), every)
        if len(found) >= 2:
            return found
    from matplotlib.ticker import MaxNLocator  # a narrow range: round numbers inside it

    return [float(t) for t in MaxNLocator(nbins=3).tick_values(low, high) if low <= t <= high]


def tick_label(value: float) -> str:
    """A short tick label: 20, 0.5, 2e10."""
    import math

    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:g}"
    exponent = math.floor(math.log10(abs(value)))
    return f"{value / 10**exponent:g}e{exponent}"


def _readable_log_axis(axis: Any, which: str, values: Sequence[float]) -> None:
    """Log scale on `which` ("x" or "y") with `log_ticks` labels only (no minor labels)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    low, high = min(values) / 1.25, max(values) * 1.25
    scale_axis = axis.xaxis if which == "x" else axis.yaxis
    getattr(axis, f"set_{which}scale")("log")
    getattr(axis, f"set_{which}lim")(low, high)
    scale_axis.set_major_locator(FixedLocator(log_ticks(low, high)))
    scale_axis.set_major_formatter(FuncFormatter(lambda value, _: tick_label(value)))
    scale_axis.set_minor_formatter(NullFormatter())


def series_label(row: Dict[str, Any]) -> str:
    """Legend text of a row's series: who compiled it, at which error probability, how rounded."""
    return f"{_who(row)}: {row.get('error_probability', '?')}, rounding {row.get('rounding', '?')}"


def build_figure(rows: List[Dict[str, Any]], reference: Optional[Dict[str, Dict[str, Any]]] = None):
    """The figure of the results (see `plot`); the caller closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed_rows = [r for r in rows if r.get("execute_seconds_per_sample")]
    figure, axes = plt.subplots(
        1, 2 if timed_rows else 1, squeeze=False, figsize=(15 if timed_rows else 8, 6)
    )
    _accuracy_panel(axes[0][0], rows, reference)
    if timed_rows:
        _time_panel(axes[0][1], timed_rows, reference or {})
    figure.suptitle("accuracy against FHE cost" + (", and encrypted time per target" if timed_rows else ""))
    figure.tight_layout()
    return figure


def _accuracy_panel(
    axis: Any, rows: List[Dict[str, Any]], reference: Optional[Dict[str, Dict[str, Any]]]
) -> None:
    """Simulate accuracy against complexity, one series per compiler, error probability, rounding."""
    everything = [_display(r) for r in rows] + [_display(r, _who(r)) for r in (reference or {}).values()]
    points = [r for r in everything if r.get("complexity") and r.get("simulate_accuracy") is not None]
    series: Dict[str, List[Dict[str, Any]]] = {}
    for row in points:
        series.setdefault(series_label(row), []).append(row)
    markers = {"fhe_backend": "o", "Concrete ML (like for like)": "s", "Concrete ML defaults": "^"}
    for label, items in series.items():
        axis.scatter(
            [r["complexity"] for r in items],
            [r["simulate_accuracy"] for r in items],
            marker=markers.get(_who(items[0]), "D"),
            label=label,
            s=40,
        )
        for r in items:
            axis.annotate(
                r["target"],
                (r["complexity"], r["simulate_accuracy"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
    if points:
        _readable_log_axis(axis, "x", [r["complexity"] for r in points])
        axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=7, ncol=1)
    axis.set_xlabel("circuit complexity (Concrete's cost model, log scale)")
    axis.set_ylabel("simulate accuracy (gpt2: agreement with float)")
    axis.grid(True, alpha=0.3)


def _time_panel(axis: Any, rows: List[Dict[str, Any]], reference: Dict[str, Dict[str, Any]]) -> None:
    """Execute seconds per sample and keygen seconds per target, ours beside Concrete ML's
    like-for-like compilation (same error probability), as grouped bars."""
    import numpy as np

    sides = [("fhe_backend", lambda r: r)]
    if any(reference.get(row_key(r), {}).get("execute_seconds_per_sample") for r in rows):
        sides.append(("Concrete ML (like for like)", lambda r: reference.get(row_key(r), {})))
    figures = (("execute_seconds_per_sample", "execute s/sample", None), ("keygen_seconds", "keygen s", "//"))
    bars = [(side, pick, figure, title, hatch) for figure, title, hatch in figures for side, pick in sides]
    width = 0.8 / len(bars)
    positions = np.arange(len(rows))
    colors = {"fhe_backend": "tab:blue", "Concrete ML (like for like)": "tab:orange"}
    values = []
    errors = sorted({r.get("error_probability", "?") for r in rows})
    for index, (side, pick, figure, title, hatch) in enumerate(bars):
        heights = [pick(r).get(figure) or 0.0 for r in rows]
        values += [h for h in heights if h > 0]
        axis.bar(
            positions + (index - (len(bars) - 1) / 2) * width,
            heights,
            width,
            hatch=hatch,
            color=colors[side],
            edgecolor="black",
            linewidth=0.5,
            label=f"{side}: {title}" + (f" ({errors[0]})" if len(errors) == 1 else ""),
        )
    labels = []
    for row in rows:
        other = reference.get(row_key(row), {})
        text = f"{row_key(row)}\n{row.get('error_probability', '?')}\nours: {row.get('rounding', '?')}"
        labels.append(text + (f"\nCML: {other['rounding']}" if other.get("rounding") else ""))
    axis.set_xticks(positions)
    axis.set_xticklabels(labels, fontsize=7)
    if values and max(values) / min(values) > 20:
        _readable_log_axis(axis, "y", values)
    axis.set_ylabel("seconds (execute: median per sample; keygen: one run)")
    axis.set_title("encrypted run, same error probability on both sides", fontsize=9)
    axis.grid(True, axis="y", alpha=0.3)
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), fontsize=7, ncol=2)


def plot(
    rows: List[Dict[str, Any]], path: Path, reference: Optional[Dict[str, Dict[str, Any]]] = None
) -> None:
    """Simulate accuracy against complexity (every row, Concrete ML's too), and with --execute a
    second panel of execute seconds per sample and keygen seconds per target."""
    import matplotlib.pyplot as plt

    figure = build_figure(rows, reference)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
