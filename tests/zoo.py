"""A zoo of miniature image classifiers: the architecture families users bring to convlens.

Each model keeps the structure that matters to an explanation method (how activations are
written, in-place additions, gating multiplications, concatenations, normalisation layers,
channels-last permutes, tokens) and the module names torchvision or timm give the parts users
refer to (``layer4``, ``features``, ``Mixed_7c``, ``act4``, ``trunk_output``,
``blocks.3.norm1``, ...), at a size that runs in milliseconds: 3x32x32 inputs, 10 classes,
random weights drawn from a fixed seed (batch-norm statistics included, so no layer is an
identity), built in eval mode. Stages are fewer and narrower than the originals, and the first
layers are adapted to 32x32 inputs so that the last feature map stays spatial (2x2 to 4x4);
each class's docstring names what it keeps.

``ZOO`` maps a family name to a constructor; ``zoo_input`` makes a batch of inputs.
"""

from __future__ import annotations

from collections import OrderedDict, namedtuple
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ZOO", "zoo_input"]

NUM_CLASSES = 10
LOGIT_SPREAD = 3.0  # standard deviation of the logits on zoo inputs


def zoo_input(n: int = 2, seed: int = 0) -> Tensor:
    """A batch (n, 3, 32, 32) of standard-normal inputs, like normalised images."""
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _init(model: nn.Module, seed: int) -> nn.Module:
    """Random weights from ``seed``, scaled as a trained network's are roughly (He-normal
    convolutions, 1/sqrt(fan-in) linear layers, small biases, normalisation layers that are not
    identities, the logits' spread ``LOGIT_SPREAD``), in eval mode."""
    generator = torch.Generator().manual_seed(seed)

    def normal(t: Tensor, std: float, mean: float = 0.0) -> None:
        t.copy_(torch.randn(t.shape, generator=generator) * std + mean)

    def uniform(t: Tensor, low: float, high: float) -> None:
        t.copy_(torch.rand(t.shape, generator=generator) * (high - low) + low)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                normal(module.weight, (2.0 / module.weight[0].numel()) ** 0.5)
                if module.bias is not None:
                    normal(module.bias, 0.05)
            elif isinstance(module, nn.Linear):
                normal(module.weight, (1.0 / module.in_features) ** 0.5)
                if module.bias is not None:
                    normal(module.bias, 0.05)
            elif isinstance(module, nn.BatchNorm2d):
                uniform(module.weight, 0.6, 1.4)
                normal(module.bias, 0.1)
                normal(module.running_mean, 0.1)
                uniform(module.running_var, 0.6, 1.4)
            elif isinstance(module, nn.LayerNorm):
                uniform(module.weight, 0.6, 1.4)
                normal(module.bias, 0.1)
            else:
                for name, p in module.named_parameters(recurse=False):
                    if name == "layer_scale":
                        uniform(p, 0.2, 1.0)
                    else:  # class token, position embedding
                        normal(p, 0.5)
        # scale the output layer so that the logits spread about as a trained model's do
        model.eval()
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        spread = model(zoo_input(8, seed=seed)).std()
        head.weight.mul_(LOGIT_SPREAD / spread)
        head.bias.mul_(LOGIT_SPREAD / spread)
    return model


# -- torchvision's shared building blocks (torchvision.ops.misc) --------------------------------


