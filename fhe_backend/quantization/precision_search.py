"""Precision search: the lowest bit-widths whose task metric stays within a tolerance.

Circuits cost what their lookups and accumulators cost, and Concrete's parameters grow steeply
with the lookups' precision: on the digits MLP, 5-bit lookups cost a third of 6-bit ones at the
same accuracy. The option `precision_search` (`fhe_backend.settings.PrecisionSearch`) searches,
per FHE partition and in the clear (the integer program, as in ``fhe="disable"``):

1. the lowest lookup precision (`rounding_threshold_bits`) at which the user's `n_bits` keep the
   metric within the tolerance, then, at that precision, the activation and weight bits
   (`op_inputs`, `op_weights`) that keep it;
2. lookup by lookup in graph order, one bit less while the metric holds;
3. (QAT) fewer bits for the outputs' bias step (`IntegerProgram.qat_bias_bits`) where that
   narrows the circuit's widest integer and the metric holds;
4. where several candidates pass (stage 1's pairs, one per accumulator width; stage 2's steps),
   Concrete compiles a few of them (no keys) and the least complexity times key bytes is kept
   (`_CircuitCosts`): Concrete's parameters follow the weights' norms rather than the
   accumulator's width, and lookups at several precisions get one bootstrap key each plus
   keyswitch keys between them, which the clear-text order cannot see.

Where lookups round approximately, stages 1-4 run twice, with per-channel weights as given and
with their accumulators capped to the range per-tensor weights give (`per_channel_weights=
"range_capped"`, the default under exact rounding), and Concrete's cheapest of the two is kept:
the cap narrows the accumulators, so lookups can go lower (the digits MLP: 5 bits instead of 6),
but it costs channels precision that some models need (a GPT-2 block at 8 bits).

The metric is a loss against the float graph (argmax disagreement, accuracy lost, or relative
mean squared error); a candidate passes when its loss exceeds the loss of the program at the
user's bounds (their `n_bits` and rounding, which no candidate exceeds) by at most the
tolerance: "within one point of what the bits you gave reach". Every candidate is an
`IntegerProgram` calibrated on the whole quantized inputset exactly as the final one is, and
scored on a held-out share of its distinct samples (every k-th one), so the program compiled at
the end scores on that share what the search measured. Without a rounding option the search
rounds with Concrete's approximate method (one PBS per lookup).

Approximately rounded candidates (the bounds included) are scored with the rounding's slips
drawn as Concrete's simulation draws them (`fhe_backend.quantization.slips`, a fixed seed):
scored exactly, as in `disable`, a 5-bit digits CNN's loss left out the 0.8-1.3 points of test
accuracy its slips cost in simulation and execution.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import CONCRETE_COMPILE_ERRORS, FheBackendError, OptionError
from ..graph_utils import as_tuple, solve_symbol
from ..settings import (
    AUTO_ROUNDING_MAX_BITS,
    RANGE_CAPPED,
    FheSettings,
    NBits,
    PrecisionSearch,
    Rounding,
)
from .program import ALIGNED_GRID, QAT_BIAS_BITS, ZERO_GRID, IntegerProgram
from .quantizers import bit_width

logger = logging.getLogger("fhe_backend")

# the metric is scored on few samples below this: each one weighs more than a point
FEW_HOLDOUT_SAMPLES = 100
# passing candidates compiled by Concrete (no keys) to compare complexity and key bytes
MAX_COMPARED = 4


@dataclass(frozen=True)
class Candidate:
    """One configuration: activation and weight bits, lookup precision, per-lookup overrides."""

    op_inputs: int
    op_weights: int
    rounding_bits: Optional[int]  # None: no rounding (the user's unrounded program)
    lookup_bits: Tuple[Tuple[str, int], ...] = ()
    qat_bias_bits: Optional[int] = None  # QAT outputs' bias step (IntegerProgram.qat_bias_bits)
    range_capped: bool = False  # per-channel weights capped to per-tensor accumulator ranges
    rounding_grid: str = ALIGNED_GRID  # rounded lookups' grid (IntegerProgram.rounding_grid)


@dataclass(frozen=True)
class Evaluation:
    """A candidate scored on the held-out samples."""

    candidate: Candidate
    loss: float  # metric degradation against float
    kept_bits: Dict[str, int]  # bits each lookup reads after rounding
    accumulator_bits: int  # widest integer: lookup inputs and partition outputs

    @property
    def cost(self) -> Tuple[int, int, int]:
        """What a circuit pays, most important first: widest lookup, widest integer, all lookups."""
        return (max(self.kept_bits.values(), default=0), self.accumulator_bits, sum(self.kept_bits.values()))


@dataclass(frozen=True)
class PrecisionChoice:
    """What the search chose for one partition, and how it scored."""

    n_bits: NBits
    rounding: Optional[Rounding]
    lookup_bits: Dict[str, int]  # bits each lookup reads after rounding (per-lookup overrides)
    range_capped: bool  # per_channel_weights="range_capped" where the user's rounding has no cap
    rounding_grid: str  # the rounded lookups' grid (IntegerProgram.rounding_grid)
    metric: str
    loss: float  # the chosen program's, against float
    bounds_loss: float  # the program's at the user's n_bits and rounding (the reference)
    tolerance: float  # loss - bounds_loss is at most this
    float_score: Optional[float]  # float accuracy on the held-out samples ("accuracy" only)
    holdout_samples: int
    evaluations: int
    # the passing candidates compiled by Concrete to choose among them, chosen one included
    compared: Tuple["CircuitCost", ...] = ()

    def describe(self) -> str:
        """One line for logs and reports."""
        rounding = "none" if self.rounding is None else f"{self.rounding.method} {self.rounding.n_bits}"
        line = (
            f"n_bits op_inputs {self.n_bits.op_inputs}, op_weights {self.n_bits.op_weights}; rounding "
            f"{rounding}; lookups {max(self.lookup_bits.values(), default=0)} bits at most; "
            f"{'per-channel weights range capped; ' if self.range_capped else ''}"
            f"{'rounding grid through 0; ' if self.rounding_grid == ZERO_GRID else ''}"
            f"{self.metric} loss {self.loss:.4f} against float ({self.bounds_loss:.4f} at the "
            f"bounds, tolerance {self.tolerance}) on "
            f"{self.holdout_samples} held-out samples, {self.evaluations} programs scored"
        )
        bits = (self.n_bits.op_inputs, self.n_bits.op_weights)
        chosen = next(
            (
                c
                for c in self.compared
                if (c.n_bits, c.lookup_bits, c.range_capped, c.rounding_grid)
                == (bits, self.lookup_bits, self.range_capped, self.rounding_grid)
            ),
            None,
        )
        if len(self.compared) > 1 and chosen is not None:
            line += (
                f"; {len(self.compared)} compiled, chosen: complexity {chosen.complexity:.3g}, "
                f"keys {chosen.key_bytes / 1e6:.0f} MB"
            )
        return line


@dataclass(frozen=True)
class CircuitCost:
    """Concrete's figures for one passing candidate (compiled, no keys generated)."""

    n_bits: Tuple[int, int]  # op_inputs, op_weights
    lookup_bits: Dict[str, int]  # bits each lookup reads after rounding
    complexity: float  # Concrete's cost of one evaluation
    key_bytes: int  # bootstrap + keyswitch keys, uncompressed (key generation time follows it)
    range_capped: bool = False  # the candidate's per-channel weights were range capped
    rounding_grid: str = ALIGNED_GRID  # the candidate's rounding grid

    def rank(self) -> Tuple[float, float]:
        """Smaller is better: complexity times key bytes (a relative gain on either side weighs
        the same), then complexity."""
        return (self.complexity * self.key_bytes, self.complexity)


