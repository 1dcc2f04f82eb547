"""The CAM family: a weighted sum of one layer's activation maps, upsampled to the input.

Every variant shares the plumbing of :class:`CAMMethod`: choosing the layer (a name, a module,
``Model.cam_layer``, or the last convolution whose output is still spatial), one forward pass
that captures it (and one backward pass to it, never further, for the gradient variants), and
upsampling. A gradient variant is then one formula, :meth:`GradientCAM.combine`; Score-CAM and
Ablation-CAM run their many forward passes through the shared engine, in batches (Ablation-CAM's
from the explained layer on where the network allows it, :mod:`convlens.methods.ablation`).

Maps are returned in the units of the target score (no normalisation); ``relu`` and the other
choices each paper makes are recorded in ``Explanation.params``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convlens.checks import RequestError, RequestTypeError, finite
from convlens.engine import Score
from convlens.hooks import Captured, capture
from convlens.methods.ablation import Ablations, ChannelScores, channel_ablations
from convlens.methods.base import Method, Result
from convlens.methods.feature_maps import feature_maps, safe_divide, upsample, weighted_sum
from convlens.methods.gradient import GuidedBackprop
from convlens.registry import register
from convlens.targets import (
    Class,
    Contrast,
    Predicted,
    Target,
    check_class,
    probability_scores,
    score_rows,
)

__all__ = [
    "CAM",
    "AblationCAM",
    "CAMMethod",
    "ChannelScoringCAM",
    "EigenCAM",
    "GradCAM",
    "GradCAMPlusPlus",
    "GradientCAM",
    "GuidedGradCAM",
    "HiResCAM",
    "LayerCAM",
    "ScoreCAM",
    "XGradCAM",
    "upsample",
    "weighted_sum",
]


@dataclass
class _Clean:
    """What a CAM reads from the clean inputs' pass."""

    activations: list[Tensor]  # per explained layer, (B, K, h, w)
    scores: Tensor  # (B,) the targets' scores
    targets: list[Target]
    names: list[str]  # the explained layers' names
    layer: nn.Module  # the (first) explained layer
    calls: int  # how often it is called in one forward pass


