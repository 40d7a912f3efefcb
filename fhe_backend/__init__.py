"""fhe_backend: run the private parts of a PyTorch model under fully homomorphic encryption.

``torch.compile(model, backend="fhe", options={...})`` captures the model, runs the FHE-marked
parts as Concrete circuits and the rest as eager torch. Importing this package registers the
backend (it is also registered through the ``torch_dynamo_backends`` entry point).
"""

from __future__ import annotations

import warnings

warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)

from torch._dynamo import list_backends, register_backend  # noqa: E402

from .backend import fhe_backend, partitions, set_fhe_mode  # noqa: E402
from .errors import (  # noqa: E402
    BitWidthError,
    FheBackendError,
    KeyGenerationError,
    LoweringError,
    NoParametersFoundError,
    NotCompiledError,
    OptionError,
    PassError,
    UnsupportedOpError,
)
from .exit_status import exit_now, keep_exit_status  # noqa: E402
from .explain import explain  # noqa: E402
from .marks import fhe_module  # noqa: E402
from .qat import has_any_qnn_layers  # noqa: E402  (also lets dynamo capture Brevitas layers)
from .runtime import FhePartition, fhe_mode  # noqa: E402
from .settings import FheSettings  # noqa: E402

__version__ = "0.1.0"

keep_exit_status()

if "fhe" not in list_backends(exclude_tags=()):
    register_backend(fhe_backend, name="fhe")

__all__ = [
    "BitWidthError",
    "FheBackendError",
    "FhePartition",
    "FheSettings",
    "KeyGenerationError",
    "LoweringError",
    "NoParametersFoundError",
    "NotCompiledError",
    "OptionError",
    "PassError",
    "UnsupportedOpError",
    "exit_now",
    "explain",
    "fhe_backend",
    "fhe_mode",
    "fhe_module",
    "has_any_qnn_layers",
    "partitions",
    "set_fhe_mode",
]
