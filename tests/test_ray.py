"""Ray: the model server as a Ray Serve deployment, keys kept in Ray, batches run as Ray tasks.

One local Ray instance for the module (2 CPUs, no dashboard), shut down at the end. The server
is started the way users start it, `fhe-backend serve MODELS --engine ray --address ...
--replicas 2`, in a subprocess connected to that instance; clients talk HTTP to Ray's proxy on
loopback. Models: the seed's FCSmall with `seq.0` remote (leveled) and FCSmall(4) with the whole
`seq` remote (3-bit lookups), as in tests/test_server.py.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from fhe_backend.deployment import FHEModelClient, ray_serve
from fhe_backend.deployment.http_client import FheHttpClient, RemoteServerError
from fhe_backend.deployment.keystore import KeyQuota, KeyRecord, UnknownKey, new_key_id
from fhe_backend.deployment.server import ServerSettings, create_app
from fhe_backend.hybrid_model import HybridFHEModel
from fhe_backend.output_dirs import held, remove_abandoned
from tests.test_server import FCSmall, client_model, free_port

ray = pytest.importorskip("ray", reason="the Ray extra is not installed: pip install 'fhe-backend[ray]'")


def wait_until(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {seconds} s"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance for this module (loopback clients; shut down at the end)."""
    started = ray_serve.connect(num_cpus=2, object_store_memory=512 << 20)
    scratch = ray_serve._local_scratch  # the local instance's workers' temporary folder
    yield ray.get_runtime_context().gcs_address
    from ray import serve

    serve.shutdown()
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == ray_serve.KEY_STORE_NAMESPACE:
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]))
    if started:
        ray_serve.shutdown()
        assert scratch is None or not os.path.exists(scratch), "the workers' folder goes at shutdown"


def held_compute_folders() -> set:
    """The compute processes' folders in the temporary directory that a live process holds."""
    return {folder for folder in Path(tempfile.gettempdir()).glob("fhe_compute_*") if held(folder)}