class CAMMethod(Method):
    """Base of the CAM family: layer choice, capture and upsampling."""

    uses_layer = True
    reads_inside = True
    reduction = "sum"
    multi_layer: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {"layer": None, "relu": True, "reshape": None}

    @classmethod
    def check(cls, params: Mapping[str, Any]) -> None:
        if params.get("reshape") is not None and not callable(params["reshape"]):
            raise RequestTypeError(
                f"reshape must be a function (B, ...) -> (B, C, h, w), not {params['reshape']!r}"
            )
        if "relu" in params and not isinstance(params["relu"], bool):
            raise RequestTypeError(f"relu must be True or False, not {params['relu']!r}")
        layers = params["layer"]
        specs = list(layers) if isinstance(layers, (list, tuple)) else [layers]
        if not specs:
            raise RequestError("layer is an empty list")
        for spec in specs:
            if spec is not None and not isinstance(spec, (str, nn.Module)):
                raise RequestTypeError(
                    f"layer must be a name, a module or a list of them, not {spec!r}"
                )
        if len(specs) > 1 and not cls.multi_layer:
            raise RequestError(f"{cls.name} explains one layer; only layercam fuses several")

    # -- the layer ----------------------------------------------------------------------------
    def _layers(self) -> dict[int, nn.Module]:
        """The modules to explain: the given ones, ``Model.cam_layer``, or else the last
        spatial feature map the classifier reads, at the outermost module that returns it
        (``Engine.feature_map``: ResNet ``layer4``, VGG ``features``, ...)."""
        spec = self.params["layer"]
        if spec is None:
            spec = self.model.cam_layer
        if spec is None:
            found = self.engine.feature_map()
            if found is None:
                raise RequestError(
                    "no layer of the model outputs a spatial feature map (B, C, h, w) to explain; "
                    "pass layer=NAME"
                )
            return {id(found): found}
        specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
        modules = [self.model.layer(s) for s in specs]
        return {id(m): m for m in modules}

    def _chosen(
        self, captured: Captured, layers: dict[int, nn.Module]
    ) -> tuple[list[int], list[str]]:
        """Keys of the layers to explain (checked in the pass), and their names."""
        for key, layer in layers.items():
            if key not in captured:
                name = self.model.layer_name(layer)
                raise RequestError(f"layer {name!r} was not called in the forward pass")
            if not isinstance(captured[key], Tensor) or captured[key].dim() not in (3, 4):
                name = self.model.layer_name(layer)
                raise RequestError(
                    f"layer {name!r} outputs neither feature maps (B, C, h, w) nor tokens (B, N, C)"
                )
        return list(layers), [self.model.layer_name(layer) for layer in layers.values()]

    def grid(self, t: Tensor) -> Tensor:
        """A layer's output as feature maps (B, C, h, w) (:func:`feature_maps`)."""
        return feature_maps(t, self.params.get("reshape"))

    @staticmethod
    def resolved(names: list[str]) -> dict[str, Any]:
        """The layer(s) chosen, as ``Result.resolved`` records them."""
        return {"layer": names[0] if len(names) == 1 else names}

    # -- forward passes -----------------------------------------------------------------------
    def clean_forward(self, x: Tensor, targets: list[Target]) -> _Clean:
        """The explained layers' activations, the target scores and the resolved targets of
        the clean inputs, in chunks, without gradients."""
        layers = self._layers()
        parts: list[list[Tensor]] = []
        scores, resolved = [], []
        keys: list[int] = []
        names: list[str] = []
        calls = 1
        for start, stop in self.engine.chunks(len(x)):
            step = self.engine.evaluate(x[start:stop], targets[start:stop], layers=layers)
            keys, names = self._chosen(step.captured, layers)
            calls = step.captured.calls[keys[0]]
            parts.append([self.grid(step.captured[key]).float() for key in keys])
            scores.append(step.scores)
            resolved += step.targets
        activations = [torch.cat([part[i] for part in parts]) for i in range(len(keys))]
        return _Clean(activations, torch.cat(scores), resolved, names, layers[keys[0]], calls)

    def finish(self, maps: list[Tensor], size: Sequence[int]) -> Tensor:
        """ReLU (if asked) and upsampling of each layer's map; several layers are fused."""
        if self.params.get("relu"):
            maps = [m.clamp(min=0) for m in maps]
        upsampled = [upsample(m, size) for m in maps]
        return upsampled[0] if len(upsampled) == 1 else self.fuse(upsampled)

    def fuse(self, maps: list[Tensor]) -> Tensor:
        raise RequestError(f"{self.name} explains one layer")


class GradientCAM(CAMMethod):
    """A CAM computed from a layer's activations A and the gradients G = d score / d A."""

    @abstractmethod
    def combine(self, activations: Tensor, gradients: Tensor) -> Tensor:
        """The variant's formula: (B, K, h, w) activations and gradients to maps (B, h, w)."""

    def objective(self, step: Any) -> Tensor:
        """The scores (one per input) whose gradients weigh the maps: the targets' own."""
        return step.scores

    def activations_and_gradients(
        self, x: Tensor, targets: list[Target]
    ) -> tuple[list[Tensor], list[Tensor], list[Target], list[str]]:
        """One forward pass and one backward pass that stops at the explained layer(s)."""
        layers = self._layers()
        step = self.engine.evaluate(x, targets, layers=layers, grad=True)
        keys, names = self._chosen(step.captured, layers)
        activations = [step.captured[key] for key in keys]
        gradients = torch.autograd.grad(self.objective(step).sum(), activations, allow_unused=True)
        gradients = [
            self.grid(torch.zeros_like(a) if g is None else g).float()
            for a, g in zip(activations, gradients, strict=True)
        ]
        activations = [self.grid(a.detach()).float() for a in activations]
        return activations, gradients, step.targets, names

    def explain(self, x: Tensor, targets: list[Target]) -> Result:
        maps, resolved = [], []
        names: list[str] = []
        with self.engine.task(len(x)):
            for start, stop in self.engine.chunks(len(x)):
                activations, gradients, chunk_targets, names = self.activations_and_gradients(
                    x[start:stop], targets[start:stop]
                )
                layer_maps = [
                    self.combine(a, g) for a, g in zip(activations, gradients, strict=True)
                ]
                maps.append(self.finish(layer_maps, x.shape[-2:]))
                resolved += chunk_targets
        return Result(torch.cat(maps), resolved, self.resolved(names))