class _Scorer:
    """Scores integer programs on the held-out samples of one partition's inputset."""

    def __init__(self, program: IntegerProgram, q_inputs: Sequence[np.ndarray], spec: PrecisionSearch):
        self.program = program
        self.spec = spec
        self.q_inputs = [np.asarray(q) for q in q_inputs]
        distinct = _distinct_samples(self.q_inputs, program)
        self.holdout = distinct[_every_kth(len(distinct), spec.holdout)]
        if not len(self.holdout):
            raise OptionError(
                f"option 'precision_search': holdout {spec.holdout} of {len(distinct)} distinct "
                "inputset samples leaves none to score; give more samples or a larger holdout"
            )
        if len(self.holdout) < FEW_HOLDOUT_SAMPLES:
            warnings.warn(
                f"fhe_backend: precision_search scores on {len(self.holdout)} held-out samples "
                f"(< {FEW_HOLDOUT_SAMPLES}): one sample is worth {1 / len(self.holdout):.1%}; give a "
                "larger inputset or 'holdout' share",
                stacklevel=5,
            )
        self.reference = self._float_outputs()
        self.labels = self._labels(distinct)
        self.float_score = _accuracy(self.reference[0], self.labels) if self.labels is not None else None
        self.evaluations: Dict[Candidate, Evaluation] = {}
        self.lookups_per_sample: Optional[int] = None  # table lookups (PBS) in one sample

    def _float_outputs(self) -> List[np.ndarray]:
        """The float graph's outputs on the held-out samples (dequantized integer inputs)."""

        program = self.program
        tensors = {}
        for node, quantizer, q in zip(program.tensor_inputs, program.input_quantizers, self.q_inputs):
            value = torch.from_numpy(quantizer.dequantize(q[self.holdout]))
            traced = node.meta.get("val")
            tensors[node] = value.to(traced.dtype if isinstance(traced, torch.Tensor) else torch.float32)
        # symbolic sizes (a graph dynamo recompiled for dynamic shapes) from the tensors' shapes
        args = [tensors[n] if n in tensors else solve_symbol(n, tensors) for n in program.placeholders]
        with torch.no_grad():
            outputs = program.graph_module(*args)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        return [o.detach().to(torch.float64).numpy() for o in outputs if isinstance(o, torch.Tensor)]

    def _labels(self, distinct: np.ndarray) -> Optional[np.ndarray]:
        """The labels of the held-out samples; rows past the labels must repeat earlier samples."""
        labels = self.spec.labels
        if labels is None:
            return None
        if len(labels) > len(self.q_inputs[0]) or distinct[-1] >= len(labels):
            raise OptionError(
                f"option 'precision_search' labels: {len(labels)} labels for an inputset of "
                f"at least {distinct[-1] + 1} samples; give one label per inputset sample, in order"
            )
        if len(self.reference) != 1 or self.reference[0].ndim != 2:
            raise OptionError(
                "option 'precision_search' metric 'accuracy' scores a partition with one (samples, "
                f"classes) output; this one has outputs of shapes {[r.shape for r in self.reference]}. "
                "Use metric 'mse' (or 'argmax') for partitions that are not the whole classifier"
            )
        return np.asarray(labels)[self.holdout]

    def loss(self, outputs: Sequence[np.ndarray]) -> float:
        """How much worse than float the outputs are, in the metric's unit."""
        metric = self.spec.metric
        if metric == "accuracy":
            return float(self.float_score - _accuracy(outputs[0], self.labels))
        losses = []
        for output, reference in zip(outputs, self.reference):
            output = np.asarray(output, dtype=np.float64).reshape(reference.shape)
            if metric == "argmax":
                losses.append(_argmax_disagreement(output, reference))
            else:
                variance = max(float(np.var(reference)), 1e-12)
                losses.append(float(np.mean((output - reference) ** 2)) / variance)
        return max(losses, default=0.0)

    def program_of(
        self, candidate: Candidate, base: FheSettings, method: str
    ) -> Tuple[IntegerProgram, Dict[str, Tuple[int, int]]]:
        """The candidate's integer program, calibrated on the whole inputset, and its lookup ranges."""
        program = IntegerProgram(
            self.program.graph_module,
            self.program.stats,
            candidate_settings(base, candidate, method),
            self.program.encryption_status,
        )
        _apply(candidate, program)
        return program, program.calibrate_rounding(self.q_inputs)

    def evaluate(self, candidate: Candidate, base: FheSettings, method: str) -> Evaluation:
        """Build, calibrate and score the program of a candidate (memoized)."""
        if candidate in self.evaluations:
            return self.evaluations[candidate]
        program, ranges = self.program_of(candidate, base, method)
        holdout = [q[self.holdout] for q in self.q_inputs]
        if self.lookups_per_sample is None:  # the same for every candidate: counted once
            self.lookups_per_sample = program.lookups_per_sample(holdout)
        with program.drawing_slips(self.lookups_per_sample):
            outputs = as_tuple(program(*holdout))
        kept = {
            key: bit_width(low, high) - program.rounding_lsbs.get(key, 0)
            for key, (low, high) in ranges.items()
        }
        widths = [bit_width(low, high) for low, high in ranges.values()]
        widths += [bit_width(int(np.min(o)), int(np.max(o))) for o in outputs if np.size(o)]
        evaluation = Evaluation(
            candidate,
            self.loss(program.dequantize_outputs(*outputs)),
            kept,
            max(widths, default=0),
        )
        self.evaluations[candidate] = evaluation
        logger.debug("precision_search %s: loss %.4f, cost %s", candidate, evaluation.loss, evaluation.cost)
        return evaluation


