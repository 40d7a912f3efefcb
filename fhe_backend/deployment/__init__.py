"""Client/server deployment of FHE partitions (mirrors `concrete.ml.deployment`).

`FHEModelDev` saves a compiled partition's client and server artifacts, `FHEModelClient` holds
the keys and encrypts/decrypts, `FHEModelServer` computes on ciphertexts. `server` is the
FastAPI application behind ``fhe-backend serve``; `http_client` is its client.
"""

from .fhe_client_server import (
    ArtifactsNotFoundError,
    DeploymentError,
    DeploymentMode,
    DeploymentModeError,
    FHEModelClient,
    FHEModelDev,
    FHEModelServer,
    VersionMismatchError,
)

__all__ = [
    "ArtifactsNotFoundError",
    "DeploymentError",
    "DeploymentMode",
    "DeploymentModeError",
    "FHEModelClient",
    "FHEModelDev",
    "FHEModelServer",
    "VersionMismatchError",
]