def save_fcsmall(refs, models, key, name, dim, remote, batch, samples, **options) -> None:
    """Compile FCSmall(dim) with `remote` in FHE, keep simulate references under `key`, save it."""
    hybrid = HybridFHEModel(FCSmall(dim), remote, model_name=name)
    hybrid.compile_model(torch.randn(100, dim), **options)
    refs[f"{key}_x"] = torch.randn(batch, dim)
    refs[f"{key}_sim"] = hybrid(refs[f"{key}_x"], fhe="simulate")
    partition = next(iter(hybrid.remote_modules.values())).partition
    refs[f"{key}_q_inputs"] = [partition.program.quantize_inputs(torch.randn(1, dim)) for _ in range(samples)]
    refs[f"{key}_q_outputs"] = [partition.run_integers(q, "simulate")[0] for q in refs[f"{key}_q_inputs"]]
    refs[f"{key}_pbs"] = partition.statistics["pbs_count"]
    hybrid.save_and_clear_private_info(models / name)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """Compile and save the leveled and the lookup FCSmall; simulate-mode references first."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("ray_server")
    models, refs = root / "models", {}
    save_fcsmall(refs, models, "fc", "FCSmall", 10, ["seq_0"], batch=5, samples=4, n_bits=4)
    save_fcsmall(
        refs, models, "pbs", "FCSmallPBS", 4, "seq", batch=2, samples=3,
        n_bits=3, rounding_threshold_bits=3, p_error=2**-40,
    )  # fmt: skip
    assert refs["pbs_pbs"] > 0
    refs["models"], refs["keys"] = models, root / "keys"
    return refs


@pytest.fixture(scope="module")
def ray_server(ray_cluster, deployed):
    """`fhe-backend serve --engine ray --replicas 2` on the module's Ray (stopped with SIGTERM)."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "fhe_backend.cli",
        "serve",
        str(deployed["models"]),
        "--keys-dir",
        str(deployed["keys"]),
        "--engine",
        "ray",
        "--address",
        ray_cluster,
        "--replicas",
        "2",
        "--replica-cpus",
        "0.5",
        "--port",
        str(port),
        "--max-body-bytes",
        str(512 << 20),
        "--retry-after-seconds",
        "1",
    ]
    process = subprocess.Popen(command, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert process.poll() is None, f"fhe-backend serve --engine ray exited with {process.returncode}"
        try:
            return requests.get(url + "/health", timeout=5).status_code == 200
        except (requests.ConnectionError, requests.Timeout):  # the proxy starts before the replicas
            return False

    try:
        wait_until(ready, 240, "the Ray Serve application answering /health")
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def test_two_replicas_serve_the_same_application(ray_server, deployed):
    assert len(ray_serve.replica_actor_names()) == 2
    settings = ServerSettings(str(deployed["models"]), str(deployed["keys"]))
    local = create_app(settings).openapi()
    served = requests.get(ray_server + "/openapi.json", timeout=10).json()
    assert served["paths"] == local["paths"] and served["components"] == local["components"]
    assert requests.get(ray_server + "/models", timeout=10).json()["models"] == ["FCSmall", "FCSmallPBS"]
    # the application's validation and limits, answered through Ray's proxy
    base = ray_server + "/models/FCSmall/modules/seq_0/shapes/po_1_10_pc"
    unknown = requests.get(ray_server + "/models/nope/modules", timeout=10)
    assert unknown.status_code == 404 and "known models" in unknown.json()["detail"]
    bad_id = requests.post(base + "/compute", json={"key_id": "x", "inputs": [["AA=="]]}, timeout=10)
    assert bad_id.status_code == 422
    too_many = requests.post(
        base + "/compute", json={"key_id": "a" * 43, "inputs": [["AA=="]] * 65}, timeout=10
    )
    assert too_many.status_code == 413 and "--max-samples-per-request" in too_many.json()["detail"]
    assert requests.post(base + "/keys", data=b"", timeout=10).status_code == 400


def test_leveled_fcsmall_over_two_replicas_equals_simulate(ray_server, deployed, tmp_path):
    hybrid = client_model(deployed, "FCSmall", ray_server, "seq_0")
    hybrid.init_client(path_to_clients=tmp_path / "clients", path_to_keys=tmp_path / "keys")
    for _ in range(4):  # requests land on both replicas; each must find the keys
        out = hybrid(deployed["fc_x"], fhe="remote")
        assert torch.allclose(out, deployed["fc_sim"], atol=1e-6)


def test_lookup_fcsmall_over_ray_equals_simulate(ray_server, deployed):
    hybrid = client_model(deployed, "FCSmallPBS", ray_server, "seq")
    hybrid.init_client()
    out = hybrid(deployed["pbs_x"], fhe="remote")
    assert torch.allclose(out, deployed["pbs_sim"], atol=1e-6)


def test_killed_replica_is_replaced_and_keys_uploaded_before_still_work(ray_server, deployed, tmp_path):
    """Two clients keep both replicas busy with lookup computations; one replica is killed."""
    target = ("FCSmallPBS", "seq", FheHttpClient(ray_server).list_shapes("FCSmallPBS", "seq")[0])
    setup = FheHttpClient(ray_server)
    setup.download_client(*target, tmp_path)
    client = FHEModelClient(tmp_path, key_dir=tmp_path / "keys")
    key_id = setup.upload_evaluation_keys(*target, client.get_serialized_evaluation_keys())
    batch = [client.encrypt_serialize_integers(q) for q in deployed["pbs_q_inputs"]]
    before = ray_serve.replica_actor_names()
    computing = held_compute_folders()
    results, failures, server_errors, stop = [], [], [], threading.Event()

    def load() -> None:
        http = FheHttpClient(ray_server, retries=3, backoff_seconds=0.5)
        http.session.hooks["response"].append(
            lambda r, *a, **k: server_errors.append(r.status_code) if r.status_code >= 500 else None
        )
        while not stop.is_set():
            try:
                outputs = http.compute(*target, key_id, batch)
            except RemoteServerError as error:
                failures.append(error)
                continue
            decrypted = [client.deserialize_decrypt(o) for o in outputs]
            results.append(all(np.array_equal(d, e) for d, e in zip(decrypted, deployed["pbs_q_outputs"])))

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(results) >= 2, 120, "computations before the kill")
        ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
        killed_at = time.time()
        done_at_kill = len(results)
        wait_until(
            lambda: (
                len(set(ray_serve.replica_actor_names()) - set(before)) == 1
                and len(ray_serve.replica_actor_names()) == 2
            ),
            180,
            "a replacement replica",
        )
        wait_until(lambda: len(results) >= done_at_kill + 2, 120, "computations after the kill")
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)
    # a request running on the killed replica is answered 500 by Ray's proxy and retried once
    assert not failures and all(results), failures
    assert len(server_errors) <= 2, server_errors
    # Ray killed the replica with its compute processes, which could not remove their folders:
    # no process holds them any more, and the next compute process on the machine removes them
    killed_for = time.time() - killed_at
    remove_abandoned("fhe_compute_", older_than=killed_for)  # the folders made before the kill
    left = {folder for folder in computing if folder.exists()}
    assert left == held_compute_folders() & computing and len(left) == len(computing) // 2, (computing, left)
    # the replacement serves the keys uploaded before it started
    wait_until(lambda: requests.get(ray_server + "/health", timeout=5).status_code == 200, 60, "health")
    http = FheHttpClient(ray_server)
    for _ in range(2):  # both replicas, whichever answers
        outputs = http.compute(*target, key_id, batch)
        for output, expected in zip(outputs, deployed["pbs_q_outputs"]):
            np.testing.assert_array_equal(client.deserialize_decrypt(output), expected)