@register("gradcam", "cam")
class GradCAM(GradientCAM):
    """Grad-CAM: channel weights are the spatial mean of the gradients, α_k = mean_ij G_kij.

    Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
    Localization", arXiv:1610.02391. Map = ReLU(Σ_k α_k A_k).
    """

    description = "gradient-weighted class activation map (Selvaraju et al. 2017)"

    def combine(self, activations: Tensor, gradients: Tensor) -> Tensor:
        return weighted_sum(activations, gradients.mean(dim=(2, 3)))


@register("gradcam_pp", "cam")
class GradCAMPlusPlus(GradientCAM):
    """Grad-CAM++: pixel-weighted positive gradients.

    Chattopadhyay, Sarkar, Howlader & Balasubramanian 2018, "Grad-CAM++: Improved Visual
    Explanations for Deep Convolutional Networks", arXiv:1710.11063. With the exponential of
    the score, α_kij = G² / (2 G² + Σ_ab A_kab G³) (0 where the denominator is 0) and
    w_k = Σ_ij α_kij ReLU(G_kij); map = ReLU(Σ_k w_k A_k).
    """

    description = "Grad-CAM++: higher-order pixel weights (Chattopadhyay et al. 2018)"

    def combine(self, activations: Tensor, gradients: Tensor) -> Tensor:
        g2 = gradients.pow(2)
        denominator = 2 * g2 + activations.sum(dim=(2, 3), keepdim=True) * gradients.pow(3)
        alpha = safe_divide(g2, denominator)
        weights = (alpha * gradients.clamp(min=0)).sum(dim=(2, 3))
        return weighted_sum(activations, weights)


@register("hirescam", "cam")
class HiResCAM(GradientCAM):
    """HiResCAM: the element-wise product of gradients and activations, summed over channels.

    Draelos & Carin 2020, "Use HiResCAM instead of Grad-CAM for faithful explanations of
    convolutional neural networks", arXiv:2011.08891. Map = ReLU(Σ_k G_k ⊙ A_k); it equals
    Grad-CAM when the head is global average pooling and one linear layer.
    """

    description = "HiResCAM: gradient times activation per position (Draelos & Carin 2020)"

    def combine(self, activations: Tensor, gradients: Tensor) -> Tensor:
        return (gradients * activations).sum(dim=1)


@register("xgradcam", "cam")
class XGradCAM(GradientCAM):
    """XGrad-CAM: gradients averaged with the normalised activations as weights.

    Fu et al. 2020, "Axiom-based Grad-CAM: Towards Accurate Visualization and Explanation of
    CNNs", arXiv:2008.02312. w_k = Σ_ij (A_kij / Σ_ab A_kab) G_kij; map = ReLU(Σ_k w_k A_k).
    """

    description = "XGrad-CAM: axiom-based channel weights (Fu et al. 2020)"

    def combine(self, activations: Tensor, gradients: Tensor) -> Tensor:
        weights = safe_divide(
            (activations * gradients).sum(dim=(2, 3)), activations.sum(dim=(2, 3))
        )
        return weighted_sum(activations, weights)


@register("layercam", "cam")
class LayerCAM(GradientCAM):
    """Layer-CAM: positive gradients weigh each activation where it is, in any layer.

    Jiang, Zhang, Hou, Cheng & Wei 2021, "LayerCAM: Exploring Hierarchical Class Activation
    Maps for Localization", IEEE TIP 30. Map = ReLU(Σ_k ReLU(G_k) ⊙ A_k). With a list of
    layers, each map is upsampled and scaled by tanh(γ M / max M) (γ = ``gamma``, 2 in the
    paper) and the maps are fused by their pixel-wise maximum, so the fused map lies in [0, 1).
    """

    description = "Layer-CAM: positive-gradient weighting, fuses layers (Jiang et al. 2021)"
    multi_layer = True
    defaults: ClassVar[dict[str, Any]] = {
        "layer": None,
        "relu": True,
        "reshape": None,
        "gamma": 2.0,
    }

    @classmethod
    def check(cls, params: Mapping[str, Any]) -> None:
        super().check(params)
        if finite("gamma", params["gamma"]) <= 0:
            raise RequestError(f"gamma must be positive, not {params['gamma']!r}")

    def combine(self, activations: Tensor, gradients: Tensor) -> Tensor:
        return (gradients.clamp(min=0) * activations).sum(dim=1)

    def fuse(self, maps: list[Tensor]) -> Tensor:
        gamma = self.params["gamma"]
        scaled = [
            torch.tanh(gamma * safe_divide(m, m.amax(dim=(1, 2, 3), keepdim=True))) for m in maps
        ]
        return torch.stack(scaled).amax(dim=0)


