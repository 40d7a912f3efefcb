"""Measuring one target: build, compile, score in every mode, time, and read the circuits' costs.

Each `measure_<kind>(target, config, progress)` returns one results row (a flat dict of
figures). The figures common to every target come from `evaluate_modes` and
`circuit_figures`, so they mean the same thing everywhere.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import resource
import statistics
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from . import models
from .targets import Target

GPT2_MLP = "transformer.h.0.mlp"
LORA_TARGET_MODULES = ["c_attn", "c_proj"]
LORA_BATCH = 8
Progress = Callable[[str], None]


@dataclass(frozen=True)
class BenchConfig:
    """What the runner asks of every target."""

    execute: bool = False
    samples: int = 3  # encrypted samples timed with --execute (median reported)
    eval_samples: Optional[int] = None  # test samples scored in disable/simulate (None: all)
    out: Path = Path("bench-results")
    batch: int = 0  # with execute: one encrypted batch of this many samples, timed with its CPU time
    configuration: Optional[Dict[str, Any]] = None  # concrete.fhe.Configuration keyword arguments
    runner: Optional[str] = None  # execute's runner option (local, threads, ray); None: the target's
    # simulate runs per target: Concrete's simulator draws bootstrap errors and approximate
    # rounding's slips at random, so one run's accuracy varies by about a point
    simulate_runs: int = 1
    # the digits split, every model's initial weights and training, the GPT-2 tokens: rerun with
    # other seeds to see how much of a difference between two compilers a single draw explains
    seed: int = models.SEED


def concrete_configuration(kwargs: Dict[str, Any]) -> Any:
    """A concrete.fhe.Configuration from JSON-able keyword arguments (both environments).

    ``approximate_rounding_config`` may be a dict of `fhe.ApproximateRoundingConfig` fields;
    enum options take their names (``"parameter_selection_strategy": "mono"``).
    """
    from concrete import fhe

    kwargs = dict(kwargs)
    if isinstance(kwargs.get("approximate_rounding_config"), dict):
        kwargs["approximate_rounding_config"] = fhe.ApproximateRoundingConfig(
            **kwargs["approximate_rounding_config"]
        )
    return fhe.Configuration(**kwargs)


def compile_options(target: Target, config: BenchConfig) -> Dict[str, Any]:
    """The target's compile options, with --configuration as a concrete.fhe.Configuration."""
    if not config.configuration:
        return dict(target.options)
    return {**target.options, "configuration": concrete_configuration(config.configuration)}


# ---- generic helpers ------------------------------------------------------------------------


def use_runner(partitions: Sequence[Any], runner: Optional[str]) -> None:
    """Run the compiled partitions' encrypted batches through `runner` (the ``runner`` option of
    `fhe_backend.circuit_runner`; ``ray``: a Ray cluster), whichever compile API built them."""
    if runner is None:
        return
    from fhe_backend.circuit_runner import executor_for

    executor_for(runner)  # an unknown runner, or Ray missing, fails before key generation
    for partition in partitions:
        partition.settings = partition.settings.replace(runner=runner)


class PeakMemory:
    """Peak resident memory (MiB) of this process while the block runs, sampled every 10 ms."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def rss_mb() -> float:
        """Current resident set size in MiB (/proc on Linux, else the lifetime maximum)."""
        try:
            with open("/proc/self/statm") as statm:
                pages = int(statm.read().split()[1])
            return pages * resource.getpagesize() / 2**20
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self.rss_mb())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self.peak_mb = self.rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self.rss_mb())


@contextlib.contextmanager
def single_torch_thread() -> Iterator[None]:
    """Train with one torch thread: tiny models train many times faster on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def timed(function: Callable[[], Any]) -> tuple:
    """(result, seconds) of calling `function`."""
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def circuit_figures(partitions: Sequence[Any]) -> Dict[str, Any]:
    """Cost of the circuits of a target: PBS, complexity and sizes summed, bit-widths maximised.

    Sizes are Concrete's statistics per sample: `input_ciphertext_bytes` counts input
    compression (`compress_input_ciphertexts`), the key sizes are uncompressed (the serialized
    evaluation keys, measured with --execute, count `compress_evaluation_keys`).
    """
    stats = [partition.statistics for partition in partitions]
    circuits = [partition.circuit for partition in partitions]
    sizes = {
        figure: sum(int(getattr(circuit, f"size_of_{name}")) for circuit in circuits)
        for figure, name in (
            ("input_ciphertext_bytes", "inputs"),
            ("output_ciphertext_bytes", "outputs"),
            ("bootstrap_key_bytes", "bootstrap_keys"),
            ("keyswitch_key_bytes", "keyswitch_keys"),
        )
    }
    return {
        **sizes,
        "circuit_p_error": max((float(c.p_error) for c in circuits), default=None),
        "circuit_global_p_error": max((float(c.global_p_error) for c in circuits), default=None),
        # Concrete reports its per-lookup figure as the global one: the union bound is the budget
        "error_bound_per_inference": sum(float(c.p_error) * s["pbs_count"] for c, s in zip(circuits, stats)),
        "partitions": len(stats),
        "pbs_count": sum(s["pbs_count"] for s in stats),
        "max_bit_width": max((s["max_bit_width"] for s in stats), default=0),
        "max_tlu_bit_width": max(
            (s["max_tlu_bit_width"] for s in stats if "max_tlu_bit_width" in s), default=None
        ),
        "complexity": float(sum(s["complexity"] for s in stats)),
        "circuit_compile_seconds": sum(p.compile_seconds or 0.0 for p in partitions),
    }


