"""State lives on the compiled object: recompiling with other options starts fresh (issue 20),
the run mode is per call/thread, and uneven calibration batches keep every sample (issue 13).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fhe_backend
from fhe_backend.compile import build_quantized_module

ROOT = Path(__file__).resolve().parents[1]
EXACT = {"p_error": 2**-40}  # simulate == execute == disable with exact (or no) rounding


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()


INPUTSET = torch.randn(200, 4, generator=torch.Generator().manual_seed(1))
SAMPLES = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))

FRESH_PROCESS = textwrap.dedent("""
    import sys, torch
    import fhe_backend
    from tests.test_state import INPUTSET, SAMPLES, EXACT, _tiny_model
    compiled = torch.compile(_tiny_model(), backend="fhe", options={
        "inputset": INPUTSET, "n_bits": 4, "rounding_threshold_bits": 4, "fhe": "disable", **EXACT})
    with torch.no_grad():
        out = compiled(SAMPLES)
    (partition,) = fhe_backend.partitions(compiled)
    print(repr(out.tolist()), partition.statistics["complexity"])
""")


def test_recompiling_the_same_model_with_other_options_starts_fresh(insecure_configuration):
    """compile -> execute -> reset -> compile the same object with other options -> execute:
    the second circuit is the one a fresh process builds, and it runs with its own keys."""
    model = _tiny_model()
    options = {"inputset": INPUTSET, "fhe": "execute", "configuration": insecure_configuration, **EXACT}
    first = torch.compile(
        model, backend="fhe", options={**options, "n_bits": 3, "rounding_threshold_bits": 3}
    )
    with torch.no_grad():
        first_out = first(SAMPLES[:1])
    (first_partition,) = fhe_backend.partitions(first)
    torch._dynamo.reset()

    second = torch.compile(
        model, backend="fhe", options={**options, "n_bits": 4, "rounding_threshold_bits": 4}
    )
    with torch.no_grad():
        executed = second(SAMPLES)
        with fhe_backend.fhe_mode("disable"):
            disabled = second(SAMPLES)
    (second_partition,) = fhe_backend.partitions(second)
    assert second_partition is not first_partition and second_partition.primary is None
    assert second_partition.circuit is not first_partition.circuit
    assert torch.equal(executed, disabled)

    fresh = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert fresh.returncode == 0, fresh.stderr
    values, complexity = fresh.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    assert torch.equal(disabled, torch.tensor(eval(values)))  # noqa: S307 - our own repr
    assert second_partition.statistics["complexity"] == float(complexity)
    assert first_out.shape == (1, 2)


def test_one_compiled_object_shares_its_circuit_across_batch_sizes():
    """Dynamo's recompilation for a new batch size reuses the session's circuit; another
    torch.compile call of the same model with other options does not."""
    model = _tiny_model()
    options = {"inputset": INPUTSET, "n_bits": 3, "fhe": "simulate", **EXACT}
    compiled = torch.compile(model, backend="fhe", options=options)
    other = torch.compile(model, backend="fhe", options={**options, "n_bits": 4})
    with torch.no_grad():
        compiled(SAMPLES[:1]), compiled(SAMPLES), compiled(SAMPLES[:2])
        other(SAMPLES)
    own = fhe_backend.partitions(compiled)
    assert len(own) == 1
    assert fhe_backend.partitions(other)[0] not in own
    fhe_backend.set_fhe_mode(compiled, "disable")
    assert own[0].mode == "disable" and fhe_backend.partitions(other)[0].mode == "simulate"


def test_dynamic_shapes_share_the_circuit_with_the_batch_of_one():
    """With symbolic shapes the batch-size graph takes the batch size as an input and the
    graph dynamo specialises for one sample does not. Both partitions used to be calibrated on
    their own (in other float orders), so a sample alone came out one float32 step away from
    itself in a batch; they now share one program and circuit, and agree exactly."""
    torch.manual_seed(23)
    model = nn.Sequential(nn.Conv2d(1, 1, 2), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(9, 4)).eval()
    x = torch.randn(100, 1, 8, 8)
    torch._dynamo.reset()
    options = {"inputset": x, "n_bits": 4, "fhe": "disable"}
    compiled = torch.compile(model, backend="fhe", dynamic=True, options=options)
    with torch.no_grad():
        batch = compiled(x[:5])
        alone = [compiled(x[i : i + 1]) for i in range(2)]
    assert len(fhe_backend.partitions(compiled)) == 1
    for i, row in enumerate(alone):
        assert torch.equal(row, batch[i : i + 1])


class _Attention(nn.Module):
    """One attention head over sequences of 2, averaged, then a linear head."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        scores = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1)
        return self.out((scores @ self.v(x)).mean(1))


def test_dynamic_shapes_with_the_batch_as_long_as_the_sequence():
    """`dynamic=True` and a first call on 2 sequences of 2: dynamo gives both sizes one symbol,
    so the graph assumes every batch as long as its sequences. Calibrating it on batches of the
    inputset's size used to fail (a reshape of 80 x 80 rows); it now takes batches of the traced
    size, keeps one partition, and gives what static shapes give. The graph dynamo compiles
    next, for a batch of 5, shares that partition (its symbols have other names, the same
    traced sizes)."""
    torch.manual_seed(0)
    model = _Attention().eval()
    x = torch.randn(80, 2, 4, generator=torch.Generator().manual_seed(1))
    results = {}
    for dynamic in (False, True):
        torch._dynamo.reset()
        options = {"inputset": x, "n_bits": 6, "fhe": "disable"}
        compiled = torch.compile(model, backend="fhe", dynamic=dynamic, options=options)
        with torch.no_grad():
            results[dynamic] = compiled(x[:2])
            # another batch size breaks the guard: a new graph, which shares the program
            assert torch.equal(compiled(x[:5])[:2], results[dynamic])
        assert len(fhe_backend.partitions(compiled)) == 1
    assert torch.equal(results[True], results[False])


