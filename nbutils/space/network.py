"""The evaluation network: cells built from a genotype, stacked, trained from scratch.

Matches ``quark0/darts`` ``cnn/model.py`` (``NetworkCIFAR``) structurally: stem of 3C
channels, reduction cells at L/3 and 2L/3 doubling the channels, affine BN, drop path
on every operation except identity, auxiliary head after cell 2L/3.

Generalised: any number of input channels and any input size. The auxiliary head pools
its input 5x5 with stride 3 exactly as the reference when that gives a 2x2 map (inputs
of 32x32, i.e. 8x8 at the head); on other sizes (28x28 gives 7x7, where the reference
would fail) it pools adaptively to 2x2, with the same parameters.
"""
from __future__ import annotations

import torch
from torch import nn

from .genotype import Genotype
from .ops import FactorizedReduce, Identity, ReLUConvBN, build_op


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero whole samples with probability ``drop_prob``, rescaling the others."""
    keep = 1.0 - drop_prob
    mask = torch.empty(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x / keep * mask


class EvalCell(nn.Module):
    def __init__(self, genotype: Genotype, c_prev_prev: int, c_prev: int, channels: int, reduction: bool, reduction_prev: bool):
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(c_prev_prev, channels, affine=True)
        else:
            self.preprocess0 = ReLUConvBN(c_prev_prev, channels, 1, 1, 0, affine=True)
        self.preprocess1 = ReLUConvBN(c_prev, channels, 1, 1, 0, affine=True)
        gene = genotype.reduce if reduction else genotype.normal
        self.concat = genotype.reduce_concat if reduction else genotype.normal_concat
        self.inputs = [src for _, src in gene]
        self.ops = nn.ModuleList(
            build_op(name, channels, 2 if reduction and src < 2 else 1, affine=True) for name, src in gene
        )
        self.multiplier = len(self.concat)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(len(self.ops) // 2):
            node = 0
            for k in (2 * i, 2 * i + 1):
                op = self.ops[k]
                h = op(states[self.inputs[k]])
                if self.training and drop_prob > 0 and not isinstance(op, Identity):
                    h = drop_path(h, drop_prob)
                node = node + h
            states.append(node)
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHead(nn.Module):
    def __init__(self, channels: int, num_classes: int, spatial: int):
        super().__init__()
        reference_out = (spatial - 5) // 3 + 1 if spatial >= 5 else 0
        pool = (
            nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False)
            if reference_out == 2
            else nn.AdaptiveAvgPool2d(2)
        )
        self.features = nn.Sequential(
            nn.ReLU(inplace=True),
            pool,
            nn.Conv2d(channels, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class EvalNetwork(nn.Module):
    """``forward`` returns ``(logits, aux_logits)``; ``aux_logits`` is None unless training with a head."""

    def __init__(
        self,
        genotype: Genotype,
        channels: int = 36,
        num_classes: int = 10,
        layers: int = 20,
        auxiliary: bool = False,
        in_channels: int = 3,
        input_size: int = 32,
        stem_multiplier: int = 3,
    ):
        super().__init__()
        if layers < 3:
            raise ValueError(f"layers must be >= 3, got {layers}")
        self.layers = layers
        self.drop_path_prob = 0.0
        self.aux_position = 2 * layers // 3
        c_curr = stem_multiplier * channels
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr)
        )
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, channels
        spatial = input_size
        self.cells = nn.ModuleList()
        reduction_prev = False
        c_aux, spatial_aux = c_prev, spatial
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                c_curr *= 2
                spatial = (spatial + 1) // 2
            cell = EvalCell(genotype, c_prev_prev, c_prev, c_curr, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, cell.multiplier * c_curr
            if i == self.aux_position:
                c_aux, spatial_aux = c_prev, spatial
        self.auxiliary_head = AuxiliaryHead(c_aux, num_classes, spatial_aux) if auxiliary else None
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        aux = None
        s0 = s1 = self.stem(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.aux_position and self.auxiliary_head is not None and self.training:
                aux = self.auxiliary_head(s1)
        return self.classifier(self.global_pooling(s1).flatten(1)), aux


def count_parameters(model: nn.Module, *, exclude_auxiliary: bool = False) -> int:
    """Number of parameters; ``exclude_auxiliary`` counts as the reference's
    ``count_parameters_in_MB`` (which skips names containing 'auxiliary')."""
    return sum(
        p.numel() for name, p in model.named_parameters() if not (exclude_auxiliary and "auxiliary" in name)
    )
