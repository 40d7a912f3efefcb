"""transformers' GPT-2 `Conv1D` (a linear layer whose weight is stored transposed) -> `nn.Linear`.

`convert_conv1d_to_linear` is Concrete ML's module-level API (also exported by
`fhe_backend.hybrid_model`). The backend itself needs no conversion: in the ATen graph a
`Conv1D` is ``addmm(bias, view(x, [-1, nx]), weight)`` with its ``[nx, nf]`` weight, which is
the form a folded ``nn.Linear`` takes too, quantized per output channel (the last axis).
"""

from __future__ import annotations

import torch


def is_conv1d(module: torch.nn.Module) -> bool:
    """True for transformers' `Conv1D` (GPT-2 style: weight of shape (nx, nf), bias (nf,))."""
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and module.weight.dim() == 2
        and module.weight.shape[1] == module.nf
    )


def _to_linear(layer: torch.nn.Module) -> torch.nn.Linear:
    in_features, out_features = layer.weight.shape
    linear = torch.nn.Linear(
        in_features,
        out_features,
        bias=layer.bias is not None,
        device=layer.weight.device,
        dtype=layer.weight.dtype,
    )
    with torch.no_grad():
        linear.weight.copy_(layer.weight.t())
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
    linear.weight.requires_grad_(layer.weight.requires_grad)
    if layer.bias is not None:
        linear.bias.requires_grad_(layer.bias.requires_grad)
    linear.train(layer.training)
    return linear


def convert_conv1d_to_linear(layer_or_module: torch.nn.Module) -> torch.nn.Module:
    """Convert a `Conv1D` layer, or every `Conv1D` inside a module, to `nn.Linear`.

    A `Conv1D` given directly is returned as a new `nn.Linear`; a module is updated in place
    (its `Conv1D` children replaced, recursively) and returned.
    """
    if is_conv1d(layer_or_module):
        return _to_linear(layer_or_module)
    if not isinstance(layer_or_module, torch.nn.Module):
        raise TypeError(
            f"convert_conv1d_to_linear expects an nn.Module, not {type(layer_or_module).__name__}"
        )
    for name, child in list(layer_or_module.named_children()):
        setattr(layer_or_module, name, convert_conv1d_to_linear(child))
    return layer_or_module
