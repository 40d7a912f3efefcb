"""`fhe-backend demo`: digits MLP and CNN compiled with backend "fhe", one sample encrypted.

Trains both models on scikit-learn's `load_digits` (shipped with the package, no download) and
compiles each with ``torch.compile(model, backend="fhe")`` in two configurations:

* ``exact``: 6-bit rounding before every lookup, exact; real execution equals simulation bit
  for bit, which the demo checks on one encrypted sample;
* ``fast``: approximate rounding with the precision of each lookup searched on the calibration
  set (``"auto"``); the cheapest circuits the backend makes, at a small accuracy cost.

It prints float vs simulated-FHE accuracy and circuit cost of both, then runs one MLP sample with
real keys and encryption in each configuration, with the key generation and execute times.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Dict, Tuple

import numpy as np
import torch

from .backend import partitions

EXACT_OPTIONS: Dict[str, Any] = {"n_bits": 6, "rounding_threshold_bits": 6}
FAST_OPTIONS: Dict[str, Any] = {
    "n_bits": 6,
    "rounding_threshold_bits": {"n_bits": "auto", "method": "approximate"},
}
CONFIGURATIONS = {"exact": EXACT_OPTIONS, "fast": FAST_OPTIONS}
DEMO_OPTIONS = EXACT_OPTIONS  # the configuration whose execution must equal simulation


class DigitsMLP(torch.nn.Sequential):
    """64-32-32-10 MLP with ReLU."""

    def __init__(self):
        super().__init__(
            torch.nn.Linear(64, 32),
            torch.nn.ReLU(),
            torch.nn.Linear(32, 32),
            torch.nn.ReLU(),
            torch.nn.Linear(32, 10),
        )


class DigitsCNN(torch.nn.Module):
    """conv 1->4 3x3 pad 1, ReLU, avg-pool 2, conv 4->8 3x3, ReLU, linear 32->10."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.pool = torch.nn.AvgPool2d(2)
        self.conv2 = torch.nn.Conv2d(4, 8, 3)
        self.fc = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, 64) flattened 8x8 digits."""
        x = self.pool(torch.relu(self.conv1(x.view(-1, 1, 8, 8))))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def load_digits_split(seed: int = 0):
    """Digits scaled to [0, 1], split 75/25, as float32 tensors."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        (x / 16.0).astype(np.float32), y, test_size=0.25, random_state=seed
    )
    return (
        torch.from_numpy(x_train),
        torch.from_numpy(x_test),
        torch.from_numpy(y_train),
        torch.from_numpy(y_test),
    )


def train(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 40, seed: int = 0
) -> torch.nn.Module:
    """Adam on cross-entropy, mini-batches of 64, fixed seed; returns the model in eval mode."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            batch = order[start : start + 64]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval()


def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of correct argmax predictions."""
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def compile_and_measure(
    name: str, model: torch.nn.Module, data, options: Dict[str, Any] = EXACT_OPTIONS
) -> Tuple[object, Dict]:
    """Compile with backend "fhe" and `options`; measure simulate accuracy and circuit cost."""
    x_train, x_test, _, y_test = data
    start = time.perf_counter()
    compiled = torch.compile(model, backend="fhe", options={"inputset": x_train, **options})
    with torch.no_grad():
        compiled(x_test[:1])
    compile_seconds = time.perf_counter() - start
    (partition,) = partitions(compiled)
    figures = {
        "model": name,
        "float_accuracy": accuracy(model, x_test, y_test),
        "simulate_accuracy": accuracy(compiled, x_test, y_test),
        "compile_seconds": compile_seconds,
        **partition.statistics,
    }
    return compiled, figures


