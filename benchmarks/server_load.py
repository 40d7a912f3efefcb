"""Load test of ``fhe-backend serve`` on loopback: concurrent clients, real keys, checked results.

    python -m benchmarks.server_load --clients 16 --samples 2 --workers 2 --out server_load.json

For a leveled model (FCSmall `seq.0`, no lookup) and a lookup model (FCSmall(4) `seq`, 3-bit
lookups), it compiles and saves the model, starts ``fhe-backend serve`` in a subprocess on a
free loopback port, then runs `--clients` concurrent clients. Each downloads the client
specification, generates its own keys, uploads its evaluation keys, and sends `--samples`
compute requests of one sample; every decrypted result is compared with the circuit's
simulation. Reported per model: key size, upload and compute latency (p50/p95), the number of
results equal to simulate, 503 retries, and the server's memory (PSS of all its processes:
supervisor, workers, compute processes), idle, peak during the load and retained 5 s after it.

Bounded: loopback only, one model at a time, a fixed number of requests; the server is stopped
at the end (also on Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch


class FCSmall(torch.nn.Module):
    """Linear-ReLU-Linear (the Concrete ML hybrid example's model)."""

    def __init__(self, dim: int):
        super().__init__()
        self.seq = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.ReLU(), torch.nn.Linear(dim, dim))

    def forward(self, x):
        """The sequence of layers."""
        return self.seq(x)


MODELS: Dict[str, Tuple[int, str, Dict[str, Any]]] = {  # name -> (input dim, remote module, compile options)
    "leveled": (10, "seq.0", {"n_bits": 4}),
    "lookup": (4, "seq", {"n_bits": 3, "rounding_threshold_bits": 3, "p_error": 0.001}),
}


def build(kind: str, folder: Path, samples: int, clients: int) -> Dict[str, Any]:
    """Compile and save one model; integer inputs and their simulated outputs per client."""
    from fhe_backend.hybrid_model import HybridFHEModel

    torch.manual_seed(0)
    dim, remote, options = MODELS[kind]
    hybrid = HybridFHEModel(FCSmall(dim), remote, model_name=kind)
    hybrid.compile_model(torch.randn(200, dim), **options)
    partition = hybrid.remote_modules[remote].partition
    inputs = [
        [partition.program.quantize_inputs(torch.randn(1, dim)) for _ in range(samples)]
        for _ in range(clients)
    ]
    expected = [[partition.run_integers(q, "simulate")[0] for q in per_client] for per_client in inputs]
    hybrid.save_and_clear_private_info(folder / kind)
    module = remote.replace(".", "_")
    shape = next(p.name for p in (folder / kind / module).iterdir() if p.is_dir())
    return {
        "target": (kind, module, shape),
        "inputs": inputs,
        "expected": expected,
        "pbs": partition.statistics.get("pbs_count", 0),
    }


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`fhe-backend serve` in its own process group, with its memory sampled in the background."""

    def __init__(self, models: Path, keys: Path, workers: int, extra: List[str], engine: str = "uvicorn"):
        self.port = free_port()
        # uvicorn: `workers` worker processes; ray: a local Ray instance with `workers` replicas
        scale = (
            ["--workers", str(workers)]
            if engine == "uvicorn"
            else ["--engine", "ray", "--replicas", str(workers), "--ray-num-cpus", str(os.cpu_count() or 2)]
        )
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable,
            "-m",
            "fhe_backend.cli",
            "serve",
            str(models),
            "--keys-dir",
            str(keys),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *scale,
            "--log-level",
            "warning",
            *extra,
        ]
        self.process = subprocess.Popen(command, start_new_session=True)
        self.peak, self.sampling = 0, True
        self.sampler = threading.Thread(target=self._sample, daemon=True)

    def wait_ready(self, seconds: float = 300) -> None:
        """Until GET /health answers 200."""
        import requests

        deadline = time.time() + seconds
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"fhe-backend serve exited with {self.process.returncode}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    self.sampler.start()
                    return
            except (requests.ConnectionError, requests.Timeout):  # Ray's proxy listens before the app runs
                pass
            time.sleep(0.3)
        raise TimeoutError("the server did not start")

    def rss(self) -> int:
        """Proportional resident bytes (PSS: shared pages split between sharers) of the server and
        all its descendants, so pages shared by the workers are not counted once per worker."""
        import psutil

        try:
            root = psutil.Process(self.process.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for process in processes:
            try:
                total += process.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _sample(self) -> None:
        while self.sampling:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM to the process group, then wait."""
        self.sampling = False
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


