"""The benchmark targets, declared as data: what is built, how it is compiled, how it is scored.

`kind` selects the measuring function in `benchmarks.measure` (``digits``: a classifier on
scikit-learn's digits; ``gpt2_hybrid``: the tiny GPT-2 with its MLP block in FHE;
``lora``: one LoRA training step on the tiny GPT-2). `model` names a builder of
`benchmarks.models`; `options` are the backend options the target is compiled with (Concrete
ML gets the same ones through its own API when compared).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence


@dataclass(frozen=True)
class Target:
    """One benchmark target."""

    name: str
    description: str
    kind: str
    model: str
    options: Dict[str, Any] = field(default_factory=dict)
    qat: bool = False
    comparable: bool = True  # whether compare_concrete_ml.py can rebuild it
    concrete_ml_options: Any = None  # Concrete ML's options when they differ (None: `options`)

    @property
    def reference_options(self) -> Dict[str, Any]:
        """The options Concrete ML compiles this target with in `--compare-python`."""
        return self.options if self.concrete_ml_options is None else self.concrete_ml_options


REFERENCE = {"n_bits": 6, "rounding_threshold_bits": 6}  # issue 9's Concrete ML configuration
FAST_ROUNDING = {"n_bits": "auto", "method": "approximate"}

TARGETS: List[Target] = [
    Target("mlp", "digits MLP 64-32-32-10, ReLU", "digits", "mlp",
           {"n_bits": 6, "rounding_threshold_bits": 6}),
    Target("cnn", "digits CNN conv(1->4,3x3,pad 1)-ReLU-avgpool 2-conv(4->8,3x3)-ReLU-linear(32->10)",
           "digits", "cnn", {"n_bits": 6, "rounding_threshold_bits": 6}),
    Target("mlp_fast", "digits MLP, approximate rounding with per-lookup 'auto' precision "
           "(vs Concrete ML at n_bits 6, rounding 6)", "digits", "mlp",
           {"n_bits": 6, "rounding_threshold_bits": FAST_ROUNDING}, concrete_ml_options=REFERENCE),
    Target("cnn_fast", "digits CNN, approximate rounding with per-lookup 'auto' precision "
           "(vs Concrete ML at n_bits 6, rounding 6)", "digits", "cnn",
           {"n_bits": 6, "rounding_threshold_bits": FAST_ROUNDING}, concrete_ml_options=REFERENCE),
    Target("qat", "Brevitas QATSimpleNet 3-bit, 64-30-30-10, on digits", "digits", "qat",
           {}, qat=True),
    Target("qat_fast", "Brevitas QATSimpleNet 3-bit, approximate rounding with per-lookup 'auto' "
           "precision (vs Concrete ML's compile_brevitas_qat_model defaults)", "digits", "qat",
           {"rounding_threshold_bits": FAST_ROUNDING}, qat=True, concrete_ml_options={}),
    Target("gpt2_mlp", "tiny GPT-2 (1 layer, n_embd 16), MLP block transformer.h.0.mlp in FHE (hybrid)",
           "gpt2_hybrid", "gpt2", {"n_bits": 6, "rounding_threshold_bits": 6}),
    Target("lora_step", "one LoRA training step on the tiny GPT-2, frozen linears in FHE",
           "lora", "gpt2", {"n_bits": 8}, comparable=False),
]

BY_NAME = {target.name: target for target in TARGETS}


def select(names: Sequence[str]) -> List[Target]:
    """The targets named (all of them for an empty selection), in declaration order."""
    from fhe_backend.errors import OptionError  # lazy: compare_concrete_ml.py has no fhe_backend

    names = [name.strip() for name in names if name.strip()]
    unknown = [name for name in names if name not in BY_NAME]
    if unknown:
        raise OptionError(f"unknown benchmark target(s) {unknown}: choose among {list(BY_NAME)} "
                          "(--targets NAME,...)")
    return [target for target in TARGETS if not names or target.name in names]
