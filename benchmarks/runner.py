"""`fhe-backend bench`: run the benchmark targets and write results.json, results.md, a plot.

Every target is built with fixed seeds, compiled with the `fhe` backend and measured (see
`benchmarks.measure`); a target that fails is recorded with its error, the others still run.
With ``--compare-python PATH`` the same targets (same weights, same data) also run through
Concrete ML's public API in the Python environment at PATH (`compare_concrete_ml.py`, a
subprocess exchanging JSON files), and ratio columns are added.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional

from .measure import MEASURES, BenchConfig, PeakMemory
from .report import add_ratios, environment, write_all
from .targets import BY_NAME, Target, select

COMPARE_SCRIPT = Path(__file__).with_name("compare_concrete_ml.py")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `fhe-backend bench`."""
    parser.add_argument("--targets", default="",
                        help=f"comma-separated target names (default: all): {','.join(BY_NAME)}")
    parser.add_argument("--execute", action="store_true",
                        help="also generate keys and run encrypted samples (slow)")
    parser.add_argument("--samples", type=int, default=3,
                        help="encrypted samples timed per target with --execute (median reported)")
    parser.add_argument("--eval-samples", type=int, default=None,
                        help="test samples scored in disable/simulate (default: the whole test split)")
    parser.add_argument("--out", default="bench-results", help="output folder (default: bench-results)")
    parser.add_argument("--compare-python", default=None, metavar="PATH",
                        help="python interpreter of an environment with concrete-ml installed: run the "
                             "same targets through Concrete ML and add ratio columns")


def run(args: argparse.Namespace) -> int:
    """Run the selected targets; returns 0 when every target was measured."""
    if args.samples < 1:
        raise SystemExit("fhe-backend bench: --samples must be >= 1")
    targets = select(args.targets.split(","))
    config = BenchConfig(execute=args.execute, samples=args.samples, eval_samples=args.eval_samples,
                         out=Path(args.out))
    config.out.mkdir(parents=True, exist_ok=True)
    env = environment(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:])
    env["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
    rows = [run_target(target, config, index, len(targets)) for index, target in enumerate(targets)]
    reference, info = None, None
    if args.compare_python:
        reference, info = compare_with_concrete_ml(args.compare_python, targets, rows, config)
        add_ratios(rows, reference)
    paths = write_all(config.out, rows, env, reference, info)
    _say(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0 if all(row["status"] == "ok" for row in rows) else 1


def run_target(target: Target, config: BenchConfig, index: int, total: int) -> Dict[str, Any]:
    """Measure one target; a failure becomes the row's status and error instead of a crash."""
    start = time.perf_counter()

    def progress(step: str) -> None:
        _say(f"[{index + 1}/{total} {target.name}] {step} ({time.perf_counter() - start:.1f}s)")

    progress("start: " + target.description)
    row: Dict[str, Any] = {"target": target.name, "description": target.description,
                           "options": target.options}
    memory = PeakMemory()
    try:
        with memory:
            row.update(MEASURES[target.kind](target, config, progress))
        row["status"] = "ok"
    except ImportError as error:
        row.update(status="unavailable", error=f"{type(error).__name__}: {error}")
    except Exception as error:  # noqa: BLE001 - a failing target is a result, not a crash
        row.update(status="error", error=f"{type(error).__name__}: {error}",
                   traceback=traceback.format_exc(limit=8))
    row["peak_memory_mb"] = memory.peak_mb
    row["total_seconds"] = time.perf_counter() - start
    progress(f"done: {row['status']}" + (f" ({row.get('error')})" if row["status"] != "ok" else ""))
    return row


def compare_with_concrete_ml(python: str, targets: List[Target], rows: List[Dict[str, Any]],
                             config: BenchConfig):
    """Run compare_concrete_ml.py in the other environment; (rows by target, its versions)."""
    measured = {row["target"] for row in rows if row["status"] == "ok"}
    jobs = [dict(name=t.name, kind=t.kind, model=t.model, options=t.reference_options, qat=t.qat)
            for t in targets if t.comparable and t.name in measured]
    job_path, result_path = config.out / "concrete_ml_job.json", config.out / "concrete_ml_results.json"
    job_path.write_text(json.dumps({"targets": jobs, "models": str(config.out / "models"),
                                    "execute": config.execute, "samples": config.samples,
                                    "eval_samples": config.eval_samples}, indent=2))
    skipped = {t.name: {"target": t.name, "status": "not compared",
                        "error": "no Concrete ML counterpart in compare_concrete_ml.py"}
               for t in targets if not t.comparable}
    _say(f"[concrete-ml] running {len(jobs)} target(s) with {python}")
    repo_root = str(Path(__file__).resolve().parent.parent)
    try:
        subprocess.run([python, str(COMPARE_SCRIPT), str(job_path), str(result_path)],
                       check=True, cwd=repo_root)
        document = json.loads(result_path.read_text())
    except (OSError, subprocess.CalledProcessError, ValueError) as error:
        failure = f"{type(error).__name__}: {error}"
        _say(f"[concrete-ml] failed: {failure}")
        return {**skipped, **{j["name"]: {"target": j["name"], "status": "error", "error": failure}
                              for j in jobs}}, {"error": failure}
    reference = {row["target"]: row for row in document["results"]}
    return {**skipped, **reference}, document.get("environment", {})


def _say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m benchmarks.runner ...` (same as `fhe-backend bench ...`)."""
    parser = argparse.ArgumentParser(prog="fhe-backend bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
