"""The circuit runner: executors spread a batch's encrypted samples, results never change."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch
from concrete import fhe
from concrete.fhe.representation import GraphProcessor
from torch import nn

import fhe_backend
from fhe_backend.circuit_runner import (
    EXECUTORS,
    SequentialExecutor,
    SlicesKeepTheirSign,
    ThreadExecutor,
    executor_for,
    register_executor,
)
from fhe_backend.errors import OptionError
from fhe_backend.output_dirs import remove_with_circuit
from fhe_backend.process_executor import ExecutorWorkerDied, ProcessExecutor, worker_cpu_seconds
from tests.harness import compile_fhe, compile_tiny_real_key_mlp


@pytest.fixture(scope="module")
def tiny_threads_model():
    """A tiny 3-bit model (lookups of at most 4 bits) run with `runner="threads"`."""
    compiled = compile_tiny_real_key_mlp(5, p_error=2.0**-40, runner="threads")
    with torch.no_grad():
        compiled(torch.randn(1, 3))
    return compiled


def test_a_batch_on_threads_equals_simulate_and_one_after_another(tiny_threads_model):
    compiled = tiny_threads_model
    (partition,) = fhe_backend.partitions(compiled)
    x = torch.randn(5, 3)
    with torch.no_grad(), fhe_backend.fhe_mode("simulate"):
        simulated = compiled(x)
    with torch.no_grad(), fhe_backend.fhe_mode("execute"):
        executed = compiled(x)
    assert torch.equal(executed, simulated)
    # the executors themselves, on the same integer samples: same results, same order
    q_inputs = partition.program.quantize_inputs(x)
    samples = partition._samples(q_inputs)
    one_by_one = SequentialExecutor().execute(partition.circuit, samples)
    threaded = ThreadExecutor(workers=3).execute(partition.circuit, samples)
    assert len(threaded) == len(samples) == 5
    for a, b in zip(one_by_one, threaded):
        assert all(np.array_equal(u, v) for u, v in zip(a, b))


def test_a_batch_on_worker_processes_equals_one_after_another_and_survives_a_dead_worker(tiny_threads_model):
    """The ``processes`` runner (the default on several cores): the same outputs in the same
    order as one sample after another; the workers did the evaluating; a worker killed between
    batches is replaced, one killed during a batch is reported by an error naming it."""
    from fhe_backend import process_executor

    (partition,) = fhe_backend.partitions(tiny_threads_model)
    samples = partition._samples(partition.program.quantize_inputs(torch.randn(7, 3)))
    one_by_one = SequentialExecutor().execute(partition.circuit, samples)
    executor = ProcessExecutor(workers=2)
    before = worker_cpu_seconds()
    for _ in range(2):  # the second batch reuses the shipped circuit and keys
        in_processes = executor.execute(partition.circuit, samples)
        assert len(in_processes) == 7
        for a, b in zip(one_by_one, in_processes):
            assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert worker_cpu_seconds() > before
    pool = process_executor._POOL
    assert oct(os.stat(pool.folder).st_mode & 0o777) == "0o700"  # evaluation keys inside
    os.kill(pool.workers[0].process.pid, signal.SIGKILL)
    pool.workers[0].process.wait()
    again = executor.execute(partition.circuit, samples)  # replaced before the batch
    assert all(np.array_equal(u, v) for a, b in zip(one_by_one, again) for u, v in zip(a, b))
    assert any(pool.scratch.iterdir()), "the workers' Concrete unpacks circuits into the pool's folder"
    original = process_executor.WORKER_SCRIPT
    process_executor.shutdown()
    assert not pool.folder.exists(), "keys, circuits and the workers' unpacked circuits go with the pool"
    try:  # workers that die on their first request
        process_executor.WORKER_SCRIPT = original.with_name("no_such_worker.py")
        with pytest.raises(ExecutorWorkerDied, match="died while evaluating samples.*runner='local'"):
            executor.execute(partition.circuit, samples)
    finally:
        process_executor.WORKER_SCRIPT = original
        process_executor.shutdown()


class _Counting(SequentialExecutor):
    """One after another, remembering how many samples each call got."""

    calls: list = []

    def execute(self, circuit, samples):
        self.calls.append(len(samples))
        return super().execute(circuit, samples)


def test_execute_goes_through_the_executor_the_runner_option_names(tiny_threads_model):
    compiled = tiny_threads_model
    (partition,) = fhe_backend.partitions(compiled)
    original = EXECUTORS["threads"]
    register_executor("threads", _Counting)
    try:
        with torch.no_grad(), fhe_backend.fhe_mode("execute"):
            compiled(torch.randn(4, 3))
    finally:
        register_executor("threads", original)
    assert _Counting.calls == [4]  # the whole batch, in one call


def test_runner_option_is_validated():
    with pytest.raises(OptionError, match="option 'runner' = 'gpu'.*'threads'"):
        fhe_backend.FheSettings.from_options({"runner": "gpu"})
    assert fhe_backend.FheSettings.from_options({"runner": "ray"}).runner == "ray"
    with pytest.raises(OptionError, match="known runners"):
        executor_for("nowhere")
    expected = ProcessExecutor if (os.cpu_count() or 1) > 1 else SequentialExecutor
    assert isinstance(executor_for("auto"), expected)
    register_executor("counting", _Counting)
    try:
        assert isinstance(executor_for("counting"), _Counting)
    finally:
        EXECUTORS.pop("counting")


def test_the_concrete_ml_style_apis_take_the_runner():
    from fhe_backend.compile import compile_torch_model
    from fhe_backend.hybrid_model import HybridFHEModel

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    x = torch.randn(50, 3)
    quantized = compile_torch_model(model, x, n_bits=3, rounding_threshold_bits=4, runner="local")
    assert quantized.partition.runner.settings.runner == "local"
    with pytest.raises(OptionError, match="option 'runner' = 'gpu'"):
        compile_torch_model(model, x, n_bits=3, runner="gpu")
    hybrid = HybridFHEModel(model, "0", model_name="runner")
    hybrid.compile_model(x, n_bits=3, runner="local")
    assert hybrid.remote_modules["0"].partition.runner.settings.runner == "local"


def test_settings_changed_on_the_partition_reach_its_circuit_runner(tiny_threads_model):
    (partition,) = fhe_backend.partitions(tiny_threads_model)
    original = partition.settings
    try:
        partition.settings = original.replace(show_mlir=True, runner="local")
        assert partition.runner.settings is partition.settings
        assert partition.runner._compile_options()["show_mlir"] is True
    finally:
        partition.settings = original


def test_compiled_circuits_leave_no_folder_in_the_temporary_directory(tmp_path, monkeypatch):
    """Concrete writes each compiled circuit's library into a new temporary folder and never
    removes it (`fhe_backend.output_dirs`): a model's folders go when the model is collected."""
    import gc
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    compiled = compile_tiny_real_key_mlp(6, p_error=2.0**-40, runner="local")
    with torch.no_grad(), fhe_backend.fhe_mode("execute"):  # simulation and execution libraries
        compiled(torch.randn(2, 3))
    assert len(list(scratch.iterdir())) >= 2
    (partition,) = fhe_backend.partitions(compiled)
    q_inputs = partition.program.quantize_inputs(torch.randn(4, 3))
    candidate = partition._candidate_circuit(partition.program, q_inputs)  # as the search does
    folders = len(list(scratch.iterdir()))
    assert candidate.complexity > 0  # Concrete starts a runtime for this, in another folder
    assert len(list(scratch.iterdir())) == folders + 1
    del candidate
    gc.collect()
    assert len(list(scratch.iterdir())) == folders
    del compiled, partition
    torch._dynamo.reset()
    gc.collect()
    assert list(scratch.iterdir()) == []


