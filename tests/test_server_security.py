"""The FHE server exposed to untrusted clients: crafted keys, malformed requests, limits,
authentication, an honest health check, and the HTTP client under failures.

Every test runs a real uvicorn server on a free loopback port with real Concrete keys: a
leveled circuit (FCSmall `seq.0`, keys of 64 bytes) wherever no lookup is needed, and a tiny
3-bit lookup circuit (FCSmall(4) `seq`, ~75 MB of bootstrap keys) for crafted keys, native
crashes and long computations. Keys and servers are shared through module-scoped fixtures.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from fhe_backend import cli
from fhe_backend.deployment import FHEModelClient
from fhe_backend.deployment.http_client import FheHttpClient, RemoteServerError
from fhe_backend.deployment.keystore import FolderKeyStore, KeyQuota, KeyRecord, new_key_id
from fhe_backend.deployment.server import ServerSettings, create_app
from fhe_backend.hybrid_model import HybridFHEModel

LEVELED = ("FCSmall", "seq_0", "po_1_10_pc")
LOOKUP = ("FCSmallPBS", "seq", "po_1_4_pc")
TIMEOUT = 120


class FCSmall(torch.nn.Module):
    """The seed's model."""

    def __init__(self, dim):
        super().__init__()
        self.seq = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.ReLU(), torch.nn.Linear(dim, dim))

    def forward(self, x):
        return self.seq(x)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ThreadServer:
    """uvicorn serving `create_app(settings)` in a thread of the test process."""

    def __init__(self, settings: ServerSettings):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)

    def shape_url(self, target) -> str:
        model, module, shape = target
        return f"{self.url}/models/{model}/modules/{module}/shapes/{shape}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Two saved hybrid models and integer references computed with simulate before clearing."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("secure_server")
    refs = {"models": root / "models", "root": root}
    leveled = HybridFHEModel(FCSmall(10), ["seq_0"], model_name="FCSmall")
    leveled.compile_model(torch.randn(100, 10), n_bits=4)
    partition = leveled.remote_modules["seq.0"].partition
    refs["leveled_in"] = [partition.program.quantize_inputs(torch.randn(1, 10)) for _ in range(4)]
    refs["leveled_out"] = [partition.run_integers(q, "simulate")[0] for q in refs["leveled_in"]]
    leveled.save_and_clear_private_info(refs["models"] / "FCSmall")
    lookup = HybridFHEModel(FCSmall(4), "seq", model_name="FCSmallPBS")
    lookup.compile_model(torch.randn(100, 4), n_bits=3, rounding_threshold_bits=3, p_error=0.001)
    partition = lookup.remote_modules["seq"].partition
    assert partition.statistics["pbs_count"] > 0
    refs["lookup_in"] = [partition.program.quantize_inputs(torch.randn(1, 4)) for _ in range(2)]
    refs["lookup_out"] = [partition.run_integers(q, "disable")[0] for q in refs["lookup_in"]]
    lookup.save_and_clear_private_info(refs["models"] / "FCSmallPBS")
    return refs


def settings(artifacts, keys_dir, **limits) -> ServerSettings:
    return ServerSettings(str(artifacts["models"]), str(keys_dir), **limits)


@pytest.fixture(scope="module")
def server(artifacts):
    running = ThreadServer(settings(artifacts, artifacts["root"] / "keys", max_samples_per_request=8))
    yield running
    running.stop()


def make_client(url, target, folder) -> FHEModelClient:
    FheHttpClient(url).download_client(*target, folder)
    return FHEModelClient(folder)


@pytest.fixture(scope="module")
def leveled_client(artifacts, server):
    return make_client(server.url, LEVELED, artifacts["root"] / "leveled_client")


@pytest.fixture(scope="module")
def lookup_client(artifacts, server):
    client = make_client(server.url, LOOKUP, artifacts["root"] / "lookup_client")
    client.generate_private_and_evaluation_keys()
    return client


@pytest.fixture(scope="module")
def lookup_keys(lookup_client):
    return lookup_client.get_serialized_evaluation_keys()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def upload(url: str, target, data: bytes, **kwargs) -> requests.Response:
    return requests.post(url + "/models/{}/modules/{}/shapes/{}/keys".format(*target), data=data,
                         timeout=TIMEOUT, **kwargs)


def compute(url: str, target, key_id: str, samples, **kwargs) -> requests.Response:
    return requests.post(url + "/models/{}/modules/{}/shapes/{}/compute".format(*target), timeout=TIMEOUT,
                         json={"key_id": key_id, "inputs": [[b64(s)] for s in samples]}, **kwargs)


def stored_files(folder: Path):
    return sorted(p.name for p in Path(folder).glob("*") if p.is_file() and p.name != ".lock")


def bootstrap_params_offset(keys: bytes, spec_params: dict) -> int:
    """Byte offset of the first bootstrap key's (levelCount, baseLog, glweDimension, polynomialSize)."""
    pattern = struct.pack("<IIII", spec_params["levelCount"], spec_params["baseLog"],
                          spec_params["glweDimension"], spec_params["polynomialSize"])
    offset = keys.find(pattern, 0, 4096)
    assert offset > 0
    return offset


