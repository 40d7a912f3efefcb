"""`fhe-backend bench`: run the benchmark targets and write results.json, results.md, a plot.

Every target is built with fixed seeds, compiled with the `fhe` backend and measured (see
`benchmarks.measure`); a target that fails is recorded with its error, the others still run.
`--error-probability` runs every target at each error probability given. With
``--compare-python PATH`` the same targets (same weights, same data) also run through
Concrete ML's public API in the Python environment at PATH (`compare_concrete_ml.py`, a
subprocess exchanging JSON files), like for like (the same error probability, its approximate
rounding where ours rounds approximately or searches the precision) and with its defaults, and
ratio columns against the like-for-like row are added.
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
from typing import Any, Dict, List, Optional, Tuple

from . import models
from .measure import MEASURES, BenchConfig, PeakMemory, concrete_configuration
from .report import add_ratios, environment, load_average, write_all
from .targets import (
    BY_NAME,
    CONCRETE_ML_DEFAULT_P_ERROR,
    DEFAULTS_SUFFIX,
    Target,
    concrete_ml_like_for_like,
    error_label,
    format_probability,
    parse_error,
    rounding_label,
    select,
)

COMPARE_SCRIPT = Path(__file__).with_name("compare_concrete_ml.py")
# job settings that earlier job files may lack, with the value they then had
JOB_DEFAULTS = {"batch": 0, "configuration": None, "simulate_runs": 1}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `fhe-backend bench`."""
    parser.add_argument(
        "--targets", default="", help=f"comma-separated target names (default: all): {','.join(BY_NAME)}"
    )
    parser.add_argument(
        "--execute", action="store_true", help="also generate keys and run encrypted samples (slow)"
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=3,
        help="encrypted samples timed one by one per target with --execute (the median is reported)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=0,
        metavar="N",
        help="with --execute, also time one encrypted batch of N samples and the CPU "
        "time it used (does execute use every core?)",
    )
    parser.add_argument(
        "--simulate-runs",
        type=int,
        default=1,
        metavar="N",
        help="simulate the test samples N times per target and report the mean accuracy and its "
        "standard deviation (Concrete's simulator draws errors at random: one run varies by about a point)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=models.SEED,
        metavar="N",
        help="seed of the digits train/test split, every model's initial weights and training, "
        f"and the GPT-2 tokens (default: {models.SEED}); the same on both sides of --compare-python. "
        "Rerun with other seeds to see how much of an accuracy difference one draw explains",
    )
    parser.add_argument(
        "--eval-samples",
        type=int,
        default=None,
        help="test samples scored in disable/simulate (default: the whole test split)",
    )
    parser.add_argument(
        "--error-probability",
        default="default",
        metavar="SPEC,...",
        help="run every target at each error probability: p_error=2**-40 (per lookup), "
        "global_p_error=1e-5 (per inference), default (the target's own options); "
        "comma-separated",
    )
    parser.add_argument(
        "--configuration",
        default=None,
        metavar="JSON",
        help="keyword arguments of concrete.fhe.Configuration for every compilation, on "
        "both sides, e.g. '{\"compress_evaluation_keys\": true}'; "
        "approximate_rounding_config takes a dict of fhe.ApproximateRoundingConfig's "
        "fields",
    )
    parser.add_argument(
        "--runner",
        default=None,
        help="with --execute, how encrypted batches run: local, threads, or ray (a Ray cluster: "
        "RAY_ADDRESS, else a local instance; pip install 'fhe-backend[ray]') (default: the option's default)",
    )
    parser.add_argument("--out", default="bench-results", help="output folder (default: bench-results)")
    parser.add_argument(
        "--compare-python",
        default=None,
        metavar="PATH",
        help="python interpreter of an environment with concrete-ml installed: run the "
        "same targets through Concrete ML (like for like, and with its defaults) "
        "and add ratio columns",
    )
    parser.add_argument(
        "--concrete-ml-results",
        default=None,
        metavar="DIR",
        help="with --compare-python, reuse Concrete ML's measurements from an earlier run's "
        "output folder for every compilation that is the same there (same options, execute "
        "settings, configuration, trained weights and data); only the others run",
    )


