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
import math
import os
import re
import signal
import socket
import struct
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

from fhe_backend import cli
from fhe_backend.deployment import FHEModelClient
from fhe_backend.deployment.http_client import FheHttpClient, RemoteServerError, ignore_sigpipe
from fhe_backend.deployment.keystore import FolderKeyStore, KeyQuota, KeyRecord, new_key_id
from fhe_backend.deployment.server import ServerSettings
from fhe_backend.hybrid_model import HybridFHEModel

from .test_server import FCSmall, ThreadServer, free_port

LEVELED = ("FCSmall", "seq_0", "po_1_10_pc")
LOOKUP = ("FCSmallPBS", "seq", "po_1_4_pc")
TIMEOUT = 120


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


@pytest.fixture(autouse=True)
def _no_sigpipe_abort():
    """Concrete's runtime aborts the process on SIGPIPE once it ran here (clients encrypt in
    this process, servers run in its threads): restore Python's SIG_IGN."""
    ignore_sigpipe()
    yield
    ignore_sigpipe()


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
    return requests.post(
        url + "/models/{}/modules/{}/shapes/{}/keys".format(*target), data=data, timeout=TIMEOUT, **kwargs
    )


def compute(url: str, target, key_id: str, samples, **kwargs) -> requests.Response:
    return requests.post(
        url + "/models/{}/modules/{}/shapes/{}/compute".format(*target),
        timeout=TIMEOUT,
        json={"key_id": key_id, "inputs": [[b64(s)] for s in samples]},
        **kwargs,
    )


def stored_files(folder: Path):
    return sorted(p.name for p in Path(folder).glob("*") if p.is_file() and p.name != ".lock")


def bootstrap_params_offset(keys: bytes, spec_params: dict) -> int:
    """Byte offset of the first bootstrap key's (levelCount, baseLog, glweDimension, polynomialSize)."""
    pattern = struct.pack(
        "<IIII",
        spec_params["levelCount"],
        spec_params["baseLog"],
        spec_params["glweDimension"],
        spec_params["polynomialSize"],
    )
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


def test_crafted_keys_rejected_against_the_client_specification(
    artifacts, server, lookup_keys, leveled_client
):
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


def test_native_crash_costs_one_request_and_quarantines_the_key(
    artifacts, lookup_client, lookup_keys, tmp_path
):
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
        assert (keys_dir / "quarantine" / f"{bad_id}.evk").is_file() and not (
            keys_dir / f"{bad_id}.evk"
        ).exists()
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


def _wait_until_unpacked(folder) -> None:
    """Wait until a compute child has unpacked a circuit into its temporary `folder`."""
    deadline = time.time() + TIMEOUT
    while not any(folder.iterdir()) and time.time() < deadline:
        time.sleep(0.1)
    assert any(folder.iterdir()), "the child unpacks the circuit into its own folder"


def test_a_compute_child_unpacks_circuits_into_a_folder_removed_with_it(artifacts):
    """Concrete never removes the folder it unpacks a loaded circuit into: each compute child
    has its own temporary folder, removed when the child is replaced after a crash (or a
    request could fill the disk crash after crash) and when it stops."""
    from fhe_backend.deployment.compute import ComputeProcess
    from fhe_backend.deployment.fhe_client_server import SERVER_ZIP

    circuit_dir = next(artifacts["models"].rglob(SERVER_ZIP)).parent
    process = ComputeProcess(1, 2**30)
    process.start()
    process.preload([circuit_dir])
    crashed = process.scratch
    _wait_until_unpacked(crashed)
    process.process.kill()
    process.process.wait()
    process.start()  # as `run` does when its child died
    assert not crashed.exists() and process.scratch.is_dir()
    stopped = process.scratch
    process.stop()
    assert not stopped.exists()
    # SIGTERM to the child (a server's process group stopped): it removes its folder and dies
    # of the signal, even where its parent does not get to remove the folder
    process.start()
    process.preload([circuit_dir])
    terminated = process.scratch
    _wait_until_unpacked(terminated)
    process.process.send_signal(signal.SIGTERM)
    assert process.process.wait(TIMEOUT) == -signal.SIGTERM
    assert not terminated.exists()
    process.stop()


