"""Tiny CNNs with fixed weights, written in every way a rectifier can appear in ``forward``."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(min(2, torch.get_num_threads()))

ACTIVATIONS = ("relu", "relu_inplace", "relu6", "functional", "reused", "relu_hardtanh")


class TinyCNN(nn.Module):
    """conv -> act -> maxpool -> conv -> act -> fc -> act -> fc, for 3x8x8 inputs, 5 classes.

    With ``head="gap"`` the end is global average pooling and one linear layer instead.

    ``act`` chooses how the rectifiers are written; the weights depend only on ``seed``, so two
    variants with the same seed compute the same function wherever they should.

    * ``relu``: three ``nn.ReLU`` modules; ``relu_inplace``: the same with ``inplace=True``;
    * ``relu6``: ``nn.ReLU6``; ``relu_hardtanh``: ``nn.ReLU`` followed by ``nn.Hardtanh(0, 6)``
      (the same function as ReLU6, in modules captum recognises);
    * ``functional``: ``F.relu`` / ``torch.relu`` / ``Tensor.relu`` inside ``forward``;
    * ``reused``: one ``nn.ReLU`` module called three times.
    """

    def __init__(
        self, act: str = "relu", seed: int = 0, scale: float = 1.0, head: str = "mlp"
    ) -> None:
        super().__init__()
        self.head = head
        generator = torch.Generator().manual_seed(seed)
        self.act = act
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 5)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * scale / p[0].numel() ** 0.5)
        if act == "reused":
            self.relu = nn.ReLU()
        elif act in ("relu", "relu_inplace", "relu6"):
            make = {
                "relu": nn.ReLU,
                "relu_inplace": lambda: nn.ReLU(inplace=True),
                "relu6": nn.ReLU6,
            }[act]
            self.act1, self.act2, self.act3 = make(), make(), make()
        elif act == "relu_hardtanh":
            self.act1, self.act2, self.act3 = (
                nn.Sequential(nn.ReLU(), nn.Hardtanh(0.0, 6.0)) for _ in range(3)
            )
        elif act != "functional":
            raise ValueError(act)

    def _activations(self):
        if self.act == "functional":
            return (F.relu, torch.relu, lambda t: t.relu())
        if self.act == "reused":
            return (self.relu, self.relu, self.relu)
        return (self.act1, self.act2, self.act3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a1, a2, a3 = self._activations()
        x = self.pool(a1(self.conv1(x)))
        x = a2(self.conv2(x))
        if self.head == "gap":  # global average pooling + one linear layer (CAM's structure)
            return self.fc(self.gap(x).flatten(1))
        x = a3(self.fc1(x.flatten(1)))
        return self.fc2(x)


def tiny(act: str = "relu", seed: int = 0, scale: float = 1.0, head: str = "mlp") -> TinyCNN:
    return TinyCNN(act, seed, scale, head).eval()


def tiny_input(n: int = 3, seed: int = 1, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.fixture
def x() -> torch.Tensor:
    return tiny_input()


@pytest.fixture(scope="session")
def bundled():
    import convlens as cl

    return cl.load_model()


@pytest.fixture(scope="session")
def photos():
    import convlens as cl

    return cl.sample_images()


def probe(model, x: torch.Tensor) -> int:
    """Images the next explanation of ``model`` on inputs like ``x`` spends deciding the memory
    layout (two on a model's first call; counted in ``forwards``)."""
    from convlens.engine import probe_images

    return probe_images(getattr(model, "module", model), x)


@pytest.fixture(autouse=True)
def _allocator_setting_not_leaked():
    """No test may leave glibc's keep-freed-memory setting on: it changes the default batch
    sizes (``convlens.engine.default_batch_size``) of every later test."""
    from convlens import allocator, engine

    yield
    leaked = dict(engine._KEPT)
    if leaked["active"] or leaked["scoped"]:
        engine._KEPT["active"] = engine._KEPT["scoped"] = False
        engine._set_thresholds(32 << 20, allocator.KEPT_AFTER)  # as freed_memory_kept() leaves them
    assert not leaked["active"] and not leaked["scoped"], (
        f"the test left convlens.engine._KEPT = {leaked}; restore it (monkeypatch.setitem)"
    )