def test_ray_key_store_survives_its_actor_restart(ray_cluster, tmp_path):
    store = ray_serve.start_key_store(str(tmp_path / "keys"))
    record = KeyRecord(new_key_id(), "m", "mod", "s", 3, time.time())
    store.add(record, b"abc", KeyQuota(max_keys=1))
    where = ray.get(store.handle().location.remote())
    assert where["node_id"] == ray.get_runtime_context().get_node_id()  # the head node
    ray.kill(store.handle(), no_restart=False)  # Ray restarts it on the head node, same folder
    fresh = ray_serve.RayKeyStore(str(tmp_path / "keys"))

    def restarted() -> bool:
        try:
            return ray.get(fresh.handle().location.remote(), timeout=5)["pid"] != where["pid"]
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            return False

    wait_until(restarted, 60, "the restarted key-store actor")
    assert fresh.record(record.key_id).size == 3
    assert fresh.data(record.key_id) == b"abc"
    with pytest.raises(ray_serve.QuotaExceeded, match="max-keys-per-model"):
        fresh.add(KeyRecord(new_key_id(), "m", "mod", "s", 3, time.time()), b"abc", KeyQuota(max_keys=1))
    fresh.delete(record.key_id)
    with pytest.raises(UnknownKey, match="unknown key_id"):
        fresh.record(record.key_id)
    ray.kill(fresh.handle())


def test_cli_refuses_bad_ray_options(tmp_path):
    from fhe_backend.cli import main

    (tmp_path / "models").mkdir()
    base = ["serve", str(tmp_path / "models"), "--keys-dir", str(tmp_path / "keys"), "--engine", "ray"]
    assert main([*base, "--detach"]) == 2  # a local Ray ends with the command
    assert main([*base, "--min-replicas", "3", "--max-replicas", "2"]) == 2
    assert main([*base, "--workers", "2"]) == 2


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    with pytest.raises(ray_serve.RayNotInstalledError, match=r"pip install 'fhe-backend\[ray\]'"):
        ray_serve.require_ray()


# ---- distributed batch execution ------------------------------------------------------------------


@pytest.fixture(scope="module")
def lookup_model(ray_cluster, tmp_path_factory):
    """A tiny compiled MLP (3-bit inputs, lookups of at most 4 bits) with cached insecure keys."""
    from fhe_backend.deployment import ray_runner
    from tests.harness import compile_tiny_real_key_mlp

    compiled = compile_tiny_real_key_mlp(
        2, key_cache_dir=str(tmp_path_factory.mktemp("ray_keys")), runner="ray"
    )
    x = torch.randn(16, 3)
    with torch.no_grad():
        simulated = compiled(x)
    # two workers of half a CPU each: the served replicas hold one CPU of the module's two
    ray_runner.configure(workers=2, cpus_per_worker=0.5)
    yield compiled, x, simulated
    ray_runner.shutdown_workers()


