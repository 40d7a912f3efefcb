"""Issue-9 optimizations keep results correct: rounding methods, "auto" precision, sharing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fhe_backend
from tests.harness import compile_fhe, quantization_tolerance


@pytest.fixture(scope="module")
def mlp_and_data():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 4)).eval()
    return model, torch.randn(400, 16), torch.randn(40, 16)


def _compile(model, inputset, rounding):
    compiled = compile_fhe(model, inputset, n_bits=6, rounding_threshold_bits=rounding)
    with torch.no_grad():
        compiled(inputset[:1])
    (partition,) = fhe_backend.partitions(compiled)
    return compiled, partition


def _error(compiled, model, x):
    with torch.no_grad():
        return float((compiled(x) - model(x)).abs().max())


def test_approximate_rounding_is_one_lookup_per_activation(mlp_and_data):
    model, inputset, x = mlp_and_data
    exact, exact_partition = _compile(model, inputset, 5)
    approximate, approximate_partition = _compile(model, inputset, {"n_bits": 5, "method": "approximate"})
    activations = 24 + 24
    assert approximate_partition.statistics["pbs_count"] == activations
    assert exact_partition.statistics["pbs_count"] > activations  # exact rounding costs extra bootstraps
    assert approximate_partition.statistics["complexity"] < exact_partition.statistics["complexity"]
    with torch.no_grad():
        tolerance = quantization_tolerance(model(x), 5, steps=4.5)
    assert _error(approximate, model, x) <= tolerance


def test_auto_rounding_lowers_lookups_within_its_error_budget(mlp_and_data):
    model, inputset, x = mlp_and_data
    unrounded, unrounded_partition = _compile(model, inputset, None)
    auto, auto_partition = _compile(model, inputset, "auto")
    lsbs = auto_partition.program.rounding_lsbs
    assert lsbs and all(v > 0 for v in lsbs.values())
    assert (
        auto_partition.statistics["max_tlu_bit_width"] < unrounded_partition.statistics["max_tlu_bit_width"]
    )
    with torch.no_grad():
        reference, rounded = unrounded(x), auto(x)
    span = float(reference.max() - reference.min())
    assert float((rounded - reference).abs().mean()) <= 0.02 * span


@pytest.mark.parametrize("method", ["approximate", "exact"])
def test_auto_rounding_scores_approximate_rounding_with_its_slips(mlp_and_data, monkeypatch, method):
    """ "auto" rounding scores each precision with approximate rounding's slips drawn
    (quantization.slips; exact rounding has none), and its budget (mean output error, a share
    of the span, against the unrounded program) holds in simulate, which draws them too."""
    from fhe_backend.quantization import program as program_module
    from fhe_backend.settings import AUTO_ROUNDING_TOLERANCE

    scored_with_slips = []
    output_error = program_module._output_error

    def recording(program, *args):
        if program.rounding_lsbs:
            scored_with_slips.append(program.slips is not None)
        return output_error(program, *args)

    monkeypatch.setattr(program_module, "_output_error", recording)
    model, inputset, _ = mlp_and_data
    unrounded, _ = _compile(model, inputset, None)
    auto, _ = _compile(model, inputset, {"n_bits": "auto", "method": method})
    assert scored_with_slips and set(scored_with_slips) == {method == "approximate"}
    with torch.no_grad(), fhe_backend.fhe_mode("disable"):
        reference = unrounded(inputset)
    span = float(reference.max() - reference.min())
    with torch.no_grad(), fhe_backend.fhe_mode("simulate"):
        errors = [float((auto(inputset) - reference).abs().mean()) / span for _ in range(3)]
    assert sum(errors) / len(errors) <= AUTO_ROUNDING_TOLERANCE * 1.1, errors


def test_per_channel_weights_are_more_accurate_than_per_tensor():
    torch.manual_seed(4)
    model = nn.Linear(16, 4).eval()
    with torch.no_grad():
        model.weight[0] *= 20  # one output channel with much larger weights than the others
    inputset, x = torch.randn(300, 16), torch.randn(40, 16)
    errors = {}
    for per_channel in (True, False):
        compiled = compile_fhe(model, inputset, n_bits=4, per_channel_weights=per_channel)
        with torch.no_grad():
            errors[per_channel] = float((compiled(x) - model(x))[:, 1:].abs().max())
    assert errors[True] < errors[False] / 2


def test_recompilation_for_a_new_batch_size_shares_the_circuit(mlp_and_data):
    model, inputset, _ = mlp_and_data
    compiled, partition = _compile(model, inputset, 6)
    circuit = partition.circuit
    with torch.no_grad():
        for batch in (2, 5, 9):
            assert compiled(inputset[:batch]).shape == (batch, 4)
    partitions = fhe_backend.partitions(compiled)
    assert len(partitions) == 1 and partitions[0].circuit is circuit


def test_lookup_offset_centers_lopsided_ranges_only_when_it_saves_a_bit():
    from fhe_backend.quantization.program import _lookup_offset
    from fhe_backend.quantization.quantizers import bit_width

    low, high = -9000, -100  # an all-negative accumulator: 15 bits as it is, 14 once centered
    offset = _lookup_offset(low, high, lsbs=0)
    assert bit_width(low + offset, high + offset) == bit_width(low, high) - 1
    offset = _lookup_offset(low, high, lsbs=6)
    # a rounded lookup reads non-negative inputs (Concrete's exact rounding of signed values
    # simulates wrongly), with room below and no wider than centering, carry included
    assert low + offset > 0
    assert bit_width(low + offset, high + offset + 2**5) <= bit_width(low, high) - 1
    assert _lookup_offset(-8000, 8000, lsbs=0) == 0  # already centered
    assert _lookup_offset(0, 63, lsbs=0) == 0  # a full unsigned range: nothing to save
    assert _lookup_offset(-21332, 10649, lsbs=0) == 0  # it would save a bit, but leave no margin


@pytest.fixture(scope="module")
def lopsided_model():
    """A ReLU layer whose accumulators are all negative on [0, 1] inputs (the bias lifts them)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        model[0].weight.copy_(-model[0].weight.abs())
        model[0].bias.fill_(1.5)
    return model, torch.rand(300, 16), torch.rand(40, 16)


