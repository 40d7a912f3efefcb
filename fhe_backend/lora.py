"""LoRA fine-tuning of a model whose frozen linear layers run in FHE.

The frozen base weights stay with the server: for each frozen linear (``nn.Linear``, and
transformers' GPT-2 ``Conv1D`` whose weight is stored transposed) both the forward pass
``x Wᵀ + b`` and the backward pass for the input gradient ``grad · W`` run as FHE partitions of
this backend (`fhe_backend.runtime.FhePartition`), glued together by a
``torch.autograd.Function``. The LoRA adapters train in clear torch on the client.

Dynamic quantization: activations and gradients change range during training, so every row is
divided by its max-abs before it is quantized (the circuits are calibrated on the unit range)
and the output is multiplied back. A bias enters the same circuit as one extra input column
holding ``anchor / scale`` (its weight row is ``b / anchor``), so the server keeps the bias too;
the bias is split over as many such columns as needed to keep its weight rows no larger than
the weights, so it does not coarsen the per-channel weight quantization.

API as in Concrete ML's ``concrete.ml.torch.lora``: `LoraTraining`, `LoraTrainer`,
`get_remote_names`, `setup_logger`, `grad_to`, `optimizer_to`. `LoraTrainer` compiles and
trains; shipping the compiled linears (server artifacts, the client connection, the client
model without the frozen weights) is `fhe_backend.lora_deployment.LoraDeployment`, to which its
deployment methods delegate.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .errors import FheBackendError, NotCompiledError, OptionError
from .lora_deployment import LoraDeployment
from .runtime import RUN_MODES, FhePartition
from .settings import FheSettings

try:  # GPT-2 style linear (weight stored as (in_features, out_features))
    from transformers.pytorch_utils import Conv1D as TransformerConv1D
except ImportError:  # pragma: no cover - transformers is optional
    TransformerConv1D = None

LINEAR_LAYERS: Tuple[Any, ...] = (nn.Linear,) + ((TransformerConv1D,) if TransformerConv1D else ())
DEFAULT_ROWS_PER_CIRCUIT = 16
MAX_BIAS_COLUMNS = 64
# checkpoint_epoch_{e}.pth at the end of each epoch (Concrete ML's name), and
# checkpoint_epoch_{e}_step_{s}.pth every `save_steps` optimizer steps
CHECKPOINT_PATTERN = re.compile(r"checkpoint_epoch_(\d+)(?:_step_(\d+))?\.pth$")
TRAINING_ARG_DEFAULTS = {"gradient_accumulation_steps": 1, "max_grad_norm": None, "save_steps": None}

logger = logging.getLogger("fhe_backend.lora")


class LoraError(FheBackendError, ValueError):
    """A LoRA training model, input or argument is not usable; the message says how to fix it."""


class LoraBatchError(LoraError, AssertionError):
    """A training batch of the wrong form (Concrete ML asserts there, so `except LoraError`,
    `except ValueError` and `except AssertionError` all catch it)."""


# ---- helpers of the Concrete ML API ------------------------------------------------------------


def setup_logger(log_file: str, level: int = logging.INFO) -> logging.Logger:
    """Set up the LoRA training logger: messages go to the console and to `log_file`."""
    train_logger = logging.getLogger("fhe_backend.lora.training")
    train_logger.setLevel(level)
    train_logger.propagate = False
    for handler in list(train_logger.handlers):
        train_logger.removeHandler(handler)
        handler.close()
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter("%(asctime)s - %(levelname)s - %(message)s")
    for handler in (logging.FileHandler(log_file), logging.StreamHandler()):
        handler.setLevel(level)
        handler.setFormatter(formatter)
        train_logger.addHandler(handler)
    return train_logger


def grad_to(param: torch.Tensor, device: str) -> None:
    """Move a parameter's gradient (if any) to `device`."""
    if param.grad is not None:
        param.grad.data = param.grad.data.to(device)


def optimizer_to(optim: torch.optim.Optimizer, device: str) -> None:
    """Move an optimizer's state tensors (momentum, ...) and parameter gradients to `device`."""
    for state in optim.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                state[key] = value.to(device)
    for group in optim.param_groups:
        for param in group["params"]:
            grad_to(param, device)


def get_remote_names(model: nn.Module, include_embedding_layers: bool = False) -> List[str]:
    """Names of the modules that run remotely (in FHE): the frozen linears, not the LoRA layers.

    On a `LoraTraining`-converted model the names are those of each `FheLinear`'s
    ``forward_module`` and ``backward_module``; on a plain model, those of the linear layers.
    The language-model head (``lm_head``) and embeddings are included only with
    `include_embedding_layers`.
    """
    names = []
    for name, module in model.named_modules():
        if "lora" in name:
            continue
        is_lm_head = "lm_head" in name
        if is_lm_head and not include_embedding_layers:
            continue
        if isinstance(module, FheLinear):
            names.append(f"{name}.forward_module")
            if module.backward_module is not None:
                names.append(f"{name}.backward_module")
        elif isinstance(module, LINEAR_LAYERS):
            names.append(name)
        elif include_embedding_layers and isinstance(module, nn.Embedding):
            names.append(name)
    return names


# ---- the frozen linear in FHE ------------------------------------------------------------------


