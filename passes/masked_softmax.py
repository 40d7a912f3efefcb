"""Softmax over scores plus a constant attention mask: `softmax(x + mask)` -> a masked softmax.

`softmax(where(masked, -inf, x))` (what `x.masked_fill(masked, -inf)` becomes) is the same
softmax with the additive mask `where(masked, -inf, 0)`.

Attention masks hold -inf (or dtype-min) at masked positions (GPT-2's causal mask, padding
masks folded to constants). Those values have no quantized range, so the pass writes the
softmax with the mask split in two: its finite part is added to the scores, and its masked
positions become a constant 0/1 factor on the exponentials:

    e = exp(y - m) * keep,   y = x + where(masked, 0, mask),
    m = amax(y * keep + amin(y) * masked)   (the largest unmasked score)
    softmax = e / sum(e)

Exact for every row with an unmasked position. A fully masked row gives what eager torch
gives where that is a number: 1/n everywhere for a row of dtype-min (HF's mask value), zeros
for a row of -inf (as `aten._safe_softmax`, scaled_dot_product_attention's softmax, does;
plain softmax gives NaN there). Every op is one the lowerings already know (amin, amax, exp,
sum, div), so the scores stay encrypted from the query and key projections to the attention
output.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.fx as fx

from fhe_backend.graph_utils import fetch_attr

aten = torch.ops.aten
SOFTMAXES = {aten._softmax.default, aten._safe_softmax.default}
MASKED_BELOW = -1e30  # -inf and dtype-min (HF's mask value) count as masked


def _constant(graph_module: fx.GraphModule, node: Any, floating: bool = True) -> Optional[torch.Tensor]:
    """The tensor a get_attr node holds: a floating one, or (`floating=False`) a boolean one."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = fetch_attr(graph_module, node.target)
    if not isinstance(value, torch.Tensor):
        return None
    return value if (value.is_floating_point() if floating else value.dtype == torch.bool) else None


def _masked_scores(graph_module: fx.GraphModule, node: fx.Node) -> Optional[Tuple[fx.Node, torch.Tensor]]:
    """(scores, additive mask) when `node` is a softmax of `scores + mask` with masked
    positions, or of `where(masked, fill, scores)` (`masked_fill(masked, -inf)`, as nanoGPT
    writes a causal mask) whose fill is masked at every position it takes."""
    source = node.args[0]
    if not isinstance(source, fx.Node) or not isinstance(source.meta.get("val"), torch.Tensor):
        return None
    if source.target == aten.add.Tensor and len(source.args) == 2:
        for scores, mask in (source.args, reversed(source.args)):
            value = _constant(graph_module, mask)
            if value is not None and isinstance(scores, fx.Node) and bool((value <= MASKED_BELOW).any()):
                return scores, value
    if source.target == aten.where.self:
        condition, first, second = source.args
        chosen = _constant(graph_module, condition, floating=False)
        for fill, scores, masked in (
            (first, second, chosen),
            (second, first, None if chosen is None else ~chosen),
        ):
            value = _constant(graph_module, fill)
            if masked is None or value is None or not isinstance(scores, fx.Node):
                continue
            mask = torch.where(masked, value, torch.zeros((), dtype=value.dtype))
            dim = node.args[1]
            whole_rows = mask.ndim and mask.shape[dim] == source.meta["val"].shape[dim]
            if (
                whole_rows
                and bool(masked.any())
                and bool((mask[masked.expand_as(mask)] <= MASKED_BELOW).all())
            ):
                return scores, mask
    return None


class _Builder:
    """Appends aten nodes before a point, with metadata for their shapes."""

    def __init__(self, graph_module: fx.GraphModule, before: fx.Node):
        self.graph_module, self.before = graph_module, before
        self.fake_mode = getattr(before.meta.get("val"), "fake_mode", None)

    def constant(self, name: str, value: torch.Tensor) -> fx.Node:
        name = f"_{name}_{len(list(self.graph_module.buffers()))}"
        self.graph_module.register_buffer(name, value, persistent=False)
        with self.graph_module.graph.inserting_before(self.before):
            node = self.graph_module.graph.get_attr(name)
        node.meta["val"] = value
        return node

    def call(self, target, *args) -> fx.Node:
        with self.graph_module.graph.inserting_before(self.before):
            node = self.graph_module.graph.call_function(target, args)
        node.meta["val"] = self._evaluate(target, fx.node.map_arg(args, lambda n: n.meta["val"]))
        for key in ("nn_module_stack", "stack_trace"):
            if key in self.before.meta:
                node.meta[key] = self.before.meta[key]
        return node

    def _evaluate(self, target, metas):
        """The new node's value on stand-ins: zeros of static shapes, else fake tensors."""
        flat = [m for m in metas if isinstance(m, torch.Tensor)]
        if all(isinstance(d, int) for m in flat for d in m.shape):
            return target(
                *[torch.zeros(m.shape, dtype=m.dtype) if isinstance(m, torch.Tensor) else m for m in metas]
            )
        with self.fake_mode:
            return target(
                *[
                    self.fake_mode.from_tensor(m)
                    if isinstance(m, torch.Tensor) and getattr(m, "fake_mode", None) is not self.fake_mode
                    else m
                    for m in metas
                ]
            )


def masked_softmax(graph_module: fx.GraphModule, settings=None) -> fx.GraphModule:
    """Rewrite every softmax of scores plus a constant mask with -inf entries (see above)."""
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function" or node.target not in SOFTMAXES:
            continue
        found = _masked_scores(graph_module, node)
        if found is None:
            continue
        scores, mask = found
        dim = node.args[1]
        masked = mask <= MASKED_BELOW
        build = _Builder(graph_module, node)
        finite = build.constant("mask_finite", torch.where(masked, torch.zeros_like(mask), mask))
        keep = build.constant("mask_keep", (~masked).to(mask.dtype))
        shifted = build.call(aten.add.Tensor, scores, finite)
        # the row's maximum over unmasked positions: masked ones take the row's minimum first
        floor = build.call(aten.amin.default, shifted, [dim], True)
        candidates = build.call(
            aten.add.Tensor,
            build.call(aten.mul.Tensor, shifted, keep),
            build.call(aten.mul.Tensor, floor, build.constant("mask_masked", masked.to(mask.dtype))),
        )
        peak = build.call(aten.amax.default, candidates, [dim], True)
        exponent = build.call(aten.exp.default, build.call(aten.sub.Tensor, shifted, peak))
        kept = build.call(aten.mul.Tensor, exponent, keep)
        total = build.call(aten.sum.dim_IntList, kept, [dim], True)
        empty_rows = masked.all(dim, keepdim=True)
        if bool(empty_rows.any()):  # 0 / 1 there instead of 0 / 0
            total = build.call(
                aten.add.Tensor, total, build.constant("mask_empty_rows", empty_rows.to(mask.dtype))
            )
        result = build.call(aten.div.Tensor, kept, total)
        uniform = empty_rows & torch.isfinite(mask).all(dim, keepdim=True)
        if bool(uniform.any()):  # rows of dtype-min: eager softmax gives 1 / n
            fill = uniform.to(mask.dtype).expand_as(mask) / mask.shape[dim]
            result = build.call(
                aten.add.Tensor, result, build.constant("mask_uniform_rows", fill.contiguous())
            )
        node.replace_all_uses_with(result)
        graph_module.graph.erase_node(node)
    graph_module.graph.eliminate_dead_code()
    return graph_module
