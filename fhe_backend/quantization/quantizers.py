"""Uniform quantizers: float <-> integer maps for activations, inputs, outputs and weights."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

ArrayLike = Union[float, np.ndarray]


def bit_width(low: float, high: float) -> int:
    """Bits Concrete needs to hold every integer in [low, high] (one more for a sign)."""
    low, high = int(math.floor(low)), int(math.ceil(high))
    if low >= 0:
        return max(1, int(high).bit_length())
    return max((-low - 1).bit_length(), max(high, 0).bit_length()) + 1


@dataclass
class UniformQuantizer:
    """Asymmetric unsigned quantizer: float = scale * (q - zero_point), q in [0, 2**n_bits - 1]."""

    scale: ArrayLike
    zero_point: ArrayLike
    n_bits: int

    @classmethod
    def from_range(cls, low: float, high: float, n_bits: int) -> "UniformQuantizer":
        """The quantizer covering [low, high] with 2**n_bits levels (0 stays representable)."""
        low, high = min(float(low), 0.0), max(float(high), 0.0)
        levels = 2**n_bits - 1
        scale = (high - low) / levels if high > low else 1.0
        zero_point = int(np.clip(round(-low / scale), 0, levels))
        return cls(scale, zero_point, n_bits)

    def quantize(self, values: Any) -> np.ndarray:
        """Float array -> integers in [0, 2**n_bits - 1]."""
        q = np.rint(np.asarray(values, dtype=np.float64) / self.scale) + self.zero_point
        return np.clip(q, 0, 2**self.n_bits - 1).astype(np.int64)

    def dequantize(self, q: Any) -> np.ndarray:
        """Integers -> float array."""
        return dequantize(q, self.scale, self.zero_point)

    def clipped(self, values: Any) -> int:
        """How many values fall outside the quantizer's range (`quantize` clips them)."""
        q = np.rint(np.asarray(values, dtype=np.float64) / self.scale) + self.zero_point
        return int(np.count_nonzero((q < 0) | (q > 2**self.n_bits - 1)))

    def to_dict(self) -> dict:
        """A JSON-serializable description (used by deployment artifacts)."""
        return {
            "scale": _jsonable(self.scale),
            "zero_point": _jsonable(self.zero_point),
            "n_bits": self.n_bits,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "UniformQuantizer":
        """Inverse of `to_dict`."""
        return cls(_array(data["scale"]), _array(data["zero_point"]), int(data["n_bits"]))


@dataclass
class OutputDequantizer:
    """float = scale * (q - zero_point) for a circuit output (accumulator or quantized value)."""

    scale: ArrayLike
    zero_point: ArrayLike

    def dequantize(self, q: Any) -> np.ndarray:
        """Integers -> float array."""
        return dequantize(q, self.scale, self.zero_point)

    def to_dict(self) -> dict:
        """A JSON-serializable description (used by deployment artifacts)."""
        return {"scale": _jsonable(self.scale), "zero_point": _jsonable(self.zero_point)}

    @classmethod
    def from_dict(cls, data: dict) -> "OutputDequantizer":
        """Inverse of `to_dict`."""
        return cls(_array(data["scale"]), _array(data["zero_point"]))


def dequantize(q: Any, scale: ArrayLike, zero_point: ArrayLike) -> np.ndarray:
    """float = scale * (q - zero_point), broadcasting per-channel parameters."""
    return (np.asarray(q, dtype=np.float64) - zero_point) * scale


def quantize_weights(weights: np.ndarray, n_bits: int, channel_axis: Union[int, None]):
    """Symmetric weight quantization, per output channel when `channel_axis` is given.

    Returns (integer weights, scale) with scale broadcastable against `weights`; symmetric
    weights have no zero-point, so no correction term appears in the integer program.
    Weights that already are integers within the range (QAT weights) are kept exactly.
    """
    weights = np.asarray(weights, dtype=np.float64)
    levels = max(1, 2 ** (n_bits - 1) - 1)
    if channel_axis is None:
        max_abs = np.max(np.abs(weights)) if weights.size else 0.0
        scale = np.where(max_abs > 0, max_abs / levels, 1.0)
    else:
        axes = tuple(a for a in range(weights.ndim) if a != channel_axis % weights.ndim)
        max_abs = np.max(np.abs(weights), axis=axes, keepdims=True)
        norms = np.sqrt(np.sum(weights**2, axis=axes, keepdims=True))
        widest_norm = float(np.max(norms)) if weights.size else 0.0
        # a channel's integer 2-norm stays within the widest one under one per-tensor scale
        norm_scale = norms * (np.max(max_abs) / levels / widest_norm) if widest_norm > 0 else 0.0
        scale = np.maximum(max_abs / levels, norm_scale)
        scale = np.where(scale > 0, scale, 1.0)
    if np.all(weights == np.rint(weights)) and np.all(max_abs <= levels):
        return weights.astype(np.int64), np.ones_like(scale)  # already integers (QAT): exact
    q = np.clip(np.rint(weights / scale), -levels, levels).astype(np.int64)
    return q, scale


def _jsonable(value: ArrayLike):
    array = np.asarray(value, dtype=np.float64)
    return {"shape": list(array.shape), "data": array.ravel().tolist()}


def _array(data) -> ArrayLike:
    if isinstance(data, dict):
        array = np.asarray(data["data"], dtype=np.float64).reshape(data["shape"])
        return float(array) if array.ndim == 0 else array
    return data
