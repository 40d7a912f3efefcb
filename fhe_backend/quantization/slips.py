"""Approximate rounding's slips, reproduced in the clear so that a search can see them.

Concrete's approximate rounding (`fhe.Exactness.APPROXIMATE`) does not clear the bits it rounds
away: they stay below the kept bits, and the next bootstrap's noise decides which way a value
near a rounding boundary goes. The noise is the one the optimizer sizes for the circuit's error
probability: a Gaussian whose tail beyond half a kept step is the per-lookup `p_error`, so its
standard deviation is ``step / (2 z)`` with ``z`` the normal quantile of ``1 - p_error / 2``
(about 0.070 of a step at ``p_error=2**-40``, 0.09 for a 300-lookup circuit at a global budget
of 1e-5). Measured against concrete-python 2.11's simulation for kept widths 3 to 10 and 2 to
10 bits rounded away: the fitted deviation is 0.070 of a step in every case at ``2**-40``, and
the share of values that slip agrees with this model within a few percent at 1e-5 and 2**-40;
Concrete's slips lean up a little (values just below a boundary slip up a few points more often,
those just above slip down as much less often), which the model does not reproduce
(`tests/test_precision_search.py::test_slip_model_matches_concretes_simulation`).

`fhe="disable"` rounds exactly (it is the deterministic reference); `precision_search` and
`rounding_threshold_bits={"n_bits": "auto", "method": "approximate"}` score approximately
rounded candidates with `SlipModel` (a fixed seed: the searches stay deterministic), so a
precision whose slips cost more than the tolerance is not chosen. On the
digits CNN at 5-bit lookups the slips cost 0.8-1.3 points of test accuracy that a score in the
clear does not see.
"""

from __future__ import annotations

from statistics import NormalDist
from typing import Any, Optional, Tuple

import numpy as np

# the slips of one scoring run are drawn from this seed: the same candidate scores the same
SLIP_SEED = 0


def slip_deviation(p_error: float) -> float:
    """The standard deviation of approximate rounding's noise, in rounding steps, for a lookup
    whose error probability (beyond half a step) is `p_error`."""
    if not 0.0 < p_error < 1.0:
        raise ValueError(f"an error probability in (0, 1) is needed, not {p_error}")
    return 0.5 / -NormalDist().inv_cdf(p_error / 2)


def lookup_error_probability(
    p_error: Optional[float], global_p_error: Optional[float], lookups: int
) -> float:
    """Each lookup's error probability under the circuit's budget: `p_error` per lookup, or a
    `global_p_error` per inference shared evenly by its `lookups` (Concrete's optimizer splits
    it over the bootstraps); the smaller where both are given."""
    shares = [p for p in (p_error, None if global_p_error is None else global_p_error / max(lookups, 1)) if p]
    if not shares:
        raise ValueError("p_error or global_p_error is needed")
    return min(shares)


def slips_under(budget: Tuple[Optional[float], Optional[float]], lookups_per_sample: int) -> "SlipModel":
    """The slips of a circuit compiled with `budget` (`FheSettings.error_budget()`: p_error,
    global_p_error) whose one sample makes `lookups_per_sample` table lookups."""
    return SlipModel(slip_deviation(lookup_error_probability(*budget, lookups_per_sample)))


class SlipModel:
    """Adds approximate rounding's noise to a lookup's input before it is rounded (numpy only).

    The noise is drawn in the input's units, ``deviation * 2**lsbs``, and rounded to integers:
    with Concrete's balanced boundary (`symetrize_deltas`, the default) a value a whole unit
    below the half step slips up when the noise reaches half a unit, as an integer shift of 1
    does under round-half-up.
    """

    def __init__(self, deviation: float, seed: int = SLIP_SEED):
        self.deviation = deviation
        self.rng = np.random.default_rng(seed)

    def __call__(self, expr: Any, lsbs: int) -> Any:
        """`expr` plus the noise of rounding `lsbs` bits away (tracers pass unchanged)."""
        if not isinstance(expr, np.ndarray) or expr.dtype.kind not in "iu":
            return expr
        noise = self.rng.normal(0.0, self.deviation * 2**lsbs, size=expr.shape)
        return expr + np.rint(noise).astype(expr.dtype)


__all__ = ["SLIP_SEED", "SlipModel", "lookup_error_probability", "slip_deviation", "slips_under"]