_FULL_DISK = """
import resource, signal, sys
import torch
import fhe_backend
from concrete import fhe
from tests.harness import compile_fhe

folder = sys.argv[1]
caches = {
    "key_cache_dir": {"key_cache_dir": folder},
    "insecure_key_cache": {"configuration": fhe.Configuration(
        enable_unsafe_features=True, use_insecure_key_cache=True, insecure_key_cache_location=folder)},
}
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
for name, cache in caches.items():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).eval()
    compiled = compile_fhe(model, torch.randn(100, 3), n_bits=3, rounding_threshold_bits=4,
                           p_error=2.0**-40, runner="local", **cache)
    compiled(torch.randn(1, 3))
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, resource.RLIM_INFINITY))
    try:
        fhe_backend.partitions(compiled)[0].keygen()
    except fhe_backend.KeyGenerationError as error:
        print(name, "->", error)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
"""


def test_keys_that_cannot_be_written_raise_naming_the_cache_folder_and_its_free_space(tmp_path):
    """Keys cached on a full disk: Concrete says only "Failed to write message to ostream" (a
    CI run failed so); the error names the partition, the folder and its free space. Files over
    1 MiB cannot be written in the child process, as on a full disk."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(tmp_path)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    lines = [line for line in child.stdout.splitlines() if "->" in line]
    assert [line.split(" ->")[0] for line in lines] == ["key_cache_dir", "insecure_key_cache"], child.stdout
    for line in lines:
        assert "partition 'fhe_partition_0'" in line and f"{tmp_path} has " in line and "MiB free" in line
        assert "free space or cache keys in another folder" in line


def _max_of_two_columns(x):
    first, second = x[:, 0:1], x[:, 1:2]
    return second + fhe.univariate(lambda v: np.maximum(v, 0))(first - second)


def test_a_slice_that_holds_no_negative_value_keeps_the_sign_of_its_tensor():
    """Concrete 2.11 types a slice from its own bounds: the second column below is never
    negative, so it became unsigned, cut from a signed tensor, and Concrete's pipeline failed
    ("Transforming FHE boolean ops failed"; the max tree over an activation hit it). Our
    pre-processor types it signed: the circuit compiles and computes the max."""
    rng = np.random.default_rng(0)
    inputset = [np.stack([rng.integers(-4, 4, 1), rng.integers(0, 4, 1)], axis=1) for _ in range(40)]
    with pytest.raises(RuntimeError, match="boolean ops"):  # Concrete alone (would it be fixed: drop ours)
        fhe.Compiler(_max_of_two_columns, {"x": "encrypted"}).compile(inputset)
    circuit = fhe.Compiler(_max_of_two_columns, {"x": "encrypted"}).compile(
        inputset, additional_pre_processors=[SlicesKeepTheirSign()]
    )
    try:
        slices = [
            n.output.dtype for n in circuit.graph.query_nodes() if n.properties.get("name") == "index_static"
        ]
        assert [dtype.is_signed for dtype in slices] == [True, True]
        for sample in inputset:
            assert np.array_equal(circuit.simulate(sample), np.maximum(sample[:, 0:1], sample[:, 1:2]))
    finally:
        remove_with_circuit(circuit)


def test_a_users_concrete_pre_processors_run_besides_ours():
    """A `configuration` with its own `additional_pre_processors` keeps them."""

    class Count(GraphProcessor):
        calls = 0

        def apply(self, graph):
            Count.calls += 1

    configuration = fhe.Configuration(additional_pre_processors=[Count()])
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    compiled = compile_fhe(model, torch.randn(50, 3), n_bits=3, configuration=configuration, fhe="simulate")
    with torch.no_grad():
        compiled(torch.randn(2, 3))
    assert Count.calls >= 1
    (partition,) = fhe_backend.partitions(compiled)
    assert any(
        isinstance(p, SlicesKeepTheirSign)
        for p in partition.runner._compile_options()["additional_pre_processors"]
    )
