"""Numbers and behaviours the docs state, each checked here or measured by a command.

Cheap claims are tests. Claims that need a trained model, real keys or timings are measured by
`python -m tests.test_claims <name>` (printed next to the claim in the docs); see `MEASUREMENTS`.
Where another test file already backs a claim, the docs name that test.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
from concrete import fhe

import fhe_backend
from fhe_backend.compile import compile_torch_model
from fhe_backend.output_dirs import remove_with_circuit
from fhe_backend.quantization.quantizers import OutputDequantizer, bit_width, decryption_window


class _Max(nn.Module):
    def forward(self, x):
        return torch.amax(x, dim=-1)


def test_max_tree_needs_about_20x_fewer_bootstraps_than_np_max():
    """docs/operators.md: max/min as a tree of b + relu(a - b), "≈20x fewer PBS than Concrete's
    np.max" (measured 21x on 8 and 16 values of 5 bits)."""
    from concrete import fhe

    width = 8
    inputset = torch.randint(0, 32, (100, width)).float()
    ours = compile_torch_model(_Max(), inputset, n_bits=5).statistics["pbs_count"]

    @fhe.compiler({"x": "encrypted"})
    def concrete_max(x):
        return np.max(x, axis=-1)

    circuit = concrete_max.compile([row[None, :] for row in inputset.numpy().astype(np.int64)])
    remove_with_circuit(circuit)  # raw Concrete never removes the folder it compiles into
    assert ours == width - 1  # one lookup per pair and level: 4 + 2 + 1
    assert circuit.programmable_bootstrap_count >= 15 * ours, (circuit.programmable_bootstrap_count, ours)


def test_centering_saves_a_bit_on_a_lopsided_range():
    """docs/performance.md: "[-20000, 3000]: 16 -> 15 bits"."""
    from fhe_backend.quantization.program import _lookup_offset

    low, high = -20000, 3000
    offset = _lookup_offset(low, high, 0)
    assert bit_width(low, high) == 16
    assert bit_width(low + offset, high + offset) == 15
    # an eighth of the span stays free on each side (inputs a little outside the range)
    margin = int(np.ceil(0.125 * (high - low)))
    assert bit_width(low + offset - margin, high + offset + margin) == 15


def test_default_error_probability_is_concretes_global_budget():
    """docs/performance.md: "Circuits use Concrete's default error budget (global_p_error=1e-5
    for the whole circuit)". Concrete's reported `global_p_error` equals its per-lookup
    `p_error` however many lookups the circuit has, so the budget is checked by the union
    bound: every lookup at `p_error`, together within 1e-5 per inference. Left to Concrete's
    own defaults, each of these 64 lookups got ~1e-5. Options given are passed through."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 64), nn.ReLU()).eval()
    inputset = torch.randn(100, 3)
    circuit = compile_torch_model(model, inputset, n_bits=3).fhe_circuit
    assert circuit.programmable_bootstrap_count >= 64
    assert circuit.p_error * circuit.programmable_bootstrap_count <= 1e-5 * (1 + 1e-6)
    chosen = compile_torch_model(model, inputset, n_bits=3, p_error=2.0**-40)
    assert chosen.fhe_circuit.p_error <= 2.0**-40 * (1 + 1e-6)
    per_lookup = compile_torch_model(model, inputset, n_bits=3, configuration=fhe.Configuration(p_error=1e-3))
    assert 1e-4 < per_lookup.fhe_circuit.p_error <= 1e-3 * (1 + 1e-6)  # the configuration's own
    # the budget the circuits get (and the precision search's slip model reads)
    settings = fhe_backend.FheSettings.from_options
    assert settings({}).error_budget() == (None, 1e-5)
    assert settings({"p_error": 2.0**-40}).error_budget() == (2.0**-40, None)
    configured = fhe.Configuration(p_error=1e-3)
    assert settings({"configuration": configured}).error_budget() == (1e-3, None)
    assert settings({"configuration": configured, "p_error": 1e-4}).error_budget() == (1e-4, None)


def test_normalization_internal_bits():
    """docs/operators.md: intermediate values of LayerNorm/softmax get n_bits + 2 bits, at most 6."""
    from fhe_backend.lowering import normalization

    assert normalization.INTERNAL_EXTRA_BITS == 2 and normalization.MAX_INTERNAL_BITS == 6

    class Ctx:
        def __init__(self, n_bits):
            self.settings = fhe_backend.FheSettings.from_options({"n_bits": n_bits})

    assert [normalization.internal_bits(Ctx(n)) for n in (2, 3, 4, 5, 8)] == [4, 5, 6, 6, 6]


def test_wide_lookup_raises_bit_width_error_naming_node_and_options():
    """docs/backend.md, docs/operators.md: a lookup wider than 16 bits raises BitWidthError (a
    ValueError) when a circuit is compiled, before Concrete is called, naming the node, its
    bit-width and the options (the clear program itself runs at any width)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 2), nn.ReLU()).eval()
    with pytest.raises(fhe_backend.BitWidthError) as caught:
        fhe_backend.compile.compile_torch_model(model, torch.randn(100, 64) * 4, n_bits=12)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert "node 'relu" in message and "-bit input" in message
    assert "rounding_threshold_bits" in message and "n_bits" in message