@pytest.mark.parametrize("rounding", [None, 5, {"n_bits": 5, "method": "approximate"}])
def test_centered_lookups_keep_results(lopsided_model, rounding):
    model, inputset, x = lopsided_model
    compiled, partition = _compile(model, inputset, rounding)
    program = partition.program
    assert any(program.lookup_offsets.values())
    for key, (low, high) in partition.lookup_ranges.items():  # the ranges the lookups see
        assert bit_width_of(low, high) <= bit_width_of(*_raw_range(program, key, low, high))
    with torch.no_grad():
        expected, simulated = model(x), compiled(x)
        fhe_backend.set_fhe_mode(compiled, "disable")
        disabled = compiled(x)
    if not isinstance(rounding, dict):  # approximate rounding slips by a step by design:
        _assert_mostly_equal(simulated, disabled)  # its bound is the eager tolerance below
    steps = 4 if rounding is None or rounding == 5 else 4.5
    assert float((simulated - expected).abs().max()) <= quantization_tolerance(expected, 5, steps)


def _assert_mostly_equal(simulated, disabled):
    """simulate == disable, but for the rare bootstrap error Concrete's simulation samples."""
    differing = int((simulated - disabled).abs().gt(1e-6).any(dim=1).sum())
    assert differing <= max(1, len(simulated) // 100)


def bit_width_of(low, high):
    from fhe_backend.quantization.quantizers import bit_width

    return bit_width(low, high)


def _raw_range(program, key, low, high):
    offset = program.lookup_offsets.get(key, 0)
    return low - offset, high - offset


def test_auto_rounding_finds_the_lowest_shared_precision(mlp_and_data):
    from fhe_backend.graph_utils import as_tuple
    from fhe_backend.quantization.program import _output_error
    from fhe_backend.settings import AUTO_ROUNDING_TOLERANCE

    model, inputset, _ = mlp_and_data
    _, partition = _compile(model, inputset, {"n_bits": "auto", "method": "approximate"})
    program = partition.program
    chosen = dict(program.rounding_lsbs)
    widths = {key: bit_width_of(low, high) for key, (low, high) in partition.lookup_ranges.items()}
    kept = {key: widths[key] - chosen.get(key, 0) for key in widths}
    q_inputs = program.quantize_inputs(inputset)
    program.rounding_lsbs = {}
    reference = program.dequantize_outputs(*as_tuple(program(*q_inputs)))
    spans = [max(float(r.max() - r.min()), 1e-9) for r in reference]

    def error(lsbs):
        program.rounding_lsbs = lsbs
        return _output_error(program, q_inputs, reference, spans)

    assert error(chosen) <= AUTO_ROUNDING_TOLERANCE
    # one bit less for every lookup than the widest one keeps breaks the budget
    narrower = max(kept.values()) - 1
    assert error({key: max(width - narrower, 0) for key, width in widths.items()}) > AUTO_ROUNDING_TOLERANCE
    program.rounding_lsbs = chosen


class _FlattenCNN(nn.Module):
    """conv -> ReLU -> flatten -> linear: AOTAutograd bakes the batch size into the flatten."""

    def __init__(self, mix_batch: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 4 * 4, 3)
        self.mix_batch = mix_batch

    def forward(self, x):
        y = self.fc(torch.relu(self.conv(x)).flatten(1))
        return torch.cumsum(y, 0) if self.mix_batch else y  # a sum over samples: stays in torch


def _calibrated(model, inputset, monkeypatch):
    """(partition, number of calibration calls) of `model` compiled on a batch-of-one trace."""
    from fhe_backend.runtime import FhePartition

    calls = []
    original = FhePartition.calibrate
    monkeypatch.setattr(
        FhePartition, "calibrate", lambda self, *args: calls.append(1) or original(self, *args)
    )
    compiled = compile_fhe(model, inputset, n_bits=6, fhe="disable")
    with torch.no_grad():
        compiled(inputset[:1])
    monkeypatch.setattr(FhePartition, "calibrate", original)
    return fhe_backend.partitions(compiled)[0], len(calls)


def test_static_graphs_calibrate_in_chunks_with_the_per_sample_ranges(monkeypatch):
    import fhe_backend.backend as backend

    torch.manual_seed(6)
    model, inputset = _FlattenCNN().eval(), torch.rand(300, 1, 6, 6)
    chunked, chunked_calls = _calibrated(model, inputset, monkeypatch)
    monkeypatch.setattr(backend, "CALIBRATION_CHUNK", 1)
    single, single_calls = _calibrated(model, inputset, monkeypatch)
    assert chunked_calls == 2 and single_calls == 300  # 256 + 44 samples, or one by one
    for name, stats in single.stats.items():
        assert chunked.stats[name].low == pytest.approx(stats.low, abs=1e-6)
        assert chunked.stats[name].high == pytest.approx(stats.high, abs=1e-6)
    assert chunked.lookup_ranges == single.lookup_ranges


def test_graphs_that_mix_samples_calibrate_one_batch_at_a_time(monkeypatch):
    torch.manual_seed(6)
    model, inputset = _FlattenCNN(mix_batch=True).eval(), torch.rand(60, 1, 6, 6)
    with pytest.warns(UserWarning):
        _, calls = _calibrated(model, inputset, monkeypatch)
    assert calls == 60  # the probe saw that a batch of several samples changes the results


def test_concrete_measures_bounds_on_the_extreme_samples(mlp_and_data, monkeypatch):
    import fhe_backend.circuit_runner as circuit_runner

    model, inputset, _ = mlp_and_data
    monkeypatch.setattr(circuit_runner, "COMPILE_INPUTSET", len(inputset))
    _, everything = _compile(model, inputset, 6)
    monkeypatch.setattr(circuit_runner, "COMPILE_INPUTSET", 3)
    compiled, subset = _compile(model, inputset, 6)

    def typed_graph(partition):  # every node with its integer type (bit-width), no bounds
        return partition.circuit.graph.format(show_bounds=False)

    assert typed_graph(subset) == typed_graph(everything)
    with torch.no_grad():
        simulated = compiled(inputset)
        fhe_backend.set_fhe_mode(compiled, "disable")
        _assert_mostly_equal(simulated, compiled(inputset))  # an overflow would break many rows


def test_auto_rounding_stays_within_six_bits_and_says_when_the_budget_needs_more(mlp_and_data, monkeypatch):
    import fhe_backend.quantization.program as program_module

    monkeypatch.setattr(program_module, "AUTO_ROUNDING_TOLERANCE", 1e-9)  # a budget no rounding meets
    model, inputset, x = mlp_and_data
    with pytest.warns(UserWarning, match="at most 6 bits"):
        compiled, partition = _compile(model, inputset, "auto")
    assert partition.statistics["max_tlu_bit_width"] == 6
    with torch.no_grad():
        expected = model(x)
        assert _error(compiled, model, x) <= quantization_tolerance(expected, 6, steps=8)


def test_simulator_gives_what_concrete_simulate_gives(mlp_and_data):
    import numpy as np

    from fhe_backend.simulation import Simulator

    model, inputset, x = mlp_and_data
    _, partition = _compile(model, inputset, 6)  # exact rounding: equal but for rare bootstrap errors
    simulator = Simulator(partition.circuit)
    samples = partition._samples(partition.program.quantize_inputs(x))
    fast = [simulator(*sample)[0] for sample in samples]
    assert simulator._per_thread.run.__name__ == "simulate"  # set up once, not the fallback
    reference = [partition.circuit.simulate(*sample) for sample in samples]
    assert all(f.dtype == np.int64 and f.shape == r.shape for f, r in zip(fast, reference))
    assert sum(not np.array_equal(f, r) for f, r in zip(fast, reference)) <= 1


def test_a_small_average_pool_feeds_the_next_convolution_without_a_lookup():
    """conv -> ReLU -> 2x2 avg-pool -> conv -> ReLU: the pool's window sum is the second conv's
    input as it is, so the only lookups are the two ReLUs (no requantization of the pool), and
    the results stay within the quantization tolerance of eager torch."""
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten()
    ).eval()
    inputset, x = torch.randn(200, 1, 6, 6), torch.randn(12, 1, 6, 6)
    # p_error 2**-40: simulate's bootstrap errors would otherwise reach 7 output steps
    compiled = compile_fhe(
        model,
        inputset,
        n_bits=6,
        rounding_threshold_bits={"n_bits": 6, "method": "approximate"},
        p_error=2.0**-40,
    )
    with torch.no_grad():
        compiled(inputset[:1])
    (partition,) = fhe_backend.partitions(compiled)
    assert partition.statistics["pbs_count"] == 3 * 6 * 6 + 2 * 1 * 1  # one per ReLU output
    assert len(partition.lookup_ranges) == 2  # the first ReLU (read by the pool) and the second
    with torch.no_grad():
        reference = model(x)
        with fhe_backend.fhe_mode("disable"):
            disable = compiled(x)
        # approximate rounding may land one step off in simulate, drawn at random by Concrete's
        # unseeded simulator (2 single runs in 90 above 5.5 steps, up to 6.8): each output's
        # median of 3 runs
        simulate = torch.stack([compiled(x) for _ in range(3)]).median(dim=0).values
    tolerance = quantization_tolerance(reference, 6, steps=4.5)
    assert float((disable - reference).abs().max()) <= tolerance
    # half a step more for the slips (medians of 3 over 30 triples: at most 4.1 steps)
    simulate_tolerance = quantization_tolerance(reference, 6, steps=5.0)
    assert float((simulate - reference).abs().max()) <= simulate_tolerance


