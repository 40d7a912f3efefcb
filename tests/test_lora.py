"""LoRA fine-tuning with the frozen linears in FHE (fhe_backend.lora).

A tiny GPT-2 (random weights) with peft LoRA adapters is fine-tuned on a corpus of repeated
token patterns in simulate and in torch mode; a tiny MLP checks execute == simulate with real
keys, checkpoints, evaluation, gradient accumulation and clipping.
"""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from torch import nn

from fhe_backend import FhePartition, NotCompiledError, OptionError
from fhe_backend.lora import (
    FheLinear,
    FheMatmul,
    LoraError,
    LoraTrainer,
    LoraTraining,
    get_remote_names,
    optimizer_to,
    setup_logger,
)
from fhe_backend.settings import FheSettings

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 50, 8


def tiny_gpt2_lora(seed: int = 0) -> nn.Module:
    """GPT-2 with one layer, 16-wide, random weights, LoRA on c_attn and c_proj."""
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=1,
        n_embd=16,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    lora = peft.LoraConfig(
        r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, task_type="CAUSAL_LM"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, lora)


def pattern_corpus(count: int = 32) -> torch.Tensor:
    """Sequences that count up by 3 from a random start: next token = previous + 3 (mod VOCAB)."""
    generator = torch.Generator().manual_seed(1)
    starts = torch.randint(0, VOCAB, (count,), generator=generator)
    return (starts[:, None] + 3 * torch.arange(SEQ)) % VOCAB


def lm_batches(tokens: torch.Tensor, size: int = 4):
    """Dict batches a causal LM takes: input_ids, attention_mask and labels."""
    return [
        {
            "input_ids": tokens[i : i + size],
            "attention_mask": torch.ones_like(tokens[i : i + size]),
            "labels": tokens[i : i + size],
        }
        for i in range(0, len(tokens), size)
    ]


def train_gpt2(fhe: str, tmp_path, steps_per_epoch_batches, epochs: int = 3):
    """LoRA-train the tiny GPT-2 for `epochs` in mode `fhe`; returns the trainer."""
    model = tiny_gpt2_lora()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    trainer = LoraTrainer(model, optimizer, train_log_path=str(tmp_path / f"{fhe}.log"), logging_steps=4)
    if fhe != "torch":
        corpus = pattern_corpus()
        assert trainer.compile({"input_ids": corpus, "labels": corpus}, n_bits=8) == (0, 0)
    trainer.train(steps_per_epoch_batches, num_epochs=epochs, fhe=fhe)
    return trainer


@pytest.fixture(scope="module")
def gpt2_runs(tmp_path_factory):
    """The same LoRA fine-tuning of the tiny GPT-2 in torch mode and in simulate."""
    tmp_path = tmp_path_factory.mktemp("gpt2")
    batches = lm_batches(pattern_corpus())
    return {fhe: train_gpt2(fhe, tmp_path, batches) for fhe in ("torch", "simulate")}, tmp_path


def mean(values):
    """Arithmetic mean."""
    return sum(values) / len(values)


def test_gpt2_simulate_lowers_loss_and_tracks_torch(gpt2_runs):
    """Simulate lowers the loss and ends within 10% of the same training in torch."""
    runs, _ = gpt2_runs
    simulated = runs["simulate"].get_training_losses()
    clear = runs["torch"].get_training_losses()
    assert len(simulated) == len(clear) == 24
    assert mean(simulated[-4:]) < mean(simulated[:4]) - 0.05, simulated
    assert abs(simulated[-1] - clear[-1]) <= 0.10 * clear[-1], (simulated[-1], clear[-1])
    assert abs(mean(simulated[-4:]) - mean(clear[-4:])) <= 0.10 * mean(clear[-4:])


def test_gpt2_frozen_linears_are_fhe_partitions(gpt2_runs):
    """Every frozen linear (not LoRA, not lm_head) is an FhePartition; stats and log are kept."""
    runs, tmp_path = gpt2_runs
    trainer = runs["simulate"]
    model = trainer.lora_training_module.inference_model
    names = get_remote_names(model)
    # c_attn is the first linear: forward only; attn.c_proj, mlp.c_fc, mlp.c_proj: both ways
    assert sum(n.endswith("forward_module") for n in names) == 4
    assert sum(n.endswith("backward_module") for n in names) == 3
    assert not any("lm_head" in n or "lora" in n for n in names)
    assert any(
        n.endswith("lm_head.forward_module") for n in get_remote_names(model, include_embedding_layers=True)
    )
    partitions = trainer.partitions()
    assert sorted(partitions) == sorted(names)
    for partition in partitions.values():
        assert isinstance(partition, FhePartition) and partition.mode == "simulate"
        assert partition.statistics["pbs_count"] == 0  # a linear is leveled: no bootstrapping
    stats = trainer.get_gradient_stats()
    assert stats and all("lora" in name for name in stats)
    assert all(len(values) == 24 for values in stats.values())
    log = (tmp_path / "simulate.log").read_text()
    assert "step 24 loss" in log and "compiling" in log


