"""Writing the results: results.json (every figure and the environment), results.md, a plot."""

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

PACKAGES = ("fhe-backend", "torch", "concrete-python", "brevitas", "transformers", "peft", "numpy",
            "scikit-learn", "matplotlib")
# (ratio column, figure, description); ratio = this project / Concrete ML
RATIOS = (
    ("complexity_ratio", "complexity", "complexity"),
    ("pbs_ratio", "pbs_count", "PBS"),
    ("compile_ratio", "compile_seconds", "compile s"),
    ("keygen_ratio", "keygen_seconds", "keygen s"),
    ("execute_ratio", "execute_seconds_per_sample", "execute s/sample"),
    ("simulate_throughput_ratio", "simulate_samples_per_second", "simulate samples/s"),
)
MAIN_COLUMNS = (
    ("target", "target"), ("float", "float_accuracy"), ("disable", "disable_accuracy"),
    ("simulate", "simulate_accuracy"), ("execute", "execute_accuracy"), ("PBS", "pbs_count"),
    ("max bits", "max_bit_width"), ("max TLU bits", "max_tlu_bit_width"), ("complexity", "complexity"),
    ("compile s", "compile_seconds"), ("keygen s", "keygen_seconds"),
    ("execute s/sample", "execute_seconds_per_sample"), ("simulate samples/s", "simulate_samples_per_second"),
    ("peak MiB", "peak_memory_mb"), ("status", "status"),
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
        "machine": {"platform": platform.platform(), "processor": _cpu_model(),
                    "cpu_count": os.cpu_count(), "memory_gib": _memory_gib(),
                    "python": sys.version.split()[0]},
        "packages": versions,
        "git": _git(),
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
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  check=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def add_ratios(rows: List[Dict[str, Any]], reference: Dict[str, Dict[str, Any]]) -> None:
    """Add this-project / Concrete ML ratio columns (and the accuracy difference) to each row."""
    for row in rows:
        other = reference.get(row["target"])
        if not other or other.get("status") != "ok" or row.get("status") != "ok":
            continue
        for column, figure, _ in RATIOS:
            mine, theirs = row.get(figure), other.get(figure)
            if isinstance(mine, (int, float)) and isinstance(theirs, (int, float)) and theirs:
                row[column] = mine / theirs
        if other.get("metric") == row.get("metric") and row.get("simulate_accuracy") is not None \
                and other.get("simulate_accuracy") is not None:
            row["simulate_accuracy_difference"] = row["simulate_accuracy"] - other["simulate_accuracy"]


def write_all(out: Path, rows: List[Dict[str, Any]], env: Dict[str, Any],
              reference: Optional[Dict[str, Dict[str, Any]]] = None,
              comparison_info: Optional[Dict[str, Any]] = None) -> Dict[str, Path]:
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
    lines = ["| " + " | ".join(title for title, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for _, key in columns) + " |")
    return lines


def markdown(rows: List[Dict[str, Any]], env: Dict[str, Any],
             reference: Optional[Dict[str, Dict[str, Any]]] = None,
             comparison_info: Optional[Dict[str, Any]] = None) -> str:
    """The results as markdown tables, with the environment and the errors."""
    machine, packages, git = env["machine"], env["packages"], env["git"]
    lines = [
        "# fhe-backend benchmark results", "",
        f"`{env['command']}` on {env['date']}: {machine['processor']}, {machine['cpu_count']} cores, "
        f"{machine['memory_gib']} GiB, Python {machine['python']}; commit "
        f"{(git.get('commit') or 'unknown')[:10]}{' (dirty)' if git.get('dirty') else ''}; "
        + ", ".join(f"{name} {version}" for name, version in packages.items() if version) + ".", "",
        "Accuracy columns are top-1 accuracy on the digits test split; for `gpt2_mlp` they are the "
        "top-1 next-token agreement with the float model; `lora_step` reports losses below.", "",
    ]
    lines += _table(rows, MAIN_COLUMNS)
    lora = [r for r in rows if r.get("metric") == "training-step loss" and r.get("status") == "ok"]
    if lora:
        lines += ["", "LoRA training step (loss of the batch; LoRA gradients' relative L2 error against the float step):", ""]
        lines += _table(lora, (("target", "target"), ("float loss", "float_loss"),
                               ("disable loss", "disable_loss"), ("simulate loss", "simulate_loss"),
                               ("simulate gradient error", "simulate_gradient_error"),
                               ("simulate step s", "simulate_step_seconds"),
                               ("execute step s", "execute_step_seconds")))
    if reference is not None:
        info = comparison_info or {}
        lines += ["", f"## Against Concrete ML {info.get('concrete-ml', '')} "
                      f"(python {info.get('python', '?')}, torch {info.get('torch', '?')}), same run", "",
                  "Ratios are this project / Concrete ML (lower is better, except throughput); "
                  "accuracy difference in points of simulate accuracy.", ""]
        compared = [r for r in rows if r["target"] in reference]
        lines += _table([dict(r, cml_status=reference[r["target"]].get("status"),
                              cml_simulate=reference[r["target"]].get("simulate_accuracy"),
                              cml_pbs=reference[r["target"]].get("pbs_count"),
                              cml_complexity=reference[r["target"]].get("complexity"),
                              cml_execute=reference[r["target"]].get("execute_seconds_per_sample"))
                         for r in compared],
                        (("target", "target"), ("CML simulate", "cml_simulate"), ("CML PBS", "cml_pbs"),
                         ("CML complexity", "cml_complexity"), ("CML execute s", "cml_execute"),
                         ("accuracy diff", "simulate_accuracy_difference"))
                        + tuple((title, column) for column, _, title in RATIOS)
                        + (("CML status", "cml_status"),))
    failed = [r for r in rows if r.get("status") != "ok"]
    failed += [r for r in (reference or {}).values() if r.get("status") not in ("ok", None)]
    if failed:
        lines += ["", "## Not measured", ""]
        lines += [f"- `{r['target']}`{' (Concrete ML)' if r in (reference or {}).values() else ''}: "
                  f"{r.get('status')}: {str(r.get('error', '')).splitlines()[0] if r.get('error') else ''}"
                  for r in failed]
    return "\n".join(lines) + "\n"


def plot(rows: List[Dict[str, Any]], path: Path,
         reference: Optional[Dict[str, Dict[str, Any]]] = None) -> None:
    """Simulate accuracy against complexity (and against execute latency when measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_spec = [("complexity", "circuit complexity (Concrete's cost model, log)")]
    if any(r.get("execute_seconds_per_sample") for r in rows):
        axes_spec.append(("execute_seconds_per_sample", "execute seconds per sample (log)"))
    figure, axes = plt.subplots(1, len(axes_spec), figsize=(6.5 * len(axes_spec), 4.5), squeeze=False)
    series = [("fhe_backend", rows, "o")]
    if reference:
        series.append(("Concrete ML", list(reference.values()), "s"))
    for axis, (figure_key, label) in zip(axes[0], axes_spec):
        for name, items, marker in series:
            points = [(r[figure_key], r["simulate_accuracy"], r["target"]) for r in items
                      if r.get(figure_key) and r.get("simulate_accuracy") is not None]
            if not points:
                continue
            axis.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, label=name)
            for x, y, text in points:
                axis.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axis.set_xscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel("simulate accuracy (gpt2: agreement with float)")
        axis.grid(True, alpha=0.3)
        axis.legend(loc="lower left")
    figure.suptitle("accuracy against FHE cost")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
