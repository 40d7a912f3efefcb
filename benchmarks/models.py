"""The benchmark models, their data and their training, all with fixed seeds.

This module imports only torch, numpy, scikit-learn (and brevitas / transformers when the
model needs them): `compare_concrete_ml.py` imports it from the Concrete ML environment to
rebuild exactly the same architectures before loading the weights trained here.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import numpy as np
import torch
from torch import nn

SEED = 0
TEST_FRACTION = 0.25
TRAIN_EPOCHS = 60
BATCH_SIZE = 64
LEARNING_RATE = 1e-2
TINY_GPT2 = dict(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
GPT2_SEQUENCES = 64
GPT2_SEQUENCE_LENGTH = 8
QAT_BITS = 3
QAT_HIDDEN = 30


def digits_data(seed: int = SEED) -> Dict[str, np.ndarray]:
    """scikit-learn's digits scaled to [0, 1], split 75/25: x_train, x_test, y_train, y_test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=TEST_FRACTION, random_state=seed)
    return dict(
        x_train=x_train, x_test=x_test, y_train=y_train.astype(np.int64), y_test=y_test.astype(np.int64)
    )


class DigitsMLP(nn.Module):
    """The 64-32-32-10 fully connected network with ReLU activations."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the 10 digit classes for flat 8x8 images."""
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class DigitsCNN(nn.Module):
    """conv 1->4 3x3 pad 1, ReLU, avg-pool 2, conv 4->8 3x3, ReLU, linear 32->10."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(4, 8, 3)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the 10 digit classes for 1x8x8 images."""
        x = self.pool(torch.relu(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def qat_simple_net(
    n_features: int = 64, n_hidden: int = QAT_HIDDEN, n_classes: int = 10, n_bits: int = QAT_BITS
) -> nn.Module:
    """The seed's Brevitas `QATSimpleNet` (3-bit weights and activations), sized for digits."""
    import brevitas.nn as qnn

    class QATSimpleNet(nn.Module):
        """Brevitas QAT network: quantized input, two hidden layers, ReLU."""

        def __init__(self):
            super().__init__()
            self.quant_inp = qnn.QuantIdentity(bit_width=n_bits, return_quant_tensor=True)
            self.fc1 = qnn.QuantLinear(n_features, n_hidden, True, weight_bit_width=n_bits, bias_quant=None)
            self.quant2 = qnn.QuantIdentity(bit_width=n_bits, return_quant_tensor=True)
            self.fc2 = qnn.QuantLinear(n_hidden, n_hidden, True, weight_bit_width=n_bits, bias_quant=None)
            self.quant3 = qnn.QuantIdentity(bit_width=n_bits, return_quant_tensor=True)
            self.fc3 = qnn.QuantLinear(n_hidden, n_classes, True, weight_bit_width=n_bits, bias_quant=None)

        def forward(self, x):
            """Logits of the classes."""
            x = self.quant_inp(x)
            x = self.quant2(torch.relu(self.fc1(x)))
            x = self.quant3(torch.relu(self.fc2(x)))
            return self.fc3(x)

    return QATSimpleNet()


class Gpt2MlpBlock(nn.Module):
    """GPT-2's MLP block with plain linears: c_fc, GELU (tanh approximation), c_proj."""

    def __init__(self, n_embd: int = TINY_GPT2["n_embd"]):
        super().__init__()
        self.fc1 = nn.Linear(n_embd, 4 * n_embd)
        self.fc2 = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output for hidden states (batch, sequence, n_embd)."""
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))


def as_images(x: np.ndarray) -> np.ndarray:
    """Flat 64-pixel digits -> (N, 1, 8, 8) images."""
    return x.reshape(-1, 1, 8, 8)


# name -> (builder, input transform); the shared vocabulary of both environments
DIGITS_MODELS: Dict[str, Tuple[Callable[[], nn.Module], Callable[[np.ndarray], np.ndarray]]] = {
    "mlp": (DigitsMLP, lambda x: x),
    "cnn": (DigitsCNN, as_images),
    "qat": (qat_simple_net, lambda x: x),
}


def train_classifier(
    model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = TRAIN_EPOCHS, seed: int = SEED
) -> nn.Module:
    """Adam on cross-entropy with a fixed seed; returns the model in eval mode."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(order), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
            loss.backward()
            optimizer.step()
    return model.eval()


def build_digits_model(name: str, data: Dict[str, np.ndarray], seed: int = SEED) -> nn.Module:
    """Build and train one of DIGITS_MODELS on the digits training split."""
    builder, transform = DIGITS_MODELS[name]
    torch.manual_seed(seed)
    model = builder()
    return train_classifier(model, transform(data["x_train"]), data["y_train"], seed=seed)


def tiny_gpt2(seed: int = SEED) -> nn.Module:
    """A randomly initialised 1-layer GPT-2 language model (n_embd 16, vocabulary 50)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(**TINY_GPT2)
    return transformers.GPT2LMHeadModel(config).eval()


def token_batches(
    seed: int = SEED, sequences: int = GPT2_SEQUENCES, length: int = GPT2_SEQUENCE_LENGTH
) -> torch.Tensor:
    """Random token ids (sequences x length) from a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY_GPT2["vocab_size"], (sequences, length), generator=generator)
