"""A small CNN the project trains itself on scikit-learn's 8x8 digits: a task with true labels.

The layout mirrors a MobileNetV2 block at miniature size, so every CNN algorithm has something
to act on: a 3x3 stem (Conv → BN → ReLU6), an expand 1x1 → depthwise 3x3 → project 1x1 block
(BatchNorms, ReLU6 between), global average pooling and a Linear classifier. Training is
deterministic for a seed: mini-batch Adam, learning rate decayed linearly to 0, on the stratified train split
(`corpora.digits("train")`), one thread while training, a few seconds on a laptop CPU.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ptqkit.core.errors import ConfigError
from ptqkit.core.optim import adam_step_
from ptqkit.core.threads import one_thread

__all__ = ["DigitsCNN", "TrainedDigits", "accuracy", "train_digits_cnn"]

logger = logging.getLogger(__name__)


def _conv_bn(cin: int, cout: int, kernel: int, *, groups: int = 1, act: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU6()] if act else layers


class DigitsCNN(nn.Module):
    """[N, 1, 8, 8] images in [0, 1] -> [N, 10] logits."""

    def __init__(self, width: int = 8, expand: int = 4) -> None:
        super().__init__()
        hidden = width * expand
        self.stem = nn.Sequential(*_conv_bn(1, width, 3))
        self.block = nn.Sequential(
            *_conv_bn(width, hidden, 1), *_conv_bn(hidden, hidden, 3, groups=hidden), *_conv_bn(hidden, 2 * width, 1, act=False)
        )
        self.classifier = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.stem(x))  # [N, 2·width, 8, 8]
        return self.classifier(x.mean(dim=(2, 3)))  # [N, 2·width] -> [N, 10]


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of `images` [N, 1, 8, 8] whose arg-max class equals `labels` [N]."""
    with torch.inference_mode():
        return float((model(images).argmax(-1) == labels).float().mean())


@dataclass(frozen=True)
class TrainedDigits:
    model: DigitsCNN
    train_accuracy: float
    test_accuracy: float
    seconds: float


def train_digits_cnn(*, seed: int = 0, epochs: int = 20, batch_size: int = 64, lr: float = 0.01) -> TrainedDigits:
    """Train a DigitsCNN on the train split; returns it in eval mode with its accuracies."""
    from ptqkit.models.corpora import digits

    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"train_digits_cnn {name}={value!r} must be a positive integer")
    x_train, y_train = digits("train")
    x_test, y_test = digits("test")
    start = time.perf_counter()
    with one_thread():  # the same float sums, so the same model, on every machine size
        torch.manual_seed(seed)
        model = DigitsCNN()
        parameters = list(model.parameters())
        state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in parameters]
        order = torch.Generator().manual_seed(seed)
        model.train()
        step, total = 0, epochs * -(-len(y_train) // batch_size)
        for _ in range(epochs):
            for batch in torch.randperm(len(y_train), generator=order).split(batch_size):
                step += 1
                loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
                grads = torch.autograd.grad(loss, parameters)
                for p, g, (m, v) in zip(parameters, grads, state):
                    adam_step_(p, g, m, v, step=step, lr=lr * (1 - (step - 1) / total))
    model.eval()
    seconds = time.perf_counter() - start
    result = TrainedDigits(model, accuracy(model, x_train, y_train), accuracy(model, x_test, y_test), seconds)
    logger.info("digits CNN: train %.4f, test %.4f, %.1f s", result.train_accuracy, result.test_accuracy, seconds)
    return result
