"""The frozen linears of LoRA training at Concrete ML's module path
(`concrete.ml.torch.hybrid_backprop_linear`): `CustomLinear` runs its forward
(`ForwardModuleLinear`) and its input gradient (`BackwardModuleLinear`) as FHE matmuls; they are
defined in `fhe_backend.lora`."""

from .lora import BackwardModuleLinear, CustomLinear, ForwardModuleLinear

__all__ = ["BackwardModuleLinear", "CustomLinear", "ForwardModuleLinear"]
