"""The benchmark scripts that have no other test: ``bench devices`` (the prepared check for a
GPU machine, run here on the CPU against itself) and ``bench audit`` (local against Ray)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_devices_check_agrees_with_itself_on_the_cpu() -> None:
    done = _bench("devices", "--device", "cpu", "--size", "64", "--methods", "saliency,gradcam")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 of 2 methods agree" in done.stdout


def test_devices_check_reports_a_failing_method_and_goes_on() -> None:
    done = _bench("devices", "--device", "cpu", "--size", "64", "--methods", "nosuch,saliency")
    assert done.returncode == 1
    assert "unknown method 'nosuch'" in done.stdout
    assert "1 of 2 methods agree; not: ['nosuch']" in done.stdout


def test_device_option_refuses_cuda_without_a_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal cannot happen")
    done = _bench("gradient", "--device", "cuda")
    assert done.returncode == 2
    assert "torch sees no CUDA device here" in done.stderr


def test_audit_bench_times_local_and_ray() -> None:
    pytest.importorskip("ray")
    done = _bench(
        "audit", "--images", "6", "--methods", "saliency", "--model", "shapes-cnn", "--steps", "4"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for engine in ("local, 1 thread", "ray, 1 worker", "local, 2 threads", "ray, 2 workers"):
        assert engine in done.stdout
    lines = [line for line in done.stdout.splitlines() if line.startswith(("local", "ray"))]
    assert all(line.split()[-1 if "local" in line else -2] == "0" for line in lines), lines


@pytest.mark.parametrize("signed", [False, True])
def test_the_lrp_bound_computes_z_plus(signed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench.relevance.zplus_bound does the z+ rule's arithmetic (checked on one convolution
    against autograd): x * d/dx [w+ x / (w+ x + eps)], the signal held fixed; with inputs of
    both signs, x+ through w+ and x- through w-."""
    import torch
    from torch import nn

    monkeypatch.syspath_prepend(str(ROOT))
    from bench.relevance import zplus_bound

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    module = nn.Sequential(conv, nn.Flatten())
    x = torch.randn(1, 3, 9, 9) if signed else torch.rand(1, 3, 9, 9)
    shares = zplus_bound(module, x, 0)()
    w = conv.weight.detach()
    parts = [(x.clamp(min=0), w.clamp(min=0)), (x.clamp(max=0), w.clamp(max=0))]
    z = sum(nn.functional.conv2d(p, v, None, 2, 1) for p, v in parts)
    signal = 1 / (z + 1e-6)
    expected = 0
    for p, v in parts[: 2 if signed else 1]:
        p = p.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad((nn.functional.conv2d(p, v, None, 2, 1) * signal).sum(), p)
        expected = expected + p.detach() * grad
    assert torch.allclose(shares, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("suite", ["gradient", "cam", "relevance", "perturbation"])
def test_every_method_of_a_suite_has_a_floor(suite: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m bench SUITE`` times every registered method of its family against a floor:
    a method added to the family without one stops the suite (KeyError)."""
    import importlib

    import convlens as cl

    monkeypatch.syspath_prepend(str(ROOT))
    floors = importlib.import_module(f"bench.{suite}").FLOORS
    assert set(cl.list_methods(suite)) <= set(floors)