def test_approximate_rounding_keeps_one_lookup_per_activation_and_exact_pays_per_bit():
    """docs/performance.md / backend.md: approximate rounding keeps one lookup per activation;
    exact rounding costs about one more bootstrap per removed bit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    inputset = torch.randn(100, 16)
    approximate = compile_torch_model(
        model, inputset, n_bits=6, rounding_threshold_bits={"n_bits": 4, "method": "approximate"}
    )
    exact = compile_torch_model(model, inputset, n_bits=6, rounding_threshold_bits=4)
    (entry,) = exact.bitwidth_and_range_report().values()
    removed = entry["accumulator_bitwidth"] - entry["bitwidth"]
    assert removed >= 2
    assert approximate.statistics["pbs_count"] == 4  # the 4 ReLUs
    # each of the 4 lookups pays about one bootstrap per removed bit on top
    assert 4 * removed <= exact.statistics["pbs_count"] - 4 <= 4 * (removed + 1)


@pytest.mark.parametrize(
    "offset, probes, decrypted",
    [
        (5, [4, 0, 63], [127, 123, 58]),  # unsigned 6 bits [1, 55]: modulo 2**7 (padding bit)
        (30, [63, 3], [-31, -27]),  # signed 6 bits [-24, 30]: modulo 2**6
    ],
    ids=["unsigned", "signed"],
)
def test_concrete_decrypts_outputs_modulo_what_the_decryption_window_assumes(
    offset, probes, decrypted, insecure_configuration
):
    """`quantizers.decryption_window`: concrete-python decrypts an output beyond its type modulo
    2**(bits + 1) when unsigned and 2**bits when signed, in simulate and execute alike; the
    window, centered on the inputset's range, maps each decrypted value back to the integer it
    stands for (another Concrete version that decrypts otherwise fails here)."""

    @fhe.compiler({"x": "encrypted"})
    def shifted(x):
        return x - offset

    circuit = shifted.compile(list(range(6, 61)), insecure_configuration)
    (output,) = circuit.graph.ordered_outputs()
    dtype = output.output.dtype
    window = decryption_window(*output.bounds, dtype.bit_width, dtype.is_signed)
    dequantizer = OutputDequantizer(1.0, 0.0, window)
    for probe, expected in zip(probes, decrypted):
        assert circuit.simulate(probe) == expected == circuit.encrypt_run_decrypt(probe)
        assert dequantizer.decrypted(np.array([expected]))[0] == probe - offset


# ---- measurements behind the figures the tests cannot afford --------------------------------


def measure_norm_accuracy() -> None:
    """docs/operators.md, LayerNorm/Softmax accuracy table (simulate, inputs 2 * randn of shape
    (4, 8), 200 calibration samples, 50 test samples)."""
    torch.manual_seed(0)
    inputset, test = 2 * torch.randn(200, 4, 8), 2 * torch.randn(50, 4, 8)
    layer_norm = nn.LayerNorm(8).eval()
    with torch.no_grad():
        layer_norm.weight.uniform_(0.5, 1.5)
        layer_norm.bias.uniform_(-0.5, 0.5)
    print("| n_bits | LayerNorm max | LayerNorm mean | Softmax max | Softmax mean |")
    for n_bits, rounding in ((4, None), (6, None), (8, 6)):
        row = []
        for model in (layer_norm, nn.Softmax(dim=-1)):
            torch._dynamo.reset()
            compiled = torch.compile(
                model,
                backend="fhe",
                options={"inputset": inputset, "n_bits": n_bits, "rounding_threshold_bits": rounding},
            )
            with torch.no_grad():
                error = (compiled(test) - model(test)).abs()
            row += [f"{float(error.max()):.3g}", f"{float(error.mean()):.3g}"]
        print(f"| {n_bits}{' (+ rounding 6)' if rounding else ''} | " + " | ".join(row) + " |")


def measure_simulator_speed() -> None:
    """docs/performance.md: Concrete's `circuit.simulate` per call against `Simulator`."""
    from fhe_backend.simulation import Simulator

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)
    ).eval()
    inputset = torch.randn(200, 64)
    quantized = compile_torch_model(
        model, inputset, n_bits=6, rounding_threshold_bits={"n_bits": 6, "method": "approximate"}
    )
    circuit = quantized.fhe_circuit
    samples = [row[None, :] for row in quantized.quantize_input(inputset[:50].numpy())]
    simulator = Simulator(circuit)
    for name, run in (("circuit.simulate", circuit.simulate), ("Simulator", simulator)):
        start = time.perf_counter()
        for sample in samples:
            run(sample)
        print(
            f"{name}: {(time.perf_counter() - start) / len(samples) * 1e3:.2f} ms per call "
            f"({quantized.statistics['pbs_count']} lookups)"
        )


