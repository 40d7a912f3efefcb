"""Lowerings from ATen ops to integer operations; `registry` is the source of truth.

`context` holds the values and the context every lowering works with; each other module lowers
one op family and registers its lowerings when imported, which happens here, eagerly.
"""

from . import activation, elementwise, embedding, linear, normalization, pool, quant, shape  # noqa: F401
from .registry import LOWERINGS, lowering_for, unsupported_reason  # noqa: F401