class FheMatmul(nn.Module):
    """One direction of a frozen linear as an FHE partition: ``y = x @ matrix (+ bias)``.

    With dynamic quantization each row is divided by its max-abs before quantization and the
    output multiplied back, so the circuit (calibrated on the unit range) stays valid whatever
    the range of the batch. Rows are grouped `rows_per_circuit` at a time per circuit call.
    """

    def __init__(self, matrix: torch.Tensor, bias: Optional[torch.Tensor] = None, name: str = ""):
        super().__init__()
        self.register_buffer("matrix", matrix.detach().clone(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)
        self.name = name
        self.has_bias = bias is not None
        self.shape = tuple(matrix.shape)
        self.anchor = 1.0
        self.bias_columns = 1
        self.dynamic = True
        self.rows_per_circuit = DEFAULT_ROWS_PER_CIRCUIT
        self.partition: Optional[FhePartition] = None
        self.graph: Any = None  # the CompiledGraph holding `partition` (deployment needs it)
        self.recording = False
        self.private_info_cleared = False
        self._mode = "torch"
        self._recorded: List[torch.Tensor] = []

    @property
    def in_features(self) -> int:
        """Width of the input rows."""
        return int(self.shape[0])

    @property
    def out_features(self) -> int:
        """Width of the output rows."""
        return int(self.shape[1])

    @property
    def mode(self) -> str:
        """Run mode: torch (float, clear) or an FHE mode of the partition."""
        return self._mode

    @mode.setter
    def mode(self, value: Any) -> None:
        value = getattr(value, "value", value)
        if value not in RUN_MODES:
            raise OptionError(f"FHE mode {value!r} for '{self.name}': allowed modes are {RUN_MODES}")
        if value != "torch":
            if self.partition is None:
                raise NotCompiledError(
                    f"'{self.name}' has no FHE circuit for mode {value!r}: call "
                    "LoraTrainer.compile(inputset) first"
                )
            self.partition.mode = value
        self._mode = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the linear to the last dimension of `x` in the current mode."""
        if self.recording:
            self._recorded.append(x.detach().reshape(-1, x.shape[-1]).float().cpu())
        if self._mode == "torch" or self.recording:
            return self._float(x)
        rows = x.detach().reshape(-1, x.shape[-1]).float().cpu()
        normalized, scale = self.normalize(rows)
        chunks = _chunked(normalized, self.rows_per_circuit)
        out = self.partition(chunks).reshape(-1, self.out_features)[: rows.shape[0]] * scale
        return out.reshape(*x.shape[:-1], self.out_features).to(device=x.device, dtype=x.dtype)

    def _float(self, x: torch.Tensor) -> torch.Tensor:
        self._require_private_info()
        matrix = self.matrix.to(device=x.device, dtype=x.dtype)
        out = x @ matrix
        return out if self.bias is None else out + self.bias.to(device=x.device, dtype=x.dtype)

    def normalize(self, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rows as the circuit takes them (bias column appended) and the per-row scale."""
        if self.has_bias:
            rows = torch.cat([rows, rows.new_full((rows.shape[0], self.bias_columns), self.anchor)], dim=1)
        if not self.dynamic:
            return rows, torch.ones_like(rows[:, :1])
        scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return rows / scale, scale

    def start_recording(self) -> None:
        """Record the rows the module sees (calibration), computing in float meanwhile."""
        self.recording = True
        self._recorded = []

    def compile(
        self, settings: FheSettings, dynamic: bool = True, rows_per_circuit: int = DEFAULT_ROWS_PER_CIRCUIT
    ) -> FhePartition:
        """Build the FHE partition from the recorded rows (or the unit range when dynamic)."""
        from torch.fx.experimental.proxy_tensor import make_fx

        from .backend import DECOMPOSITIONS, compile_aten_graph

        self._require_private_info()
        self.recording = False
        rows = torch.cat(self._recorded) if self._recorded else None
        self._recorded = []
        if rows is None and not dynamic:
            # no gradient reached this backward module (nothing trainable before it): it is never
            # run in training; dynamic quantization keeps it exact if it ever is
            warnings.warn(
                f"fhe_backend: '{self.name}' saw no data during calibration, so "
                "static quantization (use_dynamic_quantization=False) has no range for "
                "it; it uses dynamic quantization (rows scaled by their max-abs)",
                stacklevel=3,
            )
            dynamic = True
        self.dynamic = dynamic
        self.rows_per_circuit = int(rows_per_circuit)
        if rows is None:
            rows = torch.rand(2, self.matrix.shape[0]) * 2 - 1
        if self.bias is not None and dynamic:
            self.anchor = float(rows.abs().amax(dim=1).median().clamp_min(1e-6))
        if self.bias is not None:
            self.bias_columns = _bias_columns(self.matrix.float(), self.bias.float() / self.anchor)
        circuit_matrix = self._circuit_matrix()
        normalized = self.normalize(rows)[0]
        low, high = (-1.0, 1.0) if dynamic else (float(normalized.min()), float(normalized.max()))
        samples = torch.cat([normalized, _extreme_rows(low, high, circuit_matrix)])
        chunks = _chunked(samples, self.rows_per_circuit)

        def linear(chunk: torch.Tensor) -> torch.Tensor:
            """The circuit's function: one chunk of rows times the (augmented) matrix."""
            return torch.matmul(chunk, circuit_matrix)

        graph = make_fx(linear, decomposition_table=DECOMPOSITIONS)(chunks[:1])
        with warnings.catch_warnings():  # few chunks, but the unit range and its extremes are covered
            warnings.filterwarnings("ignore", message=".*representative inputset")
            compiled = compile_aten_graph(graph, [chunks[:1]], [False], settings.replace(inputset=chunks))
        if len(compiled.partitions) != 1:
            raise LoraError(
                f"'{self.name}': expected one FHE partition for the linear, got "
                f"{len(compiled.partitions)} (unsupported ops: {compiled.left_in_torch})"
            )
        self.graph, self.partition = compiled, compiled.partitions[0]
        self.partition.name = self.name or self.partition.name
        self.partition.module_path = self.name
        self.partition.mode = settings.fhe
        self._mode = settings.fhe
        return self.partition

    def _circuit_matrix(self) -> torch.Tensor:
        if self.bias is None:
            return self.matrix.float()
        bias_row = self.bias.float()[None, :] / (self.anchor * self.bias_columns)
        return torch.cat([self.matrix.float(), bias_row.expand(self.bias_columns, -1)])

    def clear_private_info(self) -> None:
        """Drop the clear weights (they stay only in the FHE circuit, i.e. with the server)."""
        self.matrix = torch.empty(0)
        self.bias = None
        self.private_info_cleared = True

    def _require_private_info(self) -> None:
        if self.private_info_cleared:
            raise LoraError(
                f"'{self.name}': the clear weights were removed by "
                "save_and_clear_private_info; run it in an FHE mode "
                "(simulate, execute or remote)"
            )

    def extra_repr(self) -> str:
        """Sizes, bias, mode and whether the layer is dynamic, shown by print(model)."""
        return (
            f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
            f"mode={self._mode!r}, dynamic={self.dynamic}"
        )


def _chunked(rows: torch.Tensor, rows_per_circuit: int) -> torch.Tensor:
    """(N, F) -> (ceil(N / R), R, F), the last chunk padded with zero rows."""
    count = max(1, math.ceil(rows.shape[0] / rows_per_circuit))
    padded = rows.new_zeros(count * rows_per_circuit, rows.shape[1])
    padded[: rows.shape[0]] = rows
    return padded.reshape(count, rows_per_circuit, rows.shape[1])


def _bias_columns(matrix: torch.Tensor, scaled_bias: torch.Tensor) -> int:
    """How many input columns the bias is split over so that each of its weight rows stays
    within the largest weight of its output channel (capped at MAX_BIAS_COLUMNS)."""
    column_max = matrix.abs().amax(dim=0).clamp_min(1e-12)
    ratio = float((scaled_bias.abs() / column_max).max())
    return int(min(MAX_BIAS_COLUMNS, max(1, math.ceil(ratio))))


def _extreme_rows(low: float, high: float, matrix: torch.Tensor) -> torch.Tensor:
    """Inputs in the box [low, high] that reach each output's largest and smallest accumulator,
    so the circuit's quantizer and bit-widths hold for any input of that range (with dynamic
    quantization the box is the unit range [-1, 1], whatever the calibration data)."""
    positive = matrix.t() > 0
    return torch.cat([torch.where(positive, high, low), torch.where(positive, low, high)]).float()


class _FheLinearFunction(torch.autograd.Function):
    """Forward ``x Wᵀ + b`` and the input gradient ``grad · W``, each through an FheMatmul."""

    @staticmethod
    def forward(ctx, x, layer):
        """The layer's forward module on `x` (FHE in an FHE mode)."""
        ctx.layer = layer
        return layer.forward_module(x)

    @staticmethod
    def backward(ctx, grad_output):
        """The input gradient through the layer's backward module; no gradient for the layer."""
        layer = ctx.layer
        if layer.backward_module is None:
            raise LoraError(
                f"linear '{layer.name}' was kept without an FHE backward pass "
                "(n_layers_to_skip_for_backprop) but a gradient is needed for its input: lower "
                "n_layers_to_skip_for_backprop"
            )
        return layer.backward_module(grad_output), None


class ForwardModuleLinear(FheMatmul):
    """The forward of a frozen linear, ``x Wᵀ + b``, as an FHE matmul (Concrete ML's name).

    `weight` is (out, in), or (in, out) with ``weight_transposed=True`` (GPT-2's Conv1D).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        weight_transposed: bool = False,
        name: str = "",
    ):
        super().__init__(weight if weight_transposed else weight.t(), bias, name=name)


class BackwardModuleLinear(FheMatmul):
    """The input gradient of a frozen linear, ``grad W``, as an FHE matmul (Concrete ML's name)."""

    def __init__(self, weight: torch.Tensor, weight_transposed: bool = False, name: str = ""):
        super().__init__(weight.t() if weight_transposed else weight, None, name=name)


class FheLinear(nn.Module):
    """A frozen linear whose forward and input-gradient run in FHE (Concrete ML's CustomLinear).

    `weight` is (out, in) for ``nn.Linear`` and (in, out) for GPT-2's Conv1D
    (``weight_transposed=True``). `with_backward=False` keeps a forward-only layer (the first
    layers, whose input needs no gradient).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        weight_transposed: bool = False,
        with_backward: bool = True,
        name: str = "",
    ):
        nn.Module.__init__(self)  # not super(): FheForwardLinear puts nn.Linear next in the MRO
        linear_weight = (weight.t() if weight_transposed else weight).detach()
        self.name = name
        self.weight_transposed = weight_transposed
        self.in_features, self.out_features = linear_weight.shape[1], linear_weight.shape[0]
        self.forward_module = ForwardModuleLinear(linear_weight, bias, name=f"{name}.forward_module")
        self.backward_module = (
            BackwardModuleLinear(linear_weight, name=f"{name}.backward_module") if with_backward else None
        )

    @property
    def weight(self) -> torch.Tensor:
        """The frozen weight in the layout of the replaced layer."""
        matrix = self.forward_module.matrix
        return matrix if self.weight_transposed else matrix.t()

    @property
    def bias(self) -> Optional[torch.Tensor]:
        """The frozen bias."""
        return self.forward_module.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x Wᵀ + b``, differentiable with respect to `x` (through the FHE backward)."""
        return _FheLinearFunction.apply(x, self)

    def extra_repr(self) -> str:
        """Sizes and the backward's kind, shown by print(model)."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"backward={'fhe' if self.backward_module is not None else 'none'}"
        )


class FheForwardLinear(FheLinear, nn.Linear):
    """A frozen linear kept for its forward only (the first `n_layers_to_skip_for_backprop`):
    it stays an ``nn.Linear``, as in Concrete ML, and its forward runs in FHE."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        weight_transposed: bool = False,
        name: str = "",
    ):
        super().__init__(weight, bias, weight_transposed, with_backward=False, name=name)


CustomLinear = FheLinear  # Concrete ML's name


def is_lora_module(name: str, module: nn.Module) -> bool:
    """True for a LoRA layer: 'lora' in its name, or a `lora_a` / `lora_b` / `lora_dropout`
    attribute (any case), as Concrete ML detects them."""
    if "lora" in name.lower().rsplit(".", 1)[-1]:
        return True
    return any(
        hasattr(module, variant)
        for attribute in ("lora_a", "lora_b", "lora_dropout")
        for variant in (attribute, attribute.upper(), attribute.replace("_a", "_A").replace("_b", "_B"))
    )


def fhe_matmuls(model: nn.Module) -> Dict[str, FheMatmul]:
    """Every FheMatmul of a model by its module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FheMatmul)}


# ---- LoraTraining ------------------------------------------------------------------------------


class LoraTraining(nn.Module):
    """A LoRA model prepared for training with its frozen linears in FHE.

    The frozen linear layers are replaced by `FheLinear` (the first
    `n_layers_to_skip_for_backprop` of them forward-only). `forward(inputs)` computes the loss,
    back-propagates the loss divided by the loss scaling factor (gradient accumulation) and
    returns ``(loss, None)`` with the unscaled, detached loss.
    """

    def __init__(
        self, model: nn.Module, n_layers_to_skip_for_backprop: int = 1, loss_fn: Optional[Callable] = None
    ):
        super().__init__()
        self.assert_has_lora_layers(model)
        if n_layers_to_skip_for_backprop < 0:
            raise LoraError(
                f"n_layers_to_skip_for_backprop = {n_layers_to_skip_for_backprop}: expected an int >= 0"
            )
        self.inference_model = model
        self.loss_fn = loss_fn
        self.loss_scaling_factor = 1.0
        if loss_fn is None:  # the model computes the loss: it must take the labels
            self._require_labels_argument()
        self.replace_layers_with_custom(model, n_layers_to_skip_for_backprop)

    @staticmethod
    def assert_has_lora_layers(model: nn.Module) -> None:
        """Raise a ValueError if the model has no LoRA layer (e.g. not wrapped by peft).

        LoRA layers are found by name ('lora') or by their `lora_a` / `lora_b` / `lora_dropout`
        attributes.
        """
        if not any(is_lora_module(name, module) for name, module in model.named_modules()):
            raise LoraError(
                f"The model does not contain any detectable LoRA layers: {type(model).__name__} has "
                "no module named 'lora...' nor with lora_a / lora_b / lora_dropout attributes; wrap "
                "it first, e.g. peft.get_peft_model(model, peft.LoraConfig(target_modules=[...]))"
            )

    @staticmethod
    def replace_layers_with_custom(model: nn.Module, n_layers_to_skip_for_backprop: int) -> None:
        """Replace the frozen linears (not the LoRA ones) by `FheLinear`, in module order.

        The first `n_layers_to_skip_for_backprop` linears get no FHE backward (the first layer's
        input needs no gradient: nothing trainable comes before it): they become
        `FheForwardLinear`, still ``nn.Linear`` instances, whose forward runs in FHE.
        """
        remaining = n_layers_to_skip_for_backprop

        def replace(module: nn.Module, prefix: str) -> None:
            """Recursively swap the linear children of `module`."""
            nonlocal remaining
            for child_name, child in list(module.named_children()):
                path = f"{prefix}.{child_name}" if prefix else child_name
                if "lora" in child_name.lower():
                    continue
                if isinstance(child, LINEAR_LAYERS) and not isinstance(child, FheLinear):
                    transposed = TransformerConv1D is not None and isinstance(child, TransformerConv1D)
                    if remaining > 0:
                        custom = FheForwardLinear(child.weight, child.bias, transposed, name=path)
                    else:
                        custom = FheLinear(child.weight, child.bias, weight_transposed=transposed, name=path)
                    remaining -= 1
                    setattr(module, child_name, custom)
                else:
                    replace(child, path)

        replace(model, "")

    def set_loss_scaling_factor(self, loss_scaling_factor: float) -> None:
        """Divide the loss by this factor before backpropagation (gradient accumulation steps)."""
        if not loss_scaling_factor or loss_scaling_factor <= 0:
            raise LoraError(f"loss_scaling_factor = {loss_scaling_factor!r}: expected a number > 0")
        self.loss_scaling_factor = float(loss_scaling_factor)

    def process_inputs(self, inputs: Any) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The attention mask and the labels of a batch (dict, BatchEncoding or (x, labels))."""
        if isinstance(inputs, Mapping):
            return inputs.get("attention_mask"), inputs.get("labels")
        if isinstance(inputs, (tuple, list)):
            if len(inputs) < 2:
                raise LoraBatchError(
                    f"Tuple inputs to LoraTraining must have two elements (data, labels), got "
                    f"{len(inputs)}; give (x, labels), (x, labels, attention_mask) or a dict"
                )
            return (inputs[2] if len(inputs) > 2 else None), inputs[1]
        return None, None

    def forward(self, inputs: Any) -> Tuple[torch.Tensor, None]:
        """Loss of one batch, back-propagated (scaled) when gradients are enabled."""
        loss = self.compute_loss(inputs)
        if torch.is_grad_enabled() and loss.requires_grad:
            (loss / self.loss_scaling_factor).backward()
        return loss.detach(), None

    def compute_loss(self, inputs: Any) -> torch.Tensor:
        """The loss of one batch: the model's own (from `labels`) or `loss_fn(output, labels)`."""
        attention_mask, labels = self.process_inputs(inputs)
        if isinstance(inputs, Mapping):
            model_inputs = {k: v for k, v in inputs.items() if k != "labels" or self.loss_fn is None}
            args: Sequence[Any] = ()
        else:
            first = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
            args, model_inputs = (first,), {}
            if attention_mask is not None:
                model_inputs["attention_mask"] = attention_mask
            if self.loss_fn is None and labels is not None:
                model_inputs["labels"] = labels
        output = self.inference_model(*args, **model_inputs)
        if self.loss_fn is not None:
            if labels is None:
                raise LoraError(
                    "loss_fn is set but the batch has no labels: give (x, labels) or a "
                    "dict with a 'labels' entry"
                )
            return self.loss_fn(_logits(output), labels)
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if loss is None:
            raise LoraError(
                f"The model did not return a loss. ({type(self.inference_model).__name__} returned "
                "none: give the batch 'labels', or pass loss_fn=... to LoraTraining/LoraTrainer)"
            )
        return loss

    def _require_labels_argument(self) -> None:
        model = self.inference_model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrapper
        parameters = inspect.signature(base.forward).parameters
        if "labels" not in parameters and not any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
        ):
            raise LoraError(
                f"When no loss_fn is provided, the model's forward method must accept a 'labels' "
                f"parameter ({type(base).__name__}.forward has none, so it cannot compute a "
                "loss): pass loss_fn=... (e.g. torch.nn.CrossEntropyLoss())"
            )