def test_threads_each_get_their_own_mode():
    """One compiled model, two threads: one in disable, one in simulate (4-bit lookups, 3-bit
    output; simulate differs from disable for this model, so a shared mode would show)."""
    model = _tiny_model()
    compiled = torch.compile(
        model, backend="fhe", options={"inputset": INPUTSET, "n_bits": 3, "fhe": "torch", **EXACT}
    )
    with torch.no_grad():
        compiled(SAMPLES)
        expected = {}
        for mode in ("disable", "simulate", "torch"):
            with fhe_backend.fhe_mode(mode):
                expected[mode] = compiled(SAMPLES)
    assert not torch.equal(expected["torch"], expected["disable"])
    results = {mode: [] for mode in ("disable", "torch", "simulate")}

    def worker(mode):
        with torch.no_grad(), fhe_backend.fhe_mode(mode):
            for _ in range(5):
                results[mode].append(compiled(SAMPLES))

    threads = [threading.Thread(target=worker, args=(mode,)) for mode in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for mode, outputs in results.items():
        assert len(outputs) == 5 and all(torch.equal(o, expected[mode]) for o in outputs), mode
    assert fhe_backend.partitions(compiled)[0].mode == "torch"


def test_calls_from_several_threads_at_once_get_what_each_gets_alone():
    """A thread pool running one compiled model (a web server, say): every call's result is
    the one it gets alone, in disable and simulate. Concrete's simulated programs shared
    between threads gave outputs of neither sample (`fhe_backend.simulation`)."""
    from concurrent.futures import ThreadPoolExecutor

    from fhe_backend.simulation import Simulator

    torch._dynamo.reset()  # the model's code may be cached by an earlier test's compilation
    compiled = torch.compile(
        _tiny_model(), backend="fhe", options={"inputset": INPUTSET, "n_bits": 4, "fhe": "simulate", **EXACT}
    )
    batches = list(torch.randn(64, 4, generator=torch.Generator().manual_seed(3)).split(4))
    with torch.no_grad():
        compiled(batches[0])
        (partition,) = fhe_backend.partitions(compiled)
        samples = [
            s for batch in batches for s in partition._samples(partition.program.quantize_inputs(batch))
        ]
        for mode in ("disable", "simulate"):

            def call(batch, mode=mode):
                with fhe_backend.fhe_mode(mode):
                    return compiled(batch)

            alone = [call(batch) for batch in batches]
            with ThreadPoolExecutor(4) as pool:
                for _ in range(3):
                    together = list(pool.map(call, batches))
                    assert all(torch.equal(a, b) for a, b in zip(alone, together)), mode
    simulator = Simulator(partition.circuit)
    alone = [simulator(*sample) for sample in samples]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            together = list(pool.map(lambda sample: simulator(*sample), samples))
            assert all(np.array_equal(a[0], b[0]) for a, b in zip(alone, together))
    disabled = [partition.program(*sample) for sample in samples]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda sample: partition.program(*sample), samples))
    assert all(np.array_equal(a, b) for a, b in zip(disabled, together))


def test_uneven_calibration_batches_keep_every_sample():
    """Inputset batches of 256 and 100 samples: 7 samples in give 7 rows out, in every mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    module = build_quantized_module(model, [torch.randn(256, 4), torch.randn(100, 4)], n_bits=4)
    x = torch.randn(7, 4).numpy()
    disabled = module.forward(x, fhe="disable")
    module.compile(torch.randn(100, 4).numpy(), **EXACT)
    simulated = module.forward(x, fhe="simulate")
    assert disabled.shape == simulated.shape == (7, 2)
    np.testing.assert_array_equal(disabled, simulated)
    for i in range(7):
        np.testing.assert_array_equal(module.forward(x[i : i + 1], fhe="simulate"), simulated[i : i + 1])


def test_fhe_mode_rejects_unknown_modes():
    """A typo in a mode is an OptionError naming the allowed modes."""
    with pytest.raises(fhe_backend.OptionError, match="allowed modes"):
        with fhe_backend.fhe_mode("simulated"):
            pass


def test_a_captured_graph_never_runs_with_another_modules_weights():
    """Two modules of one class compiled with one options dict: dynamo shares the captured
    graph (parameters are its inputs), the circuits must not (they bake the weights); weights
    changed in place are compiled again, with a warning."""
    torch.manual_seed(0)
    first, second = (nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval() for _ in range(2))
    options = {"inputset": INPUTSET, "n_bits": 6, "fhe": "disable"}
    compiled_first = torch.compile(first, backend="fhe", options=options)
    compiled_second = torch.compile(second, backend="fhe", options=options)
    with torch.no_grad():
        expected_first, expected_second = first(SAMPLES), second(SAMPLES)
        step = 4 * float(expected_first.max() - expected_first.min()) / 63
        assert float((compiled_first(SAMPLES) - expected_first).abs().max()) <= step
        assert (
            float((compiled_second(SAMPLES) - expected_second).abs().max())
            <= 4 * float(expected_second.max() - expected_second.min()) / 63
        )
        first[2].bias.add_(1.0)
        with pytest.warns(UserWarning, match="weights changed in place"):
            updated = compiled_first(SAMPLES)
        assert float((updated - first(SAMPLES)).abs().max()) <= step
