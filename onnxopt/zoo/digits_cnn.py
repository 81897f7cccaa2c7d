"""The built-in digits classifier: a small CNN for scikit-learn's 1x8x8 digit images.

Plain Conv -> BatchNorm -> ReLU chains and a GlobalAveragePool -> Flatten -> Linear head, so the
ONNX graph has the shapes the channel-pruning and head passes look for. Weights are trained by
``models/train_digits.py`` and stored in ``models/digits_cnn.pt``.

This module imports torch at import time; :mod:`onnxopt.zoo` imports it lazily.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitsCNN"]


class DigitsCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(64, 64, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))
