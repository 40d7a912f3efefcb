"""Encrypted batches through the runners: local, threads, and Ray with 1 and 2 workers.

    python -m benchmarks.ray_execute --samples 16 --rounds 3 --out ray_execute.json

Compiles the lookup FCSmall (FCSmall(4), `seq` in FHE, 3-bit lookups, p_error 2**-40),
generates its keys once, then runs the same batch of `--samples` encrypted samples through
each runner of `fhe_backend.circuit_runner` and reports the wall time, the CPU time of this
process, and whether every output equals the local runner's. One sample alone, timed with its
CPU time, says whether Concrete's runtime already keeps several cores busy on one sample.
Ray runs on a local instance of `--ray-cpus` CPUs (started and shut down here); its first
batch, which starts the workers and ships the circuit and keys, is reported apart. The runners
are measured in `--rounds` interleaved rounds and the table gives medians (the machine may be
shared).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch


def timed_cpu(function: Callable[[], Any]) -> Tuple[Any, float, float]:
    """(result, wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def build(folder: Path) -> Tuple[Any, List[Tuple[np.ndarray, ...]], int]:
    """The lookup FCSmall's circuit with keys, integer samples of its input type, PBS count."""
    import fhe_backend

    from .server_load import FCSmall

    torch.manual_seed(0)
    torch._dynamo.reset()
    compiled = torch.compile(
        FCSmall(4),
        backend="fhe",
        options={
            "inputset": torch.randn(200, 4),
            "n_bits": 3,
            "rounding_threshold_bits": 3,
            "p_error": 2**-40,
            "key_cache_dir": str(folder),
        },
    )
    with torch.no_grad():
        compiled(torch.randn(1, 4))
    (partition,) = fhe_backend.partitions(compiled)
    runner = partition.runner
    runner.keygen()
    value = runner.circuit.graph.input_nodes[0].output
    draw = np.random.default_rng(0).integers(value.dtype.min(), value.dtype.max() + 1, (64, *value.shape))
    return runner.circuit, [(sample,) for sample in draw], int(partition.statistics["pbs_count"])


def same(a: List[Tuple[Any, ...]], b: List[Tuple[Any, ...]]) -> bool:
    """Whether two runs' outputs are identical."""
    return all(np.array_equal(u, v) for x, y in zip(a, b) for u, v in zip(x, y)) and len(a) == len(b)


def run_round(circuit: Any, samples: List[Tuple[np.ndarray, ...]], reference: Any) -> List[Dict[str, Any]]:
    """One measurement of every runner on the same samples (Ray already connected)."""
    from fhe_backend.circuit_runner import SequentialExecutor, ThreadExecutor
    from fhe_backend.deployment import ray_runner

    rows: List[Dict[str, Any]] = []

    def add(runner: str, batch: List[Tuple[np.ndarray, ...]], run: Callable[[], Any], **extra: Any) -> None:
        out, wall, cpu = timed_cpu(run)
        rows.append(
            {
                "runner": runner,
                "samples": len(batch),
                "wall_s": wall,
                "cpu_s": cpu,
                "equal": same(out, reference[: len(batch)]),
                **extra,
            }
        )

    add("local, 1 sample", samples[:1], lambda: SequentialExecutor().execute(circuit, samples[:1]))
    add("local", samples, lambda: SequentialExecutor().execute(circuit, samples))
    add("threads (2)", samples, lambda: ThreadExecutor(2).execute(circuit, samples))
    for workers in (1, 2):
        ray_runner.configure(workers=workers, cpus_per_worker=1.0)
        # workers start, import Concrete, load the circuit and keys: not counted
        _, first, _ = timed_cpu(lambda: ray_runner.RayExecutor().execute(circuit, samples[:2]))
        add(
            f"ray, {workers} worker(s)",
            samples,
            lambda: ray_runner.RayExecutor().execute(circuit, samples),
            first_batch_of_2_s=first,
        )
    ray_runner.shutdown_workers()
    return rows


def main(argv=None) -> int:
    """Run the comparison; prints a markdown table (medians over rounds) and writes `--out` (JSON)."""
    import os
    import statistics

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument(
        "--rounds", type=int, default=3, help="every runner measured this many times, interleaved"
    )
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--out", default="ray_execute.json")
    args = parser.parse_args(argv)
    from fhe_backend.circuit_runner import SequentialExecutor
    from fhe_backend.deployment import ray_serve

    rows: List[Dict[str, Any]] = []
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="fhe_ray_execute_") as folder:
        circuit, pool, pbs = build(Path(folder))
        samples = pool[: args.samples]
        reference = SequentialExecutor().execute(circuit, samples)
        started = ray_serve.connect(num_cpus=args.ray_cpus)
        try:
            for index in range(args.rounds):
                for row in run_round(circuit, samples, reference):
                    row.update(
                        round=index, pbs_per_sample=pbs, samples_per_second=row["samples"] / row["wall_s"]
                    )
                    row["cores_busy_here"] = row["cpu_s"] / row["wall_s"]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            if started:
                ray_serve.shutdown()
    load.append(os.getloadavg()[0])
    Path(args.out).write_text(json.dumps({"load_average": load, "rows": rows}, indent=1))
    print(
        f"load average {load[0]:.1f} at the start, {load[1]:.1f} at the end; medians of {args.rounds} rounds"
    )
    print(
        "| runner | samples | wall (median) | samples/s | walls of the rounds | CPU here / wall | equal to local |"
    )
    print("|---|---|---|---|---|---|---|")
    for runner in dict.fromkeys(r["runner"] for r in rows):
        mine = [r for r in rows if r["runner"] == runner]
        wall = statistics.median(r["wall_s"] for r in mine)
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in mine)
        print(
            f"| {runner} | {mine[0]['samples']} | {wall:.2f} s | {mine[0]['samples'] / wall:.2f} | {walls} | "
            f"{statistics.median(r['cores_busy_here'] for r in mine):.2f} | "
            f"{'yes' if all(r['equal'] for r in mine) else 'NO'} |"
        )
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
