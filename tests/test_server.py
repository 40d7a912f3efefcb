"""The FHE model server over real HTTP: uvicorn on a free loopback port, real keys.

Models: the seed's FCSmall with `seq.0` remote (a linear circuit), FCSmall with the whole `seq`
remote (table lookups, so real bootstrapping keys), a tiny random GPT-2 with `c_fc` remote.
"""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from fhe_backend.deployment import FHEModelClient
from fhe_backend.deployment.http_client import FheHttpClient, RemoteServerError
from fhe_backend.deployment.server import ServerConfig, create_app
from fhe_backend.hybrid_model import HybridFHEMode, HybridFHEModel, RemoteModule

GPT2_REMOTE = "transformer.h.0.mlp.c_fc"


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
    """uvicorn serving `create_app(config)` in a thread of the test process."""

    def __init__(self, config: ServerConfig):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(config)
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)

    def shape_url(self, target) -> str:
        """The URL of one (model, module, input shape)."""
        model, module, shape = target
        return f"{self.url}/models/{model}/modules/{module}/shapes/{shape}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_for(url: str, seconds: float = 180.0) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"server at {url} did not start")


def gpt2_model():
    import transformers

    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """Compile and save three hybrid models; keep simulate-mode references before clearing."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hybrid_server")
    models = root / "models"
    refs = {}

    fc = HybridFHEModel(FCSmall(10), ["seq_0"], model_name="FCSmall")
    x = torch.randn(100, 10)
    fc.compile_model(x, n_bits=4)
    refs["fc_x"] = torch.randn(5, 10)
    refs["fc_sim"] = fc(refs["fc_x"], fhe="simulate")
    partition = fc.remote_modules["seq.0"].partition
    refs["fc_q_inputs"] = [partition.program.quantize_inputs(torch.randn(1, 10)) for _ in range(8)]
    refs["fc_q_outputs"] = [partition.run_integers(q, "simulate")[0] for q in refs["fc_q_inputs"]]
    fc.save_and_clear_private_info(models / "FCSmall")

    pbs = HybridFHEModel(FCSmall(4), "seq", model_name="FCSmallPBS")
    # p_error 2**-40: execute on the server must equal simulate bit for bit (at 0.001 per
    # lookup, both draw bootstrap errors and differ now and then)
    pbs.compile_model(torch.randn(100, 4), n_bits=3, rounding_threshold_bits=3, p_error=2**-40)
    assert pbs.remote_modules["seq"].partition.statistics["pbs_count"] > 0
    refs["pbs_x"] = torch.randn(2, 4)
    refs["pbs_sim"] = pbs(refs["pbs_x"], fhe="simulate")
    pbs.save_and_clear_private_info(models / "FCSmallPBS")

    gpt = HybridFHEModel(gpt2_model(), GPT2_REMOTE, model_name="gpt2")
    tokens = torch.randint(0, 50, (64, 4))
    gpt.compile_model(tokens, n_bits=4)
    refs["gpt_tokens"] = torch.randint(0, 50, (2, 4))
    refs["gpt_sim"] = gpt(refs["gpt_tokens"], fhe="simulate").logits
    gpt.save_and_clear_private_info(models / "gpt2")
    refs["models"], refs["keys"] = models, root / "keys"
    return refs


@pytest.fixture(scope="module")
def server(deployed):
    """A real uvicorn server on a free loopback port (stopped at the end of the module)."""
    running = ThreadServer(
        ServerConfig(
            str(deployed["models"]), str(deployed["keys"]), max_body_bytes=512 << 20, retry_after_seconds=1
        )
    )
    yield running
    running.stop()


def client_model(deployed, name, url, remote_names):
    """The client side: the saved model.pth (no private weights) with a server address."""
    model = torch.load(deployed["models"] / name / "model.pth", weights_only=False)
    return HybridFHEModel(model, remote_names, server_remote_address=url, model_name=name)


def count_computes(hybrid):
    calls = []
    for remote in hybrid.remote_modules.values():
        remote.http.session.hooks["response"].append(
            lambda response, *args, **kwargs: (
                calls.append(response.url) if response.url.endswith("/compute") else None
            )
        )
    return calls


def test_lists_models_modules_shapes_and_openapi(server):
    assert requests.get(server.url + "/models").json()["models"] == ["FCSmall", "FCSmallPBS", "gpt2"]
    assert requests.get(server.url + "/models/FCSmall/modules").json()["modules"] == ["seq_0"]
    shapes = requests.get(server.url + "/models/FCSmall/modules/seq_0/shapes").json()
    assert shapes["input_shapes"] == ["po_1_10_pc"]
    assert shapes["circuit_input_shapes"]["po_1_10_pc"] == [[1, 10]]
    zip_bytes = requests.get(server.url + "/models/FCSmall/modules/seq_0/shapes/po_1_10_pc/client").content
    assert zip_bytes[:2] == b"PK"
    paths = requests.get(server.url + "/openapi.json").json()["paths"]
    assert any(p.endswith("/compute") for p in paths) and any(p.endswith("/keys") for p in paths)


def test_fcsmall_remote_equals_simulate_in_one_request(deployed, server, tmp_path):
    hybrid = client_model(deployed, "FCSmall", server.url, "seq_0")
    remote = hybrid.remote_modules["seq.0"]
    assert remote.private_module is None and not any(True for _ in remote.parameters())
    hybrid.init_client(path_to_clients=tmp_path / "clients", path_to_keys=tmp_path / "keys")
    calls = count_computes(hybrid)
    out = hybrid(deployed["fc_x"], fhe="remote")
    assert torch.allclose(out, deployed["fc_sim"], atol=1e-6)
    assert len(calls) == 1, "a batch of 5 samples must be one compute request"


def test_table_lookup_module_remote_equals_simulate(deployed, server):
    hybrid = client_model(deployed, "FCSmallPBS", server.url, "seq")
    hybrid.init_client()
    out = hybrid(deployed["pbs_x"], fhe=HybridFHEMode.REMOTE)
    assert torch.allclose(out, deployed["pbs_sim"], atol=1e-6)


def test_gpt2_mlp_linear_remote_equals_simulate(deployed, server):
    hybrid = client_model(deployed, "gpt2", server.url, GPT2_REMOTE)
    assert isinstance(hybrid.model.transformer.h[0].mlp.c_fc, RemoteModule)
    hybrid.init_client()
    logits = hybrid(deployed["gpt_tokens"], fhe="remote").logits
    assert torch.allclose(logits, deployed["gpt_sim"], atol=1e-5)


def test_eight_concurrent_clients_with_their_own_keys(deployed, server, tmp_path):
    http = FheHttpClient(server.url)

    def one_client(index):
        folder = tmp_path / f"client{index}"
        http.download_client("FCSmall", "seq_0", "po_1_10_pc", folder)
        client = FHEModelClient(folder, key_dir=folder / "keys")
        client.generate_private_and_evaluation_keys()
        keys = client.get_serialized_evaluation_keys()
        key_id = http.upload_evaluation_keys("FCSmall", "seq_0", "po_1_10_pc", keys)
        sample = client.encrypt_serialize_integers(deployed["fc_q_inputs"][index])
        result = http.compute("FCSmall", "seq_0", "po_1_10_pc", key_id, [sample])
        secret = client.client.keys.serialize()
        return client.deserialize_decrypt(result), hashlib.sha256(secret).hexdigest(), key_id

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one_client, range(8)))
    for (decrypted, _, _), expected in zip(results, deployed["fc_q_outputs"]):
        np.testing.assert_array_equal(decrypted, expected)
    assert len({digest for _, digest, _ in results}) == 8, "every client must have its own keys"
    assert len({key_id for _, _, key_id in results}) == 8


@pytest.fixture(scope="module")
def fc_client(deployed, server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fc_client")
    http = FheHttpClient(server.url)
    http.download_client("FCSmall", "seq_0", "po_1_10_pc", folder)
    client = FHEModelClient(folder, key_dir=folder / "keys")
    key_id = http.upload_evaluation_keys(
        "FCSmall", "seq_0", "po_1_10_pc", client.get_serialized_evaluation_keys()
    )
    return client, key_id


def test_malformed_requests_get_4xx_then_valid_request_succeeds(deployed, server, fc_client, tmp_path):
    client, key_id = fc_client
    url = server.url + "/models/FCSmall/modules/seq_0/shapes/po_1_10_pc"
    sample = client.encrypt_serialize_integers(deployed["fc_q_inputs"][0])
    good = base64.b64encode(sample).decode()

    def check(response, status, *words):
        assert response.status_code == status, (response.status_code, response.text)
        for word in words:
            assert word in response.text, (word, response.text)

    # unknown names: 404 listing the known ones
    check(requests.get(server.url + "/models/nope/modules"), 404, "FCSmall", "gpt2")
    check(requests.get(server.url + "/models/FCSmall/modules/nope/shapes"), 404, "seq_0")
    check(requests.get(server.url + "/models/FCSmall/modules/seq_0/shapes/po_9_pc/client"), 404, "po_1_10_pc")
    check(
        requests.post(server.url + "/models/FCSmall/modules/seq_0/shapes/po_9_pc/keys", data=b"x"),
        404,
        "po_1_10_pc",
    )
    # names that could escape the models folder
    for bad in ("..", ".hidden", "%2e%2e%2f%2e%2e%2fetc", "a%2Fb"):
        response = requests.get(server.url + f"/models/{bad}/modules")
        assert response.status_code in (404, 422), (bad, response.status_code)
    # malformed keys
    check(requests.post(url + "/keys", data=b""), 400, "evaluation_keys")
    check(requests.post(url + "/keys", data=b"garbage" * 100), 400, "evaluation_keys")
    pbs_folder = tmp_path / "pbs"
    FheHttpClient(server.url).download_client("FCSmallPBS", "seq", "po_1_4_pc", pbs_folder)
    other_keys = FHEModelClient(pbs_folder).get_serialized_evaluation_keys()
    check(requests.post(url + "/keys", data=other_keys), 400, "evaluation_keys", "another circuit")
    check(
        requests.post(
            server.url + "/models/FCSmallPBS/modules/seq/shapes/po_1_4_pc/keys",
            data=other_keys[: len(other_keys) // 2],
        ),
        400,
        "evaluation_keys",
    )
    # unknown or malformed key id
    check(requests.post(url + "/compute", json={"key_id": "A" * 43, "inputs": [[good]]}), 404, "key_id")
    check(
        requests.post(url + "/compute", json={"key_id": "../../etc/passwd", "inputs": [[good]]}),
        422,
        "key_id",
    )
    # malformed ciphertexts and bodies
    check(requests.post(url + "/compute", json={"key_id": key_id, "inputs": [["***"]]}), 400, "inputs[0]")
    check(
        requests.post(
            url + "/compute", json={"key_id": key_id, "inputs": [[base64.b64encode(b"junk").decode()]]}
        ),
        400,
        "inputs[0][0]",
    )
    check(
        requests.post(url + "/compute", json={"key_id": key_id, "inputs": [[good, good]]}), 400, "inputs[0]"
    )
    check(requests.post(url + "/compute", json={"key_id": key_id}), 422, "inputs")
    check(requests.post(url + "/compute", json={"key_id": key_id, "inputs": []}), 422, "inputs")
    check(
        requests.post(url + "/compute", data=b"{not json", headers={"Content-Type": "application/json"}), 422
    )
    # a ciphertext for another shape (the GPT-2 module's input) sent to FCSmall
    gpt_folder = tmp_path / "gpt"
    FheHttpClient(server.url).download_client("gpt2", "transformer_h_0_mlp_c_fc", "po_1_4_16_pc", gpt_folder)
    gpt_client = FHEModelClient(gpt_folder)
    wrong_shape = gpt_client.quantize_encrypt_serialize(np.zeros((1, 4, 16)))
    check(
        requests.post(
            url + "/compute", json={"key_id": key_id, "inputs": [[base64.b64encode(wrong_shape).decode()]]}
        ),
        400,
        "inputs[0]",
    )
    # keys uploaded for one module used on another
    check(
        requests.post(
            server.url + "/models/gpt2/modules/transformer_h_0_mlp_c_fc/shapes/po_1_4_16_pc/compute",
            json={"key_id": key_id, "inputs": [[base64.b64encode(wrong_shape).decode()]]},
        ),
        400,
        "key_id",
    )
    # body over the limit: a server with a 1 MB limit
    small = ThreadServer(ServerConfig(str(deployed["models"]), str(deployed["keys"]), max_body_bytes=1 << 20))
    try:
        small_url = small.url + "/models/FCSmall/modules/seq_0/shapes/po_1_10_pc"
        check(requests.post(small_url + "/keys", data=b"0" * (2 << 20)), 413, "limit")
        chunks = (b"0" * (256 << 10) for _ in range(8))  # chunked upload, no Content-Length
        check(requests.post(small_url + "/keys", data=chunks), 413, "limit")
    finally:
        small.stop()
    # the server still answers a valid request
    answer = requests.post(url + "/compute", json={"key_id": key_id, "inputs": [[good]]})
    assert answer.status_code == 200
    result = base64.b64decode(answer.json()["outputs"][0][0])
    np.testing.assert_array_equal(client.deserialize_decrypt(result), deployed["fc_q_outputs"][0])


def test_client_raises_the_server_message(server):
    with pytest.raises(RemoteServerError, match="known models") as raised:
        FheHttpClient(server.url).list_modules("missing")
    assert raised.value.status_code == 404
    with pytest.raises(RemoteServerError, match="cannot reach"):
        FheHttpClient(f"http://127.0.0.1:{free_port()}", retries=1, backoff_seconds=0.01).list_models()


def worker_pids(parent: int) -> set:
    """Pids of the worker processes `fhe-backend serve` spawned (from /proc)."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"spawn_main" in command and b"resource_tracker" not in command:
            pids.add(int(stat.parent.name))
    return pids