def _apply(candidate: Candidate, program: IntegerProgram) -> None:
    """Set the candidate's per-program choices (those that are not settings) on `program`."""
    program.lookup_precision = dict(candidate.lookup_bits)
    if candidate.qat_bias_bits is not None:
        program.qat_bias_bits = candidate.qat_bias_bits
    program.rounding_grid = candidate.rounding_grid


def candidate_settings(base: FheSettings, candidate: Candidate, method: str) -> FheSettings:
    """The settings of one candidate (no further search)."""
    n_bits = dataclasses.replace(base.n_bits, op_inputs=candidate.op_inputs, op_weights=candidate.op_weights)
    rounding = None if candidate.rounding_bits is None else Rounding(candidate.rounding_bits, method)
    per_channel = RANGE_CAPPED if candidate.range_capped else base.per_channel_weights
    return base.replace(
        n_bits=n_bits,
        rounding_threshold_bits=rounding,
        precision_search=None,
        per_channel_weights=per_channel,
    )


def search_precision(
    program: IntegerProgram,
    q_inputs: Sequence[np.ndarray],
    compile_circuit: Optional[Callable[[IntegerProgram], Any]] = None,
) -> PrecisionChoice:
    """Search the partition's bit-widths and set them on `program` (settings, per-lookup bits).

    Called by `FhePartition` before `IntegerProgram.calibrate_rounding` when the option
    `precision_search` is set; returns (and stores as `program.precision_choice`) the choice.
    A candidate is admitted when
    its loss against float exceeds the loss of the program at the user's bounds (their `n_bits`
    and rounding) by at most the tolerance; when none is cheaper, the bounds are kept.
    With `compile_circuit` (integer program -> Concrete circuit, no keys), the passing
    candidates on the way from one shared lookup precision to the per-lookup choice are compiled
    and the one with the least complexity times key bytes is kept (`_CircuitCosts`).
    """
    spec = program.settings.precision_search
    assert spec is not None  # noqa: S101 - only called with the option set
    base = program.settings.replace(precision_search=None)
    user_rounding = base.rounding_threshold_bits
    method = user_rounding.method if user_rounding is not None else "approximate"
    top_bits = (
        AUTO_ROUNDING_MAX_BITS if user_rounding is None or user_rounding.auto else int(user_rounding.n_bits)
    )
    scorer = _Scorer(program, q_inputs, spec)

    def evaluate(candidate: Candidate) -> Evaluation:
        return scorer.evaluate(candidate, base, method)

    widest_inputs, widest_weights = base.n_bits.op_inputs, base.n_bits.op_weights
    bounds = evaluate(Candidate(widest_inputs, widest_weights, None if user_rounding is None else top_bits))
    limit = bounds.loss + spec.tolerance
    costs = _CircuitCosts(lambda c: scorer.program_of(c, base, method)[0], compile_circuit)

    def search(variant: Dict[str, Any]) -> Evaluation:
        """Stages 1-4 for one variant (Candidate fields that stay fixed through the stages)."""

        def evaluate_variant(candidate: Candidate) -> Evaluation:
            return evaluate(dataclasses.replace(candidate, **variant))

        passing = _lowest_precision(
            evaluate_variant,
            widest_inputs,
            widest_weights,
            range(spec.min_bits, top_bits + 1),
            spec.min_bits,
            limit,
        )
        if not passing:
            return bounds
        # the clear-text cost ranks pairs by their widest integer; Concrete's parameters follow the
        # noise (weights' norms), so the narrowest accumulator is not always the cheapest circuit
        best = costs.cheapest(_one_per_width(passing), fallback=0)
        shortlist = [best]
        best = _per_lookup(evaluate, best, spec.min_bits, limit, shortlist)
        if program.qat:
            best = _qat_bias(evaluate, best, limit)
        if best.cost > bounds.cost:  # e.g. approximate rounding where the user asked for none
            return bounds
        return costs.cheapest([*shortlist, best])

    variants = [search(variant) for variant in _variants(program, base, method)]
    variants = list({e.candidate: e for e in variants}.values())  # several may be the bounds
    in_clear = min(range(len(variants)), key=lambda i: (variants[i].cost, variants[i].loss))
    best = costs.cheapest(variants, fallback=in_clear)
    chosen = candidate_settings(base, best.candidate, method)
    program.settings = chosen
    _apply(best.candidate, program)
    program.constants.clear()
    choice = PrecisionChoice(
        n_bits=chosen.n_bits,
        rounding=chosen.rounding_threshold_bits,
        lookup_bits=dict(best.kept_bits),
        range_capped=best.candidate.range_capped,
        rounding_grid=best.candidate.rounding_grid,
        metric=spec.metric,
        loss=best.loss,
        bounds_loss=bounds.loss,
        tolerance=spec.tolerance,
        float_score=scorer.float_score,
        holdout_samples=len(scorer.holdout),
        evaluations=len(scorer.evaluations),
        compared=tuple(cost for cost in costs.compiled.values() if cost is not None),
    )
    program.precision_choice = choice
    logger.info("precision_search: %s", choice.describe())
    if base.verbose:
        print(f"[fhe_backend] precision_search: {choice.describe()}")
    return choice