def precision_figures(partitions: Sequence[Any]) -> Dict[str, Any]:
    """What `precision_search` chose for each partition ({} when it did not run): the widest
    activation / weight bits, the widest lookup, and each partition's choice in words."""
    choices = [
        choice
        for choice in (getattr(getattr(p, "program", None), "precision_choice", None) for p in partitions)
        if choice is not None
    ]
    if not choices:
        return {}
    return {
        "searched_op_inputs": max(c.n_bits.op_inputs for c in choices),
        "searched_op_weights": max(c.n_bits.op_weights for c in choices),
        "searched_lookup_bits": max(max(c.lookup_bits.values(), default=0) for c in choices),
        "precision_search": [c.describe() for c in choices],
    }


def keygen_times(row: Dict[str, Any], partitions: Sequence[Any]) -> None:
    """Generate fresh keys for every partition: wall and CPU seconds, serialized key size."""
    _, row["keygen_seconds"], row["keygen_cpu_seconds"] = timed_with_cpu(
        lambda: [partition.keygen(force=True) for partition in partitions]
    )
    row["evaluation_key_serialized_bytes"] = evaluation_key_bytes(partitions)


def evaluation_key_bytes(partitions: Sequence[Any]) -> int:
    """Serialized size of the evaluation keys (what a client sends a server), after keygen."""
    return sum(len(partition.circuit.keys.evaluation.serialize()) for partition in partitions)


def timed_with_cpu(function: Callable[[], Any]) -> tuple:
    """(result, wall seconds, CPU seconds of this process's threads and of the ``processes``
    runner's workers) of calling `function`; CPU / wall is how many cores the call kept busy."""
    cpu, start = time.process_time() + _worker_cpu(), time.perf_counter()
    result = function()
    return result, time.perf_counter() - start, time.process_time() + _worker_cpu() - cpu


def _worker_cpu() -> float:
    try:
        from fhe_backend.process_executor import worker_cpu_seconds
    except ImportError:  # Concrete ML's environment (compare_concrete_ml.py) has no such workers
        return 0.0
    return worker_cpu_seconds()


def accuracy(logits: torch.Tensor, labels: np.ndarray) -> float:
    """Top-1 accuracy of logits against integer labels."""
    return float((torch.as_tensor(logits).argmax(-1).numpy() == labels).mean())


