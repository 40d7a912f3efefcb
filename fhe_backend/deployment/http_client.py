"""HTTP client of the FHE model server (``fhe-backend serve``).

Timeouts on every request (connect, send, read), retries only where they cannot repeat work
the server did (see `FheHttpClient`), an optional API key, and errors raised with the server's
own message. A batch is one ``compute`` request carrying one ciphertext list per sample.
"""

from __future__ import annotations

import base64
import binascii
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union
from urllib.parse import quote

import requests
import urllib3

from ..graph_utils import as_tuple
from .fhe_client_server import CLIENT_ZIP, DeploymentError, SerializedSample

DEFAULT_TIMEOUT = (10.0, 600.0)  # (connect, read) seconds: FHE computations can take minutes
DEFAULT_WRITE_TIMEOUT = 120.0  # seconds one piece of a request body may take to be sent
MAX_BACKOFF_SECONDS = 60.0
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
API_KEY_ENVIRONMENT = "FHE_BACKEND_API_KEY"
DEFAULT_MAX_SAMPLES_PER_REQUEST = 64  # the server's default --max-samples-per-request


class RemoteServerError(DeploymentError):
    """The FHE server answered with an error; `status_code` and `detail` are the server's."""

    def __init__(self, message: str, status_code: Optional[int] = None, detail: Any = None):
        super().__init__(message)
        self.status_code = status_code
        self.detail = detail