def test_a_small_average_pool_keeps_its_lookup_under_exact_rounding():
    """The pool's window sum is 2 bits wider than its input: under exact rounding those bits
    would cost the next layer a bootstrap each per lookup and wider parameters, so the pool is
    requantized by a lookup as before (three lookups: ReLU, pool, ReLU)."""
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(3, 2, 3)
    ).eval()
    inputset = torch.randn(200, 1, 6, 6)
    compiled = compile_fhe(model, inputset, n_bits=6, rounding_threshold_bits=6)
    with torch.no_grad():
        compiled(inputset[:1])
    (partition,) = fhe_backend.partitions(compiled)
    assert len(partition.lookup_ranges) == 2  # the ReLU and the pool's requantization
    with torch.no_grad():
        reference = model(inputset[:20])
        with fhe_backend.fhe_mode("disable"):
            disable = compiled(inputset[:20])
    assert float((disable - reference).abs().max()) <= quantization_tolerance(reference, 6, steps=4.5)


def test_per_channel_weights_keep_the_accumulator_bits_of_per_tensor_weights():
    """Each output channel stretched to the full weight range can widen the accumulator past
    the bits per-tensor weights give it (under exact rounding each bit is one more bootstrap per
    lookup: the digits MLP cost 608 PBS against Concrete ML's 576). Given the calibration
    inputs the stretch is capped: on random layers the accumulator stays within the per-tensor
    accumulator's range (so its bits and placement are the same), no channel's step is coarser
    than the per-tensor step, the weights stay more precise than per-tensor ones, while the
    2-norm cap alone (no inputs) widens some of these layers."""
    import numpy as np

    from fhe_backend.quantization.quantizers import bit_width, quantize_weights

    widened_by_norm_cap = 0
    for seed in range(8):
        rng = np.random.default_rng(seed)
        weights = rng.normal(size=(48, 24)) * rng.uniform(0.05, 1.0, size=(1, 24))  # (in, out)
        x = rng.integers(0, 64, size=(300, 48)) - rng.integers(0, 32, size=(1, 48))

        def width(q, x=x):
            return bit_width((x @ q).min(), (x @ q).max())

        tensor_q, tensor_scale = quantize_weights(weights, 6, None)
        q, scale = quantize_weights(weights, 6, -1, lambda w, x=x: x @ w, -1)
        assert (x @ q).min() >= (x @ tensor_q).min() and (x @ q).max() <= (x @ tensor_q).max(), seed
        assert width(q) <= width(tensor_q), seed
        assert np.all(scale <= float(tensor_scale) * (1 + 1e-12)), seed
        assert np.abs(weights - q * scale).mean() < np.abs(weights - tensor_q * tensor_scale).mean(), seed
        widened_by_norm_cap += width(quantize_weights(weights, 6, -1)[0]) > width(tensor_q)
    assert widened_by_norm_cap >= 2