@register("cam", "cam")
class CAM(CAMMethod):
    """Class activation mapping: the classifier's own weights on the last feature maps.

    Zhou, Khosla, Lapedriza, Oliva & Torralba 2016, "Learning Deep Features for Discriminative
    Localization", arXiv:1512.04150. Needs a head of global average pooling and one linear layer
    on the explained layer (it checks this in the forward pass and refuses other networks);
    map = Σ_k w_{c,k} A_k, with no ReLU in the paper (``relu=False``).
    """

    description = "class activation map from a GAP + linear head (Zhou et al. 2016)"
    passes: ClassVar[str] = "1 forward pass"
    defaults: ClassVar[dict[str, Any]] = {"layer": None, "relu": False, "reshape": None}

    def explain(self, x: Tensor, targets: list[Target]) -> Result:
        layers = self._layers()
        linears = {id(m): m for m in self.model.module.modules() if isinstance(m, nn.Linear)}
        maps, resolved = [], []
        names: list[str] = []
        with self.engine.task(len(x)), torch.no_grad():
            for start, stop in self.engine.chunks(len(x)):
                with capture(linears, inputs=True) as features:
                    step = self.engine.evaluate(x[start:stop], targets[start:stop], layers=layers)
                (key,), names = self._chosen(step.captured, layers)
                activations = self.grid(step.captured[key]).float()
                activations, weights = self._class_weights(
                    activations, step.output, features, linears
                )
                rows = torch.stack([self._row_weights(t, weights) for t in step.targets])
                maps.append(self.finish([weighted_sum(activations, rows)], x.shape[-2:]))
                resolved += step.targets
        return Result(torch.cat(maps), resolved, self.resolved(names))

    def _class_weights(
        self, activations: Tensor, output: Tensor, features: Captured, linears: dict
    ) -> tuple[Tensor, Tensor]:
        """The maps the head pools (the layer's, or rectified where a functional ReLU stands
        between the layer and the pooling, as in DenseNet) and the head's weights."""
        refusal = (
            "cam needs a network whose output is one linear layer applied to the global average "
            "pooling of the explained layer (Zhou et al. 2016); {why}. Use 'gradcam', which "
            "generalises CAM to any network."
        )
        if not features.order:
            raise RequestError(refusal.format(why="this network has no nn.Linear"))
        head = linears[features.order[-1]]
        inputs = features[features.order[-1]].float()
        low = head.weight.dtype not in (torch.float32, torch.float64)  # half precision
        rtol = 3e-2 if low else 1e-4

        def pools(maps: Tensor) -> bool:
            pooled = maps.mean(dim=(2, 3))
            scale = pooled.abs().max().clamp(min=1e-12)
            return inputs.shape == pooled.shape and torch.allclose(
                inputs, pooled, rtol=rtol, atol=rtol * 0.1 * scale
            )

        if not pools(activations):
            if not pools(activations.clamp(min=0)):
                raise RequestError(
                    refusal.format(why="its last linear layer does not read that pooling")
                )
            activations = activations.clamp(min=0)
        if output.shape != (inputs.shape[0], head.out_features) or not torch.allclose(
            F.linear(inputs.to(head.weight.dtype), head.weight, head.bias).float(),  # no call
            output,
            rtol=rtol,
            atol=rtol * 0.1 * output.abs().max(),
        ):
            raise RequestError(refusal.format(why="its last linear layer is not the output"))
        return activations, head.weight.float()

    @staticmethod
    def _row_weights(target: Target, weights: Tensor) -> Tensor:
        if isinstance(target, Class):
            check_class(target.index, len(weights))
            return weights[target.index]
        if isinstance(target, Contrast):
            check_class(target.p, len(weights))
            check_class(target.q, len(weights))
            return weights[target.p] - weights[target.q]
        raise AssertionError(f"check_targets lets only classes through, not {target!r}")

    @classmethod
    def check_targets(cls, targets: Sequence[Target]) -> None:
        for target in targets:
            if not isinstance(target, (Class, Contrast, Predicted)):
                raise RequestError(
                    "cam explains classes (its weights are the classifier's); use gradcam for "
                    f"{type(target).__name__} targets"
                )