def test_restarted_server_with_two_workers_serves_known_key_ids(deployed, server, fc_client):
    """Two workers serve keys uploaded to an earlier server; a killed worker is replaced, and
    SIGTERM to the process group stops everything even while the replacement still starts."""
    client, key_id = fc_client
    server.stop()
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "fhe_backend.cli",
        "serve",
        str(deployed["models"]),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--keys-dir",
        str(deployed["keys"]),
        "--workers",
        "2",
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(command, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(url)
        http = FheHttpClient(url)
        for index in range(3):
            sample = client.encrypt_serialize_integers(deployed["fc_q_inputs"][index])
            result = http.compute("FCSmall", "seq_0", "po_1_10_pc", key_id, [sample])
            np.testing.assert_array_equal(client.deserialize_decrypt(result), deployed["fc_q_outputs"][index])
        workers = worker_pids(process.pid)
        assert len(workers) == 2
        os.kill(min(workers), signal.SIGKILL)
        deadline = time.time() + 30
        while len(worker_pids(process.pid) - workers) < 1 and time.time() < deadline:
            time.sleep(0.1)
        replaced = worker_pids(process.pid)
        assert len(replaced) == 2 and len(replaced - workers) == 1, (workers, replaced)
        time.sleep(2)  # the replacement still imports torch: uvicorn's supervisor hung on it for 300 s
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(timeout=60) == 0