def _variants(program: IntegerProgram, base: FheSettings, method: str) -> List[Dict[str, Any]]:
    """Stage 0: the choices searched one after another, each through stages 1-4.

    - The per-channel range cap trades per-channel precision for narrower accumulators (lower
      lookup bits, smaller norms): worth it on the digits MLP and CNN, not on a GPT-2 block at
      8 bits. Exact rounding caps already; QAT weights are integers (never stretched).
    - The rounded lookups' grid: a QAT program's aligned with the QuantReLU's thresholds (closer
      to Brevitas) or through 0 (Concrete ML's; more accurate on the digits QAT network); a
      float program's under approximate rounding at its placement's phase or through 0 (the
      digits CNN: a point more accurate in `simulate`, where the rounding's slips count). The
      grid costs nothing: between equal circuits the search keeps the lower loss. Exact
      rounding always rounds through 0.
    """
    variants: List[Dict[str, Any]] = [{}]
    if base.per_channel_weights is True and method != "exact" and not program.qat:
        variants.append({"range_capped": True})
    if program.qat or method == "approximate":
        variants += [{**variant, "rounding_grid": ZERO_GRID} for variant in variants]
    return variants


def _lowest_precision(evaluate, widest_inputs: int, widest_weights: int, precisions, low: int, limit: float):
    """Stage 1: the lowest lookup precision the widest activations and weights allow, then the
    activation / weight bits that pass at that precision, cheapest circuit first ([] if none).

    Lower bits are tried from the widest down; a pair is skipped when a pair at least as wide in
    both failed (accuracy falls with fewer bits), which prunes but never admits a failing pair.
    """
    for bits in precisions:
        widest = evaluate(Candidate(widest_inputs, widest_weights, bits))
        if widest.loss > limit:
            continue
        passing: List[Evaluation] = [widest]
        failed: List[Tuple[int, int]] = []
        for inputs in range(widest_inputs, low - 1, -1):
            for weights in range(widest_weights, low - 1, -1):
                if (inputs, weights) == (widest_inputs, widest_weights):
                    continue
                if any(i >= inputs and w >= weights for i, w in failed):
                    continue
                evaluation = evaluate(Candidate(inputs, weights, bits))
                if evaluation.loss <= limit:
                    passing.append(evaluation)
                else:
                    failed.append((inputs, weights))
        return sorted(
            passing,
            key=lambda e: (e.cost, e.loss, -e.candidate.op_inputs, -e.candidate.op_weights),
        )
    return []


