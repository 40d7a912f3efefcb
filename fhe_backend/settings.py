"""One frozen settings object, parsed once from the user's options and threaded everywhere."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple, Union

from .errors import OptionError

DEFAULT_N_BITS = 8
DEFAULT_MODEL_BITS = 5
DEFAULT_FHE_MODE = "simulate"
FHE_MODES = ("disable", "simulate", "execute", "torch")
ROUNDING_METHODS = ("exact", "approximate")
ENCRYPTION_STATUSES = ("encrypted", "clear")
# how `execute` runs a batch's samples (see fhe_backend.circuit_runner): "auto" is "processes" on a
# machine with several cores (threads overlap Concrete's evaluations only in part)
RUNNERS = ("auto", "local", "processes", "threads", "ray")
MAX_TLU_BIT_WIDTH = 16
# quantizers may be wider than a lookup: such a model runs in the clear (fhe="disable", to check
# post-training quantization as Concrete ML allows) and fails only when compiled to a circuit
MIN_N_BITS, MAX_N_BITS = 2, 24
MIN_RECOMMENDED_INPUTSET = 100
AUTO = "auto"
# Concrete's documented default budget, always passed explicitly. With neither `p_error` nor
# `global_p_error` given, concrete-python 2.11 compiles every lookup at about 1e-5 on its own
# (22 wrong lookups in 2e6 simulated: a 1000-lookup circuit errs on ~1% of inferences) while
# reporting a global error probability below 1e-5; given explicitly, the budget is split
# over the circuit's lookups (8.8e-9 each for 1000 lookups)
DEFAULT_GLOBAL_P_ERROR = 1e-5
AUTO_ROUNDING_TOLERANCE = 0.01  # mean output error allowed by "auto", as a share of the output span
AUTO_ROUNDING_MIN_BITS = 2
# "auto" keeps lookups at most this wide: from 7 bits on, Concrete's keys and bootstraps grow
# steeply (digits CNN: key generation 8 s with 6-bit lookups, 28-32 s once one is 7 bits)
AUTO_ROUNDING_MAX_BITS = 6
# precision_search: task metrics, and defaults of its tolerance and held-out share
PRECISION_METRICS = ("argmax", "accuracy", "mse")
DEFAULT_PRECISION_TOLERANCE = 0.01
DEFAULT_PRECISION_HOLDOUT = 0.5
# per_channel_weights: per-channel scales whose accumulators stay within the range per-tensor
# weights give them at any rounding (by default only where lookups round exactly)
RANGE_CAPPED = "range_capped"
# A partition output is read by the client with ONE scale. The linear ops whose per-channel scales
# would reach an output take per-tensor weights instead, with log2(spread of the rows' scales)
# more bits, at most `output_extra_weight_bits` (default this many): rounded up in a leveled
# circuit (each row keeps its per-channel step while the rows' scales are within 2**this), down
# where the circuit bootstraps (lookups or encrypted products share the output's width; a row's
# step at most twice its per-channel one)
DEFAULT_OUTPUT_EXTRA_WEIGHT_BITS = 4
# An average pool's window sum feeds the next linear op directly (no requantizing lookup) when it
# adds at most `pool_sum_bits` (default this many) bits to its input and lookups round
# approximately: on the digits CNN (2x2 pool before a conv) that saved 64 of 352 PBS and 18% of
# the complexity, at the same accuracy or better. With exact rounding each of those bits costs a
# bootstrap per lookup of the next layer and widens its parameters (digits CNN, exact 6: 2624 PBS
# but 6.35e11 against 2752 and 5.69e11 with the lookup); without rounding the next lookup itself
# would be 2 bits wider.
DEFAULT_POOL_SUM_BITS = 2
MAX_EXTRA_BITS = 8  # the most `output_extra_weight_bits` or `pool_sum_bits` may be


@dataclass(frozen=True)
class NBits:
    """Bit-widths of the quantizers, with Concrete ML's meaning of each field."""

    op_inputs: int
    op_weights: int
    model_inputs: int
    model_outputs: int

    @classmethod
    def parse(cls, value: Any) -> "NBits":
        """Build from an int (inputs and weights; outputs at least 5 bits) or a dict."""
        if isinstance(value, NBits):
            return value
        if isinstance(value, bool) or not isinstance(value, (int, Mapping)):
            raise OptionError(
                f"option 'n_bits' = {value!r}: expected an int or a dict with keys "
                "'op_inputs', 'op_weights' (mandatory), 'model_inputs', 'model_outputs'"
            )
        if isinstance(value, int):
            fields = dict(
                op_inputs=value,
                op_weights=value,
                model_inputs=value,
                model_outputs=max(DEFAULT_MODEL_BITS, value),
            )
        else:
            allowed = {"op_inputs", "op_weights", "model_inputs", "model_outputs"}
            unknown = set(value) - allowed
            missing = {"op_inputs", "op_weights"} - set(value)
            if unknown or missing:
                raise OptionError(
                    f"option 'n_bits' = {dict(value)!r}: "
                    + (f"unknown keys {sorted(unknown)}; " if unknown else "")
                    + (f"missing mandatory keys {sorted(missing)}; " if missing else "")
                    + f"allowed keys are {sorted(allowed)}"
                )
            fields = dict(
                op_inputs=value["op_inputs"],
                op_weights=value["op_weights"],
                model_inputs=value.get("model_inputs", DEFAULT_MODEL_BITS),
                model_outputs=value.get("model_outputs", DEFAULT_MODEL_BITS),
            )
        for key, bits in fields.items():
            if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_N_BITS <= bits <= MAX_N_BITS:
                raise OptionError(
                    f"option 'n_bits' field '{key}' = {bits!r}: expected an int in "
                    f"[{MIN_N_BITS}, {MAX_N_BITS}] (1 bit leaves no room for a sign or a zero point)"
                )
        return cls(**fields)


