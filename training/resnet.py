"""ResNet-18/34/50 (He et al. 2016) in torchvision's layout: same blocks, same parameter counts.

ResNet-50 at 1000 classes has 25,557,032 parameters, ResNet-18 11,689,512
(torchvision cannot be used here: its only build for this torch is CUDA-only).
The stride of a bottleneck sits on its 3x3 conv ("v1.5", as torchvision and
the MLPerf reference). Options: `width` scales every stage, `stem: small` (one
3x3 stride-1 conv, no max pool) keeps 4x the resolution for 32-64 px inputs,
`zero_init_residual` starts each block's last BatchNorm at gamma 0 so every
block starts as the identity (Goyal et al. 2017).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codistill.datasets.imagenet import ResNetConfig


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d that also runs in DeepSpeed's bf16/fp16, which casts parameters but keeps buffers fp32:
    the affine weights then join the fp32 running statistics in fp32 (batch norm takes low-precision inputs
    with fp32 weights and statistics; the statistics keep their precision)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.dtype == self.running_mean.dtype:
            return super().forward(x)
        if self.training:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight.float(), self.bias.float(),
                            self.training, self.momentum, self.eps)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


def shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(conv1x1(cin, cout, stride), BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, width, stride), BatchNorm2d(width)
        self.conv2, self.bn2 = conv3x3(width, width), BatchNorm2d(width)
        self.shortcut = shortcut(cin, width, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = conv1x1(cin, width), BatchNorm2d(width)
        self.conv2, self.bn2 = conv3x3(width, width, stride), BatchNorm2d(width)
        self.conv3, self.bn3 = conv1x1(width, width * 4), BatchNorm2d(width * 4)
        self.shortcut = shortcut(cin, width * 4, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


LAYOUTS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3))}


class ResNet(nn.Module):
    """Images (N, 3, H, W), already normalised, -> logits (N, num_classes)."""

    def __init__(self, config: ResNetConfig, num_classes: int):
        super().__init__()
        block, counts = LAYOUTS[config.depth]
        width = config.width
        if config.stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, padding=3, bias=False), BatchNorm2d(width),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, padding=1))
        else:
            self.stem = nn.Sequential(conv3x3(3, width), BatchNorm2d(width), nn.ReLU(inplace=True))
        stages, cin = [], width
        for i, count in enumerate(counts):
            blocks = []
            for j in range(count):
                blocks.append(block(cin, width << i, stride=2 if i > 0 and j == 0 else 1))
                cin = (width << i) * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if config.zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_((m.bn3 if isinstance(m, Bottleneck) else m.bn2).weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
