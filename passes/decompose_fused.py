"""Fused torch kernels -> the ATen ops they compute, before partitioning.

In eval mode under `torch.no_grad()`, `nn.TransformerEncoderLayer` runs its "fast path": the
whole layer is ONE op, `aten._transformer_encoder_layer_fwd`, which has no FHE lowering, so the
layer would stay in torch. This pass replaces each such node by the layer's math written with
ordinary ops (linear, layer norm, softmax, matmul, relu/gelu), traced to ATen on the node's own
traced values (static or symbolic shapes) and inlined in its place. The batch stays on dim 0
throughout (heads are split as (batch, heads, seq, head_dim)), so the attention runs in FHE.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._decomp import core_aten_decompositions
from torch.fx.experimental.proxy_tensor import make_fx

aten = torch.ops.aten


def transformer_encoder_layer(
    src,
    embed_dim,
    num_heads,
    qkv_weight,
    qkv_bias,
    proj_weight,
    proj_bias,
    use_gelu,
    norm_first,
    eps,
    norm_weight_1,
    norm_bias_1,
    norm_weight_2,
    norm_bias_2,
    ffn_weight_1,
    ffn_bias_1,
    ffn_weight_2,
    ffn_bias_2,
    mask=None,
    mask_type=None,
):
    """What `aten._transformer_encoder_layer_fwd` computes, for batch-first (N, L, E) inputs.

    mask_type 0: a (L, L) attention mask; 1: a (N, L) key padding mask; 2: a mask broadcast to
    (N, heads, L, L). Boolean masks mark the positions to leave out.
    """
    head_dim = embed_dim // num_heads

    def attention(x):
        batch, length = x.shape[0], x.shape[1]
        qkv = F.linear(x, qkv_weight, qkv_bias)
        q, k, v = (qkv[..., i * embed_dim : (i + 1) * embed_dim] for i in range(3))
        heads = lambda t: t.reshape(batch, length, num_heads, head_dim).permute(0, 2, 1, 3)  # noqa: E731
        scores = heads(q) @ heads(k).transpose(-2, -1) / math.sqrt(head_dim)
        if mask is not None:
            scores = scores + _additive_mask(mask, mask_type, scores.dtype)
        weights = torch.softmax(scores, dim=-1)
        out = (weights @ heads(v)).permute(0, 2, 1, 3).reshape(batch, length, embed_dim)
        return F.linear(out, proj_weight, proj_bias)

    def feed_forward(x):
        hidden = F.linear(x, ffn_weight_1, ffn_bias_1)
        hidden = F.gelu(hidden) if use_gelu else F.relu(hidden)
        return F.linear(hidden, ffn_weight_2, ffn_bias_2)

    norm_1 = lambda x: F.layer_norm(x, (embed_dim,), norm_weight_1, norm_bias_1, eps)  # noqa: E731
    norm_2 = lambda x: F.layer_norm(x, (embed_dim,), norm_weight_2, norm_bias_2, eps)  # noqa: E731
    if norm_first:
        src = src + attention(norm_1(src))
        return src + feed_forward(norm_2(src))
    src = norm_1(src + attention(src))
    return norm_2(src + feed_forward(src))


def _additive_mask(mask, mask_type, dtype):
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(mask, float("-inf"))
    if mask_type == 1:  # key padding mask (N, L)
        return mask[:, None, None, :]
    return mask


# fused op -> its reference implementation (same arguments)
FUSED: Dict[Any, Callable[..., Any]] = {
    aten._transformer_encoder_layer_fwd.default: transformer_encoder_layer,
}


def _inline(graph_module: fx.GraphModule, node: fx.Node, reference: Callable[..., Any]) -> None:
    """Trace `reference` on the node's traced argument values and splice the ops in its place."""
    schema = node.target._schema
    arguments = []
    for index, argument in enumerate(schema.arguments):
        if index < len(node.args):
            arguments.append(node.args[index])
        elif argument.name in node.kwargs:
            arguments.append(node.kwargs[argument.name])
        else:
            arguments.append(argument.default_value if argument.has_default_value() else None)
    tensor_positions = [i for i, a in enumerate(arguments) if isinstance(a, fx.Node)]
    fake_values = [arguments[i].meta["val"] for i in tensor_positions]
    fake_mode = next(
        (getattr(v, "fake_mode", None) for v in fake_values if getattr(v, "fake_mode", None) is not None),
        None,
    )
    if fake_mode is not None:  # constants traced elsewhere join the inputs' fake mode
        fake_values = [
            v
            if getattr(v, "fake_mode", None) is fake_mode
            else fake_mode.from_tensor(torch.empty(tuple(v.shape), dtype=v.dtype))
            for v in fake_values
        ]

    def traced(*tensors):
        values = list(arguments)
        for position, tensor in zip(tensor_positions, tensors):
            values[position] = tensor
        return reference(*values)

    # the backend's op set: core ATen, with softmax kept whole
    table = {op: fn for op, fn in core_aten_decompositions().items() if op is not aten._safe_softmax.default}
    if fake_mode is not None:
        with fake_mode:
            inner = make_fx(traced, decomposition_table=table, tracing_mode="real")(*fake_values)
    else:
        inner = make_fx(traced, decomposition_table=table, tracing_mode="real")(*fake_values)
    env: Dict[fx.Node, fx.Node] = {}
    placeholders = iter(arguments[i] for i in tensor_positions)
    result: Optional[fx.Node] = None
    graph = graph_module.graph
    with graph.inserting_before(node):
        for inner_node in inner.graph.nodes:
            if inner_node.op == "placeholder":
                env[inner_node] = next(placeholders)
            elif inner_node.op == "get_attr":
                name = f"_fused_{node.name}_{inner_node.target}"
                graph_module.register_buffer(name, getattr(inner, inner_node.target), persistent=False)
                env[inner_node] = graph.get_attr(name)
                env[inner_node].meta = dict(inner_node.meta)
            elif inner_node.op == "output":
                result = fx.node.map_arg(inner_node.args[0], lambda n: env[n])
            else:
                copy = graph.node_copy(inner_node, lambda n: env[n])
                for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
                    if key in node.meta:
                        copy.meta[key] = node.meta[key]
                env[inner_node] = copy
    node.replace_all_uses_with(result)
    graph.erase_node(node)


def decompose_fused(graph_module: fx.GraphModule, settings=None) -> fx.GraphModule:
    """Replace every fused kernel of `FUSED` by the ATen ops of its reference implementation."""
    for node in list(graph_module.graph.nodes):
        reference = FUSED.get(node.target) if node.op == "call_function" else None
        if reference is not None:
            _inline(graph_module, node, reference)
    graph_module.graph.eliminate_dead_code()
    return graph_module
