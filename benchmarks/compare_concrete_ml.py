"""Run benchmark targets through Concrete ML's public API, in Concrete ML's own environment.

Usage (the runner does this with ``fhe-backend bench --compare-python PATH``)::

    PATH benchmarks/compare_concrete_ml.py JOB.json RESULTS.json

JOB.json names the compilations (a target with Concrete ML's options: like for like with this
project's row, or Concrete ML's defaults), the folder with the weights trained by this
project's run (and the data), and the execute settings. The figures are measured by the same functions as this
project's (`benchmarks.measure`), on the same weights and data; only the compiler differs:
`concrete.ml.torch.compile.compile_torch_model` / `compile_brevitas_qat_model`. This script
imports nothing from fhe_backend (that environment does not have it).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import models  # noqa: E402
from benchmarks.measure import (  # noqa: E402
    BenchConfig,
    PeakMemory,
    circuit_figures,
    compile_options,
    evaluate_modes,
    measure_digits,
    timed,
)
from benchmarks.targets import Target  # noqa: E402


class ConcreteMlCircuit:
    """A Concrete ML quantized module seen as a partition: statistics, keygen, compile time."""

    def __init__(self, quantized_module: Any, compile_seconds: float):
        self.module = quantized_module
        self.compile_seconds = compile_seconds

    @property
    def circuit(self) -> Any:
        """The module's Concrete circuit."""
        return self.module.fhe_circuit

    @property
    def statistics(self) -> Dict[str, Any]:
        """pbs_count, max_bit_width and complexity of the Concrete circuit."""
        circuit = self.module.fhe_circuit
        return {
            "pbs_count": int(circuit.programmable_bootstrap_count),
            "max_bit_width": int(circuit.graph.maximum_integer_bit_width()),
            "complexity": float(circuit.complexity),
        }

    def keygen(self, force: bool = False) -> None:
        """Generate the circuit's keys."""
        self.module.fhe_circuit.keygen(force=force)

    def run(self, mode: str, x: torch.Tensor) -> torch.Tensor:
        """The module's float output in a mode (disable, simulate, execute)."""
        return torch.as_tensor(np.asarray(self.module.forward(x.numpy(), fhe=mode)))


def compile_with_concrete_ml(
    target: Target,
    model: torch.nn.Module,
    x_train: torch.Tensor,
    _first_input: Optional[torch.Tensor],
    options: Dict[str, Any],
):
    """Concrete ML's compile for a target with `options`: (run(mode, x), [circuit])."""
    from concrete.ml.torch.compile import compile_brevitas_qat_model, compile_torch_model

    compile_function = compile_brevitas_qat_model if target.qat else compile_torch_model
    module, seconds = timed(lambda: compile_function(model, x_train.numpy(), **options))
    circuit = ConcreteMlCircuit(module, seconds)
    return circuit.run, [circuit]


def measure_gpt2_block(target: Target, config: BenchConfig, progress, folder: Path) -> Dict[str, Any]:
    """The GPT-2 MLP block (weights of this project's tiny GPT-2) on its recorded inputs.

    Concrete ML's hybrid model compiles the same block from the same activations; scored by
    the block output's error against float (no labels).
    """
    block = models.Gpt2MlpBlock()
    block.load_state_dict(torch.load(folder / f"{target.name}.pt"))
    block.eval()
    x = torch.from_numpy(np.load(folder / f"{target.name}_inputs.npz")["x"])
    with torch.no_grad():
        reference = block(x)
    progress("compiling")
    (run, circuits), compile_seconds = timed(
        lambda: compile_with_concrete_ml(target, block, x, None, compile_options(target, config))
    )
    row: Dict[str, Any] = {
        "metric": "MLP block output error",
        "compile_seconds": compile_seconds,
        "eval_samples": len(x),
        **circuit_figures(circuits),
    }
    evaluate_modes(row, run, x, reference, lambda outputs, rows: None, circuits, config, progress)
    return row


def measure(job: Dict[str, Any], config: BenchConfig, folder: Path) -> Dict[str, Any]:
    """One compilation's row, or its error."""
    target = Target(
        name=job["name"],
        description="",
        kind=job["kind"],
        model=job["model"],
        options=job["options"],
        qat=job["qat"],
    )
    start = time.perf_counter()

    def progress(step: str) -> None:
        print(
            f"[concrete-ml {job['key']}] {step} ({time.perf_counter() - start:.1f}s)",
            file=sys.stderr,
            flush=True,
        )

    if job["role"] == "Concrete ML defaults":
        config = replace(config, configuration=None)  # its own configuration too
    row: Dict[str, Any] = {
        "target": target.name,
        "compiler": "Concrete ML",
        **{k: job[k] for k in ("key", "role", "options", "error_probability", "rounding")},
    }
    memory = PeakMemory()
    try:
        with memory:
            if target.kind == "digits":
                model = models.DIGITS_MODELS[target.model][0]()
                model.load_state_dict(torch.load(folder / f"{target.name}.pt"))
                data = dict(np.load(folder / "digits.npz"))
                row.update(
                    measure_digits(
                        target,
                        config,
                        progress,
                        trained=(model.eval(), data),
                        compiler=compile_with_concrete_ml,
                    )
                )
            elif target.kind == "gpt2_hybrid":
                row.update(measure_gpt2_block(target, config, progress, folder))
            else:
                raise NotImplementedError(f"no Concrete ML counterpart for kind {target.kind!r}")
        row["status"] = "ok"
    except Exception as error:  # noqa: BLE001 - a failing target is a result
        row.update(
            status="error", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc(limit=8)
        )
    row["peak_memory_mb"] = memory.peak_mb
    progress(f"done: {row['status']}")
    return row


def main(job_path: str, result_path: str) -> int:
    """Run the job's targets; write {environment, results} to `result_path`."""
    job = json.loads(Path(job_path).read_text())
    config = BenchConfig(
        execute=job["execute"],
        samples=job["samples"],
        eval_samples=job["eval_samples"],
        out=Path(job["models"]).parent,
        batch=job.get("batch", 0),
        configuration=job.get("configuration"),
        simulate_runs=job.get("simulate_runs", 1),
    )
    folder = Path(job["models"])
    environment = {"python": sys.version.split()[0]}
    for package in ("concrete-ml", "concrete-python", "torch", "brevitas", "numpy"):
        try:
            environment[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            environment[package] = None
    try:
        import concrete.ml.torch.compile  # noqa: F401 - imported here, not inside the compile timing
    except ImportError as error:
        failure = (
            f"concrete-ml is not importable with {sys.executable} ({type(error).__name__}: "
            f"{error}): pass --compare-python the interpreter of an environment where "
            "`pip install concrete-ml==1.9.*` was run"
        )
        print(f"[concrete-ml] {failure}", file=sys.stderr, flush=True)
        rows = [
            {
                "target": target["name"],
                "compiler": "Concrete ML",
                "status": "unavailable",
                "error": failure,
                **{k: target[k] for k in ("key", "role", "options", "error_probability", "rounding")},
            }
            for target in job["targets"]
        ]
    else:
        rows = []
        for target in job["targets"]:
            rows.append(measure(target, config, folder))
            _write(result_path, environment, rows)  # what is measured survives an interruption
    _write(result_path, environment, rows)
    return 0


def _write(result_path: str, environment: Dict[str, Any], rows: List[Dict[str, Any]]) -> None:
    """Write {environment, results} to `result_path`."""
    Path(result_path).write_text(json.dumps({"environment": environment, "results": rows}, indent=2))


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
