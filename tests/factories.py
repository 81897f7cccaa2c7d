"""Factories for the tests of user models (``factories:tiny_net`` etc.)."""

import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def tiny_net():
    torch.manual_seed(0)
    return Tiny()


class ShapeBranch(nn.Module):
    """Python control flow on the batch size: a tracer freezes the branch taken at export
    (batch 2), so the exported graph is wrong at batch 1. Verification must catch it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = self.fc(x)
        if x.shape[0] > 1:
            return y * 2.0
        return y


def shape_branch_net():
    torch.manual_seed(0)
    return ShapeBranch()


def not_a_module():
    return 42
