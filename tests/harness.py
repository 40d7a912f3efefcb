"""One harness for every numeric test: compile with backend "fhe", compare with eager torch.

The tolerance is derived from the quantization: a few output quantization steps of the
model's output range at the chosen bit-width, scaled by the number of quantized layers.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

import fhe_backend
from fhe_backend.graph_utils import as_tuple
from fhe_backend.settings import DEFAULT_MODEL_BITS


def compile_tiny_real_key_mlp(seed: int, **options: Any):
    """Linear(3, 4) -> ReLU -> Linear(4, 2) compiled at 3 bits with lookups of at most 4 bits and
    Concrete's insecure key cache (tests only): keys in seconds, for real-key tests."""
    from concrete import fhe

    from tests.conftest import KEY_CACHE

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).eval()
    configuration = fhe.Configuration(
        enable_unsafe_features=True, use_insecure_key_cache=True, insecure_key_cache_location=KEY_CACHE
    )
    return compile_fhe(
        model,
        torch.randn(100, 3),
        n_bits=3,
        rounding_threshold_bits=4,
        configuration=configuration,
        **options,
    )


def compile_fhe(model: torch.nn.Module, inputset: Any, **options: Any):
    """torch.compile(model, backend="fhe") with an inputset, a fresh dynamo cache."""
    torch._dynamo.reset()
    return torch.compile(model, backend="fhe", options={"inputset": inputset, **options})


# issue 13: a tolerance against eager torch wider than this share of the output span would let
# a constant output pass; `quantization_tolerance` refuses to build one
MAX_SHARE_OF_SPAN = 0.15


def quantization_tolerance(reference: torch.Tensor, n_bits: int, steps: float = 4.0) -> float:
    """`steps` quantization steps of the reference output's range at `n_bits`, at most
    MAX_SHARE_OF_SPAN of that range (a wider request is an error in the test)."""
    share = steps / (2**n_bits - 1)
    assert share <= MAX_SHARE_OF_SPAN, (
        f"a tolerance of {steps} steps at n_bits={n_bits} is {share:.0%} of the output span, over "
        f"{MAX_SHARE_OF_SPAN:.0%}: a constant output could pass; compare on quantization-grid "
        "inputs, with more bits, or with fhe='disable' exactly"
    )
    span = float(reference.max() - reference.min()) if reference.numel() else 0.0
    return steps * max(span, 1e-6) / (2**n_bits - 1)


def assert_matches_torch(
    model: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    inputset: Any,
    n_bits: int = 8,
    steps: float = 4.0,
    mode: str = "simulate",
    options: Optional[Dict[str, Any]] = None,
    expect_partitions: Optional[int] = None,
):
    """Compile `model`, run `inputs` in `mode`, assert every output is within tolerance of eager.

    Returns the compiled model (for further checks on its partitions).
    """
    model = model.eval()
    inputs = tuple(inputs)
    with torch.no_grad():
        expected = as_tuple(model(*inputs))
    compiled = compile_fhe(model, inputset, n_bits=n_bits, fhe=mode, **(options or {}))
    with torch.no_grad():
        actual = as_tuple(compiled(*inputs))
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert got.shape == want.shape, (got.shape, want.shape)
        # steps of the output quantizer: an int n_bits gives outputs max(5, n_bits) bits
        tolerance = quantization_tolerance(want.float(), max(DEFAULT_MODEL_BITS, n_bits), steps)
        error = float((got.float() - want.float()).abs().max())
        assert error <= tolerance, f"max error {error:.4g} > tolerance {tolerance:.4g}"
    partitions = fhe_backend.partitions(compiled)
    assert partitions, "nothing ran in FHE"
    if expect_partitions is not None:
        assert len(partitions) == expect_partitions
    return compiled


def digits_split(seed: int = 0):
    """scikit-learn's digits (ships with the package), scaled to [0, 1], split 75/25."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    return train_test_split(x, y, test_size=0.25, random_state=seed)


def find_cause(error: BaseException, kind: type) -> Optional[BaseException]:
    """The first exception of type `kind` in `error`'s cause chain (dynamo wraps backend errors)."""
    while error is not None and not isinstance(error, kind):
        error = error.__cause__ or getattr(error, "inner_exception", None)
    return error


def grid_inputs(shape: Sequence[int], n_bits: int, samples: int = 100, seed: int = 0) -> torch.Tensor:
    """Random inputs exactly on the grid an `n_bits` input quantizer calibrated on them uses.

    Values are k / 2**(n_bits - 2) for integers k in [-2**(n_bits-1), 2**(n_bits-1) - 1]; the
    first two samples hold the two extremes, so calibration finds that exact range and input
    quantization is lossless: what remains is the error of the operator's own lowering.
    """
    generator = torch.Generator().manual_seed(seed)
    half = 2 ** (n_bits - 1)
    steps = torch.randint(-half, half, (samples, *shape), generator=generator)
    steps[0], steps[1] = -half, half - 1
    return steps.to(torch.float32) / 2 ** (n_bits - 2)


def approximate_slips_that_wrap(circuit: Any) -> List[str]:
    """The approximately rounded values of a Concrete circuit whose largest input, rounded up
    one step more than exact rounding would (approximate rounding's slip), no longer fits the
    value's width, so that Concrete's result wraps around to 0 (see
    `fhe_backend.quantization.program._rounding_top`): one description per such value."""
    from concrete import fhe

    from fhe_backend.quantization.program import _rounding_top

    found = []
    graph = circuit.graph
    for node in graph.graph.nodes:
        kwargs = node.properties.get("kwargs", {})
        if kwargs.get("exactness") != fhe.Exactness.APPROXIMATE:
            continue
        (source,) = graph.ordered_preds_of(node)
        bits, lsbs, high = source.output.dtype.bit_width, int(kwargs["lsbs_to_remove"]), int(source.bounds[1])
        if source.output.dtype.is_signed:
            bits -= 1
        if high > _rounding_top(bits, lsbs, approximate=True):
            found.append(f"{bits}-bit input up to {high}, {lsbs} bits rounded away")
    return found


def rounding_carries(circuit: Any) -> List[str]:
    """The rounded values of a Concrete circuit (exact or approximate) whose exact rounding
    carries past the width of their input's range, where Concrete widens them by a bit (see
    `IntegerProgram._leave_room_on_top`): one description per such value."""
    graph = circuit.graph
    return [
        f"input in {graph.ordered_preds_of(node)[0].bounds} rounded by {node.properties['kwargs']['lsbs_to_remove']} bits"
        for node in graph.graph.nodes
        if node.properties.get("name") == "round_bit_pattern" and node.properties.get("overflow_detected")
    ]