class LoraHybridModel:
    """What Concrete ML's `LoraTrainer.hybrid_model` offers, over a `LoraTrainer`: the model,
    the remote modules (the FHE linears) and their mode."""

    def __init__(self, trainer: "LoraTrainer"):
        self.trainer = trainer

    @property
    def model(self) -> nn.Module:
        """The `LoraTraining` module."""
        return self.trainer.lora_training_module

    @property
    def module_names(self) -> List[str]:
        """Names of the remote (FHE) modules (after compile)."""
        return list(self.trainer.remote_names)

    @property
    def remote_modules(self) -> Dict[str, FheMatmul]:
        """The FHE linears by remote name (after compile)."""
        return self.trainer._remote_matmuls()

    def set_fhe_mode(self, hybrid_fhe_mode: Any) -> None:
        """Run every remote linear in this mode."""
        self.trainer.set_fhe_mode(hybrid_fhe_mode)

    def forward(self, inputs: Any, fhe: Any = None) -> Any:
        """The training module on `inputs` (loss and backward), in mode `fhe` when given."""
        if fhe is not None:
            self.set_fhe_mode(fhe)
        return self.model(inputs)

    def __call__(self, inputs: Any, fhe: Any = None) -> Any:
        """`forward` (looked up on the instance, so that it can be replaced there)."""
        return self.forward(inputs, fhe)

    def save_and_clear_private_info(self, path: str) -> None:
        """Save the client's model under `path` and remove the frozen server weights from it
        (`LoraTrainer.save_and_clear_private_info` goes through here, as in Concrete ML)."""
        trainer = self.trainer
        trainer.deployment.save_and_clear_private_info(path, trainer.lora_training_module.inference_model)