def _per_lookup(
    evaluate, best: Evaluation, low: int, limit: float, path: Optional[List[Evaluation]] = None
) -> Evaluation:
    """Stage 2: lookup by lookup in graph order, one bit less while the metric holds (each step
    kept is appended to `path`)."""
    for key in list(best.kept_bits):
        while best.kept_bits[key] > low:
            overrides = {**dict(best.candidate.lookup_bits), **{key: best.kept_bits[key] - 1}}
            trial = evaluate(
                dataclasses.replace(best.candidate, lookup_bits=tuple(sorted(overrides.items())))
            )
            if trial.loss > limit or trial.kept_bits[key] >= best.kept_bits[key]:
                break
            best = trial
            if path is not None:
                path.append(trial)
    return best


class _CircuitCosts:
    """Stage 4: passing candidates compiled by Concrete (no keys), the cheapest kept.

    The clear-text cost (widest lookup, then widest integer) cannot see what Concrete's
    optimizer makes of a program: its parameters follow the noise (the weights' norms), not the
    accumulator's width, and lookups at several precisions get one bootstrap key per precision
    plus keyswitch keys between them, so lowering single lookups cuts the complexity but can
    grow the keys more (key generation time follows the uncompressed key bytes). Among the
    candidates compared, the least complexity times key bytes wins (a relative gain on either
    side weighs the same). Without `compile_circuit` the clear-text order decides.
    """

    def __init__(
        self,
        program_of: Callable[[Candidate], IntegerProgram],
        compile_circuit: Optional[Callable[[IntegerProgram], Any]],
    ):
        self.program_of = program_of
        self.compile_circuit = compile_circuit
        self.compiled: Dict[Candidate, Optional[CircuitCost]] = {}

    def cost(self, evaluation: Evaluation) -> Optional[CircuitCost]:
        """Concrete's figures for a candidate (memoized); None when it does not compile."""
        candidate = evaluation.candidate
        if candidate in self.compiled or self.compile_circuit is None:
            return self.compiled.get(candidate)
        self.compiled[candidate] = None
        program = self.program_of(candidate)
        if program.too_wide:
            return None
        try:
            circuit = self.compile_circuit(program)
        except FheBackendError:
            raise
        except CONCRETE_COMPILE_ERRORS as error:  # e.g. NoParametersFound: not a candidate
            logger.debug("precision_search: %s does not compile (%s)", candidate, error)
            return None
        cost = CircuitCost(
            (candidate.op_inputs, candidate.op_weights),
            dict(evaluation.kept_bits),
            float(circuit.complexity),
            int(circuit.size_of_bootstrap_keys) + int(circuit.size_of_keyswitch_keys),
            candidate.range_capped,
            candidate.rounding_grid,
        )
        logger.debug("precision_search %s: %s", candidate, cost)
        self.compiled[candidate] = cost
        return cost

    def cheapest(self, passing: Sequence[Evaluation], fallback: int = -1) -> Evaluation:
        """The passing candidate Concrete finds cheapest among the first, the last and up to
        MAX_COMPARED - 2 evenly spread between them; the one at index `fallback` when none
        compiles or there is no compiler (its own compilation then reports why)."""
        distinct: List[Evaluation] = []
        for evaluation in passing:
            if all(evaluation.candidate != e.candidate for e in distinct):
                distinct.append(evaluation)
        if len(distinct) > MAX_COMPARED:
            middle = distinct[1:-1]
            picks = np.linspace(0, len(middle) - 1, MAX_COMPARED - 2).round().astype(int)
            distinct = [distinct[0], *[middle[i] for i in sorted(set(picks))], distinct[-1]]
        if len(distinct) < 2 or self.compile_circuit is None:
            return distinct[fallback]
        # equal circuits: the lower loss
        ranked = [((*cost.rank(), e.loss), e) for e in distinct for cost in [self.cost(e)] if cost]
        return min(ranked, key=lambda pair: pair[0])[1] if ranked else distinct[fallback]


