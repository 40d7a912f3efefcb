"""HTTP client of the FHE model server (``fhe-backend serve``).

Timeouts on every request, a retry on connection errors (a restarting server or a load
balancer switching machines), and errors raised with the server's own message. A batch is
one ``compute`` request carrying one ciphertext list per sample.
"""

from __future__ import annotations

import base64
import binascii
import time
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union
from urllib.parse import quote

import requests

from .fhe_client_server import CLIENT_ZIP, DeploymentError, SerializedSample

DEFAULT_TIMEOUT = (10.0, 600.0)  # (connect, read) seconds: FHE computations can take minutes


class RemoteServerError(DeploymentError):
    """The FHE server answered with an error; `status_code` and `detail` are the server's."""

    def __init__(self, message: str, status_code: Optional[int] = None, detail: Any = None):
        super().__init__(message)
        self.status_code = status_code
        self.detail = detail


def encode_sample(item: SerializedSample) -> List[str]:
    """One sample's ciphertext(s) -> base64 strings (one per circuit input)."""
    values = item if isinstance(item, tuple) else (item,)
    return [base64.b64encode(v).decode("ascii") for v in values]


def decode_sample(strings: Sequence[str], field: str) -> Tuple[bytes, ...]:
    """Base64 strings -> bytes; a `ValueError` naming `field` when one is not base64."""
    values = []
    for index, text in enumerate(strings):
        try:
            values.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError) as error:
            raise ValueError(f"{field}[{index}] is not valid base64: {error}") from error
    return tuple(values)


class FheHttpClient:
    """Talks to one FHE model server: list, download client specs, upload keys, compute."""

    def __init__(self, base_url: str, timeout: Tuple[float, float] = DEFAULT_TIMEOUT,
                 retries: int = 2, backoff_seconds: float = 0.5):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        self.session = requests.Session()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("session", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.session = requests.Session()

    # ---- endpoints ----------------------------------------------------------------------

    def list_models(self) -> List[str]:
        """Names of the served models."""
        return self._json("GET", "/models")["models"]

    def list_modules(self, model_name: str) -> List[str]:
        """Names of a model's remote modules."""
        return self._json("GET", f"/models/{_q(model_name)}/modules")["modules"]

    def list_shapes(self, model_name: str, module_name: str) -> List[str]:
        """Input shapes (as `tuple_to_underscore_str` strings) a module is compiled for."""
        return self._json("GET", _module_url(model_name, module_name) + "/shapes")["input_shapes"]

    def download_client(self, model_name: str, module_name: str, input_shape: str,
                        destination: Union[str, Path]) -> Path:
        """Save the module's client.zip (client specs and quantizers) into `destination`."""
        response = self._request("GET", _shape_url(model_name, module_name, input_shape) + "/client")
        target = Path(destination) / CLIENT_ZIP
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(response.content)
        return target

    def upload_evaluation_keys(self, model_name: str, module_name: str, input_shape: str,
                               evaluation_keys: bytes) -> str:
        """Upload serialized evaluation keys; returns the key id to use in `compute`."""
        return self._json("POST", _shape_url(model_name, module_name, input_shape) + "/keys",
                          data=evaluation_keys, headers={"Content-Type": "application/octet-stream"})["key_id"]

    def compute(self, model_name: str, module_name: str, input_shape: str, key_id: str,
                samples: Sequence[SerializedSample]) -> List[SerializedSample]:
        """Run the module on a batch of encrypted samples in ONE request."""
        payload = {"key_id": key_id, "inputs": [encode_sample(s) for s in samples]}
        answer = self._json("POST", _shape_url(model_name, module_name, input_shape) + "/compute", json=payload)
        outputs = [decode_sample(sample, f"outputs[{i}]") for i, sample in enumerate(answer["outputs"])]
        return [o[0] if len(o) == 1 else o for o in outputs]

    # ---- transport ----------------------------------------------------------------------

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        url = self.base_url + path
        for attempt in range(self.retries + 1):
            try:
                response = self.session.request(method, url, timeout=self.timeout, **kwargs)
                break
            except requests.ConnectionError as error:
                if attempt == self.retries:
                    raise RemoteServerError(
                        f"{method} {url}: cannot reach the FHE server after {attempt + 1} attempts "
                        f"({error}); check server_remote_address and that `fhe-backend serve` runs") from error
                time.sleep(self.backoff_seconds * 2**attempt)
            except requests.Timeout as error:
                raise RemoteServerError(f"{method} {url}: no answer within {self.timeout} s ({error})") from error
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise RemoteServerError(f"{method} {url}: HTTP {response.status_code}: {detail}",
                                    response.status_code, detail)
        return response


def _q(name: str) -> str:
    return quote(name, safe="")


def _module_url(model_name: str, module_name: str) -> str:
    return f"/models/{_q(model_name)}/modules/{_q(module_name)}"


def _shape_url(model_name: str, module_name: str, input_shape: str) -> str:
    return _module_url(model_name, module_name) + f"/shapes/{_q(input_shape)}"