def test_conv1d_forward_and_input_gradient_in_fhe():
    """Conv1D forward and input gradient in FHE, accurate at any input magnitude (dynamic quantization)."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(12, 6)  # weight (in=6, out=12), y = x @ W + b
    nn.init.normal_(conv.bias)
    layer = FheLinear(conv.weight, conv.bias, weight_transposed=True, name="conv")
    calibration = torch.randn(64, 6)
    settings = FheSettings.from_options({"n_bits": 8})
    for module in (layer.forward_module, layer.backward_module):
        module.start_recording()
    layer(calibration.requires_grad_()).sum().backward()
    for module in (layer.forward_module, layer.backward_module):
        module.compile(settings)
    # the dynamic range changes by 1e6 between batches: no recompilation, same relative accuracy
    for magnitude in (1e-3, 1.0, 1e3):
        x = (torch.randn(5, 3, 6) * magnitude).requires_grad_()
        grad = torch.randn(5, 3, 12) * magnitude
        out = layer(x)
        out.backward(grad)
        out, expected = out.detach(), conv(x.detach()).detach()
        assert out.shape == expected.shape
        assert float((out - expected).abs().max()) <= 0.03 * float(expected.abs().max())
        expected_grad = grad @ conv.weight.detach().t()
        assert float((x.grad - expected_grad).abs().max()) <= 0.03 * float(expected_grad.abs().max())


# ---- the tiny MLP ------------------------------------------------------------------------------


class TinyMLP(nn.Module):
    """Two linears: LoRA on both."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        """fc2(relu(fc1(x)))."""
        return self.fc2(torch.relu(self.fc1(x)))


def tiny_mlp_lora(seed: int = 0) -> nn.Module:
    """TinyMLP wrapped with peft LoRA on both linears."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(TinyMLP(), peft.LoraConfig(r=2, target_modules=["fc1", "fc2"]))
    for name, param in model.named_parameters():  # non-zero B so both layers get gradients
        if "lora_B" in name:
            nn.init.normal_(param, std=0.5)
    return model


