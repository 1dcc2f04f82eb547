"""Relevance methods on the bundled EfficientNet-Lite0 at 224x224.

    python -m bench relevance [--repeats 5]

LRP (its default composite, ``epsilon_plus_box``) is compared with one forward and backward
pass of the bare model at batch 1 (timed alternately with it): the work of a gradient, which
LRP's rules replace. The suite's floors run the bare model on contiguous images, as users do;
convlens runs it channels-last, so the suite ends with LRP against one fwd+bwd in both
layouts. DeepLIFT runs the inputs and references as one batch of two; GradientSHAP passes
``n_samples`` images, drawing each chunk's random numbers as it goes. Oracles: captum's
DeepLift and GradientShap on the same work.
"""

from __future__ import annotations

import torch

import convlens as cl

from .common import forward_backward, kept, setup, suite_main, timed_alternately

SETTINGS = {
    "lrp": {"composite": "epsilon_plus_box"},
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

    (t_plain, t_last, t_lrp), _ = timed_alternately(
        [
            kept(lambda: forward_backward(module, x)),
            kept(lambda: forward_backward(module, channels_last)),
            lrp,
        ],
        repeats,
    )
    return {"nchw_s": t_plain, "channels_last_s": t_last, "lrp_s": t_lrp}


def main(argv: list[str]) -> int:
    status = suite_main(argv, "relevance", FLOORS, SETTINGS, oracles, repeats=5)
    if "--methods" not in " ".join(argv) or "lrp" in " ".join(argv):
        f = lrp_layouts()
        nchw, last = f["lrp_s"] / f["nchw_s"], f["lrp_s"] / f["channels_last_s"]
        print(
            f"\nLRP {f['lrp_s'] * 1e3:.1f} ms against one fwd+bwd at batch 1, medians of 9 in "
            f"turn: {nchw:.2f}x the bare model on a contiguous image ({f['nchw_s'] * 1e3:.1f} "
            f"ms, the suite's floor), {last:.2f}x on a channels-last image "
            f"({f['channels_last_s'] * 1e3:.1f} ms), the layout convlens runs models in."
        )
    return status