def max_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference with the float output."""
    return float((torch.as_tensor(output).float() - reference.float()).abs().max())


def relative_error(values: Sequence[torch.Tensor], references: Sequence[torch.Tensor]) -> float:
    """||values - references|| / ||references|| over all the tensors together (L2)."""
    difference = torch.cat([(v - r).flatten() for v, r in zip(values, references)])
    reference = torch.cat([r.flatten() for r in references])
    return float(difference.norm() / reference.norm().clamp_min(1e-12))


def evaluate_modes(
    row: Dict[str, Any],
    run: Callable[[str, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    reference: torch.Tensor,
    score: Callable[[Any, slice], float],
    partitions: Sequence[Any],
    config: BenchConfig,
    progress: Progress,
) -> None:
    """Score disable and simulate on the evaluation inputs (and execute on a few samples).

    `run(mode, inputs)` returns the model outputs; `score(outputs, rows)` the accuracy of the
    outputs of `inputs[rows]`; `reference` is the float output on `inputs`.
    """
    count = len(inputs) if config.eval_samples is None else min(config.eval_samples, len(inputs))
    rows = slice(0, count)
    for mode in ("disable", "simulate"):
        progress(f"{mode} on {count} samples")
        run(mode, inputs[:2])  # warm-up: first calls (dynamo recompiling for batches) are not throughput
        runs = config.simulate_runs if mode == "simulate" else 1  # disable is deterministic
        accuracies, errors, seconds = [], [], 0.0
        for index in range(runs):
            if runs > 1:
                progress(f"{mode} run {index + 1}/{runs}")
            outputs, elapsed = timed(functools.partial(run, mode, inputs[rows]))
            accuracies.append(score(outputs, rows))
            errors.append(max_error(outputs, reference[rows]))
            seconds += elapsed
        row[f"{mode}_accuracy"] = statistics.mean(accuracies)
        row[f"{mode}_error"] = max(errors)
        row[f"{mode}_samples_per_second"] = count * runs / seconds
        if runs > 1:
            row[f"{mode}_accuracy_runs"] = accuracies
            row[f"{mode}_accuracy_sd"] = statistics.stdev(accuracies)
    if not config.execute:
        return
    use_runner(partitions, config.runner)
    row["execute_runner"] = config.runner or "default"
    progress("key generation")
    keygen_times(row, partitions)
    times, cpu_times, outputs = [], [], []
    for index in range(min(config.samples, len(inputs))):
        progress(f"execute sample {index + 1}/{config.samples}")
        output, seconds, cpu = timed_with_cpu(functools.partial(run, "execute", inputs[index : index + 1]))
        times.append(seconds)
        cpu_times.append(cpu)
        outputs.append(torch.as_tensor(output))
    executed = torch.cat(outputs)
    simulated = torch.as_tensor(run("simulate", inputs[: len(outputs)]))
    row["execute_samples"] = len(times)
    row["execute_seconds_per_sample"] = statistics.median(times)
    row["execute_seconds_all"] = times
    row["execute_cpu_seconds_per_sample"] = statistics.median(cpu_times)  # robust to load
    row["execute_cores_busy"] = sum(cpu_times) / sum(times)
    row["execute_accuracy"] = score(executed, slice(0, len(outputs)))
    row["execute_max_difference_to_simulate"] = max_error(executed, simulated)
    batch = min(config.batch, len(inputs))
    if batch:
        progress(f"execute one batch of {batch}")
        _, seconds, cpu = timed_with_cpu(lambda: run("execute", inputs[:batch]))
        row["execute_batch"] = batch
        row["execute_batch_seconds_per_sample"] = seconds / batch
        row["execute_batch_cores_busy"] = cpu / seconds


# ---- digits classifiers ---------------------------------------------------------------------


def compile_digits(
    target: Target,
    model: torch.nn.Module,
    x_train: torch.Tensor,
    first_input: torch.Tensor,
    options: Dict[str, Any],
):
    """Compile a digits model with `options`; returns (run(mode, x) -> logits, partitions)."""
    import fhe_backend
    from fhe_backend.backend import compiled_graphs

    if target.qat:
        from fhe_backend.compile import compile_brevitas_qat_model

        module = compile_brevitas_qat_model(model, x_train, **options)

        def run_qat(mode: str, x: torch.Tensor) -> torch.Tensor:
            return torch.as_tensor(module.forward(x.numpy(), fhe=mode))

        return run_qat, [module.partition]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="fhe", options={"inputset": x_train, "fhe": "disable", **options})
    with torch.no_grad():
        compiled(first_input)
    partitions = fhe_backend.partitions(compiled)
    left_in_torch = [str(node) for graph in compiled_graphs(compiled) for node in graph.left_in_torch]

    def run(mode: str, x: torch.Tensor) -> torch.Tensor:
        # dynamo may recompile for a new batch size during the call, with partitions in the
        # compile-time mode: set the mode on every partition known, and run again if a new one
        # appeared in another mode
        for _ in range(2):
            every = partitions + [p for graph in compiled_graphs(compiled) for p in graph.partitions]
            for partition in every:
                partition.mode = mode
            with torch.no_grad():
                output = compiled(x)
            if all(p.mode == mode for graph in compiled_graphs(compiled) for p in graph.partitions):
                return output
        raise RuntimeError(f"benchmark target {target.name}: could not run every partition in {mode}")

    run.left_in_torch = left_in_torch  # type: ignore[attr-defined]  # operators that did not run in FHE, recorded in the row
    return run, partitions


def measure_digits(
    target: Target,
    config: BenchConfig,
    progress: Progress,
    trained: Optional[tuple] = None,
    compiler: Callable = compile_digits,
) -> Dict[str, Any]:
    """Train a digits classifier, compile it, score it in float/disable/simulate (execute).

    `trained` = (model, data) skips the training (the Concrete ML comparison loads the weights
    trained here); `compiler(target, model, x_train, first_input, options) -> (run, partitions)`.
    """
    row: Dict[str, Any] = {"metric": "accuracy"}
    if trained is None:
        data = models.digits_data(config.seed)
        progress("training")
        with single_torch_thread():
            model, row["train_seconds"] = timed(
                lambda: models.build_digits_model(target.model, data, config.seed)
            )
        _save_for_comparison(config, target, model, data)
    else:
        model, data = trained
    transform = models.DIGITS_MODELS[target.model][1]
    x_train = torch.from_numpy(transform(data["x_train"]))
    x_test = torch.from_numpy(transform(data["x_test"]))
    with torch.no_grad():
        reference = model(x_test)
    row["eval_samples"] = (
        len(x_test) if config.eval_samples is None else min(config.eval_samples, len(x_test))
    )
    # on the samples the other modes are scored on
    row["float_accuracy"] = accuracy(reference[: row["eval_samples"]], data["y_test"][: row["eval_samples"]])
    progress("compiling")
    options = compile_options(target, config)
    search = options.get("precision_search")
    if isinstance(search, dict) and search.get("metric") == "accuracy" and "labels" not in search:
        # the training split's labels: the search scores on a held-out share of the inputset
        options["precision_search"] = {**search, "labels": data["y_train"]}
    (run, partitions), row["compile_seconds"] = timed(
        lambda: compiler(target, model, x_train, x_test[:1], options)
    )
    row["left_in_torch"] = getattr(run, "left_in_torch", [])
    row.update(circuit_figures(partitions))
    row.update(precision_figures(partitions))

    def score(outputs: torch.Tensor, rows: slice) -> float:
        return accuracy(outputs, data["y_test"][rows])

    evaluate_modes(row, run, x_test, reference, score, partitions, config, progress)
    return row


def _save_for_comparison(
    config: BenchConfig, target: Target, model: torch.nn.Module, data: Dict[str, np.ndarray]
) -> None:
    """Write the trained weights and the data where compare_concrete_ml.py reads them."""
    folder = config.out / "models"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / f"{target.name}.pt")
    np.savez(folder / "digits.npz", **data)


# ---- tiny GPT-2: MLP block in hybrid mode ---------------------------------------------------


def gpt2_block_inputs(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The hidden states entering the MLP block (for the Concrete ML comparison)."""
    captured: List[torch.Tensor] = []
    handle = model.get_submodule(GPT2_MLP).register_forward_hook(
        lambda _module, args, _output: captured.append(args[0].detach())
    )
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        handle.remove()
    return captured[0]


