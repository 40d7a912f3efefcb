"""Lowerings from ATen ops to integer operations; `registry` is the source of truth."""

from .registry import LOWERINGS, lowering_for, unsupported_reason  # noqa: F401