def measure_gpt2_block() -> None:
    """docs/operators.md: a whole tiny GPT-2 block marked by name at n_bits=5, rounding 5, in
    simulate: PBS per partition, max logit error and top-1 agreement with eager torch."""
    from fhe_backend.benchmarks.models import tiny_gpt2, token_batches

    model, tokens = tiny_gpt2(), token_batches()
    compiled = torch.compile(
        model,
        backend="fhe",
        options={
            "module_names": ["transformer.h.0"],
            "inputset": tokens,
            "n_bits": 5,
            "rounding_threshold_bits": 5,
            "fhe": "simulate",
        },
    )
    with torch.no_grad():
        expected, actual = model(tokens[:4]).logits, compiled(tokens[:4]).logits
    pbs = [p.statistics["pbs_count"] for p in fhe_backend.partitions(compiled)]
    agreement = float((actual.argmax(-1) == expected.argmax(-1)).float().mean())
    print(
        f"PBS per partition {pbs}, max error {float((actual - expected).abs().max()):.3g} of a "
        f"{float(expected.max() - expected.min()):.3g} logit span, top-1 agreement {agreement:.2f}"
    )


MEASUREMENTS = {
    "norm-accuracy": measure_norm_accuracy,
    "simulator-speed": measure_simulator_speed,
    "gpt2-block": measure_gpt2_block,
}


if __name__ == "__main__":
    names = sys.argv[1:] or sorted(MEASUREMENTS)
    unknown = [name for name in names if name not in MEASUREMENTS]
    if unknown:
        sys.exit(f"unknown measurement(s) {unknown}: choose from {sorted(MEASUREMENTS)}")
    for name in names:
        print(f"== {name}")
        MEASUREMENTS[name]()