@dataclass(frozen=True)
class Rounding:
    """Accumulator rounding before each table lookup: keep `n_bits` most significant bits.

    `n_bits="auto"` first finds the lowest precision that every lookup of the partition can
    share (at most `AUTO_ROUNDING_MAX_BITS`) with the outputs within `AUTO_ROUNDING_TOLERANCE`
    of the unrounded program on the calibration set, then lowers single lookups further, in
    graph order, while the outputs stay within that budget (`IntegerProgram._search_rounding`).
    """

    n_bits: Union[int, str]
    method: str = "exact"

    @property
    def auto(self) -> bool:
        """True when the precision of each lookup is searched on the calibration set."""
        return self.n_bits == AUTO

    @property
    def approximate(self) -> bool:
        """True for Concrete's approximate rounding: cheaper, and a value near a rounding
        boundary may land one step off (`fhe.Exactness.APPROXIMATE`)."""
        return self.method == "approximate"

    @classmethod
    def parse(cls, value: Any) -> Optional["Rounding"]:
        """Build from None, an int, or a dict with 'n_bits' and optional 'method'."""
        if value is None or isinstance(value, Rounding):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {"n_bits", "method"}
            if unknown or "n_bits" not in value:
                raise OptionError(
                    f"option 'rounding_threshold_bits' = {dict(value)!r}: a dict needs 'n_bits' (int) "
                    f"and may have 'method' in {ROUNDING_METHODS}"
                )
            method = value.get("method", "exact")
            method = str(getattr(method, "value", method)).lower()
            if method not in ROUNDING_METHODS:
                raise OptionError(
                    f"option 'rounding_threshold_bits' method = {value.get('method')!r}: "
                    f"allowed {ROUNDING_METHODS}"
                )
            return cls._checked(value["n_bits"], method)
        return cls._checked(value, "exact")

    @classmethod
    def _checked(cls, n_bits: Any, method: str) -> "Rounding":
        if n_bits == AUTO:
            return cls(AUTO, method)
        if isinstance(n_bits, bool) or not isinstance(n_bits, int) or not 1 <= n_bits <= MAX_TLU_BIT_WIDTH:
            raise OptionError(
                f"option 'rounding_threshold_bits' n_bits = {n_bits!r}: expected None, an int in "
                f"[1, {MAX_TLU_BIT_WIDTH}], 'auto', or {{'n_bits': int | 'auto', "
                f"'method': 'exact'|'approximate'}}"
            )
        return cls(n_bits, method)


