"""Relevance methods on the bundled EfficientNet-Lite0 at 224x224.

    python -m bench relevance [--repeats 5]

LRP is compared with one forward and backward pass of the bare model at batch 1 (timed
alternately with it): the work of a gradient, which LRP's rules replace. DeepLIFT runs the
inputs and references as one batch of two; GradientSHAP passes ``n_samples`` images. Oracles:
captum's DeepLift and GradientShap on the same work.
"""

from __future__ import annotations

import torch

import convlens as cl

from .common import forward_backward, kept, setup, suite_main, timed_alternately

SETTINGS = {
    "lrp": {"composite": "epsilon_plus"},
    "deeplift": {"baseline": "zero"},
    "gradient_shap": {"n_samples": 16},
}
FLOORS = {"lrp": "fwdbwd_once", "deeplift": "fwdbwd_b1", "gradient_shap": "fwdbwd_best"}


def oracles(module: torch.nn.Module, x: torch.Tensor, target: int) -> dict:
    import captum.attr as ca

    references = torch.zeros(1, *x.shape[1:])
    return {
        "deeplift": lambda: ca.DeepLift(module).attribute(x, baselines=0.0, target=target),
        "gradient_shap": lambda: ca.GradientShap(module).attribute(
            x, baselines=references, target=target, n_samples=16
        ),
    }


def lrp_bound(repeats: int = 5) -> dict[str, float]:
    """The part of LRP's work no implementation avoids, against one fwd+bwd at batch 1.

    epsilon_plus runs, besides the model's forward, one convolution with the rule's weights
    (w+) and one transposed convolution per layer, two of each where the layer's input takes
    both signs (z+ splits it). This times exactly those convolutions on the recorded inputs,
    with the forward, the floor and convlens's LRP in turn."""
    from torch.func import functional_call

    from convlens.engine import model_layout

    model, x, target = setup()
    module, inputs = model.module, model_layout(x.clone())
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    seen: dict[torch.nn.Module, torch.Tensor] = {}
    handles = [c.register_forward_hook(lambda m, a, o: seen.__setitem__(m, a[0])) for c in convs]
    with torch.no_grad():
        module(inputs)
    for handle in handles:
        handle.remove()

    def rule_convolutions() -> None:
        for conv in convs:
            x_in, w = seen[conv], conv.weight.detach()
            if bool(x_in.amin() >= 0):
                pairs = [(x_in, w.clamp(min=0))]
            else:
                pairs = [(x_in.clamp(min=0), w.clamp(min=0)), (x_in.clamp(max=0), w.clamp(max=0))]
            leaves = [part.detach().requires_grad_(True) for part, _ in pairs]
            z = sum(
                functional_call(conv, {"weight": wk, "bias": None}, (leaf,))
                for leaf, (_, wk) in zip(leaves, pairs, strict=True)
            )
            torch.autograd.grad(z, leaves, torch.ones_like(z))

    def floor() -> None:
        forward_backward(module, inputs)

    def forward_and_rules() -> None:
        with torch.enable_grad():
            module(inputs.detach().requires_grad_(True))
        rule_convolutions()

    def lrp() -> None:
        cl.explain(model, x, "lrp", target=target, progress=False)

    (t_floor, t_bound, t_lrp), _ = timed_alternately(
        [kept(floor), kept(forward_and_rules), lrp], repeats
    )
    return {"floor_s": t_floor, "bound": t_bound / t_floor, "lrp": t_lrp / t_floor}


def main(argv: list[str]) -> int:
    status = suite_main(argv, "relevance", FLOORS, SETTINGS, oracles, repeats=5)
    if "--methods" not in " ".join(argv) or "lrp" in " ".join(argv):
        figures = lrp_bound()
        print(
            f"\nLRP lower bound: the model's forward plus the rule's convolutions alone take "
            f"{figures['bound']:.2f}x one fwd+bwd ({figures['floor_s'] * 1e3:.1f} ms); "
            f"convlens's LRP takes {figures['lrp']:.2f}x in the same rotation (median of 5)."
        )
    return status