def run(args: argparse.Namespace) -> int:
    """Run the selected targets; returns 0 when every target was measured."""
    if args.samples < 1:
        raise SystemExit("fhe-backend bench: --samples must be >= 1")
    if args.batch < 0:
        raise SystemExit("fhe-backend bench: --batch must be >= 0")
    if args.simulate_runs < 1:
        raise SystemExit("fhe-backend bench: --simulate-runs must be >= 1")
    if not 0 <= args.seed < 2**32:  # what numpy's and scikit-learn's generators take
        raise SystemExit(f"fhe-backend bench: --seed must be in [0, 2**32), got {args.seed}")
    targets = select(args.targets.split(","))
    errors = [parse_error(spec) for spec in args.error_probability.split(",")]
    # absolute: the Concrete ML process runs in the repository, not in the caller's folder
    config = BenchConfig(
        execute=args.execute,
        samples=args.samples,
        eval_samples=args.eval_samples,
        out=Path(args.out).resolve(),
        batch=args.batch,
        configuration=parse_configuration(args.configuration),
        runner=args.runner,
        simulate_runs=args.simulate_runs,
        seed=args.seed,
    )
    config.out.mkdir(parents=True, exist_ok=True)
    env = environment(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:])
    env["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
    variants = [
        (target.with_error(error), variant_key(target, error, len(errors) > 1))
        for target in targets
        for error in errors
    ]
    rows = [
        run_target(target, config, index, len(variants), key) for index, (target, key) in enumerate(variants)
    ]
    reference, info = None, None
    if args.compare_python:
        reuse = Path(args.concrete_ml_results).resolve() if args.concrete_ml_results else None
        reference, info = compare_with_concrete_ml(args.compare_python, variants, rows, config, reuse)
        add_ratios(rows, reference)
    env["load_average_end"] = load_average()
    paths = write_all(config.out, rows, env, reference, info)
    _say(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0 if all(row["status"] == "ok" for row in rows) else 1


def parse_configuration(text: Optional[str]) -> Optional[Dict[str, Any]]:
    """--configuration JSON -> keyword arguments of concrete.fhe.Configuration (checked here)."""
    if not text:
        return None
    from fhe_backend.errors import OptionError

    try:
        kwargs = json.loads(text)
    except ValueError as error:
        raise OptionError(
            f"--configuration {text!r}: not JSON ({error}); expected an object of "
            "concrete.fhe.Configuration keyword arguments"
        ) from None
    if not isinstance(kwargs, dict):
        raise OptionError(
            f"--configuration {text!r}: expected a JSON object of "
            "concrete.fhe.Configuration keyword arguments"
        )
    try:
        concrete_configuration(kwargs)
    except (TypeError, ValueError, KeyError) as error:
        raise OptionError(
            f"--configuration {text!r}: concrete.fhe.Configuration rejects it: {error}"
        ) from None
    return kwargs


def variant_key(target: Target, error: Dict[str, float], several: bool) -> str:
    """The row's name: the target's, with its error probability when several are run."""
    if not several:
        return target.name
    if not error:
        return f"{target.name}@default"
    ((name, value),) = error.items()
    return f"{target.name}@{name}={format_probability(value)}"


def our_defaults() -> Dict[str, Any]:
    """The backend's default error options (both None: concrete-python's default budget)."""
    from fhe_backend.settings import FheSettings

    defaults = FheSettings()
    return {"p_error": defaults.p_error, "global_p_error": defaults.global_p_error}


def run_target(
    target: Target, config: BenchConfig, index: int, total: int, key: Optional[str] = None
) -> Dict[str, Any]:
    """Measure one target; a failure becomes the row's status and error instead of a crash."""
    start = time.perf_counter()
    key = key or target.name

    def progress(step: str) -> None:
        _say(f"[{index + 1}/{total} {key}] {step} ({time.perf_counter() - start:.1f}s)")

    progress("start: " + target.description)
    row: Dict[str, Any] = {
        "target": target.name,
        "key": key,
        "description": target.description,
        "options": target.options,
        "compiler": "fhe_backend",
        "error_probability": error_label(target.options, our_defaults()),
        "rounding": rounding_label(target.options),
        "configuration": config.configuration,
    }
    memory = PeakMemory()
    try:
        with memory:
            row.update(MEASURES[target.kind](target, config, progress))
        row["status"] = "ok"
    except ImportError as error:
        row.update(status="unavailable", error=f"{type(error).__name__}: {error}")
    except Exception as error:  # noqa: BLE001 - a failing target is a result, not a crash
        row.update(
            status="error", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc(limit=8)
        )
    row["peak_memory_mb"] = memory.peak_mb
    row["total_seconds"] = time.perf_counter() - start
    progress(f"done: {row['status']}" + (f" ({row.get('error')})" if row["status"] != "ok" else ""))
    return row


def concrete_ml_jobs(variants: List[Tuple[Target, str]], rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Concrete ML's compilations for the measured rows: like for like for each row, and one
    "Concrete ML defaults" row per target (measured once when it is the same compilation)."""
    measured = {row["key"] for row in rows if row["status"] == "ok"}
    cml_defaults = {"p_error": CONCRETE_ML_DEFAULT_P_ERROR}
    jobs: Dict[str, Dict[str, Any]] = {}
    for target, key in variants:
        if not target.comparable or key not in measured:
            continue
        like = concrete_ml_like_for_like(target.options, our_defaults())
        jobs[key] = _job(target, key, like, "like for like", error_label(like))
        default_key = target.name + DEFAULTS_SUFFIX
        if default_key in jobs or any(default_key in job["aliases"] for job in jobs.values()):
            continue
        options = target.concrete_ml_defaults
        if concrete_ml_like_for_like(options, cml_defaults) == like:
            jobs[key]["aliases"].append(default_key)  # the same compilation: measured once
            continue
        jobs[default_key] = _job(
            target,
            default_key,
            options,
            "Concrete ML defaults",
            error_label(options, cml_defaults, "Concrete ML default"),
        )
    return list(jobs.values())


def _job(target: Target, key: str, options: Dict[str, Any], role: str, error: str) -> Dict[str, Any]:
    return dict(
        key=key,
        name=target.name,
        kind=target.kind,
        model=target.model,
        qat=target.qat,
        options=options,
        role=role,
        aliases=[],
        error_probability=error,
        rounding=rounding_label(options),
    )


def _job_document(jobs: List[Dict[str, Any]], config: BenchConfig) -> Dict[str, Any]:
    return {
        "targets": jobs,
        "models": str(config.out / "models"),
        "execute": config.execute,
        "samples": config.samples,
        "eval_samples": config.eval_samples,
        "batch": config.batch,
        "configuration": config.configuration,
        "simulate_runs": config.simulate_runs,
    }


def reusable_results(
    folder: Path, jobs: List[Dict[str, Any]], config: BenchConfig
) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Any]]:
    """Concrete ML's results of an earlier run (`folder`) for the jobs that are the same there:
    same job (options, role, error probability), same execute settings and configuration, and
    the same trained weights and data. Returns ({key: result}, that run's environment)."""
    import numpy as np
    import torch

    try:
        earlier = json.loads((folder / "concrete_ml_job.json").read_text())
        document = json.loads((folder / "concrete_ml_results.json").read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"fhe-backend bench: --concrete-ml-results {folder}: {error}") from error
    settings = {k: v for k, v in _job_document([], config).items() if k not in ("targets", "models")}
    if any(earlier.get(k, JOB_DEFAULTS.get(k)) != v for k, v in settings.items()):
        _say(f"[concrete-ml] {folder}: other execute settings or configuration, nothing reused")
        return {}, {}
    results = {result.get("key"): result for result in document.get("results", [])}

    def same_file(name: str) -> bool:
        mine, theirs = config.out / "models" / name, folder / "models" / name
        if not (mine.exists() and theirs.exists()):
            return False
        if name.endswith(".npz"):
            with np.load(mine) as a, np.load(theirs) as b:
                return sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files)
        a, b = torch.load(mine), torch.load(theirs)
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    reused = {}
    for job in jobs:
        old = next((j for j in earlier.get("targets", []) if j == job), None)
        result = results.get(job["key"])
        data = "digits.npz" if job["kind"] == "digits" else None
        if old is None or result is None or result.get("status") != "ok":
            continue
        if not same_file(f"{job['name']}.pt") or (data and not same_file(data)):
            continue
        reused[job["key"]] = dict(result, reused_from=str(folder))
    return reused, document.get("environment", {})


def compare_with_concrete_ml(
    python: str,
    variants: List[Tuple[Target, str]],
    rows: List[Dict[str, Any]],
    config: BenchConfig,
    reuse: Optional[Path] = None,
):
    """Run compare_concrete_ml.py in the other environment; (rows by key, its versions).

    With `reuse` (an earlier run's output folder), the compilations that are the same there
    are not run again: their results are read from it (marked `reused_from`)."""
    all_jobs = concrete_ml_jobs(variants, rows)
    reused, reused_environment = reusable_results(reuse, all_jobs, config) if reuse else ({}, {})
    if reused:
        _say(f"[concrete-ml] reusing {len(reused)} result(s) from {reuse}: {', '.join(reused)}")
    jobs = [job for job in all_jobs if job["key"] not in reused]
    job_path, result_path = config.out / "concrete_ml_job.json", config.out / "concrete_ml_results.json"
    job_path.write_text(json.dumps(_job_document(jobs, config), indent=2))
    skipped = {
        key: {
            "target": t.name,
            "key": key,
            "status": "not compared",
            "error": "no Concrete ML counterpart in compare_concrete_ml.py",
        }
        for t, key in variants
        if not t.comparable
    }
    _say(f"[concrete-ml] running {len(jobs)} compilation(s) with {python}")
    repo_root = str(Path(__file__).resolve().parent.parent)
    failure = None
    result_path.unlink(missing_ok=True)  # never read a previous run's results
    try:
        if jobs:
            _run_echoing_stderr([python, str(COMPARE_SCRIPT), str(job_path), str(result_path)], repo_root)
        else:
            result_path.write_text(json.dumps({"results": [], "environment": reused_environment}))
    except (OSError, subprocess.CalledProcessError) as error:
        failure = f"{type(error).__name__}: {error}"
        if isinstance(error, subprocess.CalledProcessError) and error.stderr:
            failure += f"; its last output: {error.stderr}"
        _say(f"[concrete-ml] failed: {failure}")
    try:  # what it measured before a failure is kept (it writes after every compilation)
        document = json.loads(result_path.read_text())
    except (OSError, ValueError) as error:
        failure = failure or f"{type(error).__name__}: {error}"
        document = {"results": []}
    measured = dict(reused)
    for index, job in enumerate(jobs):
        measured[job["key"]] = (
            document["results"][index]
            if index < len(document["results"])
            else {
                "target": job["name"],
                "key": job["key"],
                "role": job["role"],
                "error_probability": job["error_probability"],
                "rounding": job["rounding"],
                "status": "error",
                "error": failure,
            }
        )
    # the folder holds every compilation's result, measured or reused: a later run can reuse it
    job_path.write_text(json.dumps(_job_document(all_jobs, config), indent=2))
    environment = document.get("environment") or reused_environment
    result_path.write_text(
        json.dumps(
            {"results": [measured[job["key"]] for job in all_jobs], "environment": environment}, indent=2
        )
    )
    reference = {}
    for job in all_jobs:
        result = measured[job["key"]]
        reference[job["key"]] = result
        for alias in job["aliases"]:
            reference[alias] = dict(
                result,
                key=alias,
                role="Concrete ML defaults",
                same_as=job["key"],
                error_probability=f"{job['error_probability']} (Concrete ML default)",
            )
    return {**skipped, **reference}, ({**environment, "error": failure} if failure else environment)


def _run_echoing_stderr(command: List[str], cwd: str, keep: int = 5) -> None:
    """Run `command`, echoing its stderr (its progress) as it comes; a failure raises
    CalledProcessError with the last `keep` lines of that stderr."""
    lines: List[str] = []
    with subprocess.Popen(command, cwd=cwd, stderr=subprocess.PIPE, text=True) as process:
        for line in process.stderr:
            sys.stderr.write(line)
            lines = (lines + [line.rstrip()])[-keep:]
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command, stderr=" | ".join(lines))


def _say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m fhe_backend.benchmarks.runner ...` (same as `fhe-backend bench ...`)."""
    parser = argparse.ArgumentParser(prog="fhe-backend bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
