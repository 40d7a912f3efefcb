"""The option `precision_search`: the lowest bit-widths whose task metric stays within tolerance.

A tiny classifier (8-16-16-4, trained on four Gaussian blobs) is compiled with and without the
search; the disable-mode metric is recomputed here, independently of the search's code, on the
held-out share it documents (every k-th sample).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fhe_backend
from fhe_backend.compile import compile_torch_model
from fhe_backend.errors import OptionError
from fhe_backend.output_dirs import remove_with_circuit
from fhe_backend.quantization.slips import SLIP_SEED, SlipModel, slip_deviation
from fhe_backend.settings import FheSettings
from tests.harness import compile_fhe

BOUNDS = dict(n_bits=6, rounding_threshold_bits={"n_bits": 6, "method": "approximate"}, p_error=2**-40)
HOLDOUT = 0.5


def _blobs(samples: int, seed: int):
    generator = np.random.default_rng(seed)
    centers = generator.normal(0, 2.0, size=(4, 8))
    labels = generator.integers(0, 4, size=samples)
    x = centers[labels] + generator.normal(0, 1.3, size=(samples, 8))
    return x.astype(np.float32), labels.astype(np.int64)


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    x, y = _blobs(400, 0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    return model.eval(), inputs, labels.numpy()


def _holdout(count: int, share: float = HOLDOUT) -> np.ndarray:
    """Every k-th position, as documented: k where floor((k+1)*share) > floor(k*share)."""
    positions = np.arange(count)
    return positions[np.floor((positions + 1) * share) > np.floor(positions * share)]


def _scored(module, x: np.ndarray) -> np.ndarray:
    """What the search scores: the disable-mode outputs, with approximate rounding's slips drawn
    as documented (`SlipModel` at each lookup's error probability: `p_error`, or
    `global_p_error` over the circuit's lookups; seed SLIP_SEED, one batch)."""
    program = module.partition.program
    if program.settings.rounding_threshold_bits.approximate:
        p_error = program.settings.p_error
        if p_error is None:
            p_error = program.settings.global_p_error / module.fhe_circuit.programmable_bootstrap_count
        program.slips = SlipModel(slip_deviation(p_error), SLIP_SEED)
    try:
        return np.asarray(module.forward(x, fhe="disable"))
    finally:
        program.slips = None


def _disagreement(module, model, x: torch.Tensor) -> float:
    """Share of held-out samples whose scored argmax is not the float argmax, where the
    float model reads the same quantized inputs."""
    rows = _holdout(len(x))
    quantizer = module.partition.program.input_quantizers[0]
    dequantized = torch.from_numpy(quantizer.dequantize(quantizer.quantize(x[rows].numpy()))).float()
    with torch.no_grad():
        reference = model(dequantized).numpy()
    output = _scored(module, x[rows].numpy())
    return float(np.mean(output.argmax(-1) != reference.argmax(-1)))


@pytest.fixture(scope="module")
def bounds(classifier):
    model, x, _ = classifier
    return compile_torch_model(model, x, **BOUNDS)


def _searched_at(classifier, tolerance: float):
    """The classifier compiled within BOUNDS with an argmax search at `tolerance`."""
    model, x, _ = classifier
    spec = {"metric": "argmax", "tolerance": tolerance, "holdout": HOLDOUT}
    return compile_torch_model(model, x, precision_search=spec, **BOUNDS)


@pytest.fixture(scope="module")
def searched(classifier):
    return _searched_at(classifier, 0.02)


def _lookup_bits(module) -> list:
    program = module.partition.program
    ranges = module.partition.lookup_ranges
    return sorted(max(1, _width(*ranges[key]) - program.rounding_lsbs.get(key, 0)) for key in ranges)


def _width(low: int, high: int) -> int:
    from fhe_backend.quantization.quantizers import bit_width

    return bit_width(low, high)


def test_the_search_lowers_bits_and_its_disable_metric_is_within_tolerance(classifier, bounds, searched):
    model, x, _ = classifier
    choice = searched.partition.program.precision_choice
    assert choice is not None and choice.metric == "argmax"
    bounds_loss = _disagreement(bounds, model, x)
    loss = _disagreement(searched, model, x)
    # the search measured what disable gives on the held-out share, and stayed within tolerance
    assert choice.bounds_loss == pytest.approx(bounds_loss, abs=1e-12)
    assert choice.loss == pytest.approx(loss, abs=1e-12)
    assert loss <= bounds_loss + 0.02 + 1e-12
    assert choice.holdout_samples == len(_holdout(len(x)))
    # cheaper: narrower lookups than the 6 bits of the bounds, and never wider anywhere
    assert max(_lookup_bits(searched)) < max(_lookup_bits(bounds))
    assert all(s <= b for s, b in zip(_lookup_bits(searched), _lookup_bits(bounds)))
    assert searched.partition.statistics["complexity"] < bounds.partition.statistics["complexity"]


def test_no_candidate_cheaper_than_the_choice_is_within_tolerance_at_lower_precision(classifier, searched):
    """Every program the search scored at a lookup precision below the chosen one failed the
    tolerance (the choice is the lowest precision that holds), and the choice itself holds."""
    from fhe_backend.quantization import precision_search

    model, x, _ = classifier
    scored = []
    original = precision_search._Scorer.evaluate

    def recording(self, candidate, base, method):
        evaluation = original(self, candidate, base, method)
        scored.append(evaluation)
        return evaluation

    spec = {"metric": "argmax", "tolerance": 0.02, "holdout": HOLDOUT}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precision_search._Scorer, "evaluate", recording)
        again = compile_torch_model(model, x, precision_search=spec, **BOUNDS)
    choice = again.partition.program.precision_choice
    limit = choice.bounds_loss + 0.02
    assert choice.loss <= limit
    # approximate rounding: per-channel weights as given and range capped are both searched, each
    # with the lookups' rounding grid at the placement's phase and through 0
    assert {(e.candidate.range_capped, e.candidate.rounding_grid) for e in scored} == {
        (False, "aligned"),
        (True, "aligned"),
        (False, "zero"),
        (True, "zero"),
    }
    program = again.partition.program
    settings = program.settings
    assert (settings.per_channel_weights == "range_capped") == choice.range_capped
    assert program.rounding_grid == choice.rounding_grid
    if choice.rounding_grid == "zero":  # the chosen program rounds its accumulators through 0
        assert program.lookup_shifts and "rounding grid through 0" in choice.describe()
    chosen_precision = settings.rounding_threshold_bits.n_bits
    lower = [
        e
        for e in scored
        if e.candidate.rounding_bits < chosen_precision
        and not e.candidate.lookup_bits
        and e.candidate.range_capped == choice.range_capped
        and e.candidate.rounding_grid == choice.rounding_grid
    ]
    assert lower, "the search tried no lower precision"
    assert all(e.loss > limit for e in lower)