def _logits(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    return getattr(output, "logits", output[0] if isinstance(output, (tuple, list)) else output)


# ---- LoraTrainer -------------------------------------------------------------------------------


class LoraTrainer:
    """Training loop for LoRA fine-tuning with the frozen linears in FHE.

    Handles compilation of the FHE linears, the training loop (gradient accumulation, gradient
    clipping, lr scheduler), a progress bar showing the loss, logging every `logging_steps`
    to the console and `train_log_path`, evaluation every `eval_steps`, and checkpoints in
    `checkpoint_dir` (one per epoch; every `save_steps` optimizer steps if set in
    `training_args`) from which training resumes at the next epoch and step.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Optional[Callable] = None,
        lr_scheduler: Any = None,
        training_args: Any = None,
        n_layers_to_skip_for_backprop: int = 1,
        eval_loader: Optional[Iterable] = None,
        eval_metric_fn: Optional[Callable] = None,
        logging_steps: int = 1,
        eval_steps: int = 10,
        train_log_path: str = "training.log",
        checkpoint_dir: Optional[str] = None,
    ):
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.training_args = _training_args(training_args)
        self.gradient_accumulation_steps = self.training_args["gradient_accumulation_steps"]
        self.max_grad_norm = self.training_args["max_grad_norm"]
        self.eval_loader = eval_loader
        self.eval_metric_fn = eval_metric_fn
        self.logging_steps = _positive_int("logging_steps", logging_steps)
        self.eval_steps = _positive_int("eval_steps", eval_steps)
        self.checkpoint_dir = checkpoint_dir
        self.lora_training_module = LoraTraining(model, n_layers_to_skip_for_backprop, loss_fn)
        self.logger = setup_logger(train_log_path)
        self.training_losses: List[float] = []
        self.gradient_stats: Dict[str, List[float]] = {}
        self.eval_history: List[Tuple[int, Dict[str, float]]] = []
        self.remote_names: List[str] = []
        self.deployment = LoraDeployment(self._remote_matmuls, self.logger)
        self.start_epoch, self.global_step, self._skip_batches = 1, 0, 0
        self._epoch_batches_done = 0
        self._steps_per_epoch: Optional[int] = None
        # Concrete ML's attribute: the training module with its remote (FHE) linears, callable
        # as hybrid_model(inputs, fhe=...); training and saving go through it
        self.hybrid_model = LoraHybridModel(self)

    # ---- compilation ----------------------------------------------------------------------

    def compile(
        self,
        inputset: Any,
        n_bits: int = 8,
        use_dynamic_quantization: bool = True,
        rows_per_circuit: int = DEFAULT_ROWS_PER_CIRCUIT,
        **options: Any,
    ) -> Tuple[int, int]:
        """Calibrate on `inputset` (forward and backward in float) and compile every FHE linear.

        `inputset`: one batch (a dict/BatchEncoding or a tuple ``(x, labels)``) or an iterable
        of batches. `options` are backend options (p_error, configuration, key_cache_dir...).
        Returns the (epoch, global_step) of the latest checkpoint in `checkpoint_dir` (which is
        loaded), else (0, 0).
        """
        settings = FheSettings.from_options({"n_bits": n_bits, **options})
        module = self.lora_training_module
        self.remote_names = get_remote_names(module.inference_model)
        remote = self._remote_matmuls()
        for matmul in remote.values():
            matmul.start_recording()
        was_training = module.training
        module.train()
        try:
            for batch in _inputset_batches(inputset):
                module(batch)
        finally:
            module.train(was_training)
            for matmul in remote.values():
                matmul.recording = False
        self.optimizer.zero_grad(set_to_none=True)
        for param in module.parameters():
            param.grad = None
        for index, (name, matmul) in enumerate(remote.items()):
            self.logger.info("compiling %s (%d/%d)", name, index + 1, len(remote))
            matmul.compile(settings, use_dynamic_quantization, rows_per_circuit)
        latest = self._latest_checkpoint()
        return self.load_checkpoint(latest) if latest else (0, 0)

    @property
    def _model(self) -> nn.Module:
        return self.lora_training_module.inference_model

    def _remote_matmuls(self) -> Dict[str, FheMatmul]:
        matmuls = fhe_matmuls(self._model)
        return {name: matmuls[name] for name in self.remote_names if name in matmuls}

    def partitions(self) -> Dict[str, FhePartition]:
        """The FHE partitions of the frozen linears, by remote module name (for deployment)."""
        return self.deployment.partitions()

    def set_fhe_mode(self, fhe: str) -> None:
        """Run the remote linears in `fhe` mode (the others, e.g. lm_head, stay clear torch)."""
        fhe = getattr(fhe, "value", fhe)
        if fhe not in RUN_MODES:
            raise OptionError(f"fhe={fhe!r}: allowed modes are {RUN_MODES}")
        remote = self._remote_matmuls()
        if fhe != "torch" and not remote:
            raise NotCompiledError(
                f"fhe={fhe!r} needs compiled FHE linears: call LoraTrainer.compile(inputset) first"
            )
        if fhe == "remote":
            missing = [
                name for name, m in remote.items() if m.partition is None or m.partition.remote_runner is None
            ]
            if missing:
                raise OptionError(
                    f"fhe='remote' needs a connection to the FHE server for {missing}: attach a "
                    "client runner to each partition (LoraTrainer.partitions(), e.g. with "
                    "fhe_backend.hybrid_model) before training"
                )
        for matmul in remote.values():
            matmul.mode = fhe

    # ---- deployment (fhe="remote"): `fhe_backend.lora_deployment.LoraDeployment` ---------

    @property
    def remote_clients(self) -> Dict[str, Any]:
        """The hybrid-model RemoteModules connected by `init_client`, by remote module name."""
        return self.deployment.remote_clients

    def save_server_artifacts(self, path: str) -> List[str]:
        """Write each remote linear's ``client.zip``/``server.zip`` under
        ``path/<module>/<input shape>/`` (see `LoraDeployment.save_server_artifacts`)."""
        return self.deployment.save_server_artifacts(path)

    def init_client(
        self,
        server_remote_address: str,
        model_name: str = "model",
        path_to_clients: Optional[str] = None,
        path_to_keys: Optional[str] = None,
    ) -> None:
        """Connect every remote linear to the FHE server (keys generated here, evaluation keys
        uploaded), so that ``train(..., fhe="remote")`` runs them on the server."""
        self.deployment.init_client(server_remote_address, model_name, path_to_clients, path_to_keys)

    # ---- training -------------------------------------------------------------------------

    def train(
        self, train_loader: Iterable, num_epochs: int = 1, fhe: str = "simulate", device: str = "cpu"
    ) -> None:
        """Train for epochs ``start_epoch..num_epochs`` with the frozen linears in mode `fhe`.

        `device` is where the client-side computation (LoRA layers, the clear rest of the
        model) runs. A loaded checkpoint makes training resume at its next epoch and step.
        """
        from tqdm.auto import tqdm

        self.hybrid_model.set_fhe_mode(fhe)  # through hybrid_model, as Concrete ML's train
        module = self.lora_training_module
        module.to(device)
        optimizer_to(self.optimizer, device)
        module.set_loss_scaling_factor(self.gradient_accumulation_steps)
        steps_per_epoch = len(train_loader)  # type: ignore[arg-type]  # a DataLoader or a list
        self._steps_per_epoch = steps_per_epoch
        remaining = max(0, (num_epochs - self.start_epoch + 1) * steps_per_epoch - self._skip_batches)
        self.logger.info(
            "training %d step(s), epochs %d..%d, fhe=%s, device=%s",
            remaining,
            self.start_epoch,
            num_epochs,
            fhe,
            device,
        )
        module.train()
        progress = tqdm(total=remaining, desc="LoRA training", unit="step")
        try:
            for epoch in range(self.start_epoch, num_epochs + 1):
                self._train_epoch(train_loader, epoch, steps_per_epoch, device, progress)
                if self.checkpoint_dir:
                    self.save_checkpoint(epoch, self.global_step)
                self.start_epoch, self._skip_batches = epoch + 1, 0
        finally:
            progress.close()

    def _train_epoch(
        self, train_loader: Iterable, epoch: int, steps_per_epoch: int, device: str, progress: Any
    ) -> None:
        skip = self._skip_batches
        self._epoch_batches_done = skip
        self.optimizer.zero_grad(set_to_none=True)
        for index, batch in enumerate(train_loader):
            if index < skip:
                continue
            loss, _ = self.hybrid_model(_to_device(batch, device))
            self.global_step += 1
            self._epoch_batches_done = index + 1
            value = float(loss)
            self.training_losses.append(value)
            progress.update(1)
            progress.set_postfix(loss=f"{value:.4f}", epoch=epoch)
            if self.global_step % self.logging_steps == 0:
                self.logger.info("epoch %d step %d loss %.6f", epoch, self.global_step, value)
            accumulated = (index + 1 - skip) % self.gradient_accumulation_steps == 0
            if accumulated or index + 1 == steps_per_epoch:
                self._optimizer_step()
                save_steps = self.training_args["save_steps"]
                if (
                    self.checkpoint_dir
                    and save_steps
                    and self.global_step % save_steps == 0
                    and index + 1 < steps_per_epoch
                ):
                    self.save_checkpoint(epoch, self.global_step, step_level=True)
            if self.eval_loader is not None and self.global_step % self.eval_steps == 0:
                self.evaluate(device)

    def _optimizer_step(self) -> None:
        trainable = [
            (n, p) for n, p in self._model.named_parameters() if p.requires_grad and p.grad is not None
        ]
        for name, param in trainable:
            self.gradient_stats.setdefault(name, []).append(float(param.grad.norm()))
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for _, p in trainable], self.max_grad_norm)
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def evaluate(self, device: str = "cpu") -> Dict[str, float]:
        """Evaluate on `eval_loader` (`eval_metric_fn`, else the mean loss); logged and recorded."""
        module = self.lora_training_module
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                if self.eval_metric_fn is not None:
                    metrics = dict(self.eval_metric_fn(module.inference_model, self.eval_loader))
                else:
                    losses = [float(module(_to_device(batch, device))[0]) for batch in self.eval_loader]
                    metrics = {"eval_loss": sum(losses) / max(1, len(losses))}
        finally:
            module.train(was_training)
        self.eval_history.append((self.global_step, metrics))
        self.logger.info("step %d evaluation %s", self.global_step, metrics)
        return metrics

    # ---- checkpoints ----------------------------------------------------------------------

    def save_checkpoint(self, epoch: int, global_step: int, step_level: bool = False) -> str:
        """Save the trainable (LoRA) weights, optimizer, scheduler and history; returns the path.

        The file is ``checkpoint_epoch_{epoch}.pth`` (as in Concrete ML), or
        ``checkpoint_epoch_{epoch}_step_{global_step}.pth`` for `step_level` saves
        (``save_steps``). The frozen (server) weights are not saved.
        """
        if not self.checkpoint_dir:
            raise LoraError("save_checkpoint needs checkpoint_dir=... in LoraTrainer(...)")
        directory = Path(self.checkpoint_dir)
        directory.mkdir(parents=True, exist_ok=True)
        name = f"checkpoint_epoch_{epoch}_step_{global_step}" if step_level else f"checkpoint_epoch_{epoch}"
        path = directory / f"{name}.pth"
        torch.save(
            {
                "epoch": epoch,
                "global_step": global_step,
                "epoch_batches_done": self._epoch_batches_done,
                "epoch_complete": self._steps_per_epoch is None
                or self._epoch_batches_done >= self._steps_per_epoch,
                "trainable_state": {
                    n: p.detach().cpu() for n, p in self._model.named_parameters() if p.requires_grad
                },
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
                "training_losses": list(self.training_losses),
                "gradient_stats": {k: list(v) for k, v in self.gradient_stats.items()},
                "eval_history": list(self.eval_history),
            },
            path,
        )
        self.logger.info("checkpoint saved: %s", path)
        return str(path)

    def load_checkpoint(self, checkpoint_path: str) -> Tuple[int, int]:
        """Restore a checkpoint; the next `train` resumes at its next epoch and step."""
        path = Path(checkpoint_path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint '{checkpoint_path}' not found")
        state = torch.load(path, map_location="cpu", weights_only=False)
        params = dict(self._model.named_parameters())
        unknown = sorted(set(state["trainable_state"]) - set(params))
        if unknown:
            raise LoraError(
                f"checkpoint '{checkpoint_path}' has parameters {unknown[:5]} this model "
                "does not have: it was saved from another model"
            )
        with torch.no_grad():
            for name, value in state["trainable_state"].items():
                params[name].copy_(value.to(params[name].device))
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.training_losses = list(state.get("training_losses", []))
        self.gradient_stats = {k: list(v) for k, v in state.get("gradient_stats", {}).items()}
        self.eval_history = list(state.get("eval_history", []))
        epoch, global_step = int(state["epoch"]), int(state["global_step"])
        self.global_step = global_step
        if state.get("epoch_complete", True):
            self.start_epoch, self._skip_batches = epoch + 1, 0
        else:
            self.start_epoch, self._skip_batches = epoch, int(state["epoch_batches_done"])
        self.logger.info("resumed from %s: epoch %d, step %d", path, epoch, global_step)
        return epoch, global_step

    def _latest_checkpoint(self) -> Optional[str]:
        if not self.checkpoint_dir or not Path(self.checkpoint_dir).is_dir():
            return None
        # latest = highest epoch; within it, the end-of-epoch file after any step-level one
        found = [
            (int(m.group(1)), float(m.group(2)) if m.group(2) else float("inf"), p)
            for p in Path(self.checkpoint_dir).iterdir()
            if (m := CHECKPOINT_PATTERN.search(p.name))
        ]
        return str(max(found)[2]) if found else None

    # ---- results --------------------------------------------------------------------------

    def get_training_losses(self) -> List[float]:
        """Every training batch's loss, in order."""
        return list(self.training_losses)

    def get_gradient_stats(self) -> Dict[str, List[float]]:
        """Gradient norm of each trainable parameter at each optimizer step (before clipping)."""
        return {name: list(values) for name, values in self.gradient_stats.items()}

    def save_and_clear_private_info(self, path: str) -> None:
        """Save the client's model (public weights, LoRA adapters, FHE input quantizers) under
        the directory `path` and remove the frozen server weights from it.

        After this the remote linears run only in FHE modes (simulate, execute, remote).
        """
        self.hybrid_model.save_and_clear_private_info(path)


def _training_args(training_args: Any) -> Dict[str, Any]:
    """Normalize training_args (dict, or an object such as transformers.TrainingArguments)."""
    args = dict(TRAINING_ARG_DEFAULTS)
    if training_args is None:
        return args
    source = (
        training_args
        if isinstance(training_args, Mapping)
        else {
            key: getattr(training_args, key) for key in TRAINING_ARG_DEFAULTS if hasattr(training_args, key)
        }
    )
    args.update({k: v for k, v in source.items() if k in TRAINING_ARG_DEFAULTS and v is not None})
    args["gradient_accumulation_steps"] = _positive_int(
        "gradient_accumulation_steps", args["gradient_accumulation_steps"]
    )
    if args["save_steps"] is not None:
        args["save_steps"] = _positive_int("save_steps", args["save_steps"])
    norm = args["max_grad_norm"]
    if norm is not None and (isinstance(norm, bool) or not isinstance(norm, (int, float)) or norm <= 0):
        raise LoraError(f"training_args max_grad_norm = {norm!r}: expected None or a number > 0")
    return args


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LoraError(f"{name} = {value!r}: expected an int >= 1")
    return value


def _inputset_batches(inputset: Any) -> List[Any]:
    """One batch (a dict/BatchEncoding, a tuple, a tensor) or an iterable of batches."""
    if isinstance(inputset, (Mapping, tuple, torch.Tensor)):
        return [inputset]
    batches = list(inputset)
    if not batches:
        raise LoraError("the inputset is empty: give at least one batch of training inputs")
    return batches


def _to_device(batch: Any, device: str) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        if hasattr(batch, "to"):  # transformers' BatchEncoding
            return batch.to(device)
        mapping_type: Any = type(batch)
        return mapping_type({k: _to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


__all__ = [
    "FheLinear",
    "FheMatmul",
    "CustomLinear",
    "FheForwardLinear",
    "ForwardModuleLinear",
    "BackwardModuleLinear",
    "LINEAR_LAYERS",
    "LoraHybridModel",
    "is_lora_module",
    "LoraBatchError",
    "LoraError",
    "LoraTrainer",
    "LoraTraining",
    "get_remote_names",
    "grad_to",
    "optimizer_to",
    "setup_logger",
]