def test_range_capped_weights_keep_the_per_tensor_lookup_range_under_approximate_rounding():
    """`per_channel_weights="range_capped"` caps the stretch at any rounding (the default caps it
    only under exact rounding): a lookup fed by a range-capped layer reads the range per-tensor
    weights give, while freely stretched channels widen it on some of these layers."""
    rounding = {"n_bits": 5, "method": "approximate"}
    widened = 0
    for seed in range(4):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 4)).eval()
        with torch.no_grad():
            model[0].weight.mul_(torch.rand(24, 1) * 0.95 + 0.05)  # channels of unequal ranges
        inputset = torch.randn(300, 16)
        ranges = {}
        for per_channel in (False, True, "range_capped"):
            compiled = compile_fhe(
                model, inputset, n_bits=6, rounding_threshold_bits=rounding, per_channel_weights=per_channel
            )
            with torch.no_grad():
                compiled(inputset[:2])
            (partition,) = fhe_backend.partitions(compiled)
            assert partition.program.settings.per_channel_weights == per_channel
            ((low, high),) = partition.lookup_ranges.values()
            ranges[per_channel] = (low, high)
        (low, high), (tensor_low, tensor_high) = ranges["range_capped"], ranges[False]
        assert tensor_low <= low and high <= tensor_high, seed
        free_low, free_high = ranges[True]
        widened += free_low < tensor_low or free_high > tensor_high
    assert widened >= 2