def test_the_search_is_deterministic(classifier, searched):
    model, x, _ = classifier
    spec = {"metric": "argmax", "tolerance": 0.02, "holdout": HOLDOUT}
    again = compile_torch_model(model, x, precision_search=spec, **BOUNDS)
    first, second = searched.partition.program, again.partition.program
    assert first.settings.n_bits == second.settings.n_bits
    assert first.settings.rounding_threshold_bits == second.settings.rounding_threshold_bits
    assert first.lookup_precision == second.lookup_precision
    assert first.rounding_lsbs == second.rounding_lsbs
    np.testing.assert_array_equal(
        searched.forward(x[:50].numpy(), fhe="disable"), again.forward(x[:50].numpy(), fhe="disable")
    )


def test_the_searched_circuit_simulates_like_its_integer_program(classifier):
    """Exact rounding: the circuit compiled once at the end gives in simulate what the searched
    integer program gives in disable (p_error 2**-40: no bootstrap error on these samples)."""
    model, x, _ = classifier
    module = compile_torch_model(
        model,
        x,
        n_bits=6,
        rounding_threshold_bits=6,
        p_error=2**-40,
        precision_search={"metric": "argmax", "tolerance": 0.02, "holdout": HOLDOUT},
    )
    assert module.partition.program.settings.rounding_threshold_bits.method == "exact"
    sample = x[:40].numpy()
    disable = np.asarray(module.forward(sample, fhe="disable"))
    simulate = np.asarray(module.forward(sample, fhe="simulate"))
    np.testing.assert_allclose(simulate, disable, rtol=0, atol=1e-9)
    # and against eager torch: the argmax agrees on the samples where float's margin exceeds the
    # output error disable shows on the inputset
    with torch.no_grad():
        eager = model(torch.from_numpy(sample)).numpy()
    assert np.mean(simulate.argmax(-1) == eager.argmax(-1)) >= 0.9