def test_ray_runner_batch_equals_local_execute_exactly(lookup_model):
    import fhe_backend
    from fhe_backend.circuit_runner import SequentialExecutor
    from fhe_backend.deployment import ray_runner

    compiled, x, simulated = lookup_model
    (partition,) = fhe_backend.partitions(compiled)
    assert partition.runner.settings.runner == "ray" and partition.statistics["max_tlu_bit_width"] <= 4
    fhe_backend.set_fhe_mode(compiled, "execute")
    with torch.no_grad():
        executed = compiled(x)  # 16 samples: encrypted here, evaluated by 2 Ray workers, decrypted here
    assert torch.equal(executed, simulated)
    pool = ray_runner.worker_pool()
    assert len(pool.actors) == 2 and len({ray.get(a.pid.remote()) for a in pool.actors}) == 2
    if ray_serve._local_scratch is not None:  # the module's own instance (RAY_ADDRESS unset)
        # each worker works in a folder of the instance's, Concrete's unpacked circuit included
        workers = list(Path(ray_serve._local_scratch).glob("fhe_ray_worker_*"))
        assert len(workers) == 2 and all(any(p.is_dir() for p in w.iterdir()) for w in workers), workers
    # the same circuit, keys and integer samples: the Ray runner returns what the local one does
    circuit = partition.runner.circuit
    value = circuit.graph.input_nodes[0].output  # every integer the circuit's input type allows
    draw = np.random.default_rng(0).integers(value.dtype.min(), value.dtype.max() + 1, (8, *value.shape))
    samples = [(sample,) for sample in draw]
    local = SequentialExecutor().execute(circuit, samples)
    distributed = ray_runner.RayExecutor().execute(circuit, samples)
    for a, b in zip(local, distributed):
        assert len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b))


def test_private_keys_stay_in_the_client(lookup_model):
    """What the workers receive: the server archive, evaluation keys, ciphertexts; never the keyset."""
    import fhe_backend
    from fhe_backend.deployment import ray_runner

    compiled, _, _ = lookup_model
    (partition,) = fhe_backend.partitions(compiled)
    circuit = partition.runner.circuit
    ray_runner.RayExecutor().execute(circuit, [(np.zeros((1, 3), dtype=np.int64),)])
    _, server, keys, _ = ray_runner.RayExecutor._cache[circuit]
    shipped = ray.get(keys[1][0])
    assert shipped == circuit.keys.evaluation.serialize()
    assert shipped != circuit.keys.serialize()  # the whole keyset (with the secret keys) is not sent


def test_run_server_on_ray_equals_fhe_model_server(deployed, ray_cluster, tmp_path):
    from fhe_backend.deployment import FHEModelServer, ray_runner

    folder = deployed["models"] / "FCSmall" / "seq_0" / "po_1_10_pc"
    client = FHEModelClient(folder, key_dir=tmp_path / "keys")
    keys = client.get_serialized_evaluation_keys()
    samples = [client.encrypt_serialize_integers(q) for q in deployed["fc_q_inputs"]]
    outputs = ray_runner.run_server_on_ray(folder, samples, keys)
    local = FHEModelServer(folder).run(samples, keys)
    for output, reference, expected in zip(outputs, local, deployed["fc_q_outputs"]):
        np.testing.assert_array_equal(client.deserialize_decrypt(output), expected)
        np.testing.assert_array_equal(
            client.deserialize_decrypt(output), client.deserialize_decrypt(reference)
        )
    with pytest.raises(ray_serve.FheBackendError, match=r"inputs\[0\]"):
        ray_runner.run_server_on_ray(folder, [b"not a ciphertext"], keys)


def test_autoscaling_and_limits_map_to_serve_options(tmp_path):
    from fhe_backend.deployment.serve_command import add_arguments
    from fhe_backend.deployment.server import settings_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [str(tmp_path), "--keys-dir", str(tmp_path), "--engine", "ray", "--max-replicas", "4"]
        + ["--max-concurrent-computes", "3", "--max-connections", "50"]
    )
    options = ray_serve.ray_settings_from_args(args).deployment_options(settings_from_args(args))
    assert options["autoscaling_config"] == {
        "min_replicas": 1,
        "initial_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 3,
    }
    assert "num_replicas" not in options and options["max_queued_requests"] == 50
    assert options["max_ongoing_requests"] >= 3
    fixed = ray_serve.RayServeSettings(replicas=3).deployment_options(settings_from_args(args))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    with pytest.raises(ValueError, match="--max-replicas"):
        ray_serve.RayServeSettings(min_replicas=2)


def test_ray_runner_says_when_workers_cannot_be_placed(ray_cluster, monkeypatch):
    from fhe_backend.deployment import ray_runner

    monkeypatch.setattr(ray_runner, "WORKER_START_SECONDS", 2)
    ray_runner.configure(workers=1, cpus_per_worker=64)  # more CPUs than the module's Ray has
    try:
        with pytest.raises(ray_runner.RayWorkersUnavailable, match="cpus_per_worker"):
            ray_runner.worker_pool()
    finally:
        ray_runner.configure()
