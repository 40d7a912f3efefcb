"""Uniform quantizers: float <-> integer maps for activations, inputs, outputs and weights."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple, Union

import numpy as np

ArrayLike = Union[float, np.ndarray]
STRETCH_RETRIES = 8  # per-channel weights: tries at a smaller stretch before the per-tensor scale
STRETCH_BACKOFF = 0.7


def bit_width(low: float, high: float) -> int:
    """Bits Concrete needs to hold every integer in [low, high] (one more for a sign)."""
    low, high = int(math.floor(low)), int(math.ceil(high))
    if low >= 0:
        return max(1, int(high).bit_length())
    return max((-low - 1).bit_length(), max(high, 0).bit_length()) + 1


@dataclass
class UniformQuantizer:
    """Asymmetric unsigned quantizer: float = scale * (q - zero_point), q in [0, q_max]."""

    scale: ArrayLike
    zero_point: ArrayLike
    n_bits: int
    # the largest integer; None: 2**n_bits - 1 (a QAT input quantizer with a narrow range, such
    # as Brevitas' narrow_range=True, stops below: the client clamps, the circuit needs no lookup)
    max_level: Optional[int] = None
    # a QAT model's own input quantizer: round(x / scale + model_zero_point) in float32, as the
    # model computes it, then shifted to this quantizer's zero-point. In float64, or with the
    # shift added before rounding, a tie of the float32 grid (8 / 5.3333335 is 1.5 in float32)
    # rounds the other way (round half to even)
    model_zero_point: Optional[float] = None

    @property
    def q_max(self) -> int:
        """The largest integer this quantizer gives."""
        return 2**self.n_bits - 1 if self.max_level is None else self.max_level

    @classmethod
    def from_range(cls, low: float, high: float, n_bits: int) -> "UniformQuantizer":
        """The quantizer covering [low, high] with 2**n_bits levels (0 stays representable)."""
        if not (math.isfinite(float(low)) and math.isfinite(float(high))):
            raise ValueError(
                f"the calibrated range [{float(low)}, {float(high)}] is not finite: an infinite or "
                "NaN value has no quantized range (an attention mask's -inf is only understood "
                "inside a softmax: softmax(scores + mask) or softmax(scores.masked_fill(mask, -inf)))"
            )
        low, high = min(float(low), 0.0), max(float(high), 0.0)
        levels = 2**n_bits - 1
        scale = (high - low) / levels if high > low else 1.0
        zero_point = int(np.clip(round(-low / scale), 0, levels))
        return cls(scale, zero_point, n_bits)

    def quantize(self, values: Any) -> np.ndarray:
        """Float array -> integers in [0, q_max]."""
        return np.clip(self._unclipped(values), 0, self.q_max).astype(np.int64)

    def _unclipped(self, values: Any) -> np.ndarray:
        if self.model_zero_point is not None:
            scaled = np.asarray(values, dtype=np.float32) / np.asarray(self.scale, dtype=np.float32)
            rounded = np.rint(scaled + np.float32(self.model_zero_point)).astype(np.float64)
            return rounded + (self.zero_point - self.model_zero_point)
        return np.rint(np.asarray(values, dtype=np.float64) / self.scale) + self.zero_point

    def dequantize(self, q: Any) -> np.ndarray:
        """Integers -> float array."""
        return dequantize(q, self.scale, self.zero_point)

    def clipped(self, values: Any) -> int:
        """How many values fall outside the quantizer's range (`quantize` clips them)."""
        q = self._unclipped(values)
        return int(np.count_nonzero((q < 0) | (q > self.q_max)))

    def to_dict(self) -> dict:
        """A JSON-serializable description (used by deployment artifacts)."""
        data = {
            "scale": _jsonable(self.scale),
            "zero_point": _jsonable(self.zero_point),
            "n_bits": self.n_bits,
        }
        if self.max_level is not None:
            data["max_level"] = self.max_level
        if self.model_zero_point is not None:
            data["model_zero_point"] = self.model_zero_point
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "UniformQuantizer":
        """Inverse of `to_dict`."""
        max_level = data.get("max_level")
        return cls(
            _array(data["scale"]),
            _array(data["zero_point"]),
            int(data["n_bits"]),
            None if max_level is None else int(max_level),
            None if data.get("model_zero_point") is None else float(data["model_zero_point"]),
        )