def test_accuracy_metric_with_labels(classifier, bounds):
    model, x, y = classifier
    spec = {"metric": "accuracy", "labels": y, "tolerance": 0.01, "holdout": HOLDOUT}
    module = compile_torch_model(model, x, precision_search=spec, **BOUNDS)
    choice = module.partition.program.precision_choice
    rows = _holdout(len(x))
    accuracy = np.mean(_scored(module, x[rows].numpy()).argmax(-1) == y[rows])
    bounds_accuracy = np.mean(_scored(bounds, x[rows].numpy()).argmax(-1) == y[rows])
    assert choice.float_score - accuracy == pytest.approx(choice.loss, abs=1e-12)
    assert accuracy >= bounds_accuracy - 0.01 - 1e-12


def test_mse_metric_on_a_regression():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).eval()
    x = torch.randn(300, 4)
    module = compile_torch_model(
        model,
        x,
        n_bits=6,
        rounding_threshold_bits={"n_bits": 6, "method": "approximate"},
        precision_search={"metric": "mse", "tolerance": 0.01},
    )
    choice = module.partition.program.precision_choice
    with torch.no_grad():
        reference = model(x).numpy()
    output = np.asarray(module.forward(x.numpy(), fhe="disable"))
    relative = np.mean((output - reference) ** 2) / np.var(reference)
    assert choice.loss <= choice.bounds_loss + 0.01
    assert relative < 0.05  # on every sample, not only the held-out ones


@pytest.mark.parametrize(
    "value, message",
    [
        ({"metric": "top5"}, "allowed ('argmax', 'accuracy', 'mse')"),
        ({"tolerance": 1.5}, "tolerance = 1.5"),
        ({"holdout": 0}, "holdout = 0"),
        ({"metric": "accuracy"}, "needs 'labels'"),
        ({"labels": [0, 1]}, "needs 'labels'"),
        ({"metric": "accuracy", "labels": [[0, 1]]}, "1-d array of integer class labels"),
        ({"grid": 3}, "unknown keys ['grid']"),
        (7, "expected None, True, a metric name"),
    ],
)
def test_bad_options_say_what_to_fix(value, message):
    with pytest.raises(OptionError, match=None) as error:
        FheSettings.from_options({"precision_search": value})
    assert message in str(error.value)


def test_labels_that_do_not_match_the_inputset_are_refused(classifier):
    model, x, y = classifier
    with pytest.raises(OptionError, match="labels"):
        compile_torch_model(model, x, precision_search={"metric": "accuracy", "labels": y[:100]}, **BOUNDS)


@pytest.fixture(scope="module")
def wide_tolerance(classifier):
    """At tolerance 0.05 the per-lookup stage lowers one lookup below the shared precision."""
    return _searched_at(classifier, 0.05)


def _complexity_times_keys(module) -> float:
    circuit = module.partition.circuit
    keys = int(circuit.size_of_bootstrap_keys) + int(circuit.size_of_keyswitch_keys)
    return float(circuit.complexity) * keys