@dataclass(frozen=True, eq=False)
class PrecisionSearch:
    """Search the lowest bit-widths whose task metric stays within `tolerance`.

    Run per FHE partition on its calibration inputs, in the clear (the integer program, as in
    `fhe="disable"`), scored on a held-out share (`holdout`, every k-th distinct sample) against
    the float graph. `metric`: "argmax" (share of samples whose argmax over the last dim is not
    float's), "accuracy" (float accuracy minus the candidate's against `labels`, one integer
    label per inputset sample, in order), "mse" (mean squared error over the float output's
    variance). A candidate passes when its loss is at most `tolerance` above the loss of the
    program at the given `n_bits` and `rounding_threshold_bits`, which are upper bounds. See
    `fhe_backend.quantization.precision_search`.
    """

    metric: str = "argmax"
    tolerance: float = DEFAULT_PRECISION_TOLERANCE
    holdout: float = DEFAULT_PRECISION_HOLDOUT
    labels: Any = None
    min_bits: int = AUTO_ROUNDING_MIN_BITS

    @classmethod
    def parse(cls, value: Any) -> Optional["PrecisionSearch"]:
        """Build from None/False (off), True (defaults), a metric name, or a dict of fields."""
        if value is None or value is False or isinstance(value, PrecisionSearch):
            return value or None
        if value is True:
            return cls()
        if isinstance(value, str):
            value = {"metric": value}
        if not isinstance(value, Mapping):
            raise OptionError(
                f"option 'precision_search' = {value!r}: expected None, True, a metric name in "
                f"{PRECISION_METRICS}, or a dict with keys 'metric', 'tolerance', 'holdout', "
                "'labels', 'min_bits'"
            )
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise OptionError(
                f"option 'precision_search': unknown keys {unknown}; allowed keys are {sorted(allowed)}"
            )
        search = cls(**value)
        if search.metric not in PRECISION_METRICS:
            raise OptionError(
                f"option 'precision_search' metric = {search.metric!r}: allowed {PRECISION_METRICS}"
            )
        for key, bounds, lowest in (("tolerance", "[0, 1)", 0.0), ("holdout", "(0, 1)", 1e-9)):
            number = getattr(search, key)
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not lowest <= number < 1:
                raise OptionError(
                    f"option 'precision_search' {key} = {number!r}: expected a float in {bounds}"
                )
        if isinstance(search.min_bits, bool) or not isinstance(search.min_bits, int) or search.min_bits < 1:
            raise OptionError(
                f"option 'precision_search' min_bits = {search.min_bits!r}: expected an int >= 1"
            )
        if (search.metric == "accuracy") != (search.labels is not None):
            raise OptionError(
                "option 'precision_search': metric 'accuracy' needs 'labels' (one integer label per "
                "inputset sample, in order) and the other metrics take none; "
                f"got metric {search.metric!r} with labels {'given' if search.labels is not None else 'missing'}"
            )
        if search.labels is not None:
            import numpy as np

            labels = np.asarray(search.labels)
            if labels.ndim != 1 or labels.dtype.kind not in "iu":
                raise OptionError(
                    f"option 'precision_search' labels: expected a 1-d array of integer class labels, "
                    f"got shape {labels.shape} and dtype {labels.dtype}"
                )
            search = dataclasses.replace(search, labels=labels)
        return search