def measure_gpt2_hybrid(target: Target, config: BenchConfig, progress: Progress) -> Dict[str, Any]:
    """The tiny GPT-2 with its MLP block in FHE; scored by next-token agreement with float."""
    from fhe_backend.hybrid_model import HybridFHEModel

    model = models.tiny_gpt2(config.seed)
    tokens = models.token_batches(config.seed)
    with torch.no_grad():
        reference = model(tokens).logits
    _save_gpt2_block(config, target, model, tokens)
    row: Dict[str, Any] = {
        "metric": "top-1 agreement with float",
        "float_accuracy": 1.0,
        "eval_samples": len(tokens),
    }
    progress("compiling")
    hybrid = HybridFHEModel(model, module_names=[GPT2_MLP])

    def compile_model() -> None:
        hybrid.compile_model(tokens, **compile_options(target, config))

    _, row["compile_seconds"] = timed(compile_model)
    partitions = [remote.partition for remote in hybrid.remote_modules.values()]
    row.update(circuit_figures(partitions))
    float_tokens = reference.argmax(-1)

    def run(mode: str, x: torch.Tensor) -> torch.Tensor:
        return hybrid.forward(x, fhe=mode).logits

    def score(outputs: torch.Tensor, rows: slice) -> float:
        return float((outputs.argmax(-1) == float_tokens[rows]).float().mean())

    evaluate_modes(row, run, tokens, reference, score, partitions, config, progress)
    return row