@dataclass
class OutputDequantizer:
    """float = scale * (q - zero_point) for a circuit output (accumulator or quantized value).

    `window` = (low, modulus), set once the circuit is compiled: Concrete decrypts the output
    modulo `modulus`, and the integer a decrypted value stands for is its representative in
    [low, low + modulus), a window centered on the output's range on the inputset (see
    `decrypted`).
    """

    scale: ArrayLike
    zero_point: ArrayLike
    window: Optional[Tuple[int, int]] = None

    def dequantize(self, q: Any) -> np.ndarray:
        """Integers -> float array."""
        return dequantize(q, self.scale, self.zero_point)

    def decrypted(self, q: Any) -> np.ndarray:
        """Integers as Concrete decrypted them -> the integers they stand for: an output a
        little below an unsigned type's 0 (a max that an approximate rounding's slip takes to
        -1) decrypts as 2**(bits + 1) - 1, and is -1 again here."""
        q = np.asarray(q)
        if self.window is None or not np.issubdtype(q.dtype, np.integer):
            return q
        low, modulus = self.window
        return low + np.mod(q.astype(np.int64) - low, modulus)

    def to_dict(self) -> dict:
        """A JSON-serializable description (used by deployment artifacts)."""
        data = {"scale": _jsonable(self.scale), "zero_point": _jsonable(self.zero_point)}
        if self.window is not None:
            data["window"] = list(self.window)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "OutputDequantizer":
        """Inverse of `to_dict`."""
        window = data.get("window")
        return cls(
            _array(data["scale"]),
            _array(data["zero_point"]),
            None if window is None else (int(window[0]), int(window[1])),
        )