def test_lookups_at_several_precisions_are_kept_only_when_concrete_finds_them_cheaper(
    classifier, wide_tolerance
):
    """Lookups at several precisions make Concrete generate a bootstrap key per precision and
    keyswitch keys between them: the search compiles its passing candidates and keeps the least
    complexity times key bytes, which the clear-text search alone (the last candidate) did not."""
    from fhe_backend import runtime
    from fhe_backend.quantization import precision_search

    model, x, _ = classifier
    choice = wide_tolerance.partition.program.precision_choice
    assert len(choice.compared) >= 2, "no per-lookup step to compare: the setup no longer tests this"
    assert len(
        {
            (c.n_bits, tuple(sorted(c.lookup_bits.items())), c.range_capped, c.rounding_grid)
            for c in choice.compared
        }
    ) == len(choice.compared)
    # the circuit compiled at the end is a compared candidate with the least product (equal
    # circuits: the search takes the lower loss)
    bits = (choice.n_bits.op_inputs, choice.n_bits.op_weights)
    (chosen,) = [
        c
        for c in choice.compared
        if (c.n_bits, c.lookup_bits, c.range_capped, c.rounding_grid)
        == (bits, choice.lookup_bits, choice.range_capped, choice.rounding_grid)
    ]
    assert chosen.complexity * chosen.key_bytes == min(c.complexity * c.key_bytes for c in choice.compared)
    circuit = wide_tolerance.partition.circuit
    assert float(circuit.complexity) == pytest.approx(chosen.complexity)
    assert int(circuit.size_of_bootstrap_keys) + int(circuit.size_of_keyswitch_keys) == chosen.key_bytes
    assert choice.loss <= choice.bounds_loss + 0.05 + 1e-12
    # against the clear-text choice alone (no candidate compiled), compiled independently
    spec = {"metric": "argmax", "tolerance": 0.05, "holdout": HOLDOUT}
    search = precision_search.search_precision
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runtime, "search_precision", lambda program, q_inputs, _: search(program, q_inputs))
        clear_only = compile_torch_model(model, x, precision_search=spec, **BOUNDS)
    assert clear_only.partition.program.precision_choice.compared == ()
    assert _complexity_times_keys(wide_tolerance) <= _complexity_times_keys(clear_only)
    if clear_only.partition.program.precision_choice.lookup_bits != choice.lookup_bits:
        assert _complexity_times_keys(wide_tolerance) < _complexity_times_keys(clear_only)


@pytest.mark.parametrize(
    "options",
    [
        dict(BOUNDS, per_channel_weights=False),  # per-tensor weights: nothing to cap
        dict(BOUNDS, rounding_threshold_bits=6),  # exact rounding: capped already
    ],
    ids=["per-tensor", "exact"],
)
def test_the_range_cap_is_searched_only_where_it_changes_the_weights(classifier, options):
    from fhe_backend.quantization import precision_search

    model, x, _ = classifier
    scored = []
    original = precision_search._Scorer.evaluate

    def recording(self, candidate, base, method):
        scored.append(candidate)
        return original(self, candidate, base, method)

    spec = {"metric": "argmax", "tolerance": 0.02, "holdout": HOLDOUT}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precision_search._Scorer, "evaluate", recording)
        compiled = compile_fhe(model, x, precision_search=spec, fhe="disable", **options)
        with torch.no_grad():
            compiled(x[:2])
    assert scored and not any(c.range_capped for c in scored)
    exact = options.get("rounding_threshold_bits") == 6  # always through 0: no grid to search
    assert {c.rounding_grid for c in scored} == ({"aligned"} if exact else {"aligned", "zero"})
    (partition,) = fhe_backend.partitions(compiled)
    choice = partition.program.precision_choice
    assert not choice.range_capped and "range capped" not in choice.describe()
    assert partition.program.settings.per_channel_weights == options.get("per_channel_weights", True)


def test_per_channel_weights_option_values():
    assert (
        FheSettings.from_options({"per_channel_weights": "range_capped"}).per_channel_weights
        == "range_capped"
    )
    assert FheSettings.from_options({"per_channel_weights": 0}).per_channel_weights is False
    with pytest.raises(OptionError, match="expected a bool or 'range_capped'"):
        FheSettings.from_options({"per_channel_weights": "capped"})


