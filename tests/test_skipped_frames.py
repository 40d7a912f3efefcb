"""Frames dynamo skips (RNNs) never reach the backend: a ClearTextWarning, or an error under
require_full_fhe; with allow_rnn the recurrent op stays in torch and the head runs in FHE."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fhe_backend
from fhe_backend.errors import ClearTextWarning

from .harness import quantization_tolerance


class GRUClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 8, batch_first=True)
        self.head = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


INPUTSET = torch.randn(200, 5, 4, generator=torch.Generator().manual_seed(0))


def _model():
    torch.manual_seed(0)
    torch._dynamo.reset()  # dynamo remembers a skipped frame and would not try it again
    return GRUClassifier().eval()


def test_skipped_frame_warns_that_everything_is_in_the_clear():
    model = _model()
    compiled = torch.compile(model, backend="fhe", options={"inputset": INPUTSET, "n_bits": 4})
    with (
        pytest.warns(ClearTextWarning, match=r"no graph of 'forward' .*test_skipped_frames.py.*RNN"),
        torch.no_grad(),
    ):
        out = compiled(INPUTSET[:3])
    assert fhe_backend.partitions(compiled) == []
    assert torch.equal(out, model(INPUTSET[:3]))  # eager torch, as the warning says


def test_skipped_frame_raises_with_require_full_fhe():
    compiled = torch.compile(
        _model(), backend="fhe", options={"inputset": INPUTSET, "n_bits": 4, "require_full_fhe": True}
    )
    with pytest.raises(fhe_backend.UnsupportedOpError, match="require_full_fhe"), torch.no_grad():
        compiled(INPUTSET[:3])


def test_other_backends_are_not_reported():
    compiled = torch.compile(_model(), backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClearTextWarning)
        with torch.no_grad():
            compiled(INPUTSET[:3])


def test_allow_rnn_keeps_the_gru_in_torch_and_the_head_in_fhe():
    # dynamo's config.patch, not monkeypatch: undoing a monkeypatch of the config module left
    # `allow_rnn` missing for later tests ("torch._dynamo.config.allow_rnn does not exist")
    model = _model()
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(
            model,
            backend="fhe",
            options={"inputset": INPUTSET, "n_bits": 6, "rounding_threshold_bits": 6, "fhe": "disable"},
        )
        with torch.no_grad():
            out = compiled(INPUTSET[:16])
            expected = model(INPUTSET[:16])
    assert fhe_backend.partitions(compiled), "the head should run in FHE"
    assert float((out - expected).abs().max()) <= quantization_tolerance(expected, 6, steps=6)
    torch._dynamo.reset()