def lookup_specs(artifacts) -> dict:
    import zipfile

    with zipfile.ZipFile(artifacts["models"].joinpath(*LOOKUP, "server.zip")) as archive:
        return json.loads(archive.read("client.specs.json"))


def crafted_keys(keys: bytes, specs: dict) -> dict:
    """Keys of the right size whose parameters differ from the circuit's (they crash Concrete)."""
    params = specs["keyset"]["lweBootstrapKeys"][0]["params"]
    offset = bootstrap_params_offset(keys, params)
    k, n = params["glweDimension"], params["polynomialSize"]
    variants = {}

    def variant(name, *fields):  # fields: (byte offset from the params, new uint32)
        data = bytearray(keys)
        for position, value in fields:
            struct.pack_into("<I", data, offset + position, value)
        variants[name] = bytes(data)

    # (k+1)^2 * N kept: (k+1) doubled, N divided by 4 (e.g. k=6, N=256 -> k=13, N=64)
    variant("glwe_poly_swapped", (8, 2 * (k + 1) - 1), (12, n // 4))
    # polynomial size x4, input LWE dimension = 1 (a smaller key declared as the right one)
    variant("poly_up_lwe_down", (12, n * 4), (32, 1))
    variant("base_log_changed", (4, params["baseLog"] + 1))
    return variants


# ---- 1. crafted keys ------------------------------------------------------------------------

def test_crafted_keys_rejected_against_the_client_specification(artifacts, server, lookup_keys, leveled_client):
    """Right-sized keys with other parameters, trailing or missing bytes, or another circuit's
    keys are refused with 400 before anything is stored; genuine keys are accepted."""
    keys_dir = artifacts["root"] / "keys"
    before = stored_files(keys_dir)
    specs = lookup_specs(artifacts)
    cases = dict(crafted_keys(lookup_keys, specs))
    cases["trailing_bytes"] = lookup_keys + b"\0" * 8
    cases["truncated"] = lookup_keys[:-8]
    leveled_keys = leveled_client.get_serialized_evaluation_keys()
    cases["leveled_circuit_keys"] = leveled_keys
    for name, data in cases.items():
        assert len(data) >= len(leveled_keys)
        answer = upload(server.url, LOOKUP, data)
        assert answer.status_code == 400, (name, answer.status_code, answer.text)
        assert "evaluation_keys" in answer.json()["detail"], (name, answer.text)
    swapped = upload(server.url, LOOKUP, cases["glwe_poly_swapped"]).json()["detail"]
    assert "glweDimension" in swapped and "polynomialSize" in swapped and "another circuit" in swapped
    assert stored_files(keys_dir) == before, "no rejected key may be stored"
    assert upload(server.url, LOOKUP, lookup_keys).status_code == 200


def test_native_crash_costs_one_request_and_quarantines_the_key(artifacts, lookup_client, lookup_keys, tmp_path):
    """Keys stored without the check (e.g. by an older server) that crash Concrete: the request
    gets 400, the worker lives on, the keys are quarantined (also after a restart), and genuine
    keys still compute correct results."""
    keys_dir = tmp_path / "keys"
    store = FolderKeyStore(keys_dir)
    store.check()
    crafted = crafted_keys(lookup_keys, lookup_specs(artifacts))["glwe_poly_swapped"]
    bad_id = new_key_id()
    store.add(KeyRecord(bad_id, *LOOKUP, len(crafted), time.time()), crafted, KeyQuota())
    running = ThreadServer(settings(artifacts, keys_dir, max_concurrent_computes=1))
    try:
        sample = lookup_client.encrypt_serialize_integers(artifacts["lookup_in"][0])
        crashed = compute(running.url, LOOKUP, bad_id, [sample])
        assert crashed.status_code == 400, crashed.text
        assert "computation failed" in crashed.text and "quarantined" in crashed.text
        assert "SIG" in crashed.text  # the signal that ended the compute process
        assert running.thread.is_alive()
        assert requests.get(running.url + "/health", timeout=TIMEOUT).status_code == 200
        again = compute(running.url, LOOKUP, bad_id, [sample])
        assert again.status_code == 400 and "quarantined" in again.text
        assert (keys_dir / "quarantine" / f"{bad_id}.evk").is_file() and not (keys_dir / f"{bad_id}.evk").exists()
        good_id = upload(running.url, LOOKUP, lookup_keys).json()["key_id"]
        answer = compute(running.url, LOOKUP, good_id, [sample])
        assert answer.status_code == 200, answer.text
        result = base64.b64decode(answer.json()["outputs"][0][0])
        np.testing.assert_array_equal(lookup_client.deserialize_decrypt(result), artifacts["lookup_out"][0])
    finally:
        running.stop()
    restarted = ThreadServer(settings(artifacts, keys_dir))
    try:
        answer = compute(restarted.url, LOOKUP, bad_id, [sample])
        assert answer.status_code == 400 and "quarantined" in answer.text
    finally:
        restarted.stop()
