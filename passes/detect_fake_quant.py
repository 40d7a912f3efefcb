"""Detect generic QAT fake-quantizers in the ATen graph and turn them into `fhe::fake_quant`.

Concrete ML's ``import_qat=True`` case: a plain torch model quantizes its own activations.
Two forms are recognized, with per-tensor constant scale and zero-point:

* ``torch.fake_quantize_per_tensor_affine`` (``torch.ao.quantization.FakeQuantize``), which
  reaches the graph as ``getitem(fake_quantize_per_tensor_affine_cachemask(...), 0)``;
* the hand-written chain ``(clamp(round(x / s + zp), qmin, qmax) - zp) * s`` (the zero-point
  may be added after the rounding, ``x * (1 / s)`` may replace the division, and a zero
  zero-point may be omitted).

The `fhe::fake_quant` lowering then uses exactly that quantizer instead of a calibrated one.
"""

from __future__ import annotations

import operator
from typing import Any, Optional, Tuple

import torch
import torch.fx as fx

from fhe_backend.lowering.quant import FAKE_QUANT, constant_value

aten = torch.ops.aten
ADD, SUB, MUL, DIV = aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor
TORCH_FAKE_QUANT = {
    aten.fake_quantize_per_tensor_affine_cachemask.default,
    aten.fake_quantize_per_tensor_affine.default,
}

# (x, scale, zero_point, qmin, qmax, the node computing the dequantized value)
Match = Tuple[fx.Node, float, float, float, float, fx.Node]


def _scalar(graph_module: fx.GraphModule, arg: Any) -> Optional[float]:
    """The value of a Python number or a one-element constant tensor, else None."""
    if isinstance(arg, bool):
        return None
    if isinstance(arg, (int, float)):
        return float(arg)
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = constant_value(graph_module, arg)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return float(value)
    return None


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _binary(graph_module: fx.GraphModule, node: Optional[fx.Node], target) -> Optional[Tuple[fx.Node, float]]:
    """(tensor operand, constant) of `tensor <target> constant`, else None."""
    if node is None or node.op != "call_function" or node.target != target or len(node.args) != 2:
        return None
    if node.kwargs.get("alpha", 1) != 1:
        return None
    tensor, constant = node.args
    value = _scalar(graph_module, constant)
    if not isinstance(tensor, fx.Node) or value is None:
        return None
    return tensor, value


def _match_torch_fake_quant(graph_module: fx.GraphModule, node: fx.Node) -> Optional[Match]:
    if node.op != "call_function" or node.target not in TORCH_FAKE_QUANT:
        return None
    x, scale, zero_point, qmin, qmax = node.args[:5]
    scale, zero_point = _scalar(graph_module, scale), _scalar(graph_module, zero_point)
    if scale is None or zero_point is None:
        return None
    output = node
    if node.target == aten.fake_quantize_per_tensor_affine_cachemask.default:
        getters = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        if len(getters) != 1 or len(node.users) != 1:
            return None
        output = getters[0]
    return x, scale, zero_point, float(qmin), float(qmax), output


def _match_round_chain(graph_module: fx.GraphModule, round_node: fx.Node) -> Optional[Match]:
    if round_node.op != "call_function" or round_node.target != aten.round.default:
        return None
    pre, zero_point = round_node.args[0], None
    added = _binary(graph_module, pre, ADD)
    if added is not None and _only_user(pre) is round_node:
        pre, zero_point = added
    divided = _binary(graph_module, pre, DIV)
    multiplied = _binary(graph_module, pre, MUL)
    if divided is not None:
        x, scale = divided
    elif multiplied is not None and multiplied[1] != 0:
        x, scale = multiplied[0], 1.0 / multiplied[1]
    else:
        return None
    node = _only_user(round_node)
    if zero_point is None:
        added = _binary(graph_module, node, ADD)
        zero_point = added[1] if added is not None else 0.0
        node = _only_user(node) if added is not None else node
    if node is None or node.target != aten.clamp.default or len(node.args) != 3:
        return None
    qmin, qmax = (_scalar(graph_module, a) for a in node.args[1:])
    if qmin is None or qmax is None:
        return None
    node = _only_user(node)
    subtracted = _binary(graph_module, node, SUB)
    if subtracted is not None and subtracted[1] == zero_point:
        node = _only_user(node)
    elif zero_point != 0:
        return None
    rescaled = _binary(graph_module, node, MUL)
    unscaled = _binary(graph_module, node, DIV)
    if rescaled is not None and abs(rescaled[1] - scale) <= 1e-6 * abs(scale):
        return x, scale, zero_point, qmin, qmax, node
    if unscaled is not None and unscaled[1] and abs(1.0 / unscaled[1] - scale) <= 1e-6 * abs(scale):
        return x, scale, zero_point, qmin, qmax, node
    return None


def _constant(graph_module: fx.GraphModule, before: fx.Node, name: str, value: float) -> fx.Node:
    tensor = torch.tensor(value, dtype=torch.float32)
    graph_module.register_buffer(name, tensor, persistent=False)
    with graph_module.graph.inserting_before(before):
        node = graph_module.graph.get_attr(name)
    node.meta["val"] = tensor
    return node


def detect_fake_quant(graph_module: fx.GraphModule, settings=None) -> fx.GraphModule:
    """Replace every recognized fake-quantizer by one `fhe::fake_quant` node."""
    graph = graph_module.graph
    count = 0
    for node in list(graph.nodes):
        if node.graph is not graph:
            continue  # erased by an earlier replacement
        match = _match_torch_fake_quant(graph_module, node) or _match_round_chain(graph_module, node)
        if match is None:
            continue
        x, scale, zero_point, qmin, qmax, output = match
        if scale <= 0 or zero_point != round(zero_point):
            continue
        scale_node = _constant(graph_module, output, f"_fhe_qat_scale_{count}", scale)
        zero_point_node = _constant(graph_module, output, f"_fhe_qat_zero_point_{count}", zero_point)
        with graph.inserting_before(output):
            fake_quant = graph.call_function(FAKE_QUANT, (x, scale_node, zero_point_node, qmin, qmax))
        fake_quant.meta = dict(output.meta)
        output.replace_all_uses_with(fake_quant)
        count += 1
    if count:
        graph.eliminate_dead_code()
    return graph_module