def _save_gpt2_block(
    config: BenchConfig, target: Target, model: torch.nn.Module, tokens: torch.Tensor
) -> None:
    """The MLP block as plain linears (Conv1D transposed) and its inputs, for Concrete ML."""
    block = model.get_submodule(GPT2_MLP)
    state = {
        "fc1.weight": block.c_fc.weight.detach().T.contiguous(),
        "fc1.bias": block.c_fc.bias.detach(),
        "fc2.weight": block.c_proj.weight.detach().T.contiguous(),
        "fc2.bias": block.c_proj.bias.detach(),
    }
    folder = config.out / "models"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / f"{target.name}.pt")
    np.savez(folder / f"{target.name}_inputs.npz", x=gpt2_block_inputs(model, tokens).numpy())


# ---- one LoRA training step -----------------------------------------------------------------


def measure_lora(target: Target, config: BenchConfig, progress: Progress) -> Dict[str, Any]:
    """One LoRA step (forward, backward, optimizer) on the tiny GPT-2 in each mode.

    The "accuracy" of a training step is its loss and its LoRA gradients: each mode is
    compared with the same step in float torch, with the same dropout masks (loss difference,
    relative L2 error of all the LoRA gradients together).
    """
    import peft

    from fhe_backend.lora import LoraTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(
            models.tiny_gpt2(config.seed),
            peft.LoraConfig(
                r=4,
                target_modules=LORA_TARGET_MODULES,
                fan_in_fan_out=True,
                task_type="CAUSAL_LM",
                init_lora_weights=False,
            ),
        )  # B random, not zero: every LoRA gradient is measured
    tokens = models.token_batches(config.seed)
    batch = {
        "input_ids": tokens[:LORA_BATCH],
        "attention_mask": torch.ones_like(tokens[:LORA_BATCH]),
        "labels": tokens[:LORA_BATCH],
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    trainer = LoraTrainer(model, optimizer, train_log_path=str(config.out / "lora.log"))
    progress("compiling")
    _, compile_seconds = timed(
        lambda: trainer.compile({"input_ids": tokens, "labels": tokens}, **compile_options(target, config))
    )
    partitions = list(trainer.partitions().values())
    row: Dict[str, Any] = {
        "metric": "training-step loss",
        "compile_seconds": compile_seconds,
        "eval_samples": LORA_BATCH,
        **circuit_figures(partitions),
    }
    initial = copy.deepcopy([p.detach().clone() for p in trainable])
    optimizer_state = copy.deepcopy(optimizer.state_dict())

    def step(mode: str):
        for param, value in zip(trainable, initial):
            param.data.copy_(value)
            param.grad = None
        optimizer.load_state_dict(optimizer_state)
        trainer.set_fhe_mode(mode)
        torch.manual_seed(config.seed)  # the same dropout masks in every mode
        start = time.perf_counter()
        loss, _ = trainer.lora_training_module(batch)
        gradients = [p.grad.detach().clone() for p in trainable]
        optimizer.step()
        return float(loss), gradients, time.perf_counter() - start

    modes = ["torch", "disable", "simulate"] + (["execute"] if config.execute else [])
    results = {}
    for mode in modes:
        if mode == "execute":
            progress("key generation")
            keygen_times(row, partitions)
        progress(f"training step in {mode}")
        results[mode] = step(mode)
    float_loss, float_gradients, _ = results["torch"]
    row["float_loss"] = float_loss
    for mode, (loss, gradients, seconds) in results.items():
        if mode == "torch":
            continue
        row[f"{mode}_loss"] = loss
        row[f"{mode}_error"] = abs(loss - float_loss)
        row[f"{mode}_gradient_error"] = relative_error(gradients, float_gradients)
        row[f"{mode}_step_seconds"] = seconds
        if mode == "execute":
            row["execute_seconds_per_sample"] = seconds / LORA_BATCH
        else:
            row[f"{mode}_samples_per_second"] = LORA_BATCH / seconds
    return row


MEASURES = {"digits": measure_digits, "gpt2_hybrid": measure_gpt2_hybrid, "lora": measure_lora}