class ChannelScoringCAM(CAMMethod):
    """A CAM whose channel weights come from one forward pass per channel (through the engine's
    perturbation loop). Subclasses give the sampler of one input's passes, how a pass is
    scored and how the scores become weights."""

    batch_size = 16
    score: ClassVar[Score] = staticmethod(score_rows)

    @abstractmethod
    def sampler(self, x: Tensor, features: Tensor, layer: nn.Module, calls: int) -> ChannelScores:
        """The passes of one input ``x`` (1, C, H, W) whose layer gives ``features``."""

    @abstractmethod
    def weights(self, scores: Tensor, clean: Tensor) -> Tensor:
        """Channel weights from the per-channel scores and the clean input's score."""

    def check_clean(self, scores: Tensor) -> None:
        """Refuse, before the per-channel passes, clean scores the weights cannot use."""
        return None

    def channel_scores(
        self, x: Tensor, features: Tensor, clean: _Clean
    ) -> tuple[list[Tensor], dict[str, Any]]:
        """Per input, the scores (K,) of its passes, one per channel of the layer (made by
        :meth:`sampler`), and what to add to ``Result.resolved``."""
        self.engine.expect(len(x) * features.shape[1])
        samplers = self.engine.perturb(
            clean.targets,
            lambda i, _: self.sampler(x[i : i + 1], features[i], clean.layer, clean.calls),
            type(self).score,
        )
        return [s.scores for s in samplers], {}

    def explain(self, x: Tensor, targets: list[Target]) -> Result:
        with self.engine.task(len(x)):
            clean = self.clean_forward(x, targets)
            self.check_clean(clean.scores)
            (features,) = clean.activations
            scores, ran = self.channel_scores(x, features, clean)
        maps = [
            weighted_sum(features[i : i + 1], self.weights(s, clean.scores[i])[None].to(features))
            for i, s in enumerate(scores)
        ]
        attribution = self.finish([torch.cat(maps)], x.shape[-2:])
        return Result(attribution, clean.targets, {**self.resolved(clean.names), **ran})


class _ScoreMasks(ChannelScores):
    """Score-CAM: each upsampled, min-max normalised activation map masks the input."""

    def batch(self, start: int, stop: int) -> tuple[Tensor, Any]:
        masks = upsample(self.features[start:stop], self.x.shape[-2:])
        low = masks.amin(dim=(1, 2, 3), keepdim=True)
        high = masks.amax(dim=(1, 2, 3), keepdim=True)
        return self.x * safe_divide(masks - low, high - low), None


@register("scorecam", "cam")
class ScoreCAM(ChannelScoringCAM):
    """Score-CAM: each activation map, as a mask on the input, is weighted by the score it keeps.

    Wang et al. 2020, "Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural
    Networks", arXiv:1910.01279. H_k = A_k upsampled and min-max normalised to [0, 1];
    w_k = softmax(f(x ⊙ H_k))_c (as the authors' implementation; raw values for Channel/Neuron
    targets); map = ReLU(Σ_k w_k A_k). One forward pass per channel, in batches; masks are made
    chunk by chunk.
    """

    description = "Score-CAM: channels weighted by the score of the masked input (Wang 2020)"
    passes: ClassVar[str] = "1 + one per channel of the layer (1281 on Lite0's head)"
    score = staticmethod(probability_scores)

    def sampler(self, x: Tensor, features: Tensor, layer: nn.Module, calls: int) -> ChannelScores:
        return _ScoreMasks(x, features)

    def weights(self, scores: Tensor, clean: Tensor) -> Tensor:
        return scores


