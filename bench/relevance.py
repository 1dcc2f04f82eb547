"""Relevance methods on the bundled EfficientNet-Lite0 at 224x224.

    python -m bench relevance [--repeats 5]

LRP (its default composite, ``epsilon_plus_box``) is compared with one forward and backward
pass of the bare model at batch 1 (timed alternately with it): the work of a gradient, which
LRP's rules replace. The suite's floors run the bare model on contiguous images, as users do;
convlens runs it channels-last, so the suite ends with LRP against one fwd+bwd in both
layouts, and against a hand-written lower bound on its work (``zplus_bound``: the z+ rule's
convolutions alone). DeepLIFT runs the inputs and references as one batch of two;
GradientSHAP passes ``n_samples`` images, drawing each chunk's random numbers as it goes.
Oracles: captum's DeepLift and GradientShap on the same work.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

import convlens as cl

from .common import forward_backward, kept, setup, suite_main, timed_alternately

SETTINGS = {
    "lrp": {"composite": "epsilon_plus_box"},
    "deeplift": {"baseline": "zero"},
    "gradient_shap": {"n_samples": 16},
}
# LRP and Excitation Backprop: one forward and one backward pass with their rules, at batch 1
FLOORS = {
    "lrp": "fwdbwd_once",
    "excitation_backprop": "fwdbwd_once",
    "deeplift": "fwdbwd_b1",
    "gradient_shap": "fwdbwd_best",
}


def oracles(module: torch.nn.Module, x: torch.Tensor, target: int) -> dict:
    import captum.attr as ca

    references = torch.zeros(1, *x.shape[1:])
    return {
        "deeplift": lambda: ca.DeepLift(module).attribute(x, baselines=0.0, target=target),
        "gradient_shap": lambda: ca.GradientShap(module).attribute(
            x, baselines=references, target=target, n_samples=16
        ),
    }


def zplus_bound(
    module: torch.nn.Module, x: torch.Tensor, target: int
) -> Callable[[], torch.Tensor]:
    """A lower bound on LRP's cost: z+ (Montavon et al. 2017, "Explaining nonlinear
    classification decisions with deep Taylor decomposition", Pattern Recognition) through
    every convolution and nothing else, hand-written.

    One forward pass keeps each convolution's input; then, per convolution from the last to
    the first: z+ = conv(x, w+) (with [x+, x-] and [w+, w-] where x takes both signs), the
    relevance signal R / z+, its transposed convolution, times x. No batch norm, residual
    split, pooling or linear layer, no stabiliser bookkeeping, the weights clamped beforehand,
    and the relevance at each layer's output made in advance: LRP's own work is all of this
    and more, so its ratio to a fwd+bwd cannot go below this one's."""
    from torch import nn

    from convlens.engine import model_layout

    convs = [c for c in module.modules() if isinstance(c, nn.Conv2d)]
    kept_inputs: dict[nn.Module, torch.Tensor] = {}
    shapes: dict[nn.Module, torch.Size] = {}

    def keep(conv: nn.Module, args: tuple, out: torch.Tensor) -> None:
        kept_inputs[conv] = args[0]
        shapes[conv] = out.shape

    def padded(conv: nn.Module, t: torch.Tensor) -> torch.Tensor:  # Lite0's "same" padding
        pad = getattr(conv, "static_padding", None)
        return pad(t) if pad is not None else t

    image = model_layout(x.clone())
    last = torch.channels_last
    positive = {c: c.weight.detach().clamp(min=0).contiguous(memory_format=last) for c in convs}
    both = {
        c: torch.cat(
            [c.weight.detach().clamp(min=0), c.weight.detach().clamp(max=0)], 1
        ).contiguous(memory_format=last)
        for c in convs
        if c.groups == 1
    }
    handles = [c.register_forward_hook(keep) for c in convs]
    try:
        with torch.no_grad():
            module(image)
    finally:
        for handle in handles:
            handle.remove()
    relevance = {c: torch.ones(shapes[c]).contiguous(memory_format=last) for c in convs}

    def run() -> torch.Tensor:
        """The relevance at the first convolution's input, its output's relevance all ones."""
        handles = [c.register_forward_hook(keep) for c in convs]
        shares = image
        try:
            with torch.no_grad():
                module(image)[0, target]
                for c in reversed(convs):
                    xin = padded(c, kept_inputs[c])
                    signed = c.groups == 1 and bool(xin.amin() < 0)
                    inputs = torch.cat([xin.clamp(min=0), xin.clamp(max=0)], 1) if signed else xin
                    weight = both[c] if signed else positive[c]
                    options = (c.stride, c.padding, c.dilation, c.groups)
                    z = F.conv2d(inputs, weight, None, *options)
                    signal = relevance[c] / z.add_(1e-6)
                    transposed = torch.ops.aten.convolution_backward(
                        signal, inputs, weight, None, c.stride, c.padding, c.dilation, False,
                        [0, 0], c.groups, (True, False, False),
                    )[0]  # fmt: skip
                    shares = inputs * transposed
                    if signed:
                        shares = torch.add(*shares.chunk(2, 1))
        finally:
            for handle in handles:
                handle.remove()
        return shares

    return run


def lrp_layouts(repeats: int = 9) -> dict[str, float]:
    """LRP against one fwd+bwd at batch 1 in both memory layouts, timed in turn.

    The suite's floor is the bare model as users run it, on a contiguous (NCHW) image.
    ``convlens.explain`` runs models on channels-last images (``engine.model_layout``), on
    which the bare model's own fwd+bwd is faster too: that ratio compares like with like."""
    from convlens.engine import model_layout

    model, x, target = setup()
    module, channels_last = model.module, model_layout(x.clone())

    def lrp() -> None:
        cl.explain(model, x, "lrp", target=target, progress=False)

    (t_plain, t_last, t_lrp, t_bound), _ = timed_alternately(
        [
            kept(lambda: forward_backward(module, x)),
            kept(lambda: forward_backward(module, channels_last)),
            lrp,
            kept(zplus_bound(module, x, target)),
        ],
        repeats,
    )
    return {"nchw_s": t_plain, "channels_last_s": t_last, "lrp_s": t_lrp, "bound_s": t_bound}


def main(argv: list[str]) -> int:
    status = suite_main(argv, "relevance", FLOORS, SETTINGS, oracles, repeats=5)
    if "--methods" not in " ".join(argv) or "lrp" in " ".join(argv):
        f = lrp_layouts()
        nchw, last = f["lrp_s"] / f["nchw_s"], f["lrp_s"] / f["channels_last_s"]
        print(
            f"\nLRP {f['lrp_s'] * 1e3:.1f} ms against one fwd+bwd at batch 1, medians of 9 in "
            f"turn: {nchw:.2f}x the bare model on a contiguous image ({f['nchw_s'] * 1e3:.1f} "
            f"ms, the suite's floor), {last:.2f}x on a channels-last image "
            f"({f['channels_last_s'] * 1e3:.1f} ms), the layout convlens runs models in. "
            f"z+ alone, hand-written (bench.relevance.zplus_bound), a lower bound on LRP's own "
            f"work: {f['bound_s'] / f['channels_last_s']:.2f}x the channels-last fwd+bwd "
            f"({f['bound_s'] * 1e3:.1f} ms)."
        )
    return status
