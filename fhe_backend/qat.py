"""Quantization-aware training (QAT) models: Brevitas layers and generic fake-quantizers.

Dynamo cannot trace Brevitas layers in one graph (QuantTensor metadata and data-dependent
Python branches break it into many small graphs). This module gives every Brevitas layer an
equivalent traceable forward, used while a graph is captured (``torch.compiler.is_compiling()``)
in eval mode: the layer's learned quantizers are read once, at trace time
(`torch._dynamo.assume_constant_result`), and become constants of the graph:

* activation quantizers (``QuantIdentity``, ``QuantReLU``, input/output quantizers) become the
  custom op ``fhe::fake_quant(x, scale, zero_point, qmin, qmax)``, whose lowering produces
  exactly Brevitas' integers (`fhe_backend.lowering.quant`);
* quantized weights (``QuantLinear``, ``QuantConv1d``, ``QuantConv2d``) become their integer
  values, with the weight scale applied to the accumulator, so the circuit's accumulators are
  Brevitas' integer accumulators.

Nothing is re-calibrated: scales, zero-points and bit-widths are Brevitas'. Generic QAT models
(a plain torch model with its own ``round/clamp`` fake-quantizers) are recognized in the ATen
graph by the `detect_fake_quant` graph pass instead.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F

from .lowering.quant import fake_quant

_INSTALLED = False


def _brevitas_layer_types() -> Tuple[Any, ...]:
    try:
        from brevitas.nn.mixin.base import QuantLayerMixin
    except ImportError:  # brevitas is optional
        return ()
    return (QuantLayerMixin,)


def _generic_fake_quant_types() -> Tuple[type, ...]:
    from torch.ao.quantization import FakeQuantizeBase

    return (FakeQuantizeBase,)


def has_any_qnn_layers(model: torch.nn.Module) -> bool:
    """True when the model contains Brevitas quantized layers or torch fake-quantize modules."""
    types = _brevitas_layer_types() + _generic_fake_quant_types()
    return any(isinstance(module, types) for module in model.modules())


def prepare_qat_model(model: torch.nn.Module) -> torch.nn.Module:
    """Make a QAT model capturable as one graph; returns the model, switched to eval mode.

    Brevitas layers are captured through their traceable forward (see the module docstring)
    by `torch.compile` as well as by `torch.export`.
    """
    install_brevitas_support()
    model.eval()
    for module in model.modules():
        if isinstance(module, _brevitas_layer_types()):
            module._fhe_always_traceable = True
            module._fhe_qat_constants = _layer_constants(module)  # read now, in eager mode
    return model


def _layer_constants(layer: torch.nn.Module) -> dict:
    """The quantizer specs and integer weights of a Brevitas layer, computed eagerly."""
    constants = {}
    for attribute in ("input_quant", "act_quant", "output_quant"):
        proxy = getattr(layer, attribute, None)
        if proxy is not None and proxy.is_quant_enabled:
            constants[attribute] = _quantizer_spec(proxy)
    if getattr(layer, "weight_quant", None) is not None:
        constants["weights"] = _integer_weights(layer)
    return constants


# ---- Brevitas: quantizer parameters, read at trace time ------------------------------------


@torch._dynamo.assume_constant_result
def _quantizer_spec(proxy: torch.nn.Module) -> Tuple[torch.Tensor, torch.Tensor, float, float]:
    """(scale, zero_point, qmin, qmax) of an enabled Brevitas activation quantizer proxy."""
    from brevitas.function.ops import max_int, min_int

    with torch.no_grad():
        bit_width = proxy.bit_width().detach()
        signed = bool(proxy.is_signed)
        narrow = bool(proxy.is_narrow_range)
        qmin = float(min_int(signed, narrow, bit_width))
        qmax = float(max_int(signed, narrow, bit_width))
        return (
            proxy.scale().detach().clone().float(),
            proxy.zero_point().detach().clone().float(),
            qmin,
            qmax,
        )


@torch._dynamo.assume_constant_result
def _integer_weights(layer: torch.nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weights as centered integers, scale broadcast over output channels) of a Brevitas layer.

    When the scale is not per-tensor or per-output-channel, returns (dequantized weights, 1).
    """
    with torch.no_grad():
        quant = layer.quant_weight()
        value = getattr(quant, "value", quant).detach()
        scale = getattr(quant, "scale", None)
        if scale is None or not _per_channel_scale(scale, layer):
            return value.clone(), torch.ones(())
        centered = torch.round(value / scale)
        channel_shape = _channel_shape(layer)
        return centered.clone(), scale.detach().reshape(-1).reshape(
            channel_shape if scale.numel() > 1 else ()
        ).clone()


def _per_channel_scale(scale: torch.Tensor, layer: torch.nn.Module) -> bool:
    out_channels = layer.weight.shape[0]
    return scale.numel() == 1 or (
        scale.numel() == out_channels and scale.reshape(-1).shape[0] == scale.shape[0]
    )


def _channel_shape(layer: torch.nn.Module) -> Tuple[int, ...]:
    """Shape broadcasting a per-output-channel vector over the layer's output."""
    if isinstance(layer, torch.nn.Linear):
        return (-1,)
    return (1, -1) + (1,) * (layer.weight.dim() - 2)


def _constant(layer: torch.nn.Module, key: str, compute, *args) -> Any:
    """A layer constant: cached by `prepare_qat_model`, else read at trace time."""
    cached = getattr(layer, "_fhe_qat_constants", {})
    return cached[key] if key in cached else compute(*args)