def one_client(url: str, model: Dict[str, Any], index: int, folder: Path) -> Dict[str, Any]:
    """Download, keygen, upload, compute each sample in its own request, decrypt and compare."""
    from fhe_backend.deployment import FHEModelClient
    from fhe_backend.deployment.http_client import FheHttpClient

    http = FheHttpClient(url, retries=60, backoff_seconds=0.5)
    retries = []
    http.session.hooks["response"].append(
        lambda r, *a, **k: retries.append(1) if r.status_code == 503 else None
    )
    target: Tuple[str, str, str] = model["target"]  # (model name, module name, input shape)
    http.download_client(*target, folder / f"client{index}")
    client = FHEModelClient(folder / f"client{index}")
    started = time.perf_counter()
    keys = client.get_serialized_evaluation_keys()
    keygen = time.perf_counter() - started
    started = time.perf_counter()
    key_id = http.upload_evaluation_keys(*target, keys)
    upload = time.perf_counter() - started
    latencies, equal = [], 0
    first_compute = time.time()
    for q_inputs, expected in zip(model["inputs"][index], model["expected"][index]):
        sample: Any = client.encrypt_serialize_integers(q_inputs)  # one sample's ciphertexts
        started = time.perf_counter()
        result = http.compute(*target, key_id, [sample])
        latencies.append(time.perf_counter() - started)
        equal += bool(np.array_equal(client.deserialize_decrypt(result), expected))
    computes_done = time.time()
    http.delete_evaluation_keys(*target, key_id)
    return {
        "computes": (first_compute, computes_done),
        "keygen": keygen,
        "upload": upload,
        "latencies": latencies,
        "equal": equal,
        "key_bytes": len(keys),
        "retries_503": len(retries),
    }


def percentile(values: List[float], share: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(share * len(ordered) + 0.5)) - 1))]


def run_model(kind: str, args, root: Path) -> Dict[str, Any]:
    """Build one model, serve it, load it with `args.clients` clients; one results row."""
    models = root / f"models_{kind}"
    model = build(kind, models, args.samples, args.clients)
    server = ServerProcess(models, root / f"keys_{kind}", args.workers, args.server_args, args.engine)
    try:
        server.wait_ready()
        time.sleep(args.warmup_seconds)  # compute processes import Concrete and load (compile) the circuits
        idle = server.rss()
        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(
                pool.map(lambda i: one_client(server.url, model, i, root / kind), range(args.clients))
            )
        wall = time.perf_counter() - started
        peak = max(server.peak, server.rss())
        time.sleep(5)
        retained = server.rss()
    finally:
        server.stop()
    latencies = [t for r in results for t in r["latencies"]]
    uploads = [r["upload"] for r in results]
    return {
        "model": kind,
        "pbs_per_sample": model["pbs"],
        "clients": args.clients,
        "engine": args.engine,
        "workers": args.workers,
        # compute requests over the span from the first one sent to the last one answered
        "requests_per_second": len(latencies)
        / (max(r["computes"][1] for r in results) - min(r["computes"][0] for r in results)),
        "requests": len(latencies),
        "equal_to_simulate": sum(r["equal"] for r in results),
        "key_bytes": results[0]["key_bytes"],
        "keygen_s_p50": statistics.median(r["keygen"] for r in results),
        "upload_s_p50": statistics.median(uploads),
        "upload_s_p95": percentile(uploads, 0.95),
        "compute_s_p50": statistics.median(latencies),
        "compute_s_p95": percentile(latencies, 0.95),
        "retries_503": sum(r["retries_503"] for r in results),
        "wall_s": wall,
        "rss_idle_mb": idle / 1e6,
        "rss_peak_mb": peak / 1e6,
        "rss_retained_mb": retained / 1e6,
    }


def table(rows: List[Dict[str, Any]]) -> str:
    """A markdown table of the results rows."""
    lines = [
        "| model | engine x workers | PBS/sample | clients x requests | equal to simulate | eval. keys | "
        "upload p50/p95 | compute p50/p95 | req/s | 503 retries | server memory (PSS) idle / peak / retained |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r.get('engine', 'uvicorn')} x {r['workers']} | {r['pbs_per_sample']} | "
            f"{r['clients']} x {r['requests'] // r['clients']} | "
            f"{r['equal_to_simulate']}/{r['requests']} | {r['key_bytes'] / 1e6:.1f} MB | "
            f"{r['upload_s_p50']:.2f} / {r['upload_s_p95']:.2f} s | "
            f"{r['compute_s_p50']:.2f} / {r['compute_s_p95']:.2f} s | {r.get('requests_per_second', 0):.2f} | "
            f"{r['retries_503']} | "
            f"{r['rss_idle_mb']:.0f} / {r['rss_peak_mb']:.0f} / {r['rss_retained_mb']:.0f} MB |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run the load test; prints a markdown table and writes `--out` (JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument(
        "--samples", type=int, default=2, help="compute requests per client (one sample each)"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="uvicorn worker processes, or Ray replicas with --engine ray"
    )
    parser.add_argument(
        "--engine",
        choices=("uvicorn", "ray"),
        default="uvicorn",
        help="fhe-backend serve --engine: ray starts a local Ray instance with --workers replicas",
    )
    parser.add_argument("--models", default="leveled,lookup", help=f"comma-separated, of {sorted(MODELS)}")
    parser.add_argument(
        "--warmup-seconds",
        type=float,
        default=0.0,
        help="wait after the server answers /health, before the clients start",
    )
    parser.add_argument("--out", default="server_load.json")
    parser.add_argument(
        "--server-args",
        nargs=argparse.REMAINDER,
        default=[],
        help="extra `fhe-backend serve` flags (last on the command line)",
    )
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fhe_server_load_") as folder:
        for kind in args.models.split(","):
            rows.append(run_model(kind.strip(), args, Path(folder)))
            print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return 0 if all(r["equal_to_simulate"] == r["requests"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
