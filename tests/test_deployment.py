"""FHEModelDev / FHEModelClient / FHEModelServer in process, with real keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import fhe_backend
from fhe_backend.deployment import (
    ArtifactsNotFoundError,
    DeploymentError,
    FHEModelClient,
    FHEModelDev,
    FHEModelServer,
    VersionMismatchError,
)
from tests.harness import compile_fhe


@pytest.fixture(scope="module")
def partition():
    """A tiny circuit with table lookups (Linear -> ReLU -> Linear, 3 bits)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).eval()
    compiled = compile_fhe(model, torch.randn(100, 4), n_bits=3, rounding_threshold_bits=3)
    with torch.no_grad():
        compiled(torch.randn(2, 4))
    found = fhe_backend.partitions(compiled)
    assert len(found) == 1 and found[0].statistics["pbs_count"] > 0
    return found[0]


@pytest.mark.parametrize("via_mlir", [False, True])
def test_client_server_round_trip_equals_simulate(partition, tmp_path, via_mlir):
    FHEModelDev(tmp_path / "artifacts", partition).save(via_mlir=via_mlir)
    client = FHEModelClient(tmp_path / "artifacts", key_dir=tmp_path / "keys")
    client.generate_private_and_evaluation_keys()
    server = FHEModelServer(tmp_path / "artifacts")
    keys = client.get_serialized_evaluation_keys()
    x = np.random.default_rng(0).normal(size=(3, 4))
    batch = client.quantize_encrypt_serialize(x)
    assert isinstance(batch, list) and len(batch) == 3
    single = client.quantize_encrypt_serialize(x[:1])
    assert isinstance(single, bytes)
    expected = partition.run_integers(partition.program.quantize_inputs(torch.tensor(x)), "simulate")[0]
    np.testing.assert_array_equal(client.deserialize_decrypt(server.run(batch, keys)), expected)
    np.testing.assert_array_equal(client.deserialize_decrypt(server.run(single, keys)), expected[:1])
    floats = client.deserialize_decrypt_dequantize(server.run(batch, keys))
    np.testing.assert_allclose(floats, partition.program.dequantize_outputs(expected)[0])


def test_an_mlir_server_archive_loads_with_concrete_alone(partition, tmp_path):
    """Every compilation adds our Concrete pre-processor (`SlicesKeepTheirSign`); the MLIR
    archive's saved configuration must not name it, or Concrete without this package could not
    load the archive. Loaded here in a process that cannot import fhe_backend."""
    FHEModelDev(tmp_path, partition).save(via_mlir=True)
    with zipfile.ZipFile(tmp_path / "server.zip") as archive:
        assert "fhe_backend" not in archive.read("configuration.json").decode()
    script = (
        "import sys; sys.modules['fhe_backend'] = None\n"  # importing it fails
        "from concrete import fhe\n"
        f"server = fhe.Server.load({str(tmp_path / 'server.zip')!r})\n"
        "print('loaded', server.client_specs is not None)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TMPDIR": str(tmp_path)},
        cwd=tmp_path,
    )
    assert done.returncode == 0 and "loaded True" in done.stdout, done.stderr[-2000:]


def test_keys_are_random_reused_from_key_dir_and_regenerated_on_force(partition, tmp_path):
    FHEModelDev(tmp_path, partition).save()
    first = FHEModelClient(tmp_path, key_dir=tmp_path / "keys")
    keys = first.get_serialized_evaluation_keys()
    assert FHEModelClient(tmp_path, key_dir=tmp_path / "keys").get_serialized_evaluation_keys() == keys
    other = FHEModelClient(tmp_path)
    assert other.get_serialized_evaluation_keys() != keys
    first.generate_private_and_evaluation_keys(force=True)
    assert first.get_serialized_evaluation_keys() != keys


def test_versions_are_checked_and_artifacts_not_overwritten(partition, tmp_path):
    FHEModelDev(tmp_path, partition).save()
    with pytest.raises(DeploymentError, match="is not empty"):
        FHEModelDev(tmp_path, partition).save()
    path = tmp_path / "client.zip"
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    versions = json.loads(members["versions.json"])
    versions["concrete-python"] = "0.0.1"
    members["versions.json"] = json.dumps(versions).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(VersionMismatchError, match="concrete-python"):
        FHEModelClient(tmp_path)


def test_missing_artifacts_raise_an_assertion_error_as_in_concrete_ml(tmp_path):
    """A folder that does not exist, or holds no saved archive: `ArtifactsNotFoundError`, a
    DeploymentError and the AssertionError Concrete ML raises there."""
    for side in (FHEModelClient, FHEModelServer):
        with pytest.raises(ArtifactsNotFoundError, match="does not exist. Please specify a valid path"):
            side(tmp_path / "missing")
        with pytest.raises(AssertionError, match="not found: save the artifacts"):
            side(tmp_path)