def test_exactly_rounded_lookups_round_the_accumulator_through_zero():
    """Under exact rounding a clear shift makes each rounded lookup's placement offset a
    multiple of the rounding step, so rounding the shifted input rounds the accumulator itself
    (0 on the grid), as Concrete ML rounds; where the room above the range allows, so the
    lookup keeps its width. Approximate rounding keeps the placement's phase (no shift)."""
    import numpy as np

    from fhe_backend.quantization.quantizers import bit_width

    shifted = 0
    for seed in range(3):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
        ).eval()
        inputset = torch.randn(300, 16)
        compiled = compile_fhe(model, inputset, n_bits=6, rounding_threshold_bits=4, fhe="disable")
        with torch.no_grad():
            compiled(inputset[:2])
        (partition,) = fhe_backend.partitions(compiled)
        program = partition.program
        assert program.rounding_lsbs
        approximate = compile_fhe(
            model,
            inputset,
            n_bits=6,
            rounding_threshold_bits={"n_bits": 4, "method": "approximate"},
            fhe="disable",
        )
        with torch.no_grad():
            approximate(inputset[:2])
        assert not fhe_backend.partitions(approximate)[0].program.lookup_shifts
        for key, lsbs in program.rounding_lsbs.items():
            offset = program.lookup_offsets.get(key, 0)
            shift = int(program.lookup_shifts.get(key, 0))
            low, high = partition.lookup_ranges[key]
            if shift:
                shifted += 1
                assert (offset + shift) % 2**lsbs == 0, key
                # the shifted input, rounding's carry included, fits the lookup's width
                assert high + shift + 2 ** (lsbs - 1) < 2 ** bit_width(low, high), key
            else:
                assert offset % 2**lsbs == 0 or high + (-offset) % 2**lsbs + 2 ** (
                    lsbs - 1
                ) >= 2 ** bit_width(low, high), key
        # the program compiled is what disable runs
        q = program.quantize_inputs(inputset[:20])
        np.testing.assert_allclose(
            _disable_output(compiled, inputset[:20]),
            program.dequantize_outputs(program(*q))[0],
            rtol=1e-6,
        )
    assert shifted >= 3


def _disable_output(compiled, x):
    """The compiled model's output in disable mode, as numpy."""
    with torch.no_grad(), fhe_backend.fhe_mode("disable"):
        return compiled(x).numpy()