@register("ablationcam", "cam")
class AblationCAM(ChannelScoringCAM):
    """Ablation-CAM: a channel's weight is the relative drop of the score when it is zeroed.

    Desai & Ramaswamy 2020, "Ablation-CAM: Visual Explanations for Deep Convolutional Network
    via Gradient-free Localization", WACV. w_k = (y - y_k) / y with y_k the score when channel
    k of the layer is set to zero; map = ReLU(Σ_k w_k A_k). The K ablated scores are computed
    from the layer on where the network allows it: the input runs at batch 1 and the layer's
    output becomes K rows, row k without channel k, so only the network after the layer runs K
    times (:func:`~convlens.methods.ablation.channel_ablations`, which checks it and otherwise
    runs one full pass per channel). ``Result.resolved`` records which ran (``ablation``) and
    the rows run from the layer on (``rows_from_layer``).
    """

    description = "Ablation-CAM: channels weighted by the score drop when removed (Desai 2020)"
    passes: ClassVar[str] = (
        "1 + 1 per batch of channels ablated from the layer on (the input at batch 1; 5 on "
        "Lite0's head at 224 px) + 1 check; 1 + 1 per channel where the network after the "
        "layer cannot take the batch"
    )
    _full_passes: ClassVar[bool] = False  # private switch: True forces one full pass per channel

    def sampler(self, x: Tensor, features: Tensor, layer: nn.Module, calls: int) -> ChannelScores:
        return Ablations(x, features, layer, calls)

    def channel_scores(
        self, x: Tensor, features: Tensor, clean: _Clean
    ) -> tuple[list[Tensor], dict[str, Any]]:
        return channel_ablations(
            self.engine, x, features, clean.targets, clean.scores, clean.layer, clean.calls,
            type(self).score, full=self._full_passes,
        )  # fmt: skip

    def check_clean(self, scores: Tensor) -> None:
        zero = (scores == 0).nonzero().flatten().tolist()
        if zero:
            raise RequestError(
                f"ablationcam divides by the target score, which is 0 for input(s) {zero}"
            )

    def weights(self, scores: Tensor, clean: Tensor) -> Tensor:
        return (clean - scores) / clean


@register("eigencam", "cam")
class EigenCAM(CAMMethod):
    """Eigen-CAM: the activations projected on their first principal component.

    Muhammad & Yeasin 2020, "Eigen-CAM: Class Activation Map using Principal Components",
    arXiv:2008.00299. The (h·w, K) activation matrix C is centred, its first right singular
    vector v gives the map C·v (computed as s·u from the small Gram matrix C·Cᵀ), with the sign
    chosen so that the map correlates positively with the summed activations.
    Class-independent: the target is recorded but does not change the map.
    """

    description = "Eigen-CAM: first principal component of the activations (Muhammad 2020)"
    passes: ClassVar[str] = "1 forward pass"
    defaults: ClassVar[dict[str, Any]] = {"layer": None, "relu": False, "reshape": None}

    def explain(self, x: Tensor, targets: list[Target]) -> Result:
        with self.engine.task(len(x)):
            clean = self.clean_forward(x, targets)
        (features,) = clean.activations
        b, k, h, w = features.shape
        matrix = features.reshape(b, k, h * w).transpose(1, 2)  # (B, hw, K)
        centred = matrix - matrix.mean(dim=1, keepdim=True)
        # C v1 = s1 u1, and u1, s1^2 are the top eigenpair of the small (hw, hw) Gram matrix
        # C C^T: far cheaper than an SVD of C when the layer has many channels.
        gram = (centred @ centred.transpose(1, 2)).double()
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
        top = eigenvalues[:, -1].clamp(min=0).sqrt()[:, None] * eigenvectors[:, :, -1]
        projection = top.to(features.dtype)
        total = matrix.sum(dim=2)
        sign = torch.sign((projection * (total - total.mean(dim=1, keepdim=True))).sum(dim=1))
        projection = projection * torch.where(sign == 0, torch.ones_like(sign), sign)[:, None]
        attribution = self.finish([projection.reshape(b, h, w)], x.shape[-2:])
        return Result(attribution, clean.targets, self.resolved(clean.names))


@register("guided_gradcam", "cam")
class GuidedGradCAM(CAMMethod):
    """Guided Grad-CAM: guided backpropagation times the upsampled Grad-CAM map.

    Selvaraju et al. 2017, "Grad-CAM", arXiv:1610.02391, section 3: pixel-level detail from
    guided backprop (Springenberg et al. 2015), class discrimination from Grad-CAM.
    """

    description = "guided backprop x Grad-CAM (Selvaraju et al. 2017)"
    passes: ClassVar[str] = "2 forward and backward passes (Grad-CAM and guided backpropagation)"
    reduction = "max_abs"
    defaults: ClassVar[dict[str, Any]] = {"layer": None, "reshape": None}

    def explain(self, x: Tensor, targets: list[Target]) -> Result:
        with self.engine.task(2 * len(x)):
            gradcam = GradCAM(self.engine, {**self.params, "relu": True})
            maps = gradcam.explain(x, targets)
            guided = GuidedBackprop(self.engine, {}).explain(x, maps.targets)
        return Result(guided.attribution * maps.attribution, maps.targets, maps.resolved)