def test_model_with_several_partitions_is_rejected(tmp_path):
    with pytest.raises(DeploymentError, match="one FHE partition"):
        FHEModelDev(tmp_path, torch.nn.Linear(2, 2)).save()


class _TwoInTwoOut(torch.nn.Module):
    def forward(self, a, b):
        hidden = torch.relu(a - b)
        return hidden, a + b


@pytest.fixture(scope="module")
def two_in_two_out():
    """A QuantizedModule with two inputs and two outputs (3-bit lookups)."""
    from fhe_backend.compile import compile_torch_model

    rng = np.random.default_rng(1)
    inputset = (rng.uniform(-1, 1, (100, 3)), rng.uniform(-1, 1, (100, 3)))
    return compile_torch_model(_TwoInTwoOut(), inputset, n_bits=3)


def test_several_inputs_and_outputs_pass_as_arguments_as_in_concrete_ml(two_in_two_out, tmp_path):
    """Concrete ML's client takes a model's inputs as arguments and one sample's outputs as
    arguments (`deserialize_decrypt(*server_result)`); the server gives `fhe.Value` outputs for
    `fhe.Value` inputs. Results equal the module's own simulate run."""
    from concrete import fhe

    FHEModelDev(tmp_path / "dev", two_in_two_out).save()
    client = FHEModelClient(tmp_path / "dev")
    server = FHEModelServer(tmp_path / "dev")
    keys = client.get_serialized_evaluation_keys()
    rng = np.random.default_rng(2)
    a, b = rng.uniform(-1, 1, (1, 3)), rng.uniform(-1, 1, (1, 3))
    encrypted = client.quantize_encrypt_serialize(a, b)
    assert isinstance(encrypted, tuple) and len(encrypted) == 2
    assert client.quantize_encrypt_serialize((a, b)).__class__ is tuple  # one tuple: the same
    result = server.run(encrypted, keys)
    expected = two_in_two_out.quantized_forward(*two_in_two_out.quantize_input(a, b), fhe="simulate")
    for got, want in zip(client.deserialize_decrypt(*result), expected):
        np.testing.assert_array_equal(got, want)
    floats = client.deserialize_decrypt_dequantize(*result)
    for got, want in zip(floats, two_in_two_out.dequantize_output(*expected)):
        np.testing.assert_array_equal(got, want)
    values = server.run(tuple(fhe.Value.deserialize(v) for v in encrypted), keys)
    assert all(isinstance(v, fhe.Value) for v in values)
    for got, want in zip(client.client.decrypt(*values), expected):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(DeploymentError, match="all be serialized"):
        server.run((encrypted[0], fhe.Value.deserialize(encrypted[1])), keys)
    with pytest.raises(DeploymentError, match="got 1 input"):
        client.quantize_encrypt_serialize(a)


def test_save_modes_folders_and_uncompiled_modules_as_in_concrete_ml(two_in_two_out, tmp_path):
    from fhe_backend.compile import QuantizedModule, build_quantized_module
    from fhe_backend.deployment import DeploymentMode

    FHEModelDev(tmp_path / "none", two_in_two_out).save(mode=None)  # None: inference
    FHEModelDev(tmp_path / "enum", two_in_two_out).save(mode=DeploymentMode.INFERENCE)
    FHEModelDev(tmp_path / "upper", two_in_two_out).save(mode="INFERENCE")
    assert DeploymentMode.is_valid("training") and not DeploymentMode.is_valid("train")
    for mode in ("invalid_mode", "train", "", "training", DeploymentMode.TRAINING):
        with pytest.raises(ValueError, match="Mode must be|Training FHE circuit does not exist"):
            FHEModelDev(tmp_path / "bad", two_in_two_out).save(mode=mode)
    created = FHEModelDev(tmp_path / "created" / "here", two_in_two_out)
    assert created.path_dir.is_dir()  # created at construction, as in Concrete ML
    (created.path_dir / "notes.txt").write_text("mine")
    with pytest.raises(DeploymentError, match=r"path_dir: .* is not empty\. Please delete it"):
        created.save()
    assert sorted(p.name for p in created.path_dir.iterdir()) == ["notes.txt"]  # nothing written
    rng = np.random.default_rng(3)
    quantized = build_quantized_module(
        _TwoInTwoOut(), (rng.normal(size=(100, 3)), rng.normal(size=(100, 3))), n_bits=3
    )
    for module in (quantized, QuantizedModule()):
        with pytest.raises(AttributeError, match="quantized module is not compiled"):
            FHEModelDev(tmp_path / "uncompiled", module).save()
        with pytest.raises(fhe_backend.NotCompiledError):
            getattr(module, "fhe_circuit")  # noqa: B009
    assert QuantizedModule().bitwidth_and_range_report() is None
    with pytest.raises(AttributeError, match="empty"):
        QuantizedModule().forward(np.zeros((1, 3)))