def _one_per_width(passing: Sequence[Evaluation]) -> List[Evaluation]:
    """The first (cheapest in clear-text order) passing pair of each widest-integer width."""
    widths: Dict[int, Evaluation] = {}
    for evaluation in passing:
        widths.setdefault(evaluation.accumulator_bits, evaluation)
    return list(widths.values())


def _qat_bias(evaluate, best: Evaluation, limit: float) -> Evaluation:
    """Stage 3 (QAT): fewer bits for the output bias's finer step, while the metric holds, kept
    only where they make the circuit cheaper (a narrower widest integer)."""
    for bits in range(QAT_BIAS_BITS - 1, -1, -1):
        trial = evaluate(dataclasses.replace(best.candidate, qat_bias_bits=bits))
        if trial.loss > limit:
            break
        if trial.cost < best.cost:
            best = trial
    return best


def _distinct_samples(q_inputs: Sequence[np.ndarray], program: IntegerProgram) -> np.ndarray:
    """Row indices of the first occurrence of each distinct sample, in order.

    The backend completes the calibration chunks of a static graph with samples from the start
    of the inputset; those repeats (and duplicates in the data) are scored once.
    """
    rows = {len(q) for q in q_inputs}
    if len(rows) != 1:
        raise OptionError(
            "option 'precision_search' needs partition inputs with one row per sample; this "
            f"partition's inputs have {sorted(rows)} rows"
        )
    flat = np.concatenate([np.asarray(q).reshape(len(q), -1) for q in q_inputs], axis=1)
    _, first = np.unique(flat, axis=0, return_index=True)
    return np.sort(first)


def _every_kth(count: int, share: float) -> np.ndarray:
    """Positions of an evenly spread `share` of `count` items (deterministic, no random draw)."""
    positions = np.arange(count)
    return positions[np.floor((positions + 1) * share) > np.floor(positions * share)]


def _argmax_disagreement(output: np.ndarray, reference: np.ndarray) -> float:
    """Share of rows (over the last dim) whose argmax is not a float argmax: where float has a
    tie (a QAT network's logits often do), any of the tied classes agrees."""
    chosen = np.take_along_axis(reference, output.argmax(-1)[..., None], -1)[..., 0]
    ties = 1e-6 * (np.max(np.abs(reference), axis=-1) + 1e-12)
    return float(np.mean(chosen < reference.max(-1) - ties))


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(logits).reshape(len(labels), -1).argmax(-1) == labels))


__all__ = [
    "Candidate",
    "CircuitCost",
    "Evaluation",
    "PrecisionChoice",
    "candidate_settings",
    "search_precision",
]