def decryption_window(low: int, high: int, bits: int, signed: bool) -> Tuple[int, int]:
    """(lowest integer, modulus) of the window a Concrete output of `bits` bits decrypts into,
    centered on its range [low, high] on the inputset. concrete-python 2.11 decrypts a signed
    output modulo 2**bits and an unsigned one modulo 2**(bits + 1) (its padding bit); a value
    within half that of the range's middle decrypts to itself (tested in tests/test_claims.py,
    so that another Concrete version that decrypts otherwise fails the suite)."""
    modulus = 2**bits if signed else 2 ** (bits + 1)
    return -((modulus - low - high - 1) // 2), modulus


def dequantize(q: Any, scale: ArrayLike, zero_point: ArrayLike) -> np.ndarray:
    """float = scale * (q - zero_point), broadcasting per-channel parameters."""
    return (np.asarray(q, dtype=np.float64) - zero_point) * scale


def quantize_weights(
    weights: np.ndarray,
    n_bits: int,
    channel_axis: Union[int, None],
    accumulate: Optional[Callable[[np.ndarray], np.ndarray]] = None,
    out_axis: int = -1,
):
    """Symmetric weight quantization, per output channel when `channel_axis` is given.

    Returns (integer weights, scale) with scale broadcastable against `weights`; symmetric
    weights have no zero-point, so no correction term appears in the integer program.
    Weights that already are integers within the range (QAT weights) are kept exactly.

    Per channel, each channel is stretched to the full range only as far as (a) its integer
    2-norm stays within the widest channel's under one per-tensor scale (the noise a dot
    product adds grows with that norm) and, given `accumulate` (integer weights -> the layer's
    integer accumulator on the calibration inputs, output channels on `out_axis`), (b) the
    accumulator stays within the range per-tensor weights give it: every bit of accumulator
    costs a bootstrap in exact rounding and widens what a lookup reads.
    """
    weights = np.asarray(weights, dtype=np.float64)
    levels = max(1, 2 ** (n_bits - 1) - 1)
    integral = bool(np.all(weights == np.rint(weights)) and np.all(np.abs(weights) <= levels))
    if channel_axis is None:
        max_abs = np.max(np.abs(weights)) if weights.size else 0.0
        scale = np.where(max_abs > 0, max_abs / levels, 1.0)
    else:
        axes = tuple(a for a in range(weights.ndim) if a != channel_axis % weights.ndim)
        max_abs = np.max(np.abs(weights), axis=axes, keepdims=True)
        norms = np.sqrt(np.sum(weights**2, axis=axes, keepdims=True))
        widest_norm = float(np.max(norms)) if weights.size else 0.0
        tensor_scale = float(np.max(max_abs)) / levels if weights.size else 0.0
        # a channel's integer 2-norm stays within the widest one under one per-tensor scale
        norm_scale = norms * (tensor_scale / widest_norm) if widest_norm > 0 else 0.0
        scale = np.maximum(max_abs / levels, norm_scale)
        if accumulate is not None and tensor_scale > 0 and not integral:  # integers are kept
            scale = _within_tensor_accumulator(weights, levels, scale, tensor_scale, accumulate, out_axis)
        scale = np.where(scale > 0, scale, 1.0)
    if integral:
        return weights.astype(np.int64), np.ones_like(scale)  # already integers (QAT): exact
    q = np.clip(np.rint(weights / scale), -levels, levels).astype(np.int64)
    return q, scale


def _within_tensor_accumulator(
    weights: np.ndarray,
    levels: int,
    scale: np.ndarray,
    tensor_scale: float,
    accumulate: Callable[[np.ndarray], np.ndarray],
    out_axis: int,
) -> np.ndarray:
    """Per-channel scales no finer than keeps the accumulator within per-tensor weights' range.

    Channel c's accumulator under per-tensor weights spans [low_c, high_c]; its own scale
    stretches that by tensor_scale / scale_c. The stretch is capped so that every channel stays
    within [low, high], the whole per-tensor accumulator's range on the calibration set: the
    lookup that reads it is then placed, rounded and sized exactly as with per-tensor weights.
    A channel that the rounding of its weights takes out of that range is stretched less
    (STRETCH_BACKOFF, up to STRETCH_RETRIES times), then keeps the per-tensor scale (each output
    channel's accumulator depends on its own weights only, so the others are unaffected).
    """

    def channel_ranges(step: Any):
        q = np.clip(np.rint(weights / step), -levels, levels).astype(np.int64)
        acc = np.asarray(accumulate(q))
        moved = np.moveaxis(acc, out_axis, 0).reshape(acc.shape[out_axis], -1)
        return moved.min(axis=1).astype(np.float64), moved.max(axis=1).astype(np.float64)

    low, high = channel_ranges(tensor_scale)
    if not low.size:
        return scale
    bottom, top = float(low.min()), float(high.max())
    stretch = np.minimum(
        np.where(high > 0, top / np.maximum(high, 1), np.inf),
        np.where(low < 0, bottom / np.minimum(low, -1), np.inf),
    )
    # at most the stretch the channel's own scale asks for (finite where its per-tensor
    # integers are all 0 and the range says nothing)
    asked = np.divide(tensor_scale, scale, out=np.full(np.shape(scale), np.inf), where=scale > 0)
    stretch = np.clip(stretch.reshape(np.shape(scale)), 1.0, asked)
    for _ in range(STRETCH_RETRIES):  # the weights' rounding can carry a channel past the range
        capped = np.maximum(scale, tensor_scale / stretch)
        low, high = channel_ranges(capped)
        outside = ((low < bottom) | (high > top)).reshape(np.shape(scale))
        if not outside.any():
            return capped
        stretch = np.where(outside, np.maximum(STRETCH_BACKOFF * stretch, 1.0), stretch)
    return np.where(outside, tensor_scale, capped)


def _jsonable(value: ArrayLike):
    array = np.asarray(value, dtype=np.float64)
    return {"shape": list(array.shape), "data": array.ravel().tolist()}


def _array(data) -> ArrayLike:
    if isinstance(data, dict):
        array = np.asarray(data["data"], dtype=np.float64).reshape(data["shape"])
        return float(array) if array.ndim == 0 else array
    return data