@pytest.mark.parametrize("p_error", [1e-5, 2**-40])
def test_slip_model_matches_concretes_simulation(p_error):
    """Approximate rounding's slips as `SlipModel` draws them, against Concrete's simulation of
    the same rounding (one step of a 7-bit input, 4 bits rounded away, at two error
    probabilities: the noise follows it). The share of values that land one step off agrees
    within 15%; position by position within 6 points (Concrete's slips lean up: values just
    below a boundary slip up a few points more often than the model says, values just above
    slip down as much less often)."""
    from concrete import fhe

    lsbs, step = 4, 16
    positions = np.arange(48, 64)  # one rounding step, well inside the 7-bit range
    x = np.tile(positions, 64)

    @fhe.compiler({"x": "encrypted"})
    def rounded(x):
        kept = fhe.round_bit_pattern(x, lsbs_to_remove=lsbs, exactness=fhe.Exactness.APPROXIMATE)
        return fhe.univariate(lambda v: v >> lsbs)(kept)

    inputset = [np.full_like(x, 0), np.full_like(x, 100), x]
    circuit = rounded.compile(inputset, fhe.Configuration(p_error=p_error, fhe_simulation=True))
    remove_with_circuit(circuit)  # raw Concrete never removes the folder it compiles into
    exact = (x + step // 2) >> lsbs
    runs = 30
    concrete_slips = np.mean([circuit.simulate(x) != exact for _ in range(runs)], axis=0)
    model = SlipModel(slip_deviation(p_error), seed=1)
    model_slips = np.mean([((model(x, lsbs) + step // 2) >> lsbs) != exact for _ in range(10 * runs)], axis=0)
    expected = model_slips.reshape(-1, len(positions)).mean(0)
    measured = concrete_slips.reshape(-1, len(positions)).mean(0)
    assert measured.mean() == pytest.approx(expected.mean(), rel=0.15), (expected.round(3), measured.round(3))
    assert np.all(np.abs(measured - expected) <= 0.06), (expected.round(3), measured.round(3))
    assert expected.max() > 0.3  # the values next to the boundary do slip
    # those far from it do not: 6.5 units or more (3.6 deviations at 1e-5)
    assert expected[:2].max() < 0.01 and measured[:2].max() < 0.01


def test_approximate_candidates_are_scored_with_their_slips(classifier, searched):
    """The search scores approximate rounding as Concrete runs it: the slip model moves some
    outputs away from `disable`, and by as much as Concrete's simulation does."""
    _, x, _ = classifier
    rows = x[_holdout(len(x))].numpy()
    disable = np.asarray(searched.forward(rows, fhe="disable"))
    scored = _scored(searched, rows)
    simulated = np.mean(
        [np.mean((np.asarray(searched.forward(rows, fhe="simulate")) - disable) ** 2) for _ in range(3)]
    )
    modelled = np.mean((scored - disable) ** 2)
    assert modelled > 0
    assert 0.5 < simulated / modelled < 2, (simulated, modelled)


def test_a_global_budget_is_shared_by_the_lookups_of_one_sample(classifier):
    """Under `global_p_error` the slips are drawn at the budget over the circuit's bootstraps:
    the loss the search reports is the one scored so."""
    model, x, _ = classifier
    bounds = {**BOUNDS, "p_error": None, "global_p_error": 1e-5}
    spec = {"metric": "mse", "tolerance": 0.02, "holdout": HOLDOUT}
    module = compile_torch_model(model, x, precision_search=spec, **bounds)
    choice = module.partition.program.precision_choice
    rows = _holdout(len(x))
    quantizer = module.partition.program.input_quantizers[0]
    dequantized = torch.from_numpy(quantizer.dequantize(quantizer.quantize(x[rows].numpy()))).float()
    with torch.no_grad():
        reference = model(dequantized).double().numpy()
    loss = np.mean((_scored(module, x[rows].numpy()) - reference) ** 2) / np.var(reference)
    assert choice.loss == pytest.approx(loss, rel=1e-9)
    disable = np.asarray(module.forward(x[rows].numpy(), fhe="disable"))
    assert np.mean((disable - reference) ** 2) / np.var(reference) != pytest.approx(loss, rel=1e-3)
