"""Run benchmark targets through Concrete ML's public API, in Concrete ML's own environment.

Usage (the runner does this with ``fhe-backend bench --compare-python PATH``)::

    PATH benchmarks/compare_concrete_ml.py JOB.json RESULTS.json

JOB.json names the targets, the folder with the weights trained by this project's run (and
the data), and the execute settings. The figures are measured by the same functions as this
project's (`benchmarks.measure`), on the same weights and data; only the compiler differs:
`concrete.ml.torch.compile.compile_torch_model` / `compile_brevitas_qat_model`. This script
imports nothing from fhe_backend (that environment does not have it).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any, Dict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import models  # noqa: E402
from benchmarks.measure import (  # noqa: E402
    BenchConfig,
    PeakMemory,
    circuit_figures,
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
    def statistics(self) -> Dict[str, Any]:
        """pbs_count, max_bit_width and complexity of the Concrete circuit."""
        circuit = self.module.fhe_circuit
        return {"pbs_count": int(circuit.programmable_bootstrap_count),
                "max_bit_width": int(circuit.graph.maximum_integer_bit_width()),
                "complexity": float(circuit.complexity)}

    def keygen(self, force: bool = False) -> None:
        """Generate the circuit's keys."""
        self.module.fhe_circuit.keygen(force=force)

    def run(self, mode: str, x: torch.Tensor) -> torch.Tensor:
        """The module's float output in a mode (disable, simulate, execute)."""
        return torch.as_tensor(np.asarray(self.module.forward(x.numpy(), fhe=mode)))


def compile_with_concrete_ml(target: Target, model: torch.nn.Module, x_train: torch.Tensor,
                             _first_input: torch.Tensor = None):
    """Concrete ML's compile for a target: (run(mode, x), [circuit])."""
    from concrete.ml.torch.compile import compile_brevitas_qat_model, compile_torch_model

    compile_function = compile_brevitas_qat_model if target.qat else compile_torch_model
    module, seconds = timed(lambda: compile_function(model, x_train.numpy(), **target.options))
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
    (run, circuits), compile_seconds = timed(lambda: compile_with_concrete_ml(target, block, x))
    row: Dict[str, Any] = {"metric": "MLP block output error", "compile_seconds": compile_seconds,
                           "eval_samples": len(x), **circuit_figures(circuits)}
    evaluate_modes(row, run, x, reference, lambda outputs, rows: None, circuits, config, progress)
    return row


def measure(job_target: Dict[str, Any], config: BenchConfig, folder: Path) -> Dict[str, Any]:
    """One target's row, or its error."""
    target = Target(description="", **job_target)
    start = time.perf_counter()

    def progress(step: str) -> None:
        print(f"[concrete-ml {target.name}] {step} ({time.perf_counter() - start:.1f}s)",
              file=sys.stderr, flush=True)

    row: Dict[str, Any] = {"target": target.name}
    memory = PeakMemory()
    try:
        with memory:
            if target.kind == "digits":
                model = models.DIGITS_MODELS[target.model][0]()
                model.load_state_dict(torch.load(folder / f"{target.name}.pt"))
                data = dict(np.load(folder / "digits.npz"))
                row.update(measure_digits(target, config, progress, trained=(model.eval(), data),
                                          compiler=compile_with_concrete_ml))
            elif target.kind == "gpt2_hybrid":
                row.update(measure_gpt2_block(target, config, progress, folder))
            else:
                raise NotImplementedError(f"no Concrete ML counterpart for kind {target.kind!r}")
        row["status"] = "ok"
    except Exception as error:  # noqa: BLE001 - a failing target is a result
        row.update(status="error", error=f"{type(error).__name__}: {error}",
                   traceback=traceback.format_exc(limit=8))
    row["peak_memory_mb"] = memory.peak_mb
    progress(f"done: {row['status']}")
    return row


def main(job_path: str, result_path: str) -> int:
    """Run the job's targets; write {environment, results} to `result_path`."""
    job = json.loads(Path(job_path).read_text())
    config = BenchConfig(execute=job["execute"], samples=job["samples"], eval_samples=job["eval_samples"],
                         out=Path(job["models"]).parent)
    folder = Path(job["models"])
    environment = {"python": sys.version.split()[0]}
    for package in ("concrete-ml", "concrete-python", "torch", "brevitas", "numpy"):
        try:
            environment[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            environment[package] = None
    import concrete.ml.torch.compile  # noqa: F401 - imported here, not inside the compile timing

    rows = [measure(target, config, folder) for target in job["targets"]]
    Path(result_path).write_text(json.dumps({"environment": environment, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
