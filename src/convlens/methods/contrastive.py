"""Grad-CAM asked other questions: what would raise the score, and why P rather than Q.

Both are Grad-CAM (:class:`~convlens.methods.cam.GradCAM`: α_k = mean_ij G_kij, map =
ReLU(Σ_k α_k A_k)) with other gradients G. Counterfactual Grad-CAM negates the target's
gradient; Contrast-CAM takes the gradient of a cross-entropy loss with the contrast class Q as
the label. They are methods of their own, not options of ``gradcam``: each is listed by
``convlens methods``, runs in ``--methods all``, the report and the audit, and is checked by
the generic suite; ``contrast`` means nothing to the other CAMs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from convlens.checks import RequestError, RequestTypeError, first_line
from convlens.methods.base import Result
from convlens.methods.cam import GradCAM
from convlens.registry import register
from convlens.targets import Class, Contrast, Predicted, Target, check_class, check_target_spec

__all__ = ["ContrastCAM", "CounterfactualGradCAM"]


@register("counterfactual_gradcam", "cam")
class CounterfactualGradCAM(GradCAM):
    """Counterfactual Grad-CAM: the regions whose removal would raise the target's score.

    Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
    Localization", ICCV, section "Counterfactual Explanations": the gradients are negated,
    α_k = mean_ij (-∂y/∂A_kij), and map = ReLU(Σ_k α_k A_k). Without ReLU (``relu=False``) it
    is exactly minus the Grad-CAM map.
    """

    description = "counterfactual Grad-CAM: negated gradients (Selvaraju et al. 2017)"

    def combine(self, activations: Tensor, gradients: Tensor) -> Tensor:
        return super().combine(activations, -gradients)


@register("contrast_cam", "cam")
class ContrastCAM(GradCAM):
    """Contrast-CAM: "why P, rather than Q?", with the gradient of the loss of labelling x as Q.

    Prabhushankar, Kwon, Temel & AlRegib 2020, "Contrastive Explanations in Neural Networks",
    ICIP. Grad-CAM with y^P replaced by J(P, Q) = CE(z, Q) = log Σ_j exp z_j - z_Q, the
    cross-entropy of the logits z with the contrast class Q as the label, backpropagated as it
    is (not negated): α_k = mean_ij ∂J/∂A_kij, map = ReLU(Σ_k α_k A_k), as in the authors'
    code. Since ∂J/∂z = softmax(z) - e_Q, the map weighs ∂z_j/∂A by p_j - δ_jQ.

    P is the network's prediction: J depends on it only through z, so ``target`` must be
    ``None`` or each input's predicted class (another class is refused, never silently
    ignored). ``contrast`` is Q: a class index or label name, or one per input; ``None``
    takes each input's second most likely class (the paper leaves Q to the user). The target
    ``Contrast(P, Q)`` asks the same question (``--target contrast:P,Q`` on the command line).

    Unlike ``gradcam`` with ``targets.Contrast(P, Q)``, which explains the logit difference
    y_P - y_Q (gradient weights e_P - e_Q), J = (y_P - y_Q) + CE(z, P): the contrast plus
    the loss of P itself, so every class the network believes in weighs in, by its
    probability. The two agree when the network is certain of P.
    """

    description = "Contrast-CAM: why P rather than Q, by a loss gradient (Prabhushankar 2020)"
    prediction_only = True
    _asked: list[int | None]  # Q as given, per input (None: the second most likely)
    _used: list[int]  # Q as used, per input explained so far
    defaults: ClassVar[dict[str, Any]] = {**GradCAM.defaults, "contrast": None}

    @classmethod
    def check(cls, params: Mapping[str, Any]) -> None:
        super().check(params)
        spec = params["contrast"]
        for q in spec if isinstance(spec, (list, tuple)) else [spec]:
            if isinstance(q, bool) or not isinstance(q, (int, str, type(None))):
                raise RequestTypeError(
                    f"contrast must be a class index, a label name or a list of them, not {q!r}"
                )
            if q is None and spec is not None:
                raise RequestTypeError("contrast lists one class (index or name) per input")
            if isinstance(q, int) and q < 0:
                raise RequestError(f"contrast class {q} is out of range: class indices start at 0")

    @classmethod
    def check_targets(cls, targets: Sequence[Target]) -> None:
        for target in targets:
            if not isinstance(target, (Class, Contrast, Predicted)):
                raise RequestError(
                    f"contrast_cam explains a class against contrast=Q, not a "
                    f"{type(target).__name__} target; use gradcam for inner units"
                )

    def _contrasts(self, n: int) -> list[int | None]:
        """Q for each of ``n`` inputs: an index, or ``None`` for the second most likely."""
        spec = self.params["contrast"]
        if spec is None:
            return [None] * n
        if isinstance(spec, (list, tuple)) and len(spec) != n:
            raise RequestError(
                f"contrast is a list of {len(spec)} classes but there are {n} inputs; "
                "give one per input"
            )
        try:
            resolved = check_target_spec(spec, n, self.model.labels)  # label names to indices
        except RequestError as error:
            raise type(error)(
                f"contrast={spec!r} is not a class of this model: {first_line(error)}"
            ) from None
        return [int(t.index) for t in resolved if isinstance(t, Class)]  # type: ignore[arg-type]

    def explain(self, x: Tensor, targets: list[Target]) -> Result:
        self._asked = self._contrasts(len(x))
        self._used = []
        result = super().explain(x, targets)
        result.resolved["contrast"] = self._used
        return result

    def objective(self, step: Any) -> Tensor:
        """J(P, Q) of each input of the chunk (each input's gradient is its own)."""
        output = step.output
        q = self._contrast_classes(output.detach(), step.targets)
        return torch.logsumexp(output, dim=1) - output.gather(1, q[:, None])[:, 0]

    def _contrast_classes(self, output: Tensor, targets: list[Target]) -> Tensor:
        """Q (N,) for the chunk whose logits are ``output``; refuses a P that is not the
        prediction, and a Q that is P or out of range."""
        n_classes = output.shape[1]
        if n_classes < 2:
            raise RequestError("contrast_cam needs a classifier of at least 2 classes")
        start = len(self._used)
        for i, (target, q) in enumerate(zip(targets, self._asked[start:], strict=False)):
            row = output[i]
            if isinstance(target, Contrast):
                if q is not None:
                    raise RequestError("give Q once: target=Contrast(P, Q) or contrast=Q, not both")
                p, q = int(target.p), int(target.q)
            else:
                p = int(target.index)  # type: ignore[attr-defined]
            check_class(p, n_classes)
            if row.max() - row[p] > 1e-4 * row.abs().max().clamp(min=1):  # ties: float noise
                raise RequestError(
                    f"contrast_cam explains the network's prediction P (Prabhushankar et al. "
                    f"2020), but input {start + i} predicts class {int(row.argmax())}, not {p}: "
                    f"pass target=None, or use gradcam with target=Contrast({p}, Q) "
                    f"(--target contrast:{p},Q)"
                )
            if q is None:  # the most likely class other than P
                q = next(int(c) for c in row.argsort(descending=True) if c != p)
            if not 0 <= q < n_classes:
                raise RequestError(
                    f"contrast class {q} is out of range: the model has {n_classes} classes "
                    f"(0-{n_classes - 1})"
                )
            if q == p:
                raise RequestError(
                    f"contrast class {q} is the explained class P of input {start + i}; "
                    "contrast_cam asks why P rather than another class Q"
                )
            self._used.append(q)
        return torch.tensor(self._used[start:], device=output.device)