class ConvNormActivation(nn.Sequential):
    """torchvision's Conv2dNormActivation: Sequential of Conv2d, norm, activation (in place)."""

    # padding (k - 1) // 2; the convolution has a bias only where there is no norm

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        norm_layer: Callable[[int], nn.Module] | None = nn.BatchNorm2d,
        activation_layer: Callable[..., nn.Module] | None = nn.ReLU,
        bias: bool | None = None,
    ) -> None:
        if padding is None:
            padding = (kernel_size - 1) // 2
        if bias is None:
            bias = norm_layer is None
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias
            )
        ]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        if activation_layer is not None:
            layers.append(activation_layer(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision's squeeze-excitation: pooled 1x1 convs and a gate, ``scale * input``."""

    # avgpool, fc1, activation, fc2, scale_activation (sigmoid; hard sigmoid in MobileNetV3)

    def __init__(
        self,
        input_channels: int,
        squeeze_channels: int,
        activation: Callable[[], nn.Module] = nn.ReLU,
        scale_activation: Callable[[], nn.Module] = nn.Sigmoid,
    ) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def _scale(self, input: Tensor) -> Tensor:
        scale = self.avgpool(input)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        return self.scale_activation(scale)

    def forward(self, input: Tensor) -> Tensor:
        scale = self._scale(input)
        return scale * input


class StochasticDepth(nn.Module):
    """torchvision's stochastic depth: drops residual branches in training, identity in eval."""

    def __init__(self, p: float, mode: str = "row") -> None:
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return input
        survival = 1.0 - self.p
        shape = [input.shape[0]] + [1] * (input.dim() - 1) if self.mode == "row" else [1]
        noise = torch.empty(shape, dtype=input.dtype, device=input.device).bernoulli_(survival)
        return input * noise.div_(survival)


class Permute(nn.Module):
    """torchvision's Permute module (ConvNeXt's move to channels-last and back)."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return torch.permute(x, self.dims)


class LayerNorm2d(nn.LayerNorm):
    """torchvision's LayerNorm2d: nn.LayerNorm over channels, via permutes to (B, H, W, C)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor``, never below 90% of ``v`` (MobileNet's rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


# -- ResNet (torchvision.models.resnet) -----------------------------------------------------------


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-bn, ``out += identity`` in place, one ReLU reused."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    """ResNet bottleneck (v1.5): 1x1/3x3/1x1 conv-bn, ``out += identity`` in place, ReLU reused."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv3(out)
        out = self.bn3(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    """ResNet (He et al. 2016), torchvision names: conv1/bn1/relu/maxpool, layer1..4, fc."""

    # the stem convolution is 3x3 stride 1 (CIFAR size) so that layer4 stays 2x2 on 32x32 inputs;
    # one top-level nn.ReLU(inplace=True) module; torch.flatten(x, 1) before fc

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        widths: tuple[int, int, int, int],
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


def resnet_basic() -> nn.Module:
    return _init(ResNet(BasicBlock, (2, 1, 1, 1), (8, 16, 24, 32)), seed=1)


def resnet_bottleneck() -> nn.Module:
    return _init(ResNet(Bottleneck, (1, 1, 1, 1), (4, 8, 12, 16)), seed=2)


# -- DenseNet (torchvision.models.densenet) --------------------------------------------------------


class _DenseLayer(nn.Module):
    """DenseNet layer: concatenated earlier maps, norm/relu/1x1 conv, norm/relu/3x3 conv."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def bn_function(self, inputs: list[Tensor]) -> Tensor:
        concated_features = torch.cat(inputs, 1)
        return self.conv1(self.relu1(self.norm1(concated_features)))

    def forward(self, input: Tensor | list[Tensor]) -> Tensor:
        prev_features = [input] if isinstance(input, Tensor) else input
        bottleneck_output = self.bn_function(prev_features)
        return self.conv2(self.relu2(self.norm2(bottleneck_output)))


class _DenseBlock(nn.ModuleDict):
    """DenseNet block: ModuleDict of dense layers fed all earlier outputs, concatenated."""

    def __init__(
        self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int
    ) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        for _name, layer in self.items():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    """DenseNet transition: norm, relu, 1x1 conv halving the channels, 2x2 average pool."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, 1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """DenseNet (Huang et al. 2017), torchvision names: features (conv0..norm5), classifier."""

    # features = conv0, norm0, relu0, pool0, denseblock1, transition1, denseblock2, norm5 (two
    # blocks of two layers); forward: F.relu(features, inplace=True), adaptive_avg_pool2d, flatten

    def __init__(
        self,
        growth_rate: int = 8,
        block_config: tuple[int, ...] = (2, 2),
        num_init_features: int = 16,
        bn_size: int = 2,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv0", nn.Conv2d(3, num_init_features, 7, stride=2, padding=3, bias=False)),
                    ("norm0", nn.BatchNorm2d(num_init_features)),
                    ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
                ]
            )
        )
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers, num_features, bn_size, growth_rate)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = _Transition(num_features, num_features // 2)
                self.features.add_module(f"transition{i + 1}", trans)
                num_features = num_features // 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        out = self.classifier(out)
        return out


def densenet() -> nn.Module:
    return _init(DenseNet(), seed=3)


# -- VGG (torchvision.models.vgg) ------------------------------------------------------------------


class VGG(nn.Module):
    """VGG (Simonyan & Zisserman 2015): features (conv, ReLU(inplace), maxpool), classifier."""

    # avgpool AdaptiveAvgPool2d((2, 2)); flattened by x.view(x.size(0), -1) as older VGG code does
    # (it raises on channels-last tensors); classifier Linear, ReLU(inplace), Dropout (x2), Linear

    def __init__(
        self, cfg: tuple[int | str, ...] = (8, "M", 16, "M", 24, 24, "M"), hidden: int = 48
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_channels, int(v), 3, padding=1), nn.ReLU(inplace=True)]
                in_channels = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Linear(in_channels * 2 * 2, hidden),
            nn.ReLU(True),
            nn.Dropout(p=0.5),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(p=0.5),
            nn.Linear(hidden, NUM_CLASSES),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = x.view(x.size(0), -1)
        x = self.classifier(x)
        return x


def vgg() -> nn.Module:
    return _init(VGG(), seed=4)


# -- Inception v3 (torchvision.models.inception) ---------------------------------------------------

InceptionOutputs = namedtuple("InceptionOutputs", ["logits", "aux_logits"])


class BasicConv2d(nn.Module):
    """Inception's BasicConv2d: conv, bn (eps 0.001), ``F.relu(x, inplace=True)``."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)  # type: ignore[arg-type]
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        x = self.bn(x)
        return F.relu(x, inplace=True)


class InceptionA(nn.Module):
    """Inception A (Mixed_5b): 1x1, 5x5, double-3x3 and avg-pool branches, concatenated."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 8, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 6, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(6, 8, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 8, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(8, 12, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(12, 12, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
        branch_pool = self.branch_pool(branch_pool)
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionB(nn.Module):
    """Inception B (Mixed_6a): strided 3x3, double 3x3 and max-pool branches (grid reduction)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 16, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 8, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(8, 12, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(12, 12, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3(x)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch3x3dbl, branch_pool], 1)


class InceptionC(nn.Module):
    """Inception C (Mixed_6b): 1x1, 1x7/7x1, double 7x1/1x7 and avg-pool branches."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 16, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 16, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 16, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 16, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        branch7x7dbl = self.branch7x7dbl_2(branch7x7dbl)
        branch7x7dbl = self.branch7x7dbl_3(branch7x7dbl)
        branch7x7dbl = self.branch7x7dbl_4(branch7x7dbl)
        branch7x7dbl = self.branch7x7dbl_5(branch7x7dbl)
        branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
        branch_pool = self.branch_pool(branch_pool)
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], 1)


class InceptionD(nn.Module):
    """Inception D (Mixed_7a): strided 3x3, 1x7/7x1 + strided 3x3, max-pool branches."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 8, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(8, 16, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 8, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(8, 8, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(8, 8, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(8, 8, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        branch7x7x3 = self.branch7x7x3_2(branch7x7x3)
        branch7x7x3 = self.branch7x7x3_3(branch7x7x3)
        branch7x7x3 = self.branch7x7x3_4(branch7x7x3)
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], 1)


class InceptionE(nn.Module):
    """Inception E (Mixed_7b/7c): 1x1, 3x3 and double 3x3 split into 1x3|3x1, avg-pool."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 10, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 12, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(12, 12, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(12, 12, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 14, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(14, 12, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(12, 12, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(12, 12, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 6, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat(
            [self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1
        )
        branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
        branch_pool = self.branch_pool(branch_pool)
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)


class InceptionAux(nn.Module):
    """Inception's AuxLogits head: avg-pool, conv0 (1x1), conv1, adaptive avg-pool, fc."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv0 = BasicConv2d(in_channels, 16, kernel_size=1)
        self.conv1 = BasicConv2d(16, 32, kernel_size=3)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.avg_pool2d(x, kernel_size=3, stride=2)  # 5x5 / 3 in torchvision, on 17x17 maps
        x = self.conv0(x)
        x = self.conv1(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.fc(x)


class Inception3(nn.Module):
    """Inception v3 (Szegedy et al. 2016), torchvision names: Mixed_5b..Mixed_7c, AuxLogits, fc."""

    # stem Conv2d_1a_3x3, maxpool1, Conv2d_3b_1x1, Conv2d_4a_3x3; one block of each kind:
    # Mixed_5b (A), Mixed_6a (B), Mixed_6b (C), Mixed_7a (D), Mixed_7b and Mixed_7c (E, 3x3
    # maps); avgpool, dropout, fc; in train mode AuxLogits runs and forward returns
    # InceptionOutputs(logits, aux_logits)

    def __init__(self, num_classes: int = NUM_CLASSES, aux_logits: bool = True) -> None:
        super().__init__()
        self.aux_logits = aux_logits
        self.Conv2d_1a_3x3 = BasicConv2d(3, 8, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(8, 12, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(12, 16, kernel_size=3, padding=1)
        self.Mixed_5b = InceptionA(16, pool_features=4)  # 32 channels, 15x15
        self.Mixed_6a = InceptionB(32)  # 60 channels, 7x7
        self.Mixed_6b = InceptionC(60, channels_7x7=8)  # 64 channels
        self.AuxLogits = InceptionAux(64, num_classes) if aux_logits else None
        self.Mixed_7a = InceptionD(64)  # 88 channels, 3x3
        self.Mixed_7b = InceptionE(88)  # 64 channels
        self.Mixed_7c = InceptionE(64)  # 64 channels
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=0.5)
        self.fc = nn.Linear(64, num_classes)

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        x = self.Conv2d_1a_3x3(x)
        x = self.maxpool1(x)
        x = self.Conv2d_3b_1x1(x)
        x = self.Conv2d_4a_3x3(x)
        x = self.Mixed_5b(x)
        x = self.Mixed_6a(x)
        x = self.Mixed_6b(x)
        aux: Tensor | None = None
        if self.AuxLogits is not None and self.training:
            aux = self.AuxLogits(x)
        x = self.Mixed_7a(x)
        x = self.Mixed_7b(x)
        x = self.Mixed_7c(x)
        x = self.avgpool(x)
        x = self.dropout(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x, aux

    def forward(self, x: Tensor) -> Tensor | InceptionOutputs:
        x, aux = self._forward(x)
        if self.training and self.aux_logits:
            return InceptionOutputs(x, aux)
        return x


def inception() -> nn.Module:
    return _init(Inception3(), seed=5)


# -- Xception (timm legacy_xception) ---------------------------------------------------------------


class SeparableConv2d(nn.Module):
    """Depthwise-separable convolution: conv1 (depthwise, groups=in) + pointwise 1x1."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels, in_channels, kernel_size, stride, padding, groups=in_channels, bias=False
        )
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.pointwise(x)
        return x


class XceptionBlock(nn.Module):
    """Xception block (timm Block): ReLU/SeparableConv2d/BN reps, max pool, ``x += skip``."""

    # skip = 1x1 conv + skipbn where the shape changes; where strided, x is the max-pool output

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        reps: int,
        strides: int = 1,
        start_with_relu: bool = True,
        grow_first: bool = True,
    ) -> None:
        super().__init__()
        if out_channels != in_channels or strides != 1:
            self.skip: nn.Module | None = nn.Conv2d(
                in_channels, out_channels, 1, stride=strides, bias=False
            )
            self.skipbn = nn.BatchNorm2d(out_channels)
        else:
            self.skip = None
        rep: list[nn.Module] = []
        for i in range(reps):
            if grow_first:
                inc = in_channels if i == 0 else out_channels
                outc = out_channels
            else:
                inc = in_channels
                outc = in_channels if i < reps - 1 else out_channels
            rep.append(nn.ReLU(inplace=True))
            rep.append(SeparableConv2d(inc, outc, 3, stride=1, padding=1))
            rep.append(nn.BatchNorm2d(outc))
        if not start_with_relu:
            rep = rep[1:]
        else:
            rep[0] = nn.ReLU(inplace=False)
        if strides != 1:
            rep.append(nn.MaxPool2d(3, strides, 1))
        self.rep = nn.Sequential(*rep)

    def forward(self, inp: Tensor) -> Tensor:
        x = self.rep(inp)
        if self.skip is not None:
            skip = self.skip(inp)
            skip = self.skipbn(skip)
        else:
            skip = inp
        x += skip
        return x


class SelectAdaptivePool2d(nn.Module):
    """timm's global pool: ``pool`` (adaptive average) then ``flatten``."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.flatten(self.pool(x))


class Xception(nn.Module):
    """Xception (Chollet 2017), timm names: conv1/bn1/act1, block1..4, conv4/bn4/act4, fc."""

    # conv2/bn2/act2 after the first; blocks: two strided entry blocks, a middle block (identity
    # skip), an exit block (grow_first=False); conv3/conv4 separable; global_pool; last map 2x2

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 2, 0, bias=False)  # 15x15
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 16, 3, bias=False)  # 13x13
        self.bn2 = nn.BatchNorm2d(16)
        self.act2 = nn.ReLU(inplace=True)
        self.block1 = XceptionBlock(16, 24, 2, 2, start_with_relu=False)  # 7x7
        self.block2 = XceptionBlock(24, 32, 2, 2)  # 4x4
        self.block3 = XceptionBlock(32, 32, 3, 1)
        self.block4 = XceptionBlock(32, 48, 2, 2, grow_first=False)  # 2x2
        self.conv3 = SeparableConv2d(48, 64, 3, 1, 1)
        self.bn3 = nn.BatchNorm2d(64)
        self.act3 = nn.ReLU(inplace=True)
        self.conv4 = SeparableConv2d(64, 64, 3, 1, 1)
        self.bn4 = nn.BatchNorm2d(64)
        self.act4 = nn.ReLU(inplace=True)
        self.num_features = 64
        self.global_pool = SelectAdaptivePool2d()
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)
        x = self.conv2(x)
        x = self.bn2(x)
        x = self.act2(x)
        x = self.block1(x)
        x = self.block2(x)
        x = self.block3(x)
        x = self.block4(x)
        x = self.conv3(x)
        x = self.bn3(x)
        x = self.act3(x)
        x = self.conv4(x)
        x = self.bn4(x)
        x = self.act4(x)
        return x

    def forward_head(self, x: Tensor) -> Tensor:
        x = self.global_pool(x)
        return self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def xception() -> nn.Module:
    return _init(Xception(), seed=6)


# -- MobileNetV2 (torchvision.models.mobilenetv2) --------------------------------------------------


class InvertedResidualV2(nn.Module):
    """MobileNetV2 block: ReLU6 expansion, depthwise, linear bottleneck, ``x + conv(x)``."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        self.stride = stride
        hidden_dim = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormActivation(inp, hidden_dim, 1, activation_layer=nn.ReLU6))
        layers += [
            ConvNormActivation(
                hidden_dim, hidden_dim, stride=stride, groups=hidden_dim, activation_layer=nn.ReLU6
            ),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018), torchvision names: features, classifier."""

    # features = stem ConvNormActivation (ReLU6, stride 2), five inverted residuals, 1x1
    # ConvNormActivation (4x4 maps); forward: adaptive_avg_pool2d, flatten, classifier

    def __init__(self, num_classes: int = NUM_CLASSES, last_channel: int = 64) -> None:
        super().__init__()
        settings = [(1, 8, 1, 1), (4, 12, 2, 2), (4, 16, 2, 2)]  # t, c, n, s
        input_channel = 8
        features: list[nn.Module] = [
            ConvNormActivation(3, input_channel, stride=2, activation_layer=nn.ReLU6)
        ]
        for t, c, n, s in settings:
            for i in range(n):
                stride = s if i == 0 else 1
                features.append(InvertedResidualV2(input_channel, c, stride, expand_ratio=t))
                input_channel = c
        features.append(
            ConvNormActivation(input_channel, last_channel, 1, activation_layer=nn.ReLU6)
        )
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=0.2), nn.Linear(last_channel, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def mobilenet_v2() -> nn.Module:
    return _init(MobileNetV2(), seed=7)


# -- MobileNetV3 (torchvision.models.mobilenetv3) --------------------------------------------------


class InvertedResidualV3(nn.Module):
    """MobileNetV3 block: expansion, depthwise, SE (Hardsigmoid gate), projection, ``+=``."""

    # activations ReLU or Hardswish; ``result += input`` in place where stride 1 and shapes match

    def __init__(
        self,
        input_channels: int,
        kernel: int,
        expanded_channels: int,
        out_channels: int,
        use_se: bool,
        activation: str,
        stride: int,
    ) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and input_channels == out_channels
        activation_layer = nn.Hardswish if activation == "HS" else nn.ReLU
        layers: list[nn.Module] = []
        if expanded_channels != input_channels:
            layers.append(
                ConvNormActivation(
                    input_channels, expanded_channels, 1, activation_layer=activation_layer
                )
            )
        layers.append(
            ConvNormActivation(
                expanded_channels,
                expanded_channels,
                kernel,
                stride=stride,
                groups=expanded_channels,
                activation_layer=activation_layer,
            )
        )
        if use_se:
            squeeze_channels = _make_divisible(expanded_channels // 4, 8)
            layers.append(
                SqueezeExcitation(
                    expanded_channels, squeeze_channels, scale_activation=nn.Hardsigmoid
                )
            )
        layers.append(ConvNormActivation(expanded_channels, out_channels, 1, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = out_channels

    def forward(self, input: Tensor) -> Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result += input
        return result


class MobileNetV3(nn.Module):
    """MobileNetV3 (Howard et al. 2019), torchvision names: features, avgpool, classifier."""

    # features = stem (Hardswish, stride 2), five blocks (ReLU or Hardswish, SE), 1x1 conv
    # (Hardswish), 4x4 maps; classifier = Linear, Hardswish, Dropout, Linear

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        configs = [  # input, kernel, expanded, out, use_se, activation, stride
            (8, 3, 8, 8, True, "RE", 2),
            (8, 3, 24, 12, False, "RE", 2),
            (12, 3, 32, 12, False, "RE", 1),
            (12, 5, 48, 16, True, "HS", 1),
            (16, 5, 64, 16, True, "HS", 1),
        ]
        layers: list[nn.Module] = [
            ConvNormActivation(3, configs[0][0], stride=2, activation_layer=nn.Hardswish)
        ]
        layers += [InvertedResidualV3(*config) for config in configs]
        lastconv_input = configs[-1][3]
        lastconv_output = 6 * lastconv_input
        layers.append(
            ConvNormActivation(lastconv_input, lastconv_output, 1, activation_layer=nn.Hardswish)
        )
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        last_channel = 64
        self.classifier = nn.Sequential(
            nn.Linear(lastconv_output, last_channel),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=0.2, inplace=True),
            nn.Linear(last_channel, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def mobilenet_v3() -> nn.Module:
    return _init(MobileNetV3(), seed=8)


# -- EfficientNet-B0 (torchvision.models.efficientnet) ---------------------------------------------


class MBConv(nn.Module):
    """EfficientNet MBConv: SiLU expansion, depthwise, SE (sigmoid gate), projection, ``+=``."""

    # where stride 1 and shapes match: result = stochastic_depth(result); result += input

    def __init__(
        self,
        expand_ratio: int,
        kernel: int,
        stride: int,
        input_channels: int,
        out_channels: int,
        stochastic_depth_prob: float,
    ) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and input_channels == out_channels
        expanded_channels = _make_divisible(input_channels * expand_ratio, 8)
        layers: list[nn.Module] = []
        if expanded_channels != input_channels:
            layers.append(
                ConvNormActivation(input_channels, expanded_channels, 1, activation_layer=nn.SiLU)
            )
        layers.append(
            ConvNormActivation(
                expanded_channels,
                expanded_channels,
                kernel,
                stride=stride,
                groups=expanded_channels,
                activation_layer=nn.SiLU,
            )
        )
        squeeze_channels = max(1, input_channels // 4)
        layers.append(
            SqueezeExcitation(
                expanded_channels, squeeze_channels, activation=partial(nn.SiLU, inplace=True)
            )
        )
        layers.append(ConvNormActivation(expanded_channels, out_channels, 1, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")
        self.out_channels = out_channels

    def forward(self, input: Tensor) -> Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += input
        return result


class EfficientNet(nn.Module):
    """EfficientNet-B0 (Tan & Le 2019), torchvision names: features, avgpool, classifier."""

    # features = stem (SiLU, stride 2), one Sequential of MBConv per stage (three stages,
    # stochastic depth up to 0.2), 1x1 conv + bn + SiLU (4x4 maps); classifier = Dropout, Linear

    def __init__(self, num_classes: int = NUM_CLASSES, stochastic_depth_prob: float = 0.2) -> None:
        super().__init__()
        stages = [(1, 3, 1, 8, 8, 1), (6, 3, 2, 8, 12, 2), (6, 5, 2, 12, 16, 1)]
        total_blocks = sum(stage[-1] for stage in stages)
        layers: list[nn.Module] = [ConvNormActivation(3, 8, stride=2, activation_layer=nn.SiLU)]
        block_id = 0
        for expand_ratio, kernel, stride, input_channels, out_channels, num_layers in stages:
            stage: list[nn.Module] = []
            for i in range(num_layers):
                sd_prob = stochastic_depth_prob * float(block_id) / total_blocks
                stage.append(
                    MBConv(
                        expand_ratio,
                        kernel,
                        stride if i == 0 else 1,
                        input_channels if i == 0 else out_channels,
                        out_channels,
                        sd_prob,
                    )
                )
                block_id += 1
            layers.append(nn.Sequential(*stage))
        lastconv_input = stages[-1][4]
        lastconv_output = 4 * lastconv_input
        layers.append(
            ConvNormActivation(lastconv_input, lastconv_output, 1, activation_layer=nn.SiLU)
        )
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(p=0.2, inplace=True), nn.Linear(lastconv_output, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def efficientnet_b0() -> nn.Module:
    return _init(EfficientNet(), seed=9)


# -- RegNetY (torchvision.models.regnet) -----------------------------------------------------------


class BottleneckTransform(nn.Sequential):
    """RegNetY bottleneck: a 1x1, b grouped 3x3, se (sigmoid gate), c 1x1 without activation."""

    def __init__(
        self, width_in: int, width_out: int, stride: int, group_width: int, se_ratio: float
    ) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        w_b = width_out  # bottleneck multiplier 1.0
        g = w_b // group_width
        layers["a"] = ConvNormActivation(width_in, w_b, 1)
        layers["b"] = ConvNormActivation(w_b, w_b, 3, stride=stride, groups=g)
        width_se_out = round(se_ratio * width_in)
        layers["se"] = SqueezeExcitation(w_b, width_se_out, activation=nn.ReLU)
        layers["c"] = ConvNormActivation(w_b, width_out, 1, activation_layer=None)
        super().__init__(layers)


class ResBottleneckBlock(nn.Module):
    """RegNet residual block: ``proj(x) + f(x)`` (or ``x + f(x)``), then ReLU(inplace)."""

    def __init__(
        self, width_in: int, width_out: int, stride: int, group_width: int, se_ratio: float
    ) -> None:
        super().__init__()
        self.proj = None
        if width_in != width_out or stride != 1:
            self.proj = ConvNormActivation(
                width_in, width_out, 1, stride=stride, activation_layer=None
            )
        self.f = BottleneckTransform(width_in, width_out, stride, group_width, se_ratio)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x) + self.f(x) if self.proj is not None else x + self.f(x)
        return self.activation(x)


class AnyStage(nn.Sequential):
    """RegNet stage: a Sequential of blocks named ``block{stage}-{i}``."""

    def __init__(
        self,
        width_in: int,
        width_out: int,
        stride: int,
        depth: int,
        group_width: int,
        se_ratio: float,
        stage_index: int,
    ) -> None:
        super().__init__()
        for i in range(depth):
            block = ResBottleneckBlock(
                width_in if i == 0 else width_out,
                width_out,
                stride if i == 0 else 1,
                group_width,
                se_ratio,
            )
            self.add_module(f"block{stage_index}-{i}", block)


class RegNet(nn.Module):
    """RegNetY (Radosavovic et al. 2020), torchvision names: stem, trunk_output, avgpool, fc."""

    # stem = 3x3 stride 2 ConvNormActivation; trunk_output = stages block1, block2 of residual
    # bottlenecks (grouped 3x3, group width 8, SE 0.25); trunk_output is 4x4

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        stem_width, group_width, se_ratio = 8, 8, 0.25
        self.stem = ConvNormActivation(3, stem_width, 3, stride=2)
        stages = [(16, 1), (32, 2)]  # width, depth; stride 2 each
        blocks: list[tuple[str, nn.Module]] = []
        width_in = stem_width
        for i, (width_out, depth) in enumerate(stages):
            stage = AnyStage(width_in, width_out, 2, depth, group_width, se_ratio, i + 1)
            blocks.append((f"block{i + 1}", stage))
            width_in = width_out
        self.trunk_output = nn.Sequential(OrderedDict(blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.trunk_output(x)
        x = self.avgpool(x)
        x = x.flatten(start_dim=1)
        x = self.fc(x)
        return x


def regnet_y() -> nn.Module:
    return _init(RegNet(), seed=10)


# -- ConvNeXt (torchvision.models.convnext) --------------------------------------------------------


class CNBlock(nn.Module):
    """ConvNeXt block: 7x7 depthwise, channels-last LayerNorm-Linear-GELU-Linear, scale, ``+=``."""

    # block = conv, Permute (B, H, W, C), LayerNorm, Linear 4x, GELU, Linear, Permute back;
    # result = layer_scale * block(x); result = stochastic_depth(result); result += input

    def __init__(self, dim: int, layer_scale: float, stochastic_depth_prob: float) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim, bias=True),
            nn.GELU(),
            nn.Linear(4 * dim, dim, bias=True),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")

    def forward(self, input: Tensor) -> Tensor:
        result = self.layer_scale * self.block(input)
        result = self.stochastic_depth(result)
        result += input
        return result


class ConvNeXt(nn.Module):
    """ConvNeXt (Liu et al. 2022), torchvision names: features, avgpool, classifier."""

    # features = stem (4x4 stride 4 conv + LayerNorm2d), three stages of CNBlocks with
    # LayerNorm2d + 2x2 stride 2 conv between (2x2 maps); classifier = LayerNorm2d, Flatten, Linear

    def __init__(self, num_classes: int = NUM_CLASSES, stochastic_depth_prob: float = 0.1) -> None:
        super().__init__()
        stages = [(16, 32, 1), (32, 48, 2), (48, None, 1)]  # in, out, blocks
        norm_layer = partial(LayerNorm2d, eps=1e-6)
        layers: list[nn.Module] = [
            ConvNormActivation(
                3,
                stages[0][0],
                kernel_size=4,
                stride=4,
                padding=0,
                norm_layer=norm_layer,
                activation_layer=None,
                bias=True,
            )
        ]
        total_blocks = sum(stage[-1] for stage in stages)
        block_id = 0
        for input_channels, out_channels, num_layers in stages:
            stage: list[nn.Module] = []
            for _ in range(num_layers):
                sd_prob = stochastic_depth_prob * block_id / (total_blocks - 1.0)
                stage.append(CNBlock(input_channels, 1e-6, sd_prob))
                block_id += 1
            layers.append(nn.Sequential(*stage))
            if out_channels is not None:
                layers.append(
                    nn.Sequential(
                        norm_layer(input_channels),
                        nn.Conv2d(input_channels, out_channels, kernel_size=2, stride=2),
                    )
                )
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        last = stages[-1][0]
        self.classifier = nn.Sequential(
            norm_layer(last), nn.Flatten(1), nn.Linear(last, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = self.classifier(x)
        return x


def convnext() -> nn.Module:
    return _init(ConvNeXt(), seed=11)


# -- ViT (timm vision_transformer) -----------------------------------------------------------------


class PatchEmbed(nn.Module):
    """timm's PatchEmbed: proj Conv2d with stride = kernel = patch, flattened to (B, N, C)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        x = x.flatten(2).transpose(1, 2)
        return self.norm(x)


class Attention(nn.Module):
    """timm's Attention (unfused): qkv Linear, softmax of scaled dot products, proj Linear."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class Mlp(nn.Module):
    """timm's Mlp: fc1, act (GELU), drop1, fc2, drop2."""

    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(0.0)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop1(x)
        x = self.fc2(x)
        x = self.drop2(x)
        return x


class Block(nn.Module):
    """timm's pre-norm ViT block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = nn.Identity()
        self.drop_path1 = nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = nn.Identity()
        self.drop_path2 = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al. 2021), timm names: patch_embed.proj, blocks.N, norm, head."""

    # 8x8 patches on 32x32 inputs: 16 tokens and a cls_token, pos_embed; blocks.0..blocks.3 with
    # norm1, attn.qkv/proj, norm2, mlp.fc1/fc2; head reads the class token (global_pool='token')

    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 8,
        embed_dim: int = 32,
        depth: int = 4,
        num_heads: int = 2,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        self.global_pool = "token"
        self.num_prefix_tokens = 1
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(0.0)
        self.norm_pre = nn.Identity()
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.Identity()
        self.head_drop = nn.Dropout(0.0)
        self.head = nn.Linear(embed_dim, num_classes)

    def _pos_embed(self, x: Tensor) -> Tensor:
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        return self.pos_drop(x)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.norm_pre(x)
        x = self.blocks(x)
        x = self.norm(x)
        return x

    def forward_head(self, x: Tensor) -> Tensor:
        x = x[:, 0]  # the class token
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def vit() -> nn.Module:
    return _init(VisionTransformer(), seed=12)


ZOO: dict[str, Callable[[], nn.Module]] = {
    "resnet_basic": resnet_basic,
    "resnet_bottleneck": resnet_bottleneck,
    "densenet": densenet,
    "vgg": vgg,
    "inception": inception,
    "xception": xception,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3": mobilenet_v3,
    "efficientnet_b0": efficientnet_b0,
    "regnet_y": regnet_y,
    "convnext": convnext,
    "vit": vit,
}