def ignore_sigpipe() -> None:
    """Let writes to a closed socket raise `BrokenPipeError` instead of killing the process.

    Python ignores SIGPIPE, but Concrete's runtime (HPX) installs its own handler the first
    time it runs, which aborts the process on a broken pipe: a server closing the connection
    early (a 413 during a key upload, say) killed the client. From the main thread this
    restores Python's disposition for the process; from another thread it blocks SIGPIPE there.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    else:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPIPE})


def encode_sample(item: SerializedSample) -> List[str]:
    """One sample's ciphertext(s) -> base64 strings (one per circuit input)."""
    return [base64.b64encode(v).decode("ascii") for v in as_tuple(item)]


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
    """Talks to one FHE model server: list, download client specs, upload keys, compute.

    api_key: sent as ``Authorization: Bearer <api_key>`` (default: the ``FHE_BACKEND_API_KEY``
    environment variable; servers started with ``--api-keys-file`` require one).
    timeout: (connect, read) seconds; the read timeout covers the server's computation.
    write_timeout: seconds one piece of a request body may take to be sent (requests applies
    the connect timeout there otherwise: a busy server reading a 170 MB key upload slowly made
    uploads fail and be re-sent).
    retries / backoff_seconds: GET and DELETE requests are retried on connection errors and
    timeouts; POST requests (key uploads, computations) only when the server never received
    them (connection refused or not established) or answered 503 (busy, nothing done);
    computations also on a lost connection or a 500/502/504 that is not the application's own
    answer (the replica or worker running it died: a computation changes nothing on the
    server). Waits grow
    exponentially with jitter, and follow the server's ``Retry-After``.
    max_samples_per_request: larger batches are sent as several compute requests (the server's
    ``--max-samples-per-request``, 64 by default, refuses more with 413).
    """

    def __init__(
        self,
        base_url: str,
        timeout: Tuple[float, float] = DEFAULT_TIMEOUT,
        retries: int = 2,
        backoff_seconds: float = 0.5,
        api_key: Optional[str] = None,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT,
        max_samples_per_request: int = DEFAULT_MAX_SAMPLES_PER_REQUEST,
    ):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.write_timeout = write_timeout
        self.max_samples_per_request = max_samples_per_request
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENVIRONMENT)
        self.session = requests.Session()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("session", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.session = requests.Session()

    # ---- endpoints ----------------------------------------------------------------------

    def health(self) -> dict:
        """The server's ``GET /health`` answer (raises `RemoteServerError` when it is not ready)."""
        return self._json("GET", "/health")

    def list_models(self) -> List[str]:
        """Names of the served models."""
        return self._json("GET", "/models")["models"]

    def list_modules(self, model_name: str) -> List[str]:
        """Names of a model's remote modules."""
        return self._json("GET", f"/models/{_q(model_name)}/modules")["modules"]

    def list_shapes(self, model_name: str, module_name: str) -> List[str]:
        """Input shapes (as `tuple_to_underscore_str` strings) a module is compiled for."""
        return self._json("GET", _module_url(model_name, module_name) + "/shapes")["input_shapes"]

    def download_client(
        self, model_name: str, module_name: str, input_shape: str, destination: Union[str, Path]
    ) -> Path:
        """Save the module's client.zip (client specs and quantizers) into `destination`."""
        response = self._request("GET", _shape_url(model_name, module_name, input_shape) + "/client")
        target = Path(destination) / CLIENT_ZIP
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(response.content)
        return target

    def upload_evaluation_keys(
        self, model_name: str, module_name: str, input_shape: str, evaluation_keys: bytes
    ) -> str:
        """Upload serialized evaluation keys; returns the key id to use in `compute`."""
        return self._json(
            "POST",
            _shape_url(model_name, module_name, input_shape) + "/keys",
            data=evaluation_keys,
            headers={"Content-Type": "application/octet-stream"},
        )["key_id"]

    def delete_evaluation_keys(
        self, model_name: str, module_name: str, input_shape: str, key_id: str
    ) -> None:
        """Ask the server to forget uploaded keys."""
        self._request("DELETE", _shape_url(model_name, module_name, input_shape) + f"/keys/{_q(key_id)}")

    def compute(
        self,
        model_name: str,
        module_name: str,
        input_shape: str,
        key_id: str,
        samples: Sequence[SerializedSample],
    ) -> List[SerializedSample]:
        """Run the module on a batch of encrypted samples: ONE request per `max_samples_per_request`."""
        outputs = []
        step = max(1, self.max_samples_per_request)
        for start in range(0, len(samples), step):
            payload = {"key_id": key_id, "inputs": [encode_sample(s) for s in samples[start : start + step]]}
            answer = self._json(
                "POST",
                _shape_url(model_name, module_name, input_shape) + "/compute",
                json=payload,
                pure=True,
            )
            outputs += [
                decode_sample(sample, f"outputs[{start + i}]") for i, sample in enumerate(answer["outputs"])
            ]
        return [o[0] if len(o) == 1 else o for o in outputs]

    # ---- transport ----------------------------------------------------------------------

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    def _request(self, method: str, path: str, pure: bool = False, **kwargs: Any) -> requests.Response:
        """Send with retries (see the class doc). `pure`: the request changes nothing on the server
        (a computation), so a 5xx that did not come from the application (a Ray Serve replica or
        a worker behind a load balancer dying mid-request) is retried like a 503."""
        url = self.base_url + path
        ignore_sigpipe()
        idempotent = method in IDEMPOTENT_METHODS
        headers = dict(kwargs.pop("headers", None) or {})
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        has_body = kwargs.get("data") is not None or kwargs.get("json") is not None
        # urllib3 sends the body under the connect timeout: give sending its own (longer) one
        timeout = (max(self.timeout[0], self.write_timeout), self.timeout[1]) if has_body else self.timeout
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self.session.request(method, url, timeout=timeout, headers=headers, **kwargs)
            except requests.ConnectionError as error:  # includes timeouts while connecting or sending
                retry = idempotent or pure or _never_sent(error)
                if last or not retry:
                    what = (
                        "no answer within {} s".format(timeout)
                        if isinstance(error, requests.Timeout)
                        else "cannot reach the FHE server"
                    )
                    raise RemoteServerError(
                        f"{method} {url}: {what} after {attempt + 1} attempt(s) ({error})"
                        + ("" if retry else "; not retried: the server may have received the request")
                        + "; check server_remote_address and that `fhe-backend serve` runs"
                    ) from error
                self._wait(attempt, None)
                continue
            except requests.Timeout as error:  # read timeout: the server had the whole request
                if last or not idempotent:
                    raise RemoteServerError(
                        f"{method} {url}: no answer within {timeout[1]} s ({error})"
                        + ("" if idempotent else "; not retried: the server may have received the request")
                    ) from error
                self._wait(attempt, None)
                continue
            if response.status_code == 503 and not last:
                self._wait(attempt, response.headers.get("Retry-After"))
                continue
            if (
                pure
                and response.status_code in (500, 502, 504)
                and not last
                and not _from_application(response)
            ):
                self._wait(attempt, None)
                continue
            break
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise RemoteServerError(
                f"{method} {url}: HTTP {response.status_code}: {detail}", response.status_code, detail
            )
        return response

    def _wait(self, attempt: int, retry_after: Optional[str]) -> None:
        """Exponential backoff with jitter; the server's Retry-After (seconds) when it sent one."""
        delay = self.backoff_seconds * 2**attempt * random.uniform(0.5, 1.5)
        if retry_after is not None and retry_after.strip().isdigit():
            delay = max(delay, float(retry_after))
        time.sleep(min(delay, MAX_BACKOFF_SECONDS))
        # a pooled connection idle that long may be closed by the server as the retry reuses it
        # (a reset that looks like a request it received): retry on fresh connections
        self.session.close()


def _from_application(response: requests.Response) -> bool:
    """Whether an error answer is the FHE application's own (JSON with a ``detail``), not a proxy's."""
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and "detail" in body


def _never_sent(error: requests.ConnectionError) -> bool:
    """Whether a connection error happened before any byte of the request reached the server."""
    reason = getattr(error.args[0], "reason", None) if error.args else None
    return isinstance(reason, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError))


def _q(name: str) -> str:
    return quote(name, safe="")


def _module_url(model_name: str, module_name: str) -> str:
    return f"/models/{_q(model_name)}/modules/{_q(module_name)}"


def _shape_url(model_name: str, module_name: str, input_shape: str) -> str:
    return _module_url(model_name, module_name) + f"/shapes/{_q(input_shape)}"