def _fake_quantized(layer: torch.nn.Module, attribute: str, x: torch.Tensor) -> torch.Tensor:
    proxy = getattr(layer, attribute)
    if not proxy.is_quant_enabled:
        return x
    scale, zero_point, qmin, qmax = _constant(layer, attribute, _quantizer_spec, proxy)
    return fake_quant(x, scale, zero_point, qmin, qmax)


def _plain(x: Any) -> torch.Tensor:
    """The float tensor of a Brevitas QuantTensor (or the tensor itself)."""
    return getattr(x, "value", x) if not isinstance(x, torch.Tensor) else x


def _activation_forward(layer: torch.nn.Module, x: Any) -> Any:
    """Traceable eval forward of QuantIdentity, QuantReLU, ... (QuantNonLinearActLayer)."""
    x = _fake_quantized(layer, "input_quant", _plain(x))
    fused = layer.act_quant.fused_activation_quant_proxy
    if fused is None:
        return _as_returned(layer, "input_quant", x)
    x = fused.activation_impl(x)
    return _as_returned(layer, "act_quant", _fake_quantized(layer, "act_quant", x))


def _as_returned(
    layer: torch.nn.Module, attribute: str, y: torch.Tensor, accumulator_scale: Any = None
) -> Any:
    """What the layer returns: with ``return_quant_tensor=True`` a Brevitas QuantTensor around
    the fake-quantized values (so user code reading ``.value``, ``.scale`` ... still runs while
    the graph is captured), else the tensor itself. A weight layer without an output quantizer
    returns its accumulator (scale `accumulator_scale`, zero-point 0, 32 bits as a bound)."""
    if not getattr(layer, "return_quant_tensor", False):
        return y
    from brevitas.quant_tensor import IntQuantTensor

    proxy = getattr(layer, attribute, None)
    if proxy is not None and getattr(proxy, "is_quant_enabled", False):
        scale, zero_point, qmin, qmax = _constant(layer, attribute, _quantizer_spec, proxy)
        bits, signed = float(round(math.log2(qmax - qmin + 1.0))), qmin < 0
    else:
        scale = accumulator_scale if accumulator_scale is not None else torch.ones(())
        zero_point, bits, signed = torch.zeros(()), 32.0, True
    return IntQuantTensor(y, scale, zero_point, torch.full((), bits), signed, False)


def _weight_layer_forward(layer: torch.nn.Module, x: Any) -> Any:
    """Traceable eval forward of QuantLinear, QuantConv1d, QuantConv2d."""
    input_scale = getattr(x, "scale", None) if not isinstance(x, torch.Tensor) else None
    x = _fake_quantized(layer, "input_quant", _plain(x))
    weights, scale = _constant(layer, "weights", _integer_weights, layer)
    if isinstance(layer, torch.nn.Linear):
        y = F.linear(x, weights)
    else:
        y = layer._conv_forward(x, weights, None)
    y = y * scale
    if layer.bias is not None:
        y = y + layer.bias.reshape(_channel_shape(layer))
    accumulator_scale = input_scale * scale if input_scale is not None else None
    return _as_returned(layer, "output_quant", _fake_quantized(layer, "output_quant", y), accumulator_scale)


def _traceable(layer: torch.nn.Module) -> bool:
    if layer.training or getattr(layer, "export_mode", False):
        return False
    return getattr(layer, "_fhe_always_traceable", False) or torch.compiler.is_compiling()


def _supported_weight_layer(layer: torch.nn.Module) -> bool:
    return isinstance(layer, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)) and not getattr(
        layer, "is_same_padded_strided", False
    )


def install_brevitas_support() -> bool:
    """Give Brevitas layers their traceable forward while a graph is captured (idempotent).

    Returns False when Brevitas is not installed. Eager execution is unchanged.
    """
    global _INSTALLED
    if _INSTALLED:
        return True
    try:
        from brevitas.nn.quant_layer import QuantNonLinearActLayer, QuantWeightBiasInputOutputLayer
    except ImportError:
        return False

    original_activation = QuantNonLinearActLayer.forward
    original_weight = QuantWeightBiasInputOutputLayer.forward_impl

    @functools.wraps(original_activation)
    def activation_forward(self, input):
        if _traceable(self):
            return _activation_forward(self, input)
        return original_activation(self, input)

    @functools.wraps(original_weight)
    def weight_forward(self, inp):
        if _traceable(self) and _supported_weight_layer(self):
            return _weight_layer_forward(self, inp)
        return original_weight(self, inp)

    QuantNonLinearActLayer.forward = activation_forward
    QuantWeightBiasInputOutputLayer.forward_impl = weight_forward
    _INSTALLED = True
    return True


def brevitas_bit_widths(model: torch.nn.Module) -> Optional[dict]:
    """{module name: activation or weight bit-width} of a Brevitas model (None without Brevitas)."""
    if not _brevitas_layer_types():
        return None
    widths = {}
    for name, module in model.named_modules():
        for attribute in ("act_quant", "weight_quant", "input_quant", "output_quant"):
            proxy = getattr(module, attribute, None)
            if proxy is not None and getattr(proxy, "is_quant_enabled", False):
                widths[f"{name}.{attribute}"] = int(proxy.bit_width())
    return widths


install_brevitas_support()
