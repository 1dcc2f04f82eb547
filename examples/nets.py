"""Model factories for ``convlens --model nets.py:NAME`` and ``convlens train --arch nets.py:NAME``.

A factory is a function of no arguments that returns an ``nn.Module`` classifier (logits out).
Yours would typically build a torchvision or timm network with its pretrained weights, e.g.::

    def xception():
        import timm
        return timm.create_model("xception", pretrained=True)

``resnet_small`` here is a small residual network (He et al. 2016, "Deep Residual Learning for
Image Recognition", CVPR: 3x3 basic blocks with identity shortcuts, global average pooling and
a linear head ``fc``), pretrained on ``convlens.datasets.shapes`` (circles, squares, triangles
and crosses, 64x64 pixels) by ``python scripts/train_shapes.py --arch examples/nets.py:resnet_small
--out examples/resnet_small_shapes.pt``: the README fine-tunes it on a generated folder, as you
would fine-tune an ImageNet network on your photos.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

PRETRAINED = Path(__file__).with_name("resnet_small_shapes.pt")


class Block(nn.Module):
    """Two 3x3 convolutions with batch norm, added to the (projected) input, then ReLU."""

    def __init__(self, inputs: int, outputs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """A stem, four stages of one block each (16-32-64-64 channels, strides 2-1-2-2-1), global
    average pooling and ``fc``; the last stage ``layer4`` is the CAM layer."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.layer1 = Block(16, 16)
        self.layer2 = Block(16, 32, 2)
        self.layer3 = Block(32, 64, 2)
        self.layer4 = Block(64, 64)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet_small(pretrained: bool = True) -> nn.Module:
    """A :class:`ResNetSmall` with its shapes weights (``pretrained``, when the file is there),
    else PyTorch's default initialisation, seeded (the same network every call)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ResNetSmall()
    if pretrained and PRETRAINED.is_file():
        model.load_state_dict(torch.load(PRETRAINED, map_location="cpu", weights_only=True))
    return model.eval()