def _running(pid: str) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_folders_of_killed_compute_processes_are_removed_by_the_next_one(artifacts, tmp_path):
    """A worker killed outright together with its compute child (Ray kills a replica's
    children with it, the OOM killer) runs no cleanup: its folder stays, no longer locked, and
    the next compute process started on the machine removes it; folders in use stay."""
    from fhe_backend.deployment.compute import ComputeProcess
    from fhe_backend.deployment.fhe_client_server import SERVER_ZIP
    from fhe_backend.output_dirs import ABANDONED_AFTER_SECONDS, held, remove_abandoned

    circuit_dir = next(artifacts["models"].rglob(SERVER_ZIP)).parent
    script = (
        "import sys, time\n"
        "from fhe_backend.deployment.compute import ComputeProcess\n"
        "process = ComputeProcess(1, 2**30)\n"
        "process.start()\n"
        "process.preload([sys.argv[1]])\n"
        "print(process.scratch, process.process.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    worker = subprocess.Popen(
        [sys.executable, "-c", script, str(circuit_dir)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    folder, child = worker.stdout.readline().split()
    folder = Path(folder)
    _wait_until_unpacked(folder)
    os.killpg(worker.pid, signal.SIGKILL)  # the worker and its child, no handler runs
    worker.wait()
    deadline = time.time() + TIMEOUT
    while _running(child) and time.time() < deadline:  # dead once a zombie: its files are closed
        time.sleep(0.05)
    while held(folder) and time.time() < deadline:  # the kernel drops the lock as the last holder exits
        time.sleep(0.05)
    assert folder.is_dir() and not held(folder)
    live = ComputeProcess(1, 2**30)
    live.start()
    try:
        assert folder.is_dir(), "a folder changed in the last minute may not be locked yet: it stays"
        old = time.time() - 2 * ABANDONED_AFTER_SECONDS
        os.utime(folder, (old, old))
        live.start()  # a restart makes a new folder, and removes the abandoned ones first
        assert not folder.exists()
        held = live.scratch
        os.utime(held, (old, old))
        assert held not in remove_abandoned("fhe_compute_", older_than=0) and held.is_dir()
    finally:
        live.stop()


# ---- 2. no 500 for bad input: the malformed-request battery ---------------------------------


def raw_request(port: int, data: bytes, timeout: float = 30.0) -> int:
    """Send raw bytes; the status code of the answer (0 when the server closed without one)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    parts = answer.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def malformed_cases(server, leveled_client, lookup_client, lookup_keys, artifacts):
    """(name, callable returning the status code): at least 100 malformed requests."""
    key_id = upload(server.url, LEVELED, leveled_client.get_serialized_evaluation_keys()).json()["key_id"]
    sample = leveled_client.encrypt_serialize_integers(artifacts["leveled_in"][0])
    good = b64(sample)
    other_sample = b64(lookup_client.encrypt_serialize_integers(artifacts["lookup_in"][0]))
    base = server.shape_url(LEVELED)
    cases = []

    def http(name, method, url, **kwargs):
        cases.append((name, lambda: requests.request(method, url, timeout=TIMEOUT, **kwargs).status_code))

    def compute_body(name, body: bytes, content_type="application/json"):
        http(
            f"compute body {name}",
            "POST",
            base + "/compute",
            data=body,
            headers={"Content-Type": content_type},
        )

    def compute_json(name, payload):
        compute_body(name, json.dumps(payload).encode())

    valid = json.dumps({"key_id": key_id, "inputs": [[good]]})
    # bodies that gave 500 before: non-finite numbers, invalid UTF-8, UTF-16
    compute_body("1e999", b"1e999")
    compute_body("-1e999", b"-1e999")
    compute_body("NaN key_id", b'{"key_id": NaN, "inputs": [["AAAA"]]}')
    compute_body("Infinity key_id", b'{"key_id": Infinity, "inputs": [["AAAA"]]}')
    compute_body("NaN input", ('{"key_id": "%s", "inputs": [[NaN]]}' % key_id).encode())
    compute_body("1e999 input", ('{"key_id": "%s", "inputs": [[1e999]]}' % key_id).encode())
    compute_body("invalid utf-8", b'{"key_id": "\xff\xfe\xfd", "inputs": [["\xc3\x28"]]}')
    compute_body("invalid utf-8 only", b"\xff\xfe\xfd\xfc")
    compute_body("utf-16 with BOM", valid.encode("utf-16"))
    compute_body("utf-16-le", valid.encode("utf-16-le"))
    compute_body("utf-32", valid.encode("utf-32"))
    compute_body("lone surrogate", b'{"key_id": "\\ud800", "inputs": [["AAAA"]]}')
    compute_body("nul bytes", b"\0" * 64)
    compute_body("truncated json", valid.encode()[:-3])
    compute_body("not json", b"{not json")
    compute_body("deep nesting", b"[" * 100000 + b"]" * 100000)
    compute_body("deep nesting in inputs", ('{"key_id": "%s", "inputs": ' % key_id).encode() + b"[" * 50000)
    compute_body("huge integer", b"9" * 100000)
    compute_body("huge exponent", b'{"key_id": 1e99999999999, "inputs": []}')
    compute_body("empty", b"")
    compute_body("whitespace", b"   \n\t ")
    for literal in (b"null", b"[]", b'""', b"0", b"true", b"{}", b'"text"', b"[{}]"):
        compute_body(f"literal {literal!r}", literal)
    compute_body("text/plain garbage", b"hello", content_type="text/plain")
    compute_body("form encoded", b"key_id=x&inputs=y", content_type="application/x-www-form-urlencoded")
    for bad_id in (
        1,
        None,
        ["x"],
        {"a": 1},
        "",
        "short",
        "../../etc/passwd",
        "A" * 65,
        "é" * 40,
        "A" * 42 + "/",
        "A" * 43 + "\n",
        "%2e%2e%2f" * 5,
    ):
        compute_json(f"key_id {bad_id!r:.30}", {"key_id": bad_id, "inputs": [[good]]})
    compute_json("unknown key_id", {"key_id": "A" * 43, "inputs": [[good]]})
    compute_json("missing key_id", {"inputs": [[good]]})
    compute_json("missing inputs", {"key_id": key_id})
    compute_json("duplicate fields", {"key_id": key_id, "inputs": []} | {})
    compute_body("duplicate keys both bad", b'{"key_id": 1, "key_id": 2, "inputs": []}')
    for name, inputs in (
        ("string", "x"),
        ("number", 1),
        ("null", None),
        ("empty", []),
        ("empty sample", [[]]),
        ("int ciphertext", [[1]]),
        ("null ciphertext", [[None]]),
        ("nested", [[[good]]]),
        ("not base64", [["***"]]),
        ("empty string", [[""]]),
        ("base64 junk", [[b64(b"junk")]]),
        ("base64 padding", [["AAA"]]),
        ("base64 with spaces", [["AA AA"]]),
        ("truncated ciphertext", [[b64(sample[:-8])]]),
        ("half ciphertext", [[b64(sample[: len(sample) // 2])]]),
        ("trailing bytes", [[b64(sample + b"\0" * 8)]]),
        ("one trailing byte", [[b64(sample + b"x")]]),
        ("two ciphertexts", [[good, good]]),
        ("other circuit", [[other_sample]]),
        ("keys as ciphertext", [[b64(leveled_client.get_serialized_evaluation_keys())]]),
        ("random bytes", [[b64(bytes(range(256)) * 4)]]),
        ("too many samples", [[good]] * 9),
        ("mixed samples", [[good], ["***"]]),
        ("dict sample", [{"a": good}]),
    ):
        compute_json(f"inputs {name}", {"key_id": key_id, "inputs": inputs})
    header = bytearray(sample)
    struct.pack_into("<I", header, 0, 100000)  # 100001 segments declared
    compute_json("ciphertext with huge segment table", {"key_id": key_id, "inputs": [[b64(bytes(header))]]})
    oversized = bytearray(sample)
    struct.pack_into("<I", oversized, 4, 1 << 30)  # first segment larger than the message
    compute_json("ciphertext with oversized segment", {"key_id": key_id, "inputs": [[b64(bytes(oversized))]]})
    # keys uploaded for another module used here
    other_key = upload(server.url, LOOKUP, lookup_keys).json()["key_id"]
    compute_json("keys of another module", {"key_id": other_key, "inputs": [[good]]})

    # keys endpoint
    def keys_body(name, body, target=LEVELED):
        http(
            f"keys {name}",
            "POST",
            server.shape_url(target) + "/keys",
            data=body,
            headers={"Content-Type": "application/octet-stream"},
        )

    leveled_keys = leveled_client.get_serialized_evaluation_keys()
    keys_body("empty", b"")
    keys_body("garbage", b"garbage" * 100)
    for length in (1, 7, 8, 16, 63, 1000):
        keys_body(f"zeros {length}", b"\0" * length)
    keys_body("random", bytes(range(256)) * 16)
    keys_body("json", valid.encode())
    keys_body("trailing bytes", leveled_keys + b"\0" * 8)
    keys_body("one trailing byte", leveled_keys + b"x")
    keys_body("truncated", leveled_keys[:-8])
    keys_body("ciphertext as keys", sample)
    keys_body("leveled keys for the lookup circuit", leveled_keys, LOOKUP)
    for cut in (8, 16, 100, 4096, len(lookup_keys) // 2):
        keys_body(f"lookup keys cut at {cut}", lookup_keys[:cut], LOOKUP)
    keys_body("lookup keys with trailing bytes", lookup_keys + b"\0" * 8, LOOKUP)
    for name, data in crafted_keys(lookup_keys, lookup_specs(artifacts)).items():
        keys_body(f"crafted {name}", data, LOOKUP)
    segments = bytearray(leveled_keys)
    struct.pack_into("<I", segments, 0, 0xFFFFFFFF)
    keys_body("segment count overflow", bytes(segments))
    far_loop = struct.pack("<II", 0, 1) + struct.pack("<Q", 2)  # root: a far pointer to itself
    keys_body("far pointer loop", far_loop)
    struct_out = struct.pack("<II", 0, 1) + struct.pack("<Q", (0x7FFFF << 2) | (3 << 48))  # root past the end
    keys_body("root outside the message", struct_out)

    # names, methods, key ids in paths
    for bad in ("..", ".hidden", "%2e%2e%2f%2e%2e%2fetc", "a%2Fb", "x" * 200, "%00", "%C3%BC", "a%20b", "-x"):
        http(f"model name {bad:.20}", "GET", f"{server.url}/models/{bad}/modules")
        http(
            f"shape name {bad:.20}",
            "POST",
            f"{server.url}/models/FCSmall/modules/seq_0/shapes/{bad}/keys",
            data=leveled_keys,
        )
    http("unknown model", "GET", server.url + "/models/nope/modules")
    http("unknown module", "GET", server.url + "/models/FCSmall/modules/nope/shapes")
    http("unknown shape client", "GET", server.url + "/models/FCSmall/modules/seq_0/shapes/po_9_pc/client")
    http(
        "unknown shape compute",
        "POST",
        server.url + "/models/FCSmall/modules/seq_0/shapes/po_9_pc/compute",
        data=valid,
    )
    for method, url in (
        ("PUT", "/models"),
        ("PATCH", "/models/FCSmall/modules"),
        ("POST", "/health"),
        ("GET", "/models/FCSmall/modules/seq_0/shapes/po_1_10_pc/compute"),
        ("PUT", "/models/FCSmall/modules/seq_0/shapes/po_1_10_pc/keys"),
    ):
        http(f"method {method} {url}", method, server.url + url)
    for bad in ("..%2F..%2Fetc%2Fpasswd", "short", "A" * 43, "A" * 200, "%00" * 40):
        http(f"delete key {bad:.20}", "DELETE", f"{base}/keys/{bad}")
    http("unknown path", "GET", server.url + "/nothing/here")

    # framing (raw sockets): request smuggling, bad lengths, bad HTTP
    path = "/models/FCSmall/modules/seq_0/shapes/po_1_10_pc/compute"

    def raw(name, data: bytes):
        cases.append((f"raw {name}", lambda: raw_request(server.port, data)))

    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    raw(
        "content-length and transfer-encoding",
        (head + "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").encode(),
    )
    raw(
        "transfer-encoding and content-length",
        (head + "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n").encode(),
    )
    raw("two content-lengths", (head + "Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}x").encode())
    raw("content-length not a number", (head + "Content-Length: abc\r\n\r\n{}").encode())
    raw("negative content-length", (head + "Content-Length: -1\r\n\r\n{}").encode())
    raw("content-length over the limit", (head + f"Content-Length: {(1 << 30) + 1}\r\n\r\n").encode())
    raw("bad chunk size", (head + "Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n").encode())
    raw("gzip transfer-encoding", (head + "Transfer-Encoding: gzip\r\n\r\n{}").encode())
    raw("no host", f"POST {path} HTTP/1.1\r\nContent-Length: 2\r\n\r\n{{}}".encode())
    raw("garbage request line", b"GARBAGE\r\n\r\n")
    raw("header without colon", (head + "NoColonHere\r\nContent-Length: 2\r\n\r\n{}").encode())
    raw("huge header", (head + "X-Big: " + "a" * 70000 + "\r\nContent-Length: 2\r\n\r\n{}").encode())
    raw("body bigger than content-length", (head + "Content-Length: 2\r\n\r\n{}garbage-after").encode())
    return cases


def test_malformed_request_battery_gets_only_4xx(
    artifacts, server, leveled_client, lookup_client, lookup_keys
):
    """At least 100 malformed requests: every one is answered 4xx (never 5xx, never silence)."""
    cases = malformed_cases(server, leveled_client, lookup_client, lookup_keys, artifacts)
    assert len(cases) >= 100, len(cases)
    results = {name: run() for name, run in cases}
    wrong = {name: status for name, status in results.items() if not 400 <= status < 500}
    assert not wrong, wrong
    # the ones the issue lists, with the status a client can act on
    assert results["raw content-length and transfer-encoding"] == 400
    assert results["compute body 1e999"] == 422 and results["compute body NaN key_id"] == 422
    assert results["compute body utf-16 with BOM"] == 422 and results["compute body invalid utf-8"] == 422
    assert results["compute body inputs trailing bytes"] == 400 and results["keys trailing bytes"] == 400
    assert results["compute body inputs too many samples"] == 413
    assert results["raw content-length over the limit"] == 413
    # still serving
    sample = leveled_client.encrypt_serialize_integers(artifacts["leveled_in"][1])
    key_id = upload(server.url, LEVELED, leveled_client.get_serialized_evaluation_keys()).json()["key_id"]
    answer = compute(server.url, LEVELED, key_id, [sample])
    assert answer.status_code == 200
    result = base64.b64decode(answer.json()["outputs"][0][0])
    np.testing.assert_array_equal(leveled_client.deserialize_decrypt(result), artifacts["leveled_out"][1])


# ---- 2. keys folder: checked at start-up, reported by /health, atomic metadata ---------------


def test_unwritable_keys_folder_stops_start_up_with_exit_1(artifacts, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    status = cli.main(["serve", str(artifacts["models"]), "--keys-dir", str(blocker / "keys")])
    out = capsys.readouterr().out
    assert status == 1 and "keys folder" in out and "not writable" in out and "--keys-dir" in out, out


def test_health_reports_keys_that_cannot_be_stored_and_uploads_get_503(artifacts, leveled_client, tmp_path):
    keys_dir = tmp_path / "keys"
    running = ThreadServer(settings(artifacts, keys_dir))
    try:
        health = requests.get(running.url + "/health", timeout=TIMEOUT)
        assert health.status_code == 200 and health.json()["keys"] == "writable"
        key_id = upload(running.url, LEVELED, leveled_client.get_serialized_evaluation_keys()).json()[
            "key_id"
        ]
        assert stored_files(keys_dir) == sorted([f"{key_id}.evk", f"{key_id}.json"]), "no temporary file left"
        record = json.loads((keys_dir / f"{key_id}.json").read_text())
        assert record["key_id"] == key_id and record["model"] == "FCSmall" and record["size"] > 0
        import shutil

        shutil.rmtree(keys_dir)
        keys_dir.write_text("the keys folder was replaced by a file")
        health = requests.get(running.url + "/health", timeout=TIMEOUT)
        assert health.status_code == 503 and "not writable" in health.json()["detail"]
        answer = upload(running.url, LEVELED, leveled_client.get_serialized_evaluation_keys())
        assert answer.status_code == 503 and "keys" in answer.json()["detail"], answer.text
        keys_dir.unlink()
        assert requests.get(running.url + "/health", timeout=TIMEOUT).status_code == 200  # recreated
    finally:
        running.stop()


# ---- 3. limits ----------------------------------------------------------------------------


def test_key_quota_expiry_and_delete(artifacts, leveled_client, tmp_path):
    running = ThreadServer(settings(artifacts, tmp_path / "keys", max_keys_per_model=2, key_ttl_seconds=2.0))
    keys = leveled_client.get_serialized_evaluation_keys()
    sample = leveled_client.encrypt_serialize_integers(artifacts["leveled_in"][0])
    try:
        first, second = (upload(running.url, LEVELED, keys).json()["key_id"] for _ in range(2))
        refused = upload(running.url, LEVELED, keys)
        assert refused.status_code == 429 and "--max-keys-per-model" in refused.text
        base = running.shape_url(LEVELED)
        assert requests.delete(f"{base}/keys/{first}", timeout=TIMEOUT).status_code == 204
        assert compute(running.url, LEVELED, first, [sample]).status_code == 404
        assert requests.delete(f"{base}/keys/{first}", timeout=TIMEOUT).status_code == 404
        third = upload(running.url, LEVELED, keys).json()["key_id"]
        assert compute(running.url, LEVELED, third, [sample]).status_code == 200
        time.sleep(2.2)
        expired = compute(running.url, LEVELED, second, [sample])
        assert expired.status_code == 404 and "expired" in expired.text
        assert upload(running.url, LEVELED, keys).status_code == 200  # expired keys no longer count
        assert len([name for name in stored_files(tmp_path / "keys") if name.endswith(".evk")]) == 1
    finally:
        running.stop()
    running = ThreadServer(settings(artifacts, tmp_path / "keys2", max_key_bytes_per_model=len(keys) + 10))
    try:
        assert upload(running.url, LEVELED, keys).status_code == 200
        refused = upload(running.url, LEVELED, keys)
        assert refused.status_code == 429 and "--max-key-bytes-per-model" in refused.text
    finally:
        running.stop()


def test_samples_per_request_limit(artifacts, server, leveled_client):
    key_id = upload(server.url, LEVELED, leveled_client.get_serialized_evaluation_keys()).json()["key_id"]
    samples = [leveled_client.encrypt_serialize_integers(q) for q in artifacts["leveled_in"]] * 2
    assert len(samples) == 8
    assert compute(server.url, LEVELED, key_id, samples).status_code == 200
    refused = compute(server.url, LEVELED, key_id, samples + samples[:1])
    assert refused.status_code == 413 and "--max-samples-per-request" in refused.text
    # the client splits a larger batch into requests the server accepts
    http = FheHttpClient(server.url, max_samples_per_request=8)
    calls = []
    http.session.hooks["response"].append(lambda response, *a, **k: calls.append(response.status_code))
    results = http.compute(*LEVELED, key_id, samples + samples[:1])
    assert calls == [200, 200] and len(results) == 9
    for result, expected in zip(results, artifacts["leveled_out"] * 3):
        np.testing.assert_array_equal(leveled_client.deserialize_decrypt(result), expected)


def test_slow_bodies_time_out_and_their_connections_close(artifacts, tmp_path):
    """`Content-Length: 100000000` followed by 10 bytes, and a body trickling in: 408, closed."""
    running = ThreadServer(
        settings(artifacts, tmp_path / "keys", body_idle_timeout_seconds=1.0, body_timeout_seconds=3.0)
    )
    path = "/models/FCSmall/modules/seq_0/shapes/po_1_10_pc/keys"
    try:
        sockets = []
        started = time.time()
        for _ in range(30):
            sock = socket.create_connection(("127.0.0.1", running.port), timeout=20)
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n".encode()
                + b"0123456789"
            )
            sockets.append(sock)
        for sock in sockets:
            answer = b""
            while True:  # read until the server closes the connection
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            sock.close()
        assert time.time() - started < 15
        trickle = socket.create_connection(("127.0.0.1", running.port), timeout=20)
        trickle.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n".encode())
        started, answer = time.time(), b""
        trickle.setblocking(False)
        while not answer and time.time() - started < 15:
            try:
                trickle.sendall(b"x")
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                pass
            time.sleep(0.3)
            try:
                answer = trickle.recv(4096)
            except BlockingIOError:
                pass
        trickle.close()
        assert answer.startswith(b"HTTP/1.1 408") and 2.5 < time.time() - started < 10, answer[:100]
    finally:
        running.stop()


def test_busy_worker_answers_503_with_retry_after_and_client_retries(
    artifacts, lookup_client, lookup_keys, tmp_path
):
    running = ThreadServer(
        settings(
            artifacts,
            tmp_path / "keys",
            max_concurrent_computes=1,
            compute_queue_seconds=0.5,
            retry_after_seconds=1,
        )
    )
    try:
        key_id = upload(running.url, LOOKUP, lookup_keys).json()["key_id"]
        samples = [lookup_client.encrypt_serialize_integers(q) for q in artifacts["lookup_in"]]
        with ThreadPoolExecutor(1) as pool:
            long_one = pool.submit(compute, running.url, LOOKUP, key_id, samples * 2)
            deadline = time.time() + 60
            while (
                requests.get(running.url + "/health", timeout=TIMEOUT).json()["compute"]["running_computes"]
                == 0
            ):
                assert time.time() < deadline
                time.sleep(0.05)
            queued = time.time()
            busy = compute(running.url, LOOKUP, key_id, samples[:1])
            assert busy.status_code == 503 and busy.headers["Retry-After"] == "1", busy.text
            assert time.time() - queued >= 0.5 and "--compute-queue-seconds" in busy.text  # waited, then 503
            # the client follows Retry-After and succeeds once the first computation is done
            patient = FheHttpClient(running.url, retries=30, backoff_seconds=0.2)
            result = patient.compute(*LOOKUP, key_id, samples[:1])
            assert long_one.result().status_code == 200
        np.testing.assert_array_equal(lookup_client.deserialize_decrypt(result), artifacts["lookup_out"][0])
    finally:
        running.stop()


def test_compute_stops_when_the_client_disconnects(artifacts, lookup_client, lookup_keys, tmp_path):
    running = ThreadServer(settings(artifacts, tmp_path / "keys", max_concurrent_computes=1))
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("fhe_backend.server").addHandler(handler)
    logging.getLogger("fhe_backend.server").setLevel(logging.INFO)
    try:
        key_id = upload(running.url, LOOKUP, lookup_keys).json()["key_id"]
        sample = lookup_client.encrypt_serialize_integers(artifacts["lookup_in"][0])
        started = time.time()
        assert compute(running.url, LOOKUP, key_id, [sample]).status_code == 200  # loads the keys
        started = time.time()
        assert compute(running.url, LOOKUP, key_id, [sample]).status_code == 200
        one_sample = time.time() - started
        # enough samples that finishing them all would take clearly longer than the bound below
        count = min(64, max(8, math.ceil((2 * one_sample + 2.0) / one_sample)))
        body = json.dumps({"key_id": key_id, "inputs": [[b64(sample)]] * count}).encode()
        sock = socket.create_connection(("127.0.0.1", running.port), timeout=30)
        sock.sendall(
            b"POST /models/FCSmallPBS/modules/seq/shapes/po_1_4_pc/compute HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        health = running.url + "/health"
        while requests.get(health, timeout=TIMEOUT).json()["compute"]["running_computes"] == 0:
            time.sleep(0.02)
        sock.close()
        closed = time.time()
        while requests.get(health, timeout=TIMEOUT).json()["compute"]["running_computes"] == 1:
            time.sleep(0.05)
        freed = time.time() - closed
        assert freed < 2 * one_sample + 1.0, (freed, one_sample, count)
        stopped = [m for m in messages if "disconnected during POST" in m and "compute stopped" in m]
        assert stopped, messages
        done = int(re.search(r"compute stopped after (\d+) of (\d+) samples", stopped[0]).group(1))
        assert done < count, (stopped, count)
    finally:
        logging.getLogger("fhe_backend.server").removeHandler(handler)
        logging.getLogger("fhe_backend.server").setLevel(logging.NOTSET)
        running.stop()


def test_key_cache_is_bounded_in_count_and_bytes(artifacts, leveled_client, tmp_path):
    keys = leveled_client.get_serialized_evaluation_keys()
    samples = [leveled_client.encrypt_serialize_integers(q) for q in artifacts["leveled_in"][:3]]
    for limits, bound in (({"key_cache_size": 2}, 2), ({"key_cache_bytes": len(keys) + 1}, 1)):
        running = ThreadServer(
            settings(artifacts, tmp_path / f"keys{bound}", max_concurrent_computes=1, **limits)
        )
        try:
            for index in range(3):
                key_id = upload(running.url, LEVELED, keys).json()["key_id"]
                answer = compute(running.url, LEVELED, key_id, [samples[index]])
                result = base64.b64decode(answer.json()["outputs"][0][0])
                np.testing.assert_array_equal(
                    leveled_client.deserialize_decrypt(result), artifacts["leveled_out"][index]
                )
                stats = requests.get(running.url + "/health", timeout=TIMEOUT).json()["compute"]
                assert stats["cached_keys"] == min(index + 1, bound), (limits, stats)
                assert stats["cached_key_bytes"] == len(keys) * min(index + 1, bound)
        finally:
            running.stop()


# ---- 4. authentication ------------------------------------------------------------------------


def test_api_keys_required_and_key_ids_bound_to_their_uploader(artifacts, leveled_client, tmp_path):
    alice, bob = "alice-" + "a" * 32, "bob-" + "b" * 32
    api_keys = tmp_path / "api_keys"
    api_keys.write_text(f"# one API key per line\n{alice}\n\n{bob}\n")
    running = ThreadServer(settings(artifacts, tmp_path / "keys", api_keys_file=str(api_keys)))
    keys = leveled_client.get_serialized_evaluation_keys()
    sample = leveled_client.encrypt_serialize_integers(artifacts["leveled_in"][2])
    as_alice, as_bob = ({"Authorization": f"Bearer {token}"} for token in (alice, bob))
    try:
        assert requests.get(running.url + "/health", timeout=TIMEOUT).status_code == 200
        for headers in (
            {},
            {"Authorization": "Bearer wrong-token-0123456789"},
            {"Authorization": alice},
            {"Authorization": "Basic " + b64(alice.encode())},
        ):
            denied = requests.get(running.url + "/models", headers=headers, timeout=TIMEOUT)
            assert denied.status_code == 401 and denied.headers["WWW-Authenticate"] == "Bearer"
            assert upload(running.url, LEVELED, keys, headers=headers).status_code == 401
        assert requests.get(running.url + "/models", headers=as_bob, timeout=TIMEOUT).json()["models"]
        key_id = upload(running.url, LEVELED, keys, headers=as_alice).json()["key_id"]
        stolen = compute(running.url, LEVELED, key_id, [sample], headers=as_bob)
        assert stolen.status_code == 403 and "another API key" in stolen.text
        base = running.shape_url(LEVELED)
        assert requests.delete(f"{base}/keys/{key_id}", headers=as_bob, timeout=TIMEOUT).status_code == 403
        http = FheHttpClient(running.url, api_key=alice)
        result = http.compute(*LEVELED, key_id, [sample])
        np.testing.assert_array_equal(leveled_client.deserialize_decrypt(result), artifacts["leveled_out"][2])
        http.delete_evaluation_keys(*LEVELED, key_id)
        with pytest.raises(RemoteServerError) as raised:
            http.compute(*LEVELED, key_id, [sample])
        assert raised.value.status_code == 404
    finally:
        running.stop()
    weak = tmp_path / "weak"
    weak.write_text("short\n")
    assert (
        cli.main(
            [
                "serve",
                str(artifacts["models"]),
                "--keys-dir",
                str(tmp_path / "k"),
                "--api-keys-file",
                str(weak),
            ]
        )
        == 1
    )


# ---- 5. the client under failures -------------------------------------------------------------


class SilentServer:
    """A TCP server that reads requests and closes without answering (or never reads: `read=False`)."""

    def __init__(self, read: bool = True):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections, self.read, self.open = 0, read, []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            if self.read:
                connection.recv(65536)
                connection.close()
            else:
                self.open.append(connection)

    def close(self):
        self.listener.close()
        for connection in self.open:
            connection.close()


def test_client_retries_only_requests_the_server_never_processed():
    silent = SilentServer()
    try:
        client = FheHttpClient(silent.url, retries=2, backoff_seconds=0.01)
        with pytest.raises(RemoteServerError):
            client.list_models()
        assert silent.connections == 3, "a GET is retried"
        before = silent.connections
        with pytest.raises(RemoteServerError):
            client.upload_evaluation_keys(*LEVELED, b"k" * 1000)
        assert silent.connections - before == 1, "an upload the server received is not re-sent"
    finally:
        silent.close()
    refused = FheHttpClient(f"http://127.0.0.1:{free_port()}", retries=2, backoff_seconds=0.01)
    started = time.time()
    with pytest.raises(RemoteServerError, match="after 3 attempt"):
        refused.upload_evaluation_keys(*LEVELED, b"k" * 1000)  # never sent: retried
    assert time.time() - started < 5


def test_client_upload_has_its_own_write_timeout():
    """A server that never reads: the upload fails after the write timeout, once, not at 10 s connect."""
    stuck = SilentServer(read=False)
    try:
        client = FheHttpClient(
            stuck.url, timeout=(0.5, 600.0), write_timeout=3.0, retries=2, backoff_seconds=0.01
        )
        started = time.time()
        with pytest.raises(RemoteServerError, match="not retried"):
            client.upload_evaluation_keys(*LEVELED, b"k" * (64 << 20))
        elapsed = time.time() - started
        assert 2.5 < elapsed < 30 and stuck.connections == 1, (elapsed, stuck.connections)
    finally:
        stuck.close()


def test_upload_disconnect_is_one_log_line(artifacts, server):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("fhe_backend.server", "uvicorn.error", "uvicorn")]
    for logger in loggers:
        logger.addHandler(handler)
    loggers[0].setLevel(logging.INFO)
    try:
        for _ in range(5):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(
                b"POST /models/FCSmall/modules/seq_0/shapes/po_1_10_pc/keys HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: 1000000\r\n\r\n" + b"k" * 5000
            )
            time.sleep(0.2)
            sock.close()
        deadline = time.time() + 10
        while len([r for r in records if "disconnected" in r.getMessage()]) < 5 and time.time() < deadline:
            time.sleep(0.1)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        loggers[0].setLevel(logging.NOTSET)
    lines = [r for r in records if "disconnected during POST" in r.getMessage()]
    assert len(lines) == 5, [r.getMessage() for r in records]
    assert not [r for r in records if r.exc_info], "no traceback for a client that went away"
    assert requests.get(server.url + "/health", timeout=TIMEOUT).status_code == 200


def test_every_limit_is_a_documented_flag():
    """Each `ServerSettings` limit has a `fhe-backend serve` flag and a row in docs/security.md."""
    import argparse
    from dataclasses import fields

    from fhe_backend.deployment import server as server_module

    parser = argparse.ArgumentParser()
    server_module.add_arguments(parser)
    documented = (Path(__file__).resolve().parents[1] / "docs" / "security.md").read_text()
    limits = [f.name for f in fields(ServerSettings) if "help" in f.metadata]
    assert len(limits) >= 12
    for name in limits:
        flag = "--" + name.replace("_", "-")
        assert f"`{flag}`" in documented, flag
        assert parser.parse_args(["models", "--keys-dir", "k"]).__dict__[name] == getattr(
            ServerSettings("m", "k"), name
        )
    parsed = server_module.settings_from_args(
        parser.parse_args(
            ["models", "--keys-dir", "k", "--max-keys-per-model", "none", "--key-ttl-seconds", "60"]
        )
    )
    assert parsed.max_keys_per_model is None and parsed.key_ttl_seconds == 60.0