def mlp_data(count: int = 32, seed: int = 0):
    """A 3-class toy classification set."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 4, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return x, y


def mlp_trainer(tmp_path, lr: float = 0.1, **kwargs) -> LoraTrainer:
    """A LoraTrainer on a fresh tiny MLP with SGD and cross-entropy."""
    model = tiny_mlp_lora()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    kwargs.setdefault("train_log_path", str(tmp_path / "mlp.log"))
    return LoraTrainer(model, optimizer, loss_fn=nn.CrossEntropyLoss(), **kwargs)


def trainable_state(trainer: LoraTrainer):
    """Copies of the trainable (LoRA) parameters by name."""
    model = trainer.lora_training_module.inference_model
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_mlp_one_step_execute_equals_simulate(tmp_path, insecure_configuration):
    """With real keys, one training step gives exactly the simulate (and disable) update."""
    x, y = mlp_data()
    trainer = mlp_trainer(tmp_path)
    trainer.compile((x, y), n_bits=3, configuration=insecure_configuration)
    assert len(trainer.partitions()) == 3  # fc1 forward, fc2 forward and backward
    for partition in trainer.partitions().values():
        assert partition.statistics["max_bit_width"] <= 16
    start = trainable_state(trainer)
    results = {}
    for fhe in ("simulate", "execute", "disable"):
        with torch.no_grad():
            for name, param in trainer.lora_training_module.inference_model.named_parameters():
                if name in start:
                    param.copy_(start[name])
        trainer.train([(x[:8], y[:8])], num_epochs=trainer.start_epoch, fhe=fhe)
        results[fhe] = trainable_state(trainer)
    for name in start:
        assert not torch.equal(results["simulate"][name], start[name]), name
        assert torch.equal(results["execute"][name], results["simulate"][name]), name
        assert torch.equal(results["disable"][name], results["simulate"][name]), name
    losses = trainer.get_training_losses()
    assert losses[0] == losses[1] == losses[2]


def test_gradient_accumulation_matches_large_batch(tmp_path):
    """Two accumulated batches of 4 give the update of one batch of 8 (simulate)."""
    x, y = mlp_data(8)
    updates = {}
    for accumulation, batches in ((1, [(x, y)]), (2, [(x[:4], y[:4]), (x[4:], y[4:])])):
        trainer = mlp_trainer(tmp_path, training_args={"gradient_accumulation_steps": accumulation})
        trainer.compile(mlp_data(64, seed=1), n_bits=8)
        start = trainable_state(trainer)
        trainer.train(batches, num_epochs=1, fhe="simulate")
        updates[accumulation] = {n: p - start[n] for n, p in trainable_state(trainer).items()}
        assert len(trainer.get_gradient_stats()["base_model.model.fc1.lora_A.default.weight"]) == 1
    for name, update in updates[1].items():
        assert update.abs().max() > 0
        torch.testing.assert_close(updates[2][name], update, rtol=1e-3, atol=1e-5)


def test_max_grad_norm_clips(tmp_path):
    """max_grad_norm bounds the update; gradient stats keep the raw norm."""
    x, y = mlp_data(8)
    trainer = mlp_trainer(tmp_path, lr=1.0, training_args={"max_grad_norm": 1e-3})
    start = trainable_state(trainer)
    trainer.train([(x, y)], num_epochs=1, fhe="torch")
    change = torch.sqrt(sum(((p - start[n]) ** 2).sum() for n, p in trainable_state(trainer).items()))
    recorded = torch.tensor([v[0] for v in trainer.get_gradient_stats().values()])
    assert recorded.norm() > 1e-2  # the raw gradient is much larger than the clip norm
    assert 0 < float(change) <= 1e-3 * (1 + 1e-4)


def test_evaluation_every_eval_steps(tmp_path):
    """eval_metric_fn (or the mean loss) runs every eval_steps steps."""
    x, y = mlp_data(24)
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 24, 4)]
    calls = []

    def accuracy(model, loader):
        """Share of correct predictions over the eval batches."""
        calls.append(len(loader))
        with torch.no_grad():
            correct = sum(int((model(bx).argmax(-1) == by).sum()) for bx, by in loader)
        return {"accuracy": correct / 8}

    trainer = mlp_trainer(tmp_path, eval_loader=batches[:2], eval_metric_fn=accuracy, eval_steps=2)
    trainer.train(batches, num_epochs=1, fhe="torch")
    assert [step for step, _ in trainer.eval_history] == [2, 4, 6]
    assert len(calls) == 3 and all("accuracy" in m for _, m in trainer.eval_history)
    plain = mlp_trainer(tmp_path, eval_loader=batches[:2], eval_steps=3)
    plain.train(batches, num_epochs=1, fhe="torch")
    assert [step for step, _ in plain.eval_history] == [3, 6]
    assert all(m["eval_loss"] > 0 for _, m in plain.eval_history)


def test_checkpoint_resume_continues_at_next_epoch_and_step(tmp_path):
    """Resuming from a checkpoint continues at the next epoch and step with the same result."""
    x, y = mlp_data(16)
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 16, 4)]
    full = mlp_trainer(tmp_path, checkpoint_dir=str(tmp_path / "full"), training_args={"save_steps": 2})
    full.train(batches, num_epochs=2, fhe="torch")
    assert full.global_step == 8
    saved = sorted(p.name for p in (tmp_path / "full").iterdir())
    # one per epoch under Concrete ML's name, plus the step-level ones inside an epoch
    assert saved == [
        "checkpoint_epoch_1.pth",
        "checkpoint_epoch_1_step_2.pth",
        "checkpoint_epoch_2.pth",
        "checkpoint_epoch_2_step_6.pth",
    ]

    # resume after epoch 1: only epoch 2 runs, steps 5..8, same result as the full run
    resumed = mlp_trainer(tmp_path, checkpoint_dir=str(tmp_path / "resumed"))
    assert resumed.load_checkpoint(str(tmp_path / "full" / "checkpoint_epoch_1.pth")) == (1, 4)
    resumed.train(batches, num_epochs=2, fhe="torch")
    assert resumed.global_step == 8 and len(resumed.get_training_losses()) == 8
    assert resumed.get_training_losses() == pytest.approx(full.get_training_losses())
    for name, value in trainable_state(full).items():
        torch.testing.assert_close(trainable_state(resumed)[name], value)

    # resume in the middle of epoch 2 (after step 6): batches 3 and 4 of epoch 2 only
    middle = mlp_trainer(tmp_path)
    middle.load_checkpoint(str(tmp_path / "full" / "checkpoint_epoch_2_step_6.pth"))
    middle.train(batches, num_epochs=2, fhe="torch")
    assert middle.global_step == 8
    assert middle.get_training_losses() == pytest.approx(full.get_training_losses())

    # compile() finds and loads the latest checkpoint of checkpoint_dir
    latest = mlp_trainer(tmp_path, checkpoint_dir=str(tmp_path / "full"))
    assert latest.compile(mlp_data(32, seed=1), n_bits=4) == (2, 8)
    for name, value in trainable_state(full).items():
        torch.testing.assert_close(trainable_state(latest)[name], value)
    with pytest.raises(FileNotFoundError):
        latest.load_checkpoint(str(tmp_path / "missing.pth"))


def test_save_and_clear_private_info(tmp_path):
    """Client model saved, clear frozen weights dropped, circuits still run; server artifacts written."""
    x, y = mlp_data(32)
    trainer = mlp_trainer(tmp_path)
    trainer.compile((x, y), n_bits=6)
    trainer.train([(x[:8], y[:8])], num_epochs=1, fhe="torch")
    # server side: one client.zip/server.zip per remote linear, in the hybrid server's layout
    folders = trainer.save_server_artifacts(str(tmp_path / "models" / "lora_mlp"))
    assert len(folders) == 3
    for folder in folders:
        assert {"client.zip", "server.zip"} <= {
            p.name for p in (tmp_path / "models" / "lora_mlp").glob("*/*/*")
        }
        assert folder.startswith(str(tmp_path / "models" / "lora_mlp"))
    trainer.save_and_clear_private_info(str(tmp_path / "client"))
    assert (tmp_path / "client" / "client_model_state.pt").is_file()
    assert (tmp_path / "client" / "remote_modules.pt").is_file()
    state = torch.load(tmp_path / "client" / "client_model_state.pt")
    assert any("lora_A" in key for key in state)
    model = trainer.lora_training_module.inference_model
    assert model.base_model.model.fc2.base_layer.forward_module.matrix.numel() == 0
    with pytest.raises(LoraError, match="save_and_clear_private_info"):
        trainer.train([(x[:8], y[:8])], num_epochs=2, fhe="torch")
    trainer.train([(x[:8], y[:8])], num_epochs=2, fhe="simulate")  # the circuits still run


def test_errors_say_how_to_fix(tmp_path):
    """Bad models, inputs and modes raise errors naming the fix."""
    with pytest.raises(ValueError, match="does not contain any detectable LoRA layers"):
        LoraTraining(TinyMLP())
    with pytest.raises(ValueError, match="must accept a 'labels' parameter.*loss_fn"):
        LoraTraining(tiny_mlp_lora())  # no loss_fn, and TinyMLP.forward takes no labels
    x, y = mlp_data(4)
    trainer = mlp_trainer(tmp_path)
    with pytest.raises(NotCompiledError, match="compile"):
        trainer.train([(x, y)], fhe="simulate")
    with pytest.raises(OptionError, match="allowed modes"):
        trainer.train([(x, y)], fhe="fast")
    with pytest.raises(LoraError, match="gradient_accumulation_steps"):
        mlp_trainer(tmp_path, training_args={"gradient_accumulation_steps": 0})
    trainer.compile((x, y), n_bits=4)
    with pytest.raises(OptionError, match="remote"):
        trainer.train([(x, y)], fhe="remote")


def test_concrete_ml_batch_checks_hybrid_model_and_backprop_modules(tmp_path):
    """Concrete ML's LoraTraining checks, its LoraTrainer.hybrid_model attribute that training
    and saving go through, and its hybrid_backprop_linear module path."""
    from fhe_backend.hybrid_backprop_linear import BackwardModuleLinear, CustomLinear, ForwardModuleLinear

    class ReturnsNoLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.lora_a = nn.Parameter(torch.zeros(4, 4))
            self.linear = nn.Linear(4, 4)

        def forward(self, x, labels=None):
            return {"logits": self.linear(x)}

    training = LoraTraining(ReturnsNoLoss())
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"The model did not return a loss\."):
        training((x, None))
    with pytest.raises(AssertionError, match="must have two elements"):
        training((x,))

    trainer = mlp_trainer(tmp_path)
    assert trainer.hybrid_model is trainer.hybrid_model
    calls = []
    original = trainer.hybrid_model.forward
    trainer.hybrid_model.forward = lambda inputs, fhe=None: calls.append(inputs) or original(inputs, fhe)
    data = mlp_data(8)
    trainer.train([data], fhe="torch")
    assert len(calls) == 1 and calls[0][0] is data[0]  # the training step went through it
    saved = []
    trainer.hybrid_model.save_and_clear_private_info = saved.append
    trainer.save_and_clear_private_info(str(tmp_path / "client"))
    assert saved == [str(tmp_path / "client")]

    weight, bias = torch.randn(5, 3), torch.randn(5)
    forward, backward = ForwardModuleLinear(weight, bias), BackwardModuleLinear(weight)
    inputs = torch.randn(2, 3)
    torch.testing.assert_close(forward(inputs), inputs @ weight.t() + bias)
    gradient = torch.randn(2, 5)
    torch.testing.assert_close(backward(gradient), gradient @ weight)
    layer = CustomLinear(weight, bias)
    inputs.requires_grad_(True)
    layer(inputs).backward(gradient)
    torch.testing.assert_close(inputs.grad, gradient @ weight)


def test_training_inputs_forms_and_helpers(tmp_path):
    """Dict, BatchEncoding and tuple inputs; remote names; logger and optimizer helpers."""
    model = tiny_gpt2_lora()
    names = get_remote_names(model)  # before conversion: the plain frozen linears
    assert "base_model.model.transformer.h.0.attn.c_attn.base_layer" in names
    assert "base_model.model.transformer.h.0.mlp.c_fc" in names
    assert not any("lora" in n or "lm_head" in n for n in names)
    training = LoraTraining(model)
    tokens = pattern_corpus(4)
    mask = torch.ones_like(tokens)
    assert (
        training.process_inputs({"input_ids": tokens, "attention_mask": mask, "labels": tokens})[1] is tokens
    )
    encoding = transformers.BatchEncoding({"input_ids": tokens, "attention_mask": mask, "labels": tokens})
    loss_dict, none = training(encoding)
    loss_tuple, _ = training((tokens, tokens))
    assert none is None and not loss_dict.requires_grad
    torch.testing.assert_close(loss_dict, loss_tuple)
    lora_grad = next(p.grad for n, p in model.named_parameters() if "lora_B" in n)  # A: 0 while B = 0
    assert lora_grad is not None and lora_grad.abs().sum() > 0
    training.set_loss_scaling_factor(2)
    assert training((tokens, tokens))[0] == pytest.approx(float(loss_tuple))

    logger = setup_logger(str(tmp_path / "logs" / "train.log"), level=logging.DEBUG)
    logger.debug("hello")
    assert "hello" in (tmp_path / "logs" / "train.log").read_text()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    optimizer.step()
    optimizer_to(optimizer, "cpu")
    assert all(
        t.device.type == "cpu"
        for s in optimizer.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    )
    copy.deepcopy(FheMatmul(torch.eye(2)))  # modules stay copyable


def free_port() -> int:
    """A free TCP port on loopback."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_mlp_remote_training_step_through_the_fhe_server(tmp_path):
    """fhe="remote": the frozen linears run on `fhe-backend serve` (loopback) with client keys."""
    import subprocess
    import sys
    import time
    import urllib.request

    x, y = mlp_data()
    trainer = mlp_trainer(tmp_path)
    trainer.compile((x, y), n_bits=3)
    written = trainer.save_server_artifacts(str(tmp_path / "models" / "lora_mlp"))
    assert len(written) == 3
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fhe_backend.cli",
            "serve",
            str(tmp_path / "models"),
            "--port",
            str(port),
            "--keys-dir",
            str(tmp_path / "keys"),
            "--log-level",
            "warning",
        ]
    )
    try:
        for _ in range(480):  # the server starts in ~20 s alone, over a minute on a loaded machine
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert server.poll() is None, f"fhe-backend serve exited with {server.returncode}"
                time.sleep(0.5)
        trainer.init_client(f"http://127.0.0.1:{port}", model_name="lora_mlp")
        start = trainable_state(trainer)
        trainer.train([(x[:8], y[:8])], num_epochs=1, fhe="remote")
        remote = trainable_state(trainer)
        with torch.no_grad():
            for name, param in trainer.lora_training_module.inference_model.named_parameters():
                if name in start:
                    param.copy_(start[name])
        trainer.train([(x[:8], y[:8])], num_epochs=2, fhe="simulate")
        for name, value in trainable_state(trainer).items():
            assert not torch.equal(value, start[name])
            assert torch.equal(remote[name], value), name
    finally:
        server.terminate()
        server.wait(timeout=30)
