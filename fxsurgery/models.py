"""Small built-in models: the demo model and the seed notebook's Network-in-Network."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["NetworkInNetwork", "NiNClassifier", "demo_model", "DEMO_INPUT_SHAPE"]

DEMO_INPUT_SHAPE = (2, 3, 32, 32)


class NetworkInNetwork(nn.Module):
    """The seed notebook's model: a 3x3 conv followed by two pointwise (1x1) convs."""

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, kernel_size=3, padding=1)
        self.pointwise1 = nn.Conv2d(channels, channels, kernel_size=1)
        self.pointwise2 = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.pointwise1(x))
        return torch.relu(self.pointwise2(x))


class NiNClassifier(nn.Module):
    """Network-in-Network features, a strided pointwise downsample, and a flatten + MLP classifier head.

    Exercises every common rule: pointwise and strided convs (conv -> linear); a 4x4 flatten feeding a Linear, a
    Linear chain with activations and dropout, and a pooled side head (linear -> conv).
    """

    def __init__(self, num_classes: int = 10, channels: int = 32) -> None:
        super().__init__()
        self.features = NetworkInNetwork(channels)
        self.down = nn.Conv2d(channels, 2 * channels, kernel_size=1, stride=2)
        self.bn = nn.BatchNorm2d(2 * channels)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * channels * 16, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(0.2),
            nn.Linear(128, num_classes),
        )
        self.aux = nn.Linear(2 * channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.down(self.features(x))))
        logits = self.classifier(self.pool(x))
        return logits + self.aux(x.mean([2, 3]))


def demo_model(seed: int = 0) -> nn.Module:
    """The built-in default model, initialised deterministically, in eval mode."""
    torch.manual_seed(seed)
    return NiNClassifier().eval()
