"""HybridFHEModel: names, modes, numerics against eager torch, private info, hub packaging."""

from __future__ import annotations

import gc
import zipfile
from pathlib import Path

import numpy as np
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
    model = FCSmall(4)
    hybrid = HybridFHEModel(model, "seq.0")
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(hybrid(x), model(x))  # a new remote module runs its torch module
    for mode in ("disable", "simulate", "execute"):  # never the float layer in place of FHE
        with pytest.raises(NotCompiledError, match="not compiled here"):
            hybrid(x, fhe=mode)
    with pytest.raises(DeploymentError, match="init_client"):
        hybrid(x, fhe="remote")
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
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 6),
        torch.nn.Sequential(
            brevitas.QuantIdentity(bit_width=3, return_quant_tensor=True),
            brevitas.QuantLinear(6, 4, bias=True, weight_bit_width=3),
            brevitas.QuantReLU(bit_width=3),
        ),
    )
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
    windows = [secret[i : i + 1024] for i in range(len(secret) // 4, len(secret) - 1024, len(secret) // 8)]
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


@pytest.fixture(scope="module")
def seed_deployment(tmp_path_factory):
    """The guide "Hybrid model deployment" end to end: compile FCSmall's seq.0, save it
    (via_mlir by default), serve the folder with a real server on loopback."""
    from fhe_backend.deployment.server import ServerConfig
    from tests.test_server import ThreadServer

    torch.manual_seed(3)
    root = tmp_path_factory.mktemp("seed_hybrid")
    model = FCSmall(10)
    float_model = FCSmall(10)
    float_model.load_state_dict(model.state_dict())
    hybrid = HybridFHEModel(model, ["seq_0"], model_name="FCSmall")
    hybrid.compile_model(torch.randn(100, 10), n_bits=4)
    x = torch.randn((10,))
    simulated = hybrid(x.unsqueeze(0), fhe="simulate")[0]
    hybrid.save_and_clear_private_info(root / "models" / "FCSmall")
    server = ThreadServer(ServerConfig(str(root / "models"), str(root / "keys")))
    yield {
        "model": model,
        "float_model": float_model.eval(),
        "x": x,
        "simulated": simulated,
        "url": server.url,
        "root": root,
    }
    server.stop()


def _computes(hybrid):
    calls = []
    for remote in hybrid.remote_modules.values():
        remote.http.session.hooks["response"].append(
            lambda response, *args, **kwargs: (
                calls.append(response.url) if response.url.endswith("/compute") else None
            )
        )
    return calls


def test_seed_client_flow_reaches_the_server(seed_deployment):
    # the guide's client: the cleared model, a server address, REMOTE set on each module, then
    # forward(x) without `fhe` on a 1-D input
    deployment = seed_deployment
    hybrid = HybridFHEModel(
        deployment["model"],
        "seq_0",
        server_remote_address=deployment["url"],
        model_name="FCSmall",
        verbose=False,
    )
    hybrid.init_client(path_to_clients=deployment["root"] / "clients")
    for module in hybrid.remote_modules.values():
        module.fhe_local_mode = HybridFHEMode.REMOTE
    calls = _computes(hybrid)
    out = hybrid.forward(deployment["x"])
    assert out.shape == (10,) and len(calls) == 1
    assert torch.allclose(out, deployment["simulated"], atol=1e-6)


def test_uncompiled_client_model_uses_the_server_not_float(seed_deployment):
    # a client that builds the model afresh (float weights present, never compiled)
    deployment = seed_deployment
    model = FCSmall(10)
    model.load_state_dict(deployment["float_model"].state_dict())
    hybrid = HybridFHEModel(model, "seq_0", server_remote_address=deployment["url"], model_name="FCSmall")
    with pytest.raises(NotCompiledError, match="not compiled here"):
        hybrid(deployment["x"], fhe="disable")  # no silent float run of the private layer
    hybrid.init_client()
    hybrid.set_fhe_mode(HybridFHEMode.REMOTE)
    calls = _computes(hybrid)
    out = hybrid(deployment["x"])
    assert len(calls) == 1
    assert torch.allclose(out, deployment["simulated"], atol=1e-6)
    with torch.no_grad():
        float_out = deployment["float_model"](deployment["x"])
    assert not torch.allclose(out, float_out, atol=1e-6)  # the circuit's result, not torch's
    # client specs went to a temporary folder, removed with the model
    (client,) = hybrid.remote_modules["seq.0"].clients.values()
    folder = Path(client.path_dir).parent
    assert folder.name.startswith("fhe_client_") and folder.is_dir()
    del hybrid, model, calls, client  # the model holds the remote module too
    gc.collect()
    assert not folder.exists()


def test_forward_without_fhe_keeps_each_module_mode(compiled_fc):
    hybrid, reference = compiled_fc
    x = torch.randn(4, 10)
    hybrid.set_fhe_mode("simulate")
    simulated = hybrid(x)
    assert hybrid.remote_modules["seq.0"].fhe_local_mode is HybridFHEMode.SIMULATE
    hybrid.remote_modules["seq.0"].fhe_local_mode = HybridFHEMode.TORCH
    assert torch.allclose(hybrid(x), reference(x))
    assert torch.equal(hybrid(x, fhe="disable"), simulated)
    assert hybrid(x[0]).shape == (10,)  # one sample without its batch dim
    remote = hybrid.remote_modules["seq.0"]
    remote.fhe_local_mode = HybridFHEMode.SIMULATE
    assert torch.equal(remote(x[0]), remote(x)[0])  # the FHE module: exactly what the batch gives
    # the whole model: the torch layer after it multiplies one row or a batch (gemv or gemm),
    # which may differ in float32's last place
    torch.testing.assert_close(hybrid(x[0]), simulated[0], rtol=0, atol=1e-6)


def test_compile_model_arguments_and_private_q_modules():
    torch.manual_seed(4)
    hybrid = HybridFHEModel(FCSmall(4), "seq.0")
    with pytest.raises(OptionError, match="Dynamic quantization requires GLWE backend"):
        hybrid.compile_model(torch.randn(50, 4), use_dynamic_quantization=True)
    hybrid.compile_model(torch.randn(50, 4), 4, None, None, "cpu", None, False)
    quantized = hybrid.private_q_modules["seq.0"]
    x = torch.randn(3, 4)
    hybrid.set_fhe_mode("disable")
    with torch.no_grad():
        remote_output = hybrid.remote_modules["seq.0"](x).numpy()
    np.testing.assert_allclose(quantized.forward(x.numpy(), fhe="disable"), remote_output, atol=1e-6)
    assert isinstance(hybrid.private_modules["seq.0"], torch.nn.Linear)