def run_encrypted(compiled, sample: torch.Tensor) -> Dict:
    """One sample with real keys: keygen time, execute time, and the distance to simulate."""
    (partition,) = partitions(compiled)
    with torch.no_grad():
        simulated = compiled(sample)
        start = time.perf_counter()
        partition.keygen()
        keygen_seconds = time.perf_counter() - start
        partition.mode = "execute"
        try:
            start = time.perf_counter()
            encrypted = compiled(sample)
            latency = time.perf_counter() - start
        finally:
            partition.mode = "simulate"
    return {
        "keygen_seconds": keygen_seconds,
        "execute_seconds": latency,
        "matches_simulate": bool(torch.equal(encrypted, simulated)),
        "max_difference": float((encrypted - simulated).abs().max()),
        "same_class": bool(torch.equal(encrypted.argmax(-1), simulated.argmax(-1))),
    }


def describe(options: Dict[str, Any]) -> str:
    """A configuration in words, e.g. "n_bits 6, rounding 6 exact" or "... rounding 'auto' approximate"."""
    rounding = options["rounding_threshold_bits"]
    if isinstance(rounding, dict):
        return (
            f"n_bits {options['n_bits']}, rounding {rounding['n_bits']!r} {rounding.get('method', 'exact')}"
        )
    return f"n_bits {options['n_bits']}, rounding {rounding} exact"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `fhe-backend demo`."""
    parser.add_argument("--no-execute", action="store_true", help="skip the encrypted runs")
    parser.add_argument("--epochs", type=int, default=40, help="training epochs (default 40)")


def run(args: argparse.Namespace) -> int:
    """Train, compile in both configurations, print the figures, run one encrypted sample each.

    Returns 1 when a configuration fails to compile or the exact configuration's encrypted
    result differs from simulation.
    """
    data = load_digits_split()
    x_train, _, y_train, _ = data
    mlp: Dict[str, object] = {}
    failed = False
    for name, factory in (("MLP 64-32-32-10", DigitsMLP), ("CNN", DigitsCNN)):
        print(f"training {name} on digits ...", flush=True)
        model = train(factory(), x_train, y_train, epochs=args.epochs)
        print(f"  float accuracy {accuracy(model, data[1], data[3]):.3f}", flush=True)
        for label, options in CONFIGURATIONS.items():
            try:
                compiled, figures = compile_and_measure(name, model, data, options)
            except Exception as error:  # reported, and the demo exits 1; the other one still runs
                failed = True
                print(
                    f"  {label:5} ({describe(options)}): FAILED to compile: "
                    f"{type(error).__name__}: {str(error).strip().splitlines()[-1]}",
                    flush=True,
                )
                continue
            if factory is DigitsMLP:
                mlp[label] = compiled
            print(
                f"  {label:5} ({describe(options)}): simulate accuracy "
                f"{figures['simulate_accuracy']:.3f} | PBS {figures['pbs_count']} | max bit-width "
                f"{figures['max_bit_width']} | lookup bit-width {figures['max_tlu_bit_width']} | "
                f"complexity {figures['complexity']:.3g} | compile {figures['compile_seconds']:.1f}s",
                flush=True,
            )
    if args.no_execute:
        return 1 if failed else 0
    print("one MLP sample with real encryption (key generation first) ...", flush=True)
    results: Dict[str, Dict] = {}
    for label, compiled in mlp.items():
        figures = results[label] = run_encrypted(compiled, data[1][:1])
        agreement = (
            "equals simulate"
            if figures["matches_simulate"]
            else f"differs from simulate by up to {figures['max_difference']:.3g} "
            f"({'same' if figures['same_class'] else 'another'} predicted class)"
        )
        print(
            f"  {label:5}: keygen {figures['keygen_seconds']:.1f}s | execute one sample "
            f"{figures['execute_seconds']:.2f}s | {agreement}",
            flush=True,
        )
    exact_ok = "exact" in results and results["exact"]["matches_simulate"]
    if len(results) == 2:
        ratio = results["exact"]["execute_seconds"] / results["fast"]["execute_seconds"]
        pace = f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"
        agrees = "agrees" if exact_ok else "does NOT agree"
        print(f"  fast executes {pace} than exact; exact {agrees} with simulation bit for bit", flush=True)
    return 0 if exact_ok and not failed else 1