@dataclass(frozen=True, eq=False)
class FheSettings:
    """Every option of the backend, validated. Build it with `FheSettings.from_options`."""

    inputset: Any = None
    n_bits: NBits = NBits.parse(DEFAULT_N_BITS)
    rounding_threshold_bits: Optional[Rounding] = None
    p_error: Optional[float] = None
    global_p_error: Optional[float] = None
    configuration: Any = None
    fhe: str = DEFAULT_FHE_MODE
    verbose: bool = False
    require_full_fhe: bool = False
    module_names: Tuple[str, ...] = ()
    inputs_encryption_status: Optional[Tuple[str, ...]] = None
    key_cache_dir: Optional[str] = None
    per_channel_weights: Union[bool, str] = True  # or RANGE_CAPPED
    show_mlir: bool = False
    precision_search: Optional[PrecisionSearch] = None
    runner: str = "auto"
    output_extra_weight_bits: int = DEFAULT_OUTPUT_EXTRA_WEIGHT_BITS
    pool_sum_bits: int = DEFAULT_POOL_SUM_BITS

    @classmethod
    def from_options(cls, options: Optional[Mapping[str, Any]] = None) -> "FheSettings":
        """Parse `torch.compile(..., options=...)`; unknown options and bad values raise."""
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise OptionError(f"unknown option(s) {unknown}: allowed options are {sorted(known)}")
        return cls().replace(**options)

    def error_budget(self) -> Tuple[Optional[float], Optional[float]]:
        """(p_error, global_p_error) the circuits are compiled with: the options', else the
        configuration's, else Concrete's documented default budget (DEFAULT_GLOBAL_P_ERROR)."""
        configuration = self.configuration
        p_error = self.p_error if self.p_error is not None else getattr(configuration, "p_error", None)
        global_p_error = (
            self.global_p_error
            if self.global_p_error is not None
            else getattr(configuration, "global_p_error", None)
        )
        if p_error is None and global_p_error is None:
            return None, DEFAULT_GLOBAL_P_ERROR
        return p_error, global_p_error

    def replace(self, **overrides: Any) -> "FheSettings":
        """A copy with some options changed, validated the same way as `from_options`."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values.update(overrides)
        return FheSettings(**_validated(values))


EXTRA_BITS_OPTIONS = {
    "output_extra_weight_bits": "the most weight bits an output layer adds when it takes per-tensor weights",
    "pool_sum_bits": "the most bits an average pool's window sum adds to the next linear op's accumulator",
}


def _validated(values: dict) -> dict:
    values["n_bits"] = NBits.parse(values["n_bits"])
    values["rounding_threshold_bits"] = Rounding.parse(values["rounding_threshold_bits"])
    values["precision_search"] = PrecisionSearch.parse(values["precision_search"])
    for key in ("p_error", "global_p_error"):
        value = values[key]
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1
        ):
            raise OptionError(f"option '{key}' = {value!r}: expected None or a float in (0, 1)")
    if values["p_error"] is not None and values["global_p_error"] is not None:
        raise OptionError(
            f"options 'p_error' = {values['p_error']!r} and 'global_p_error' = "
            f"{values['global_p_error']!r}: set at most one of them"
        )
    configuration = values["configuration"]
    if configuration is not None:
        from concrete import fhe

        if not isinstance(configuration, fhe.Configuration):
            raise OptionError(
                f"option 'configuration' = {configuration!r}: expected a concrete.fhe.Configuration"
            )
    mode = values["fhe"]
    mode = getattr(mode, "value", mode)
    if mode not in FHE_MODES:
        raise OptionError(f"option 'fhe' = {values['fhe']!r}: allowed modes are {FHE_MODES}")
    values["fhe"] = mode
    for key in ("verbose", "require_full_fhe", "per_channel_weights", "show_mlir"):
        if key == "per_channel_weights" and values[key] == RANGE_CAPPED:
            continue
        if not isinstance(values[key], (bool, int)):
            also = f" or {RANGE_CAPPED!r}" if key == "per_channel_weights" else ""
            raise OptionError(f"option '{key}' = {values[key]!r}: expected a bool{also}")
        values[key] = bool(values[key])
    names = values["module_names"]
    if isinstance(names, str):
        names = (names,)
    if not all(isinstance(name, str) for name in names):
        raise OptionError(f"option 'module_names' = {names!r}: expected a list of module names")
    values["module_names"] = tuple(names)
    status = values["inputs_encryption_status"]
    if status is not None:
        status = tuple(status)
        if any(s not in ENCRYPTION_STATUSES for s in status):
            raise OptionError(
                f"Unexpected status from '{status}', expected 'clear' or 'encrypted'. (option "
                f"'inputs_encryption_status': one of {ENCRYPTION_STATUSES} per input)"
            )
        values["inputs_encryption_status"] = status
    if values["runner"] not in RUNNERS:
        raise OptionError(
            f"option 'runner' = {values['runner']!r}: allowed {RUNNERS} (how `execute` spreads a "
            "batch's samples: 'local' one after another, 'threads' one per core, 'ray' on a Ray cluster)"
        )
    for key, meaning in EXTRA_BITS_OPTIONS.items():
        bits = values[key]
        if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= MAX_EXTRA_BITS:
            raise OptionError(
                f"option '{key}' = {bits!r}: expected an int in 0..{MAX_EXTRA_BITS} ({meaning})"
            )
    if values["key_cache_dir"] is not None:
        values["key_cache_dir"] = str(values["key_cache_dir"])
    return values


def check_encryption_status(status: Tuple[str, ...], count: int) -> None:
    """Check `inputs_encryption_status` against a model of `count` tensor inputs (Concrete ML's
    checks, in its order and words): one status per input, at least one 'encrypted'."""
    option = f"(option 'inputs_encryption_status': one of {ENCRYPTION_STATUSES} per input)"
    if len(status) < count:
        raise OptionError(f"Missing arguments from '{status}', expected {count} arguments. {option}")
    if len(status) > count:
        raise OptionError(f"Too many arguments in '{status}', expected {count} arguments. {option}")
    if "encrypted" not in status:
        raise OptionError(
            f"At least one input should be encrypted but got {status}: a circuit computes on "
            f"encrypted values {option}"
        )
