"""HybridFHEModel: names, modes, numerics against eager torch, private info, hub packaging."""

from __future__ import annotations

import zipfile

import pytest
import torch

from fhe_backend.deployment import DeploymentError
from fhe_backend.errors import NotCompiledError, OptionError
from fhe_backend.hybrid_model import (
    HybridFHEMode,
    HybridFHEModel,
    RemoteModule,
    tuple_to_underscore_str,
    underscore_str_to_tuple,
)
from tests.harness import quantization_tolerance
from tests.test_server import FCSmall, gpt2_model


@pytest.fixture(scope="module")
def compiled_fc():
    torch.manual_seed(0)
    model = FCSmall(10)
    reference = FCSmall(10)
    reference.load_state_dict(model.state_dict())
    hybrid = HybridFHEModel(model, "seq.0", model_name="FCSmall")
    hybrid.compile_model(torch.randn(200, 10), n_bits=4)
    return hybrid, reference.eval()


def test_names_with_dots_or_underscores_and_errors():
    model = FCSmall(4)
    assert HybridFHEModel(model, "seq_2").module_names == ["seq.2"]
    assert isinstance(model.seq[2], RemoteModule)
    with pytest.raises(ValueError, match="valid names.*seq.0"):
        HybridFHEModel(FCSmall(4), ["nope"])
    with pytest.raises(TypeError, match="not an nn.Module"):
        HybridFHEModel(FCSmall(4), "seq.0.weight")
    with pytest.raises(TypeError):
        HybridFHEModel(FCSmall(4), 3)


def test_shape_strings_round_trip():
    for shape in [(1, 10), (1, 4, 16), (7,)]:
        assert underscore_str_to_tuple(tuple_to_underscore_str(shape)) == shape
    assert tuple_to_underscore_str((1, 10)) == "po_1_10_pc"
    with pytest.raises(ValueError):
        underscore_str_to_tuple("../etc")


def test_modes_before_compile():
    hybrid = HybridFHEModel(FCSmall(4), "seq.0")
    x = torch.randn(3, 4)
    assert hybrid(x).shape == (3, 4)  # disable before compiling: plain torch
    with pytest.raises(NotCompiledError):
        hybrid(x, fhe="simulate")
    with pytest.raises(OptionError):
        hybrid.set_fhe_mode("fast")
    assert HybridFHEMode.parse("EXECUTE") is HybridFHEMode.EXECUTE


def test_simulate_matches_torch_and_disable(compiled_fc):
    hybrid, reference = compiled_fc
    x = torch.randn(20, 10)
    expected = reference(x)
    simulated = hybrid(x, fhe="simulate")
    assert (simulated - expected).abs().max() <= quantization_tolerance(expected, 4, steps=2)
    assert torch.equal(simulated, hybrid(x, fhe="disable"))
    assert torch.allclose(hybrid(x, fhe="torch"), expected)
    assert hybrid.remote_modules["seq.0"].partition.mode == "disable"


def test_execute_with_real_keys_equals_simulate(insecure_configuration):
    torch.manual_seed(1)
    hybrid = HybridFHEModel(FCSmall(6), "seq.0")
    hybrid.compile_model(torch.randn(100, 6), n_bits=3, configuration=insecure_configuration)
    x = torch.randn(3, 6)
    assert torch.allclose(hybrid(x, fhe="execute"), hybrid(x, fhe="simulate"), atol=1e-6)


def test_gpt2_mlp_block_simulate_close_to_torch():
    torch.manual_seed(0)
    model = gpt2_model()
    tokens = torch.randint(0, 50, (64, 4))
    with torch.no_grad():
        expected = model(tokens[:4]).logits
    hybrid = HybridFHEModel(model, "transformer.h.0.mlp", model_name="gpt2")
    hybrid.compile_model(tokens, n_bits=6, rounding_threshold_bits=8)
    remote = hybrid.remote_modules["transformer.h.0.mlp"]
    assert len(remote.graph.partitions) == 1 and not remote.graph.left_in_torch
    assert all(type(m).__name__ != "Conv1D" for m in remote.private_module.modules())
    logits = hybrid(tokens[:4], fhe="simulate").logits
    assert (logits - expected).abs().max() <= quantization_tolerance(expected, 6, steps=8)


def test_brevitas_submodule_compiles_as_qat():
    brevitas = pytest.importorskip("brevitas.nn")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Sequential(
        brevitas.QuantIdentity(bit_width=3, return_quant_tensor=True),
        brevitas.QuantLinear(6, 4, bias=True, weight_bit_width=3), brevitas.QuantReLU(bit_width=3)))
    model.eval()
    x = torch.randn(100, 6)
    with torch.no_grad():
        expected = model(x[:10])
    hybrid = HybridFHEModel(model, "1")
    hybrid.compile_model(x, n_bits=3)
    simulated = hybrid(x[:10], fhe="simulate")
    assert (simulated - expected).abs().max() <= quantization_tolerance(expected, 3, steps=1)


def test_save_clears_private_info_and_packages_for_hub(tmp_path, insecure_configuration):
    torch.manual_seed(2)
    model = FCSmall(6)
    private = [p.detach().clone() for p in model.seq[0].parameters()]
    hybrid = HybridFHEModel(model, "seq.0", model_name="FCSmall")
    hybrid.compile_model(torch.randn(100, 6), n_bits=3, configuration=insecure_configuration)
    hybrid(torch.randn(2, 6), fhe="execute")  # keys exist locally now
    secret = hybrid.remote_modules["seq.0"].partition.circuit.keys.serialize()
    hybrid.save_and_clear_private_info(tmp_path / "FCSmall")

    saved = torch.load(tmp_path / "FCSmall" / "model.pth", weights_only=False)
    tensors = list(saved.state_dict().values())
    assert not any(t.shape == p.shape and torch.equal(t, p) for t in tensors for p in private)
    raw = (tmp_path / "FCSmall" / "model.pth").read_bytes()
    assert private[0].numpy().tobytes()[:32] not in raw
    # secret keys are binary words (bytes 0 and 1): only long windows of them are unique
    windows = [secret[i:i + 1024] for i in range(len(secret) // 4, len(secret) - 1024, len(secret) // 8)]
    for archive in (tmp_path / "FCSmall").rglob("*.zip"):
        with zipfile.ZipFile(archive) as opened:
            assert not any("key" in name.lower() for name in opened.namelist())
            members = b"".join(opened.read(name) for name in opened.namelist())
        assert not any(window in members for window in windows)

    with pytest.raises(DeploymentError, match="no repo_id") as raised:
        hybrid.publish_to_hub()
    hub = tmp_path / "FCSmall" / "hub"
    assert str(hub) in str(raised.value)
    assert (hub / "README.md").is_file() and (hub / "model_info.json").is_file()
    assert (hub / "seq_0" / "po_1_6_pc" / "server.zip").is_file()
    with pytest.raises(DeploymentError, match="failed"):
        hybrid.publish_to_hub(repo_id="nobody/fhe-backend-test", token="hf_invalid")
