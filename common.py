"""Shared primitives for reproducing two papers on normalization and adversarial robustness.

P1: "Batch normalization increases adversarial vulnerability: disentangling usefulness and
    robustness of model features" (LIGS, Ilyas-style feature datasets).
P2: Galloway et al., "Batch Normalization is a Cause of Adversarial Vulnerability".

What lives here: what two or more scripts use, and the primitives the papers name. Each exp_*.py
owns its recipe, sweep, table, figure and claims. Sections (banners below):
   1. Basics: choices, seeds
   2. Normalization layers
   3. VGG
   4. ResNets (with Fixup variants)
   5. WideResNet
   6. MLPs and the deep linear network
   7. make_model: the single entry point for scripts
   8. Attacks: FGSM, BIM, PGD-linf/l2 with CE or CW margin loss
   9. LIGS (P1 Eq. 1) and its differentiable regularizer
  10. Data: readers, checksummed download, bundled digits, synthetic images
  11. Training and evaluation
  12. P2's mechanism analyses
  13. Claims: intervals, verdicts, attack sanity checks, the checkpoint cache
  14. Run records, presets and command-line plumbing
  15. Corruptions: a batched CIFAR-10-C generator, the released files, BN-statistics adaptation

Input-space conventions (DECISIONS.md D2) -- the attacks do not care which one a script uses:
  - P1: data in [0,1] pixels; the model standardizes inside (`mean=`, `std=` -> a `Standardize`
    first layer); eps in pixel units; attacks use clip=(0, 1).
  - P2: data standardized outside the model (no `mean`/`std`); eps in standardized units; attacks
    use the paper's clip range, e.g. clip=(-2, 2) for CIFAR-10, (-1, 1) for SVHN, None for MNIST.

Importing this module has no side effects (no argparse parsing, no global torch flags, no I/O).
"""
import argparse
import contextlib
import copy
import csv
import datetime
import gzip
import hashlib
import http.client
import io
import json
import math
import os
import pathlib
import pickle
import platform
import random
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

NORMS = ("none", "bn", "in", "ln", "gn")
ACTS = ("relu", "leaky_relu", "selu")
ATTACK_NORMS = ("linf", "l2")
ATTACK_LOSSES = ("ce", "cw")
PERTURBATIONS = ("gaussian", "uniform", "fgsm", "pgd")


# ================================================================================================
# 1. Basics: choices, seeds
# ================================================================================================

def check_choice(name, value, choices):
    """Raise one clear line when `value` is not one of `choices` (used for every string option)."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}")


def set_seed(seed):
    """Seed python, numpy and torch (CPU and all CUDA devices). Generators owned by a run
    (data order, augmentation, attack starts, LIGS noise) are seeded separately by their caller."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ================================================================================================
# 2. Normalization layers (P1 Sec. 4.3, Table 2; P2 Sec. 1)
# ================================================================================================

def norm_layer(norm, channels, dim=2, gn_groups=None, bn_eps=1e-5, bn_momentum=0.1):
    """The one norm factory of the project (P1 Sec. 3 / Table 2 compare exactly these five).

    norm: none | bn | in | ln | gn.  dim=2 for conv feature maps (B, C, H, W), dim=1 for MLP
    features (B, C).
      bn: BatchNorm{1,2}d (PyTorch defaults eps=1e-5, momentum=0.1; P2 Fig 2 uses bn_eps=1e-3,
          P2's spheres code bn_momentum=None, i.e. an exact cumulative average).
      in: GroupNorm(C, C) with affine -- used instead of InstanceNorm2d, whose default is
          affine=False with confusing running-stat options. Undefined for dim=1 (one value per
          group), so it raises there.
      ln: GroupNorm(1, C) (normalizes over C, H, W; over the features for dim=1).
      gn: GroupNorm(G, C), G = gcd(gn_groups, C) with gn_groups defaulting to 32 (Wu & He).
          Note: for C <= 32 the default makes GN identical to IN; smoke widths should pass a
          smaller gn_groups so the code paths differ.
      none: nn.Identity (the preceding conv/linear then keeps its bias, see `_has_bias`).
    """
    check_choice("norm", norm, NORMS)
    if norm == "none":
        return nn.Identity()
    if norm == "bn":
        return (nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d)(channels, eps=bn_eps, momentum=bn_momentum)
    if norm == "in":
        if dim == 1:
            raise ValueError("norm='in' is undefined for fully-connected layers (one value per instance-channel)")
        return nn.GroupNorm(channels, channels)
    if norm == "ln":
        return nn.GroupNorm(1, channels)
    return nn.GroupNorm(math.gcd(gn_groups or 32, channels), channels)


def _has_bias(norm):
    # A norm with a learned shift makes a preceding bias redundant: bias only for 'none'.
    return norm == "none"


def make_act(act):
    """relu | leaky_relu (slope 0.1, P1 Fig 8; DECISIONS.md D16) | selu. Never in-place: LIGS needs
    double backprop and attacks need clean graphs."""
    check_choice("act", act, ACTS)
    return {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.1), "selu": nn.SELU}[act]()


class Standardize(nn.Module):
    """(x - mean) / std per channel as the model's first layer, so that attacks and LIGS work in
    [0,1] pixel space (P1 convention; the robustness-library `Normalize` layer)."""

    def __init__(self, mean, std):
        super().__init__()
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != std.shape or (std <= 0).any():
            raise ValueError(f"Standardize: mean and std need the same shape and std > 0, got {mean.tolist()}, {std.tolist()}")
        self.register_buffer("mean", mean.reshape(-1))
        self.register_buffer("std", std.reshape(-1))

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)  # (1, C, 1, 1) for images, (1, D) for vectors
        return (x - self.mean.view(shape)) / self.std.view(shape)


def _input_layer(mean, std):
    return nn.Identity() if mean is None and std is None else Standardize(mean, std)


def _ch(c, width):
    return max(1, int(round(c * width)))


def conv3x3(c_in, c_out, stride=1, bias=False):
    """3x3 convolution with padding 1 (bias only when no norm follows)."""
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


def conv1x1(c_in, c_out, stride=1, bias=False):
    """1x1 convolution (projection shortcuts and bottlenecks)."""
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=bias)


# ================================================================================================
# 3. VGG (P1 Table 1, P2 Tables 1-3, 8; DECISIONS.md D8)
# ================================================================================================

VGG_CFGS = {  # numbers = 3x3 conv output channels, "M" = 2x2 max-pool
    8: [64, "M", 128, "M", 256, "M", 512, "M", 512, "M"],
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG for 32x32 inputs (P1 Table 1, P2 Table 1; DECISIONS.md D8). conv -> norm -> act after every
    conv; the hidden FC layers get no norm (torchvision vgg*_bn convention). n_fc=3 gives
    512-512-n_classes, so the name counts weight layers (VGG8 = 5 conv + 3 FC); n_fc=1 is the common
    one-FC CIFAR variant.

    Pools use ceil_mode=True: identical to floor mode on 32x32 (all sizes even) while letting small
    inputs (8x8 digits, 16x16 smoke images) pass all five pools at 1x1. A final global average pool
    is the identity at 32x32. He init (P2: "standard He initialization"), zero biases.
    """

    def __init__(self, depth=16, norm="bn", width=1.0, num_classes=10, in_channels=3, n_fc=3,
                 act="relu", gn_groups=None, mean=None, std=None):
        super().__init__()
        check_choice("vgg depth", depth, tuple(VGG_CFGS))
        if n_fc < 1:
            raise ValueError(f"n_fc={n_fc}: expected >= 1")
        self.input_norm = _input_layer(mean, std)
        layers, c_in = [], in_channels
        for v in VGG_CFGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                c = _ch(v, width)
                layers += [conv3x3(c_in, c, bias=_has_bias(norm)), norm_layer(norm, c, gn_groups=gn_groups), make_act(act)]
                c_in = c
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        hidden, h = [], _ch(512, width)
        for _ in range(n_fc - 1):
            hidden += [nn.Linear(c_in, h), make_act(act)]
            c_in = h
        self.hidden = nn.Sequential(*hidden)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def features(self, x):
        """Penultimate representation g(x): last hidden FC after its act (flattened conv output if n_fc=1)."""
        return self.hidden(self.body(self.input_norm(x)))

    def forward(self, x):
        return self.fc(self.features(x))


# ================================================================================================
# 4. ResNets: CIFAR ResNet-18/34/50 (P1) and ResNet-20/56/110 (P1 Fig 9), with Fixup variants
# ================================================================================================

def _pad_shortcut(x, c_out, stride):
    """He et al. 2016 option A: parameter-free subsample + zero-pad channels (ResNet-20/56/110 and
    the Fixup authors' code, DECISIONS.md D11)."""
    x = x[:, :, ::stride, ::stride]
    return F.pad(x, (0, 0, 0, 0, 0, c_out - x.shape[1]))


class BasicBlock(nn.Module):
    """conv-norm-act-conv-norm (+ shortcut) -> act. shortcut=False drops the identity path and any
    projection: the block output is act(residual branch) (P1 Figs 9, 16). proj='conv' is the 1x1
    conv + norm projection (kuangliu/MadryLab ResNet-18); proj='pad' is option A."""
    expansion = 1

    def __init__(self, c_in, c, stride=1, norm="bn", act="relu", shortcut=True, proj="conv", gn_groups=None):
        super().__init__()
        b = _has_bias(norm)
        self.conv1, self.n1, self.act1 = conv3x3(c_in, c, stride, b), norm_layer(norm, c, gn_groups=gn_groups), make_act(act)
        self.conv2, self.n2, self.act2 = conv3x3(c, c, 1, b), norm_layer(norm, c, gn_groups=gn_groups), make_act(act)
        self.shortcut, self.proj = shortcut, None
        self.c_out, self.stride = c, stride
        if shortcut and (stride != 1 or c_in != c) and proj == "conv":
            self.proj = nn.Sequential(conv1x1(c_in, c, stride, b), norm_layer(norm, c, gn_groups=gn_groups))

    def branch(self, x):
        return self.n2(self.conv2(self.act1(self.n1(self.conv1(x)))))

    def forward(self, x):
        out = self.branch(x)
        if self.shortcut:
            out = out + (self.proj(x) if self.proj is not None else _identity_or_pad(x, self.c_out, self.stride))
        return self.act2(out)


def _identity_or_pad(x, c_out, stride):
    return x if stride == 1 and x.shape[1] == c_out else _pad_shortcut(x, c_out, stride)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (x4 channels) bottleneck of CIFAR ResNet-50 (kuangliu/MadryLab layout), the
    ResNet50 of P1 Table 1 and of the feature-dataset source models (P1 App. E)."""
    expansion = 4

    def __init__(self, c_in, c, stride=1, norm="bn", act="relu", shortcut=True, proj="conv", gn_groups=None):
        super().__init__()
        b, c_out = _has_bias(norm), 4 * c
        self.conv1, self.n1, self.act1 = conv1x1(c_in, c, 1, b), norm_layer(norm, c, gn_groups=gn_groups), make_act(act)
        self.conv2, self.n2, self.act2 = conv3x3(c, c, stride, b), norm_layer(norm, c, gn_groups=gn_groups), make_act(act)
        self.conv3, self.n3, self.act3 = conv1x1(c, c_out, 1, b), norm_layer(norm, c_out, gn_groups=gn_groups), make_act(act)
        self.shortcut, self.proj = shortcut, None
        self.c_out, self.stride = c_out, stride
        if shortcut and (stride != 1 or c_in != c_out) and proj == "conv":
            self.proj = nn.Sequential(conv1x1(c_in, c_out, stride, b), norm_layer(norm, c_out, gn_groups=gn_groups))

    def branch(self, x):
        out = self.act1(self.n1(self.conv1(x)))
        out = self.act2(self.n2(self.conv2(out)))
        return self.n3(self.conv3(out))

    def forward(self, x):
        out = self.branch(x)
        if self.shortcut:
            out = out + (self.proj(x) if self.proj is not None else _identity_or_pad(x, self.c_out, self.stride))
        return self.act3(out)


def _scalar(value):
    return nn.Parameter(torch.full((1,), float(value)))


def _he_fan_out_(weight, scale=1.0):
    # normal with std = sqrt(2 / (out_channels * k * k)) * scale, as in the Fixup authors' code (DECISIONS.md D11)
    fan_out = weight.shape[0] * weight[0, 0].numel()
    with torch.no_grad():
        weight.normal_(0.0, math.sqrt(2.0 / fan_out) * scale)


class FixupBasicBlock(nn.Module):
    """Fixup basic block (Zhang et al. 2019; DECISIONS.md D11), no normalization:
        out = conv1(x + b1a); out = act(out + b1b); out = conv2(out + b2a); out = scale*out + b2b
        return act(out + shortcut(x + b1a))
    Init (L = number of residual blocks, m = 2 layers per branch): conv1 He fan_out * L^(-1/2),
    conv2 = 0, so every branch outputs exactly 0 at init; a 1x1 projection keeps unscaled He."""
    expansion = 1

    def __init__(self, c_in, c, stride=1, act="relu", proj="conv", num_blocks=1):
        super().__init__()
        self.bias1a, self.bias1b, self.bias2a, self.bias2b = _scalar(0), _scalar(0), _scalar(0), _scalar(0)
        self.scale = _scalar(1)
        self.conv1, self.act1 = conv3x3(c_in, c, stride), make_act(act)
        self.conv2, self.act2 = conv3x3(c, c), make_act(act)
        self.c_out, self.stride, self.proj = c, stride, None
        if (stride != 1 or c_in != c) and proj == "conv":
            self.proj = conv1x1(c_in, c, stride)
            _he_fan_out_(self.proj.weight)
        _he_fan_out_(self.conv1.weight, num_blocks ** -0.5)
        nn.init.zeros_(self.conv2.weight)

    def branch(self, x):
        out = self.act1(self.conv1(x + self.bias1a) + self.bias1b)
        return self.conv2(out + self.bias2a) * self.scale + self.bias2b

    def forward(self, x):
        xb = x + self.bias1a
        sc = self.proj(xb) if self.proj is not None else _identity_or_pad(xb, self.c_out, self.stride)
        return self.act2(self.branch(x) + sc)


class FixupBottleneck(nn.Module):
    """Fixup bottleneck (DECISIONS.md D11, ImageNet variant): m = 3, so conv1 and conv2 get
    He fan_out * L^(-1/4) and conv3 = 0; scalar biases before each conv and activation."""
    expansion = 4

    def __init__(self, c_in, c, stride=1, act="relu", proj="conv", num_blocks=1):
        super().__init__()
        c_out = 4 * c
        self.bias1a, self.bias1b, self.bias2a, self.bias2b, self.bias3a, self.bias3b = (_scalar(0) for _ in range(6))
        self.scale = _scalar(1)
        self.conv1, self.act1 = conv1x1(c_in, c), make_act(act)
        self.conv2, self.act2 = conv3x3(c, c, stride), make_act(act)
        self.conv3, self.act3 = conv1x1(c, c_out), make_act(act)
        self.c_out, self.stride, self.proj = c_out, stride, None
        if (stride != 1 or c_in != c_out) and proj == "conv":
            self.proj = conv1x1(c_in, c_out, stride)
            _he_fan_out_(self.proj.weight)
        _he_fan_out_(self.conv1.weight, num_blocks ** -0.25)
        _he_fan_out_(self.conv2.weight, num_blocks ** -0.25)
        nn.init.zeros_(self.conv3.weight)

    def branch(self, x):
        out = self.act1(self.conv1(x + self.bias1a) + self.bias1b)
        out = self.act2(self.conv2(out + self.bias2a) + self.bias2b)
        return self.conv3(out + self.bias3a) * self.scale + self.bias3b

    def forward(self, x):
        xb = x + self.bias1a
        sc = self.proj(xb) if self.proj is not None else _identity_or_pad(xb, self.c_out, self.stride)
        return self.act3(self.branch(x) + sc)


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stride-1 stem, no max-pool, stages of `widths` channels, global average
    pool, linear classifier (P1 Table 1).

    ResNet-18/34/50: widths 64/128/256/512, 1x1-conv projections (MadryLab layout used by P1's
    authors; PyTorch default init, as in their code, DECISIONS.md D10).
    ResNet-20/56/110: widths 16/32/64, (depth-2)/6 basic blocks per stage, option-A shortcuts.
    fixup=True builds the Fixup network instead (no norm layers; scalar bias after the stem and
    before the classifier; classifier weight and bias zero, so all logits are 0 at init).
    """

    def __init__(self, block, num_blocks, widths=(64, 128, 256, 512), norm="bn", width=1.0, num_classes=10,
                 in_channels=3, act="relu", shortcut=True, proj="conv", fixup=False, gn_groups=None, mean=None, std=None):
        super().__init__()
        self.input_norm = _input_layer(mean, std)
        self.fixup = fixup
        widths = [_ch(w, width) for w in widths]
        self.stem = conv3x3(in_channels, widths[0], bias=_has_bias(norm) and not fixup)
        self.stem_norm = nn.Identity() if fixup else norm_layer(norm, widths[0], gn_groups=gn_groups)
        self.stem_act = make_act(act)
        if fixup:
            self.bias1, self.bias2 = _scalar(0), _scalar(0)
        layers, c_in, L = [], widths[0], sum(num_blocks)
        for i, (w, n) in enumerate(zip(widths, num_blocks)):
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                if fixup:
                    layers.append(block(c_in, w, stride, act=act, proj=proj, num_blocks=L))
                else:
                    layers.append(block(c_in, w, stride, norm, act, shortcut, proj, gn_groups))
                c_in = w * block.expansion
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)
        if fixup:
            nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    def features(self, x):
        """Penultimate representation g(x): the globally average-pooled vector before the classifier."""
        out = self.stem_norm(self.stem(self.input_norm(x)))
        if self.fixup:
            out = out + self.bias1  # Fixup: scalar bias before the activation
        out = F.adaptive_avg_pool2d(self.layers(self.stem_act(out)), 1).flatten(1)
        if self.fixup:
            out = out + self.bias2  # Fixup: scalar bias before the classifier
        return out

    def forward(self, x):
        return self.fc(self.features(x))


# ================================================================================================
# 5. WideResNet (P2 Tables 2, 4, 9): pre-activation blocks, BN or Fixup
# ================================================================================================

class WideBlock(nn.Module):
    """Pre-activation wide block of the BN WRN-28-10 in P2 Tables 2, 4, 9 (Zagoruyko & Komodakis; dropout 0):
    o = act(n1(x)); shortcut = x or 1x1conv(o); return conv2(act(n2(conv1(o)))) + shortcut."""

    def __init__(self, c_in, c, stride, norm="bn", act="relu", gn_groups=None):
        super().__init__()
        b = _has_bias(norm)
        self.n1, self.act1 = norm_layer(norm, c_in, gn_groups=gn_groups), make_act(act)
        self.conv1 = conv3x3(c_in, c, stride, b)
        self.n2, self.act2, self.conv2 = norm_layer(norm, c, gn_groups=gn_groups), make_act(act), conv3x3(c, c, 1, b)
        self.proj = conv1x1(c_in, c, stride, b) if (stride != 1 or c_in != c) else None

    def forward(self, x):
        o = self.act1(self.n1(x))
        sc = x if self.proj is None else self.proj(o)
        return self.conv2(self.act2(self.n2(self.conv1(o)))) + sc


class FixupWideBlock(nn.Module):
    """Fixup version of the pre-activation wide block, defined explicitly here because the public
    WRN-Fixup code changed materially between commits (DECISIONS.md D11):
        o = act(x + b1a); shortcut = x or 1x1conv(o)
        o = act(conv1(o) + b1b); o = scale * conv2(o + b2a) + b2b; return o + shortcut
    conv1: He fan_out * L^(-1/2) (L = number of blocks, 12 for WRN-28-10); conv2 = 0; the 1x1
    projection: unscaled He fan_out."""

    def __init__(self, c_in, c, stride, act="relu", num_blocks=1):
        super().__init__()
        self.bias1a, self.bias1b, self.bias2a, self.bias2b = _scalar(0), _scalar(0), _scalar(0), _scalar(0)
        self.scale = _scalar(1)
        self.act1, self.conv1 = make_act(act), conv3x3(c_in, c, stride)
        self.act2, self.conv2 = make_act(act), conv3x3(c, c)
        self.proj = conv1x1(c_in, c, stride) if (stride != 1 or c_in != c) else None
        if self.proj is not None:
            _he_fan_out_(self.proj.weight)
        _he_fan_out_(self.conv1.weight, num_blocks ** -0.5)
        nn.init.zeros_(self.conv2.weight)

    def branch(self, o):
        o = self.act2(self.conv1(o) + self.bias1b)
        return self.conv2(o + self.bias2a) * self.scale + self.bias2b

    def forward(self, x):
        o = self.act1(x + self.bias1a)
        sc = x if self.proj is None else self.proj(o)
        return self.branch(o) + sc


class WideResNet(nn.Module):
    """WRN-depth-k (P2 Tables 2, 4, 9): stem conv 16, three stages of 16k/32k/64k channels with (depth-4)/6
    blocks each, then final norm -> act -> global average pool -> linear.

    fixup=True: no norm anywhere (FixupWideBlock), zero classifier; final_bn=True keeps the single
    BatchNorm before the classifier that P2's Fixup WRN-28-10 has (P2 footnote 7), off by default
    so that plain Fixup is the default meaning of "fixup".
    """

    def __init__(self, depth=28, k=10, norm="bn", num_classes=10, in_channels=3, act="relu", fixup=False,
                 final_bn=False, gn_groups=None, mean=None, std=None):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth={depth}: expected 6n+4 (e.g. 16, 22, 28, 40)")
        if final_bn and not fixup:
            raise ValueError("final_bn=True is only meaningful with norm='fixup' (a normed WRN always has a final norm)")
        n = (depth - 4) // 6
        widths = [16 * k, 32 * k, 64 * k]
        self.input_norm = _input_layer(mean, std)
        self.fixup = fixup
        self.stem = conv3x3(in_channels, 16, bias=_has_bias(norm) and not fixup)
        blocks, c_in = [], 16
        for i, w in enumerate(widths):
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(FixupWideBlock(c_in, w, stride, act, num_blocks=3 * n) if fixup
                              else WideBlock(c_in, w, stride, norm, act, gn_groups))
                c_in = w
        self.blocks = nn.Sequential(*blocks)
        if fixup:
            self.final_norm = nn.BatchNorm2d(c_in) if final_bn else nn.Identity()
            self.bias1, self.bias2 = _scalar(0), _scalar(0)
        else:
            self.final_norm = norm_layer(norm, c_in, gn_groups=gn_groups)
        self.final_act = make_act(act)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and not fixup:
                _he_fan_out_(m.weight)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        if fixup:
            _he_fan_out_(self.stem.weight)
            nn.init.zeros_(self.fc.weight)

    def features(self, x):
        """Penultimate representation g(x): the pooled vector before the classifier."""
        out = self.final_norm(self.blocks(self.stem(self.input_norm(x))))
        if self.fixup:
            out = out + self.bias1  # Fixup: scalar bias before the activation
        out = F.adaptive_avg_pool2d(self.final_act(out), 1).flatten(1)
        if self.fixup:
            out = out + self.bias2  # Fixup: scalar bias before the classifier
        return out

    def forward(self, x):
        return self.fc(self.features(x))


# ================================================================================================
# 6. MLPs (P2 Sec. 4, Figs 2-5, 8) and the deep linear network (P2 Figs 1, 7)
# ================================================================================================

class MLP(nn.Module):
    """Fully connected net: for each hidden width, Linear -> [norm] -> act (P2 Eq. 1), then a linear
    classifier. Inputs of any shape are flattened.

    norm_positions: indices of the hidden layers that get `norm` (None = all of them), e.g. [0] for
    P2 Table 6's single BN after the first hidden layer. A Linear followed by a norm has no bias.
    init='he' (Kaiming normal for ReLU, zero biases; P2 Fig 2; DECISIONS.md D10) or 'default' (PyTorch's).
    """

    def __init__(self, in_dim, hidden=(256, 256), num_classes=10, norm="none", norm_positions=None, act="relu",
                 bn_eps=1e-5, bn_momentum=0.1, gn_groups=None, init="he", mean=None, std=None):
        super().__init__()
        check_choice("init", init, ("he", "default"))
        if norm_positions is not None and any(not 0 <= p < len(hidden) for p in norm_positions):
            raise ValueError(f"norm_positions={list(norm_positions)}: expected indices in [0, {len(hidden)})")
        self.input_norm = _input_layer(mean, std)
        positions = set(range(len(hidden)) if norm_positions is None else norm_positions)
        layers, d = [], in_dim
        for i, h in enumerate(hidden):
            n = norm if i in positions else "none"
            layers += [nn.Linear(d, h, bias=_has_bias(n)),
                       norm_layer(n, h, dim=1, gn_groups=gn_groups, bn_eps=bn_eps, bn_momentum=bn_momentum), make_act(act)]
            d = h
        self.hidden = nn.Sequential(*layers)
        self.fc = nn.Linear(d, num_classes)
        if init == "he":
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    def features(self, x):
        """Penultimate representation g(x): the last hidden layer's activations."""
        return self.hidden(self.input_norm(x).flatten(1))

    def forward(self, x):
        return self.fc(self.features(x))


class DeepLinear(nn.Module):
    """Deep *linear* network of P2 Figs 1 and 7: `depth` x (Linear(width) -> [BN]) with no
    nonlinearity, then Linear(num_classes). PyTorch default init (P2: the dynamic range shrinks with
    depth "under default initialization"). Without BN the whole net is one linear map; with BN in
    train mode each mini-batch gets its own affine map (P2 Figs 1, 7)."""

    def __init__(self, in_dim=2, width=128, depth=16, num_classes=2, norm="none", bn_momentum=0.1):
        super().__init__()
        check_choice("norm", norm, ("none", "bn"))
        self.layers = nn.ModuleList()
        d = in_dim
        for _ in range(depth):
            self.layers.append(nn.Sequential(nn.Linear(d, width), norm_layer(norm, width, dim=1, bn_momentum=bn_momentum)))
            d = width
        self.fc = nn.Linear(d, num_classes)

    def layer_outputs(self, x):
        """[x, h_1, ..., h_depth]: the input and every layer's (normalized) output, for the per-layer PCA plots."""
        outs = [x]
        for layer in self.layers:
            outs.append(layer(outs[-1]))
        return outs

    def features(self, x):
        return self.layer_outputs(x)[-1]

    def forward(self, x):
        return self.fc(self.features(x))


# ================================================================================================
# 7. make_model: the single entry point for scripts
# ================================================================================================

RESNET_SPECS = {  # name -> (block kind, blocks per stage)
    "resnet18": ("basic", [2, 2, 2, 2]), "resnet34": ("basic", [3, 4, 6, 3]), "resnet50": ("bottleneck", [3, 4, 6, 3]),
    **{f"resnet{d}": ("basic", [(d - 2) // 6] * 3) for d in (20, 32, 44, 56, 110)},
}
ARCHS = tuple(f"vgg{d}" for d in VGG_CFGS) + tuple(RESNET_SPECS) + ("wrn<depth>_<k>", "mlp", "deep_linear")


def make_model(arch, norm="bn", width=1.0, num_classes=10, in_channels=3, **kw):
    """Build any model of both papers by name (the architectures of P1 and P2).

    arch: vgg8|vgg11|vgg13|vgg16|vgg19, resnet18|resnet34|resnet50, resnet20|32|44|56|110,
          wrn<depth>_<k> (e.g. wrn28_10), mlp (needs in_dim=, hidden=), deep_linear.
    norm: none|bn|in|ln|gn, or 'fixup' for the ResNets and WRNs (Fixup init, no norm layers).
    width: channel multiplier (smoke runs use e.g. 1/16); for wrn the width is k.
    kw: passed to the class (act, shortcut, gn_groups, n_fc, final_bn, mean/std, ...).
    Returns an nn.Module with forward(x) -> logits and features(x) -> penultimate g(x).
    """
    arch = str(arch).lower()
    fixup = norm == "fixup"
    wrn = re.fullmatch(r"wrn(\d+)_(\d+)", arch)
    if fixup and not (arch in RESNET_SPECS or wrn):
        raise ValueError(f"norm='fixup' applies to resnet*/wrn* only, not arch={arch!r}")
    if not fixup:
        check_choice("norm", norm, NORMS)
    if arch.startswith("vgg") and arch[3:].isdigit() and int(arch[3:]) in VGG_CFGS:
        return VGG(int(arch[3:]), norm, width, num_classes, in_channels, **kw)
    if arch in RESNET_SPECS:
        kind, blocks = RESNET_SPECS[arch]
        cifar_small = arch not in ("resnet18", "resnet34", "resnet50")
        if fixup and kw.get("shortcut", True) is False:
            raise ValueError("norm='fixup' needs shortcut=True (a zero-initialized branch without identity outputs 0)")
        if fixup:
            kw.pop("shortcut", None)
            block = FixupBottleneck if kind == "bottleneck" else FixupBasicBlock
        else:
            block = Bottleneck if kind == "bottleneck" else BasicBlock
        widths = (16, 32, 64) if cifar_small else (64, 128, 256, 512)
        return ResNet(block, blocks, widths, "none" if fixup else norm, width, num_classes, in_channels,
                      proj="pad" if cifar_small else "conv", fixup=fixup, **kw)
    if wrn:
        if width != 1.0:
            raise ValueError("wrn: set the width through the name (wrn28_10 has k=10), not width=")
        return WideResNet(int(wrn[1]), int(wrn[2]), "none" if fixup else norm, num_classes, in_channels, fixup=fixup, **kw)
    if arch == "mlp":
        if "in_dim" not in kw:
            raise ValueError("arch='mlp' needs in_dim= (number of input features)")
        if "hidden" not in kw and width != 1.0:
            kw["hidden"] = [_ch(256, width)] * 2
        return MLP(num_classes=num_classes, norm=norm, **kw)
    if arch == "deep_linear":
        return DeepLinear(num_classes=num_classes, norm=norm, **kw)
    raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")


# ================================================================================================
# 8. Attacks (P1 App. B.2; P2 Sec. 3 and App. A.2). All work on any input shape (B, ...)
# ================================================================================================

@contextlib.contextmanager
def eval_mode(model):
    """Run `model` in eval mode (BN uses running statistics, which stay untouched) and restore every
    submodule's train/eval flag afterwards, even if they were mixed."""
    flags = [m.training for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in zip(model.modules(), flags):
            m.training = flag


def _bview(t, like):
    # per-sample scalar (B,) -> (B, 1, 1, ...) broadcastable against `like`
    return t.view(-1, *([1] * (like.dim() - 1)))


def _l2(t):
    return t.flatten(1).norm(dim=1)


def _unit_l2(t):
    """t / ||t||_2 per sample; 0 where t is 0. Divides by the max-abs entry first: the float32
    squared norm of a gradient with entries ~1e-23 underflows to 0, which would blow up the step."""
    s = t.flatten(1).abs().amax(1).clamp_min(torch.finfo(t.dtype).tiny)
    t = t / _bview(s, t)
    return t / _bview(_l2(t).clamp_min(torch.finfo(t.dtype).tiny), t)


def cw_margin(logits, y):
    """z_y - max_{j != y} z_j per sample (the CW margin of P1 App. B.2). The runner-up is taken by
    masking z_y with -inf, not by multiplying with a one-hot mask: the latter returns 0 for the
    "other" max when every other logit is negative, a bug in several public libraries."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return z_y - z_other


def cw_loss(logits, y, kappa=50.0):
    """Carlini-Wagner margin loss as used by P1's "CW" attack (PGD with this loss, after Zhang &
    Wang 2019; kappa=50 as in their code, DECISIONS.md D4): -ReLU(z_y - max_{j!=y} z_j + kappa) per sample.
    Always <= 0; the attacker maximizes it, i.e. pushes the margin below -kappa."""
    return -F.relu(cw_margin(logits, y) + kappa)


def softmax_residual(logits, y):
    """dCE/dz = softmax(z) - onehot(y), with the y entry computed as -sum_{j!=y} p_j instead of
    p_y - 1: when the softmax saturates, p_y rounds to 1 in float32 and p_y - 1 cancels to 0 while
    the other p_j are still representable, which would silently corrupt the gradient direction."""
    mask = F.one_hot(y, logits.shape[1]).bool()
    p_other = logits.log_softmax(1).exp().masked_fill(mask, 0.0)
    return p_other - mask * p_other.sum(1, keepdim=True)


def ce_input_grad(model, x, y, create_graph=False):
    """Per-sample input gradient grad_x CE(f(x_i), y_i) of P1 Eq. 1 (sum reduction, so each sample
    gets its own gradient), as J^T (softmax - onehot) with `softmax_residual`. create_graph=True
    keeps it differentiable w.r.t. the parameters (double backprop for `ligs_penalty`). Uses the
    model in whatever mode it is in."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = model(x)
        g, = torch.autograd.grad(logits, x, grad_outputs=softmax_residual(logits, y), create_graph=create_graph)
    return g


def attack_objective(logits, y, loss="ce", kappa=50.0, targeted=False):
    """Per-sample objective that an attack *ascends* (P1 App. B.2, P2 Sec. 3). Untargeted: CE(z, y) or
    cw_loss(z, y). Targeted towards label y: -CE(z, y), or -ReLU(max_{j!=y} z_j - z_y + kappa)."""
    if loss == "ce":
        ce = F.cross_entropy(logits, y, reduction="none")
        return -ce if targeted else ce
    margin = cw_margin(logits, y)
    return -F.relu(kappa - margin) if targeted else -F.relu(margin + kappa)


def _check_xy(x, y):
    if x.dim() < 2 or y.dim() != 1 or len(x) != len(y):
        raise ValueError(f"expected x of shape (B, ...) and labels y of shape (B,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if not x.is_floating_point() or y.dtype != torch.long:
        raise ValueError(f"expected floating-point x and int64 labels y, got {x.dtype} and {y.dtype}")


def _check_attack_args(x, y, eps, steps, restarts, norm, loss, rand_init, step_size=None, kappa=50.0):
    check_choice("attack norm", norm, ATTACK_NORMS)
    check_choice("attack loss", loss, ATTACK_LOSSES)
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps={eps}: expected a finite number >= 0")
    if step_size is not None and not ((step_size > 0 or eps == step_size == 0) and math.isfinite(step_size)):
        raise ValueError(f"step_size={step_size}: expected a finite number > 0")  # a negative step is a defence
    if not kappa >= 0:
        raise ValueError(f"kappa={kappa}: expected a number >= 0")
    if steps < 1 or restarts < 1:
        raise ValueError(f"steps={steps}, restarts={restarts}: expected >= 1")
    if restarts > 1 and not rand_init:
        raise ValueError(f"restarts={restarts} without rand_init=True would repeat the same deterministic attack")
    _check_xy(x, y)


def _clip(x, clip):
    return x if clip is None else x.clamp(clip[0], clip[1])


def _random_start(x0, eps, norm, generator):
    if norm == "linf":  # uniform in the eps-box
        return (torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) * 2 - 1) * eps
    # uniform in the eps-ball: Gaussian direction, radius eps * U^(1/d)
    d = x0[0].numel()
    g = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    r = eps * torch.rand(len(x0), generator=generator, device=x0.device, dtype=x0.dtype) ** (1.0 / d)
    return _unit_l2(g) * _bview(r, g)


def _objective_grad(model, xa, y, loss, kappa, targeted):
    """Input gradient of the summed `attack_objective`. For CE it is J^T (softmax - onehot) with the
    cancellation-free `softmax_residual`: a confidently classified sample (p_y rounds to 1 in
    float32) still gets its true step direction, instead of a zero or wrong one that would stall the
    attack and overstate robustness."""
    if loss == "ce":
        g = ce_input_grad(model, xa, y)
        return -g if targeted else g
    xa = xa.detach().requires_grad_(True)
    g, = torch.autograd.grad(attack_objective(model(xa), y, loss, kappa, targeted).sum(), xa)
    return g


def pgd(model, x, y, eps, steps, step_size=None, norm="linf", loss="ce", kappa=50.0, targeted=False,
        rand_init=False, restarts=1, clip=(0.0, 1.0), generator=None, grad0=None):
    """Projected gradient ascent on `attack_objective` (Madry et al. 2018; P1 App. B.2, P2 Sec. 3).

    x, y: inputs (B, ...) and labels (B,) -- true labels, or target labels when targeted=True.
    eps: radius of the linf or l2 ball around x, in the units of x (see the module docstring).
    step_size: None means 2.5 * eps / steps (MadryLab rule, P1); P2 passes eps/10 explicitly.
    norm='linf': x <- clip(x0 + clamp(x + a*sign(g) - x0, -eps, eps)).
    norm='l2':   x <- x + a * g/||g|| (per sample; a zero gradient gives a zero step), then
                 delta = x - x0 is rescaled by min(1, eps/||delta||) per sample, then clipped.
    loss: 'ce' or 'cw' (margin loss with kappa, P1's "CW" attack).
    rand_init: uniform start in the eps-box (linf) or eps-ball (l2), drawn from `generator` (a
               torch.Generator on x's device; None uses the global RNG).
    restarts: per sample, keep the worst case over restarts (a successful attack beats an
              unsuccessful one; ties go to the larger objective). Needs rand_init=True.
    clip: (lo, hi) box for the adversarial input, or None for no box (P2 MNIST).
    grad0: the CE input gradient at x in eval mode, if the caller already has it (`epoch_metrics`
           shares one clean gradient between LIGS and PGD); used for the first step of an
           untargeted CE attack without random start. The result is bit-identical to recomputing it.

    Runs the model in eval mode (restored afterwards), touches no parameter .grad and no BN
    statistics, works under torch.no_grad(), and never modifies `x`. Returns a detached tensor.
    The CE gradient is computed without softmax cancellation (see `_objective_grad`), so attacks on
    confidently classified float32 samples do not stall.
    """
    _check_attack_args(x, y, eps, steps, restarts, norm, loss, rand_init, step_size, kappa)
    step_size = 2.5 * eps / steps if step_size is None else step_size
    x0 = x.detach()
    tiny = torch.finfo(x0.dtype).tiny
    best_x, best_obj, best_succ = x0.clone(), None, None
    with eval_mode(model), torch.enable_grad():
        for _ in range(restarts):
            delta = _random_start(x0, eps, norm, generator) if rand_init else torch.zeros_like(x0)
            xa = _clip(x0 + delta, clip)
            for k in range(steps):
                if k == 0 and grad0 is not None and loss == "ce" and not targeted and not rand_init and torch.equal(xa, x0):
                    g = grad0
                else:
                    g = _objective_grad(model, xa, y, loss, kappa, targeted)  # w.r.t. the input only
                with torch.no_grad():
                    if norm == "linf":
                        delta = (xa + step_size * g.sign() - x0).clamp(-eps, eps)
                    else:
                        delta = xa + step_size * _unit_l2(g) - x0
                        delta = delta * _bview((eps / _l2(delta).clamp_min(tiny)).clamp(max=1.0), delta)
                    xa = _clip(x0 + delta, clip)
            if restarts == 1:
                return xa.detach()
            with torch.no_grad():
                logits = model(xa)
                obj = attack_objective(logits, y, loss, kappa, targeted)
                succ = (logits.argmax(1) == y) if targeted else (logits.argmax(1) != y)
                if best_obj is None:
                    better = torch.ones_like(succ)
                else:
                    better = (succ & ~best_succ) | ((succ == best_succ) & (obj > best_obj))
                best_x = torch.where(_bview(better, xa), xa, best_x)
                best_obj = obj if best_obj is None else torch.where(better, obj, best_obj)
                best_succ = succ if best_succ is None else torch.where(better, succ, best_succ)
    return best_x.detach()


def fgsm(model, x, y, eps, clip=(0.0, 1.0)):
    """Fast gradient sign method (Goodfellow et al. 2015; P1 App. G, Table 8):
    x' = clip(x + eps * sign(grad_x CE)). Identical to one linf PGD step of size eps."""
    return pgd(model, x, y, eps, steps=1, step_size=eps, norm="linf", clip=clip)


def bim(model, x, y, eps, steps, step_size, clip=(0.0, 1.0)):
    """Basic iterative method (Kurakin et al. 2017; P2 Sec. 4, App. A.2): `steps` sign steps of
    `step_size`, each projected onto the linf eps-box and clipped; no random start."""
    return pgd(model, x, y, eps, steps=steps, step_size=step_size, norm="linf", clip=clip)


@torch.no_grad()
def invert_features(model, x_target, x_start, steps, step_size, clip=(0.0, 1.0)):
    """Representation inversion (Ilyas et al. 2019, Alg. 1; P1 App. B.3 and E): starting at x_start,
    minimise ||g(x_r) - g(x_target)||_2 over x_r, g = model.features (the penultimate representation),
    with `steps` steps of l2 length `step_size` along the per-sample normalised negative gradient (the
    robustness library's L2Step), x_r clamped to `clip` after every step, and no bound on ||x_r -
    x_start|| (P1 App. B.3: 1000 steps of 0.1). Descends the squared distance, whose direction is the
    distance's but which has a zero gradient, not NaN, once the features match. Eval mode; x_target,
    x_start, the train/eval flags, BN statistics and parameter grads are untouched; every sample is
    independent (alone = inside a batch). Each step costs one forward and one input-gradient backward.
    Returns a detached tensor."""
    if x_target.shape != x_start.shape or not x_start.is_floating_point():
        raise ValueError(f"invert_features: x_target {tuple(x_target.shape)} and x_start {tuple(x_start.shape)} must be "
                         "floating-point tensors of one shape")
    if steps < 0 or not step_size > 0:
        raise ValueError(f"invert_features: steps={steps}, step_size={step_size}: expected steps >= 0, step_size > 0")
    with eval_mode(model), torch.enable_grad():
        with torch.no_grad():
            target = model.features(x_target.detach())
        xr = _clip(x_start.detach(), clip).clone()
        for _ in range(steps):
            xr.requires_grad_(True)
            g, = torch.autograd.grad((model.features(xr) - target).pow(2).sum(), xr)  # sum: each sample its own
            with torch.no_grad():
                xr = _clip(xr - step_size * _unit_l2(g), clip)
    return xr.detach()


def other_label_indices(y, y_pool, generator):
    """For each label in y, the index of an element of y_pool with another label, uniformly (the random
    start images of representation inversion, P1 App. B.3); redrawn until every label differs."""
    j = torch.randint(0, len(y_pool), (len(y),), generator=generator)
    while (same := y_pool[j] == y).any():
        j[same] = torch.randint(0, len(y_pool), (int(same.sum()),), generator=generator)
    return j


def feature_distance(model, a, b, batch_size=500):
    """Per-sample ||g(a) - g(b)||_2 of the penultimate representation g = model.features, in eval mode."""
    out = []
    with torch.no_grad(), eval_mode(model):
        for xa, xb in zip(a.split(batch_size), b.split(batch_size)):
            out.append(_l2(model.features(xa) - model.features(xb)))
    return torch.cat(out)


def accuracy(model, x, y, batch_size=1000):
    """Top-1 accuracy (fraction in [0, 1]) of `model` in eval mode on tensors x, y (P1 "usefulness",
    P1 Sec. 3.1; robust accuracy when x is adversarial)."""
    with torch.no_grad(), eval_mode(model):
        correct = sum((model(xb).argmax(1) == yb).sum() for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    return float(correct) / len(y)


# ================================================================================================
# 9. LIGS: Local Input Gradient Similarity (P1 Sec. 3.1 Eq. 1, App. B.4)
# ================================================================================================

def _cosine(g0, g1):
    """Per-sample cosine of flattened gradients, in float64 with explicit norms; NaN where either
    gradient is zero or non-finite (no clamping of tiny norms, which would bias it towards 0)."""
    a, b = g0.flatten(1).double(), g1.flatten(1).double()
    na, nb = a.norm(dim=1), b.norm(dim=1)
    ok = (na > 0) & (nb > 0) & torch.isfinite(na) & torch.isfinite(nb)
    cos = (a * b).sum(1) / (na * nb)
    return torch.where(ok, cos.clamp(-1.0, 1.0), torch.full_like(cos, float("nan")))


def ligs_per_sample(model, x, y, perturbation="gaussian", sigma=0.01, clip=None, draws=1, generator=None,
                    pgd_steps=7, batch_size=250, g0=None):
    """Per-sample LIGS cos(grad_x l(x, y), grad_x l(x + nu, y)), shape (draws, B), NaN where skipped.

    perturbation (P1 App. B.4, all with sigma = eps = 0.01 in [0,1] pixel units):
      gaussian: nu ~ N(0, sigma^2 I) (P1's default);  uniform: nu ~ U[-sigma, sigma];
      fgsm: nu = sigma * sign(grad_x CE);  pgd: linf PGD with eps=sigma, `pgd_steps` steps of
      2.5*sigma/steps, no random start; nu = x_adv - x.
    clip: box for x + nu, default None: the authors' code neither clips nor projects
      (DECISIONS.md D12).
    Runs in eval mode (in train mode BN couples the samples' gradients). Noise for all of x is drawn
    up front from `generator` (on x's device), so the value does not depend on batch_size.
    g0: the clean CE input gradients of all of x in eval mode, if the caller already has them.
    """
    check_choice("perturbation", perturbation, PERTURBATIONS)
    _check_xy(x, y)
    if not sigma > 0 or draws < 1:
        raise ValueError(f"sigma={sigma}, draws={draws}: expected sigma > 0 and draws >= 1")
    out = torch.empty(draws, len(x), dtype=torch.float64)
    with eval_mode(model):
        for k in range(draws):
            if perturbation == "gaussian":
                noise = sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            elif perturbation == "uniform":
                noise = sigma * (2 * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 1)
            for i in range(0, len(x), batch_size):
                xb, yb = x[i:i + batch_size].detach(), y[i:i + batch_size]
                gb = ce_input_grad(model, xb, yb) if g0 is None else g0[i:i + batch_size]
                if perturbation in ("gaussian", "uniform"):
                    nu = noise[i:i + batch_size]
                elif perturbation == "fgsm":
                    nu = sigma * gb.sign()
                else:
                    nu = pgd(model, xb, yb, sigma, pgd_steps, norm="linf", clip=clip, grad0=gb) - xb
                g1 = ce_input_grad(model, _clip(xb + nu, clip), yb)
                out[k, i:i + batch_size] = _cosine(gb, g1).cpu()
    return out


def ligs(model, x, y, perturbation="gaussian", sigma=0.01, clip=None, draws=1, generator=None, pgd_steps=7,
         batch_size=250, g0=None):
    """LIGS (P1 Eq. 1): mean over samples (and draws) of the cosine similarity between the
    cross-entropy input gradients at x and at x + nu. Returns (ligs, n_skipped): samples whose
    gradient is exactly zero or non-finite (saturated softmax) are left out of the mean and counted,
    as the authors drop NaN cosines. Arguments as in `ligs_per_sample`."""
    cos = ligs_per_sample(model, x, y, perturbation, sigma, clip, draws, generator, pgd_steps, batch_size, g0)
    ok = torch.isfinite(cos)
    value = float(cos[ok].mean()) if ok.any() else float("nan")
    return value, int((~ok).sum())


def ligs_penalty(model, x, y, sigma=0.01, generator=None):
    """Differentiable LIGS regularizer for P1 Fig 5 (DECISIONS.md D13): returns
    (penalty, logits) with penalty = mean_i (1 - cos(grad_x l(x_i), grad_x l(x_i + nu_i))),
    nu ~ N(0, sigma^2), through double backprop (create_graph=True). Train with
    CE(logits, y) + lam * penalty; `logits` are the clean forward pass, so no extra forward is needed.

    It uses the model in its current mode: during training BN uses batch statistics, which couple
    the samples' gradients (unlike the eval-mode metric), and both forward passes update BN
    running statistics. Samples with a zero gradient are left out of the mean."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    g0, = torch.autograd.grad(logits, x, grad_outputs=softmax_residual(logits, y), create_graph=True)
    nu = sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    g1 = ce_input_grad(model, x + nu, y, create_graph=True)
    a, b = g0.flatten(1), g1.flatten(1)
    sa, sb = a.detach().abs().amax(1), b.detach().abs().amax(1)
    ok = (sa > 0) & (sb > 0) & torch.isfinite(sa) & torch.isfinite(sb)
    # Index before the norm (its gradient at 0 is undefined) and divide by the max-abs entry: the
    # cosine is scale-free, and float32 squared norms of gradients ~1e-23 would underflow to 0.
    a, b = a[ok] / sa[ok, None], b[ok] / sb[ok, None]
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    penalty = (1 - cos).mean() if len(cos) else logits.sum() * 0.0
    return penalty, logits


# ================================================================================================
# 10. Data: real on-disk formats, download with checksum, bundled digits, synthetic images (DECISIONS.md D23)
# ================================================================================================

class DataError(ValueError):
    """A dataset is missing, corrupt or mis-specified. The message is one line a user can act on."""


# Per-channel statistics for the in-model `Standardize` layer (P1) or for standardizing outside (P2).
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "mnist": ((0.1307,), (0.3081,)),
}
# name -> (folder under --data-root, [(file, url, md5)] to fetch, files that must exist to read it)
_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_MNIST_FILES = [("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
                ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
                ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
                ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c")]
SOURCES = {
    "cifar10": ("", [("cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                      "c58f30108f718f92721af3b95e74349a")],
                [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)] + ["cifar-10-batches-py/test_batch"]),
    "svhn": ("svhn", [("train_32x32.mat", "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
                       "e26dedcc434d2e4c54c9b2d4a06d8373"),
                      ("test_32x32.mat", "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
                       "eb5a983be6a315427106f1b164d9cef3")],
             ["train_32x32.mat", "test_32x32.mat"]),
    "mnist": ("mnist", [(f, _MNIST_URL + f, md5) for f, md5 in _MNIST_FILES],
              [f[:-3] for f, _ in _MNIST_FILES]),  # raw or .gz both accepted
}
DIGITS_FILE = pathlib.Path(__file__).resolve().parent / "data" / "digits.npz"


def download(url, dest, md5, timeout=60.0, chunk=1 << 20):
    """Fetch `url` to `dest`, checking the byte count announced by the server and the md5.
    Streams into `dest.part` and renames only after both checks pass, so an interrupted or corrupt
    transfer leaves nothing at `dest`."""
    dest = pathlib.Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    h, n = hashlib.md5(), 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as f:
            expected = resp.headers.get("Content-Length")
            while True:
                block = resp.read(chunk)
                if not block:
                    break
                f.write(block)
                h.update(block)
                n += len(block)
        if expected is not None and n != int(expected):
            raise DataError(f"download of {url} was interrupted ({n} of {expected} bytes); run again")
        if h.hexdigest() != md5:
            raise DataError(f"download of {url} failed its checksum (md5 {h.hexdigest()}, expected {md5}); nothing was kept")
        os.replace(part, dest)
    except (OSError, http.client.HTTPException) as e:
        raise DataError(f"download of {url} failed: {e.__class__.__name__}: {e}") from None
    finally:
        part.unlink(missing_ok=True)
    return dest


def extract_tar(path, dest):
    """Unpack a tar archive into `dest` safely: members that would land outside `dest` (absolute paths,
    '..', links pointing out) are refused by tarfile's 'data' filter; everything is unpacked into a
    temporary folder first and moved into place only when the whole archive has been read, so a failure
    leaves nothing half-extracted behind."""
    dest = pathlib.Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=dest, prefix=".extract-"))
    try:
        with tarfile.open(path) as tar:
            tar.extractall(tmp, filter="data")
        for child in tmp.iterdir():
            target = dest / child.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(child, target)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"could not unpack {path}: {e.__class__.__name__}: {e}; nothing was extracted") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch(name, root):
    """--download: fetch `name` into `root` (md5-checked) and unpack it into the standard layout."""
    folder, files, _ = SOURCES[name]
    base = pathlib.Path(root) / folder
    for fname, url, md5 in files:
        path = download(url, base / fname, md5)
        if fname.endswith((".tar", ".tar.gz")):  # CIFAR-10, CIFAR-10-C
            extract_tar(path, base)


def _require(name, root, download_ok):
    folder, _, needed = SOURCES[name]
    base = pathlib.Path(root) / folder
    missing = [p for p in needed if not (base / p).exists() and not (base / (p + ".gz")).exists()]
    if missing and download_ok:
        fetch(name, root)
    elif missing:
        raise DataError(f"{name} not found: expected {base / missing[0]} (under --data-root {root}); "
                        f"pass --download to fetch it (md5-checked) or use --preset quick (bundled digits)")
    return base


def read_cifar10(root, download_ok=False):
    """CIFAR-10 python pickle batches (cifar-10-batches-py/data_batch_1..5, test_batch) ->
    dict of uint8 images (N, 3, 32, 32) and int64 labels."""
    base = _require("cifar10", root, download_ok) / "cifar-10-batches-py"

    def load(fname):
        try:
            with open(base / fname, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(d[b"labels"], dtype=np.int64)
        except Exception as e:  # truncated pickle, wrong keys, wrong sizes: all one clear line
            raise DataError(f"corrupt CIFAR-10 batch {base / fname}: {e.__class__.__name__}: {e}") from None
        if len(x) != len(y) or (y < 0).any() or (y > 9).any():
            raise DataError(f"corrupt CIFAR-10 batch {base / fname}: {len(x)} images, {len(y)} labels")
        return x, y

    train = [load(f"data_batch_{i}") for i in range(1, 6)]
    x_te, y_te = load("test_batch")
    return dict(x_train=np.concatenate([t[0] for t in train]), y_train=np.concatenate([t[1] for t in train]),
                x_test=x_te, y_test=y_te)


def read_svhn(root, download_ok=False):
    """SVHN cropped digits (svhn/{train,test}_32x32.mat, MATLAB v5: X (32, 32, 3, N), y in 1..10 with
    10 meaning digit 0) -> uint8 images (N, 3, 32, 32), labels 0..9. Needs scipy (optional dependency)."""
    base = _require("svhn", root, download_ok)
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError("reading SVHN .mat files needs scipy: pip install scipy") from None
    out = {}
    for split in ("train", "test"):
        try:
            m = loadmat(base / f"{split}_32x32.mat")
            x = np.ascontiguousarray(np.asarray(m["X"], dtype=np.uint8).transpose(3, 2, 0, 1))
            y = np.asarray(m["y"], dtype=np.int64).reshape(-1) % 10
        except Exception as e:
            raise DataError(f"corrupt SVHN file {base / f'{split}_32x32.mat'}: {e.__class__.__name__}: {e}") from None
        if x.shape[1:] != (3, 32, 32) or len(x) != len(y):
            raise DataError(f"corrupt SVHN file {base / f'{split}_32x32.mat'}: X {x.shape}, y {y.shape}")
        out[f"x_{split}"], out[f"y_{split}"] = x, y
    return out


def _read_idx(path, magic_expected):
    """One IDX file (raw or .gz): magic 0x00000803 for uint8 images (N, H, W), 0x00000801 for labels.
    A file of the other kind (images and labels swapped) is a DataError."""
    path = pathlib.Path(path)
    if not path.exists():
        path = path.with_name(path.name + ".gz")
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
        magic, n = struct.unpack(">II", raw[:8])
        if magic == 0x803:
            h, w = struct.unpack(">II", raw[8:16])
            arr, shape = np.frombuffer(raw, np.uint8, offset=16), (n, h, w)
        elif magic == 0x801:
            arr, shape = np.frombuffer(raw, np.uint8, offset=8), (n,)
        else:
            raise ValueError(f"bad magic number {magic:#x}")
        if magic != magic_expected:
            raise ValueError(f"holds {'images' if magic == 0x803 else 'labels'} where "
                             f"{'images' if magic_expected == 0x803 else 'labels'} were expected (files swapped?)")
        return arr.reshape(shape).copy()  # raises on truncation; a writable copy (torch warns on read-only arrays)
    except Exception as e:
        raise DataError(f"corrupt MNIST file {path}: {e.__class__.__name__}: {e}") from None


def read_mnist(root, download_ok=False):
    """MNIST IDX files (mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte, raw or .gz) ->
    uint8 images (N, 1, 28, 28), int64 labels."""
    base = _require("mnist", root, download_ok)
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = _read_idx(base / f"{prefix}-images-idx3-ubyte", 0x803)
        y = _read_idx(base / f"{prefix}-labels-idx1-ubyte", 0x801).astype(np.int64)
        if len(x) != len(y):
            raise DataError(f"corrupt MNIST {split} split under {base}: {len(x)} images, {len(y)} labels")
        if len(y) and not (y.min() >= 0 and y.max() <= 9):
            raise DataError(f"corrupt MNIST {split} labels under {base}: values {y.min()}..{y.max()}, expected 0..9")
        out[f"x_{split}"], out[f"y_{split}"] = x[:, None], y
    return out


def read_cifar101(root):
    """CIFAR-10.1 v6 (Recht et al.; P2 Tables 2, 9), local files only: root/cifar10.1/
    cifar10.1_v6_data.npy (N, 32, 32, 3) uint8 and cifar10.1_v6_labels.npy -> uint8 (N, 3, 32, 32),
    int64 labels."""
    base = pathlib.Path(root) / "cifar10.1"
    paths = [base / "cifar10.1_v6_data.npy", base / "cifar10.1_v6_labels.npy"]
    if not all(p.exists() for p in paths):
        raise DataError(f"CIFAR-10.1 not found: expected {paths[0]} and {paths[1].name} (CIFAR-10.1 columns are skipped)")
    try:
        x, y = np.load(paths[0]), np.load(paths[1]).astype(np.int64)
        if x.dtype != np.uint8 or x.shape[1:] != (32, 32, 3) or len(x) != len(y):
            raise ValueError(f"data {x.dtype} {x.shape}, labels {y.shape}")
    except Exception as e:
        raise DataError(f"corrupt CIFAR-10.1 files in {base}: {e.__class__.__name__}: {e}") from None
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y


ILYAS_SETS = {"d_r": "robust_CIFAR", "d_nr": "non_robust_CIFAR", "d_rand": "drand_CIFAR", "d_det": "ddet_CIFAR"}


def read_ilyas_dataset(root, kind):
    """One of Ilyas et al. 2019's released CIFAR-10 feature datasets (datasets.tar from
    andrewilyas.com/datasets.tar, extracted under `root`): root/release_datasets/<robust|non_robust|
    drand|ddet>_CIFAR/ holds torch-saved lists of tensors CIFAR_ims (float, N x 3 x 32 x 32 in [0, 1])
    and CIFAR_lab (class indices), concatenated on dim 0. `kind` is one of ILYAS_SETS (d_r, d_nr,
    d_rand, d_det). Returns (x float32, y int64); a missing or malformed file is one DataError line."""
    check_choice("released dataset", kind, list(ILYAS_SETS))
    folder = pathlib.Path(root) / "release_datasets" / ILYAS_SETS[kind]
    parts = []
    for name in ("CIFAR_ims", "CIFAR_lab"):
        path = folder / name
        if not path.exists():
            raise DataError(f"{path} not found: download andrewilyas.com/datasets.tar and extract it under {root}")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise DataError(f"{path}: not a torch-saved list of tensors ({e.__class__.__name__})") from None
        obj = [obj] if isinstance(obj, torch.Tensor) else obj
        if not isinstance(obj, (list, tuple)) or not obj or not all(isinstance(t, torch.Tensor) for t in obj):
            raise DataError(f"{path}: expected a list of tensors, got {type(obj).__name__}")
        try:
            parts.append(torch.cat(list(obj)))
        except RuntimeError:
            raise DataError(f"{path}: its tensors have different shapes") from None
    x, y = parts
    if x.dim() != 4 or tuple(x.shape[1:]) != (3, 32, 32) or not x.is_floating_point():
        raise DataError(f"{folder / 'CIFAR_ims'}: expected float images N x 3 x 32 x 32, got {x.dtype} {tuple(x.shape)}")
    if y.dim() != 1 or len(y) != len(x) or y.is_floating_point() or (y < 0).any() or (y > 9).any():
        raise DataError(f"{folder / 'CIFAR_lab'}: expected {len(x)} labels in 0..9, got {y.dtype} {tuple(y.shape)}")
    if x.amin() < 0 or x.amax() > 1:
        raise DataError(f"{folder / 'CIFAR_ims'}: pixel values outside [0, 1] ({float(x.amin()):.3g}..{float(x.amax()):.3g})")
    return x.float(), y.long()


def imagenet_folder(root, split="val", size=224):
    """ImageNet in the standard folder layout (root/{train,val}/<wnid>/*.JPEG) as a torchvision
    ImageFolder with [0,1] tensors (resize 256, centre crop). The only place torchvision is needed,
    so it is imported here, lazily (it cannot be imported with the CPU torch on our machines)."""
    path = pathlib.Path(root) / split
    if not path.is_dir():
        raise DataError(f"ImageNet not found: expected class folders under {path}")
    try:
        import torchvision
    except Exception as e:
        raise DataError(f"ImageNet needs torchvision, which failed to import: {e.__class__.__name__}") from None
    t = torchvision.transforms
    tf = t.Compose([t.Resize(256 * size // 224), t.CenterCrop(size), t.ToTensor()])
    return torchvision.datasets.ImageFolder(str(path), transform=tf)


def resize_images(x, size, mode="nearest"):
    """Upscale (B, C, H, W) images to size x size. 'nearest' with an integer factor k replicates every
    pixel k*k times (P2 Sec. 4 upscales MNIST with PIL NEAREST); 'bilinear' interpolates."""
    check_choice("upscale mode", mode, ("nearest", "bilinear"))
    if x.shape[-1] == size:
        return x
    if mode == "nearest" and size % x.shape[-1] == 0:
        k = size // x.shape[-1]
        return x.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)
    return F.interpolate(x, size=(size, size), mode=mode, **({} if mode == "nearest" else {"align_corners": False}))


def load_digits(size=8, channels=1, upscale="nearest", n_test=297, split_seed=0, root=None):
    """The UCI digits (ROOT/digits.npz if present, else the bundled data/digits.npz; 1797 8x8 images)
    in [0,1] (pixel/16), upscaled to size x size and repeated to `channels`. Fixed split: a permutation
    seeded with split_seed gives 1500 train / 297 test (DECISIONS.md D23), the same for every run.
    A truncated file, missing keys or out-of-range values are one DataError."""
    path = pathlib.Path(root) / "digits.npz" if root is not None else DIGITS_FILE
    path = path if path.exists() else DIGITS_FILE
    if not path.exists():
        raise DataError(f"digits not found at {path} (copy data/digits.npz along with common.py)")
    try:
        with np.load(path) as d:
            images, labels = d["images"], d["labels"]
    except Exception as e:
        raise DataError(f"corrupt digits file {path}: {e.__class__.__name__}: {e}") from None
    if images.ndim != 3 or labels.shape != images.shape[:1] or len(labels) <= n_test or not (
            labels.min() >= 0 and labels.max() <= 9 and images.min() >= 0 and images.max() <= 16):
        raise DataError(f"corrupt digits file {path}: images {images.shape} in 0..16 and labels (N,) in 0..9 expected, "
                        f"more than {n_test} of them")
    x = torch.from_numpy(images.astype(np.float32) / 16.0)[:, None]
    y = torch.from_numpy(labels.astype(np.int64))
    x = resize_images(x, size, upscale).repeat(1, channels, 1, 1)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed))
    te, tr = perm[:n_test], perm[n_test:]
    return dict(x_train=x[tr], y_train=y[tr], x_test=x[te], y_test=y[te])


def make_synthetic_images(n, classes=10, size=16, channels=3, seed=0, template_seed=1234):
    """Learnable synthetic images for smoke tests: per class a smooth low-frequency template
    (amplitude ~0.3, a "robust feature") plus a class-specific high-frequency +-0.03 pattern (a
    "non-robust feature"), plus N(0, 0.1^2) pixel noise, clipped to [0,1]. Templates depend only on
    template_seed, so train and test sets built with different `seed`s share them."""
    gt = torch.Generator().manual_seed(template_seed)
    coords = torch.linspace(0, math.pi, size)
    basis = torch.stack([torch.outer(torch.cos(a * coords), torch.cos(b * coords)) for a in range(3) for b in range(3)])
    coef = torch.randn(classes, channels, len(basis), generator=gt)
    smooth = torch.einsum("kcb,bhw->kchw", coef, basis)
    smooth = 0.3 * smooth / smooth.flatten(1).abs().amax(1).view(-1, 1, 1, 1)
    checker = (torch.arange(size)[:, None] + torch.arange(size)[None, :]) % 2 * 2 - 1.0
    hf = 0.03 * torch.sign(torch.randn(classes, channels, size, size, generator=gt)) * checker
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=g)
    x = 0.5 + smooth[y] + hf[y] + 0.1 * torch.randn(n, channels, size, size, generator=g)
    return x.clamp(0, 1), y


def make_spheres(n_per_class, dim=2, radii=(1.0, 1.3), generator=None):
    """Adversarial spheres (Gilmer et al. 2018; P2 App. C, Figs 1, 7, 8): z ~ N(0, I_d), x = R z/||z||,
    class 0 on the inner sphere (R = radii[0] = 1), class 1 on the outer (R = 1.3). Returns (x, y)."""
    z = torch.randn(2 * n_per_class, dim, generator=generator)
    r = torch.tensor([radii[0]] * n_per_class + [radii[1]] * n_per_class)
    x = z / z.norm(dim=1, keepdim=True) * r[:, None]
    return x, torch.arange(2).repeat_interleave(n_per_class)


class Data:
    """A dataset resident as tensors on one device: x_* float in [0,1] (N, C, H, W), y_* int64.
    `mean`/`std` are the per-channel statistics for standardization (inside the model for P1, or
    outside it with a `Standardize` layer as input_fn for P2)."""

    def __init__(self, name, x_train, y_train, x_test, y_test, mean, std, num_classes=10):
        self.name, self.num_classes = name, num_classes
        self.x_train, self.y_train, self.x_test, self.y_test = x_train, y_train, x_test, y_test
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    @property
    def shape(self):
        return tuple(self.x_train.shape[1:])


DATASETS = ("cifar10", "svhn", "mnist", "digits", "synthetic")


def build_dataset(name, root="data", device="cpu", download=False, size=None, channels=None, upscale="nearest",
                  n_train=None, n_test=None, seed=0):
    """Load `name` into memory on `device` as a `Data`.
    cifar10 | svhn | mnist: the real files under `root` (see SOURCES), fetched when download=True.
    digits: the bundled UCI digits (size default 8, channels default 1).
    synthetic: make_synthetic_images (size default 16, channels default 3; n_train/n_test default 1000/200).
    size/channels resize and repeat channels; n_train/n_test take the first samples (after the fixed
    split), for smoke runs."""
    check_choice("dataset", name, DATASETS)
    if name == "digits":
        d = load_digits(size or 8, channels or 1, upscale, root=root)
    elif name == "synthetic":
        s, c = size or 16, channels or 3
        xtr, ytr = make_synthetic_images(n_train or 1000, size=s, channels=c, seed=seed)
        xte, yte = make_synthetic_images(n_test or 200, size=s, channels=c, seed=seed + 1)
        d = dict(x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    else:
        raw = {"cifar10": read_cifar10, "svhn": read_svhn, "mnist": read_mnist}[name](root, download)
        d = {k: torch.from_numpy(v) for k, v in raw.items()}
        for split in ("train", "test"):
            x = d[f"x_{split}"].float() / 255.0
            if size:
                x = resize_images(x, size, upscale)
            if channels and channels != x.shape[1]:
                x = x.repeat(1, channels // x.shape[1], 1, 1) if x.shape[1] == 1 else x.mean(1, keepdim=True)
            d[f"x_{split}"] = x
    d["x_train"], d["y_train"] = d["x_train"][:n_train], d["y_train"][:n_train]
    d["x_test"], d["y_test"] = d["x_test"][:n_test], d["y_test"][:n_test]
    if name in STATS and d["x_train"].shape[1] == len(STATS[name][0]):
        mean, std = STATS[name]
    else:  # computed from the training split (digits, synthetic, or channels changed)
        mean = d["x_train"].mean((0, 2, 3)).tolist()
        std = d["x_train"].std((0, 2, 3)).clamp_min(1e-3).tolist()
    return Data(name, *(d[k].to(device) for k in ("x_train", "y_train", "x_test", "y_test")), mean, std)


def class_balanced_subset(y, per_class, seed=0):
    """Indices of a fixed class-balanced subset: the first `per_class` of each class in a seeded
    permutation (P1 App. B.2: 1000 test samples, 100 per class, for robust accuracy and LIGS)."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).to(y.device)
    idx = [perm[y[perm] == c][:per_class] for c in torch.unique(y).tolist()]
    return torch.cat(idx).sort().values


def augment_crop_flip(x, generator, pad=4, flip=True):
    """Random crop with zero padding `pad` plus horizontal flip (standard CIFAR augmentation,
    1.5), for a whole batch at once on x's device. Random numbers come from a CPU `generator`, so the
    stream is the same on every device."""
    B, C, H, W = x.shape
    off = torch.randint(0, 2 * pad + 1, (2, B), generator=generator).to(x.device)
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = (off[0][:, None] + torch.arange(H, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (off[1][:, None] + torch.arange(W, device=x.device))[:, None, :]  # (B, 1, W)
    out = xp.permute(0, 2, 3, 1)[torch.arange(B, device=x.device)[:, None, None], rows, cols].permute(0, 3, 1, 2)
    if flip:
        mask = (torch.rand(B, generator=generator) < 0.5).to(x.device)
        out = torch.where(mask[:, None, None, None], out.flip(3), out)
    return out.contiguous()


# ================================================================================================
# 11. Training and evaluation (P1 App. B.1, P2 Sec. 3)
# ================================================================================================

def pick_device(name="auto"):
    """--device auto|cpu|cuda -> torch.device; 'cuda' without a GPU is one clear error. Under torchrun
    each rank takes the GPU of its LOCAL_RANK."""
    check_choice("--device", name, ("auto", "cpu", "cuda"))
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if is_distributed() else torch.device("cuda")
    return torch.device("cpu")


# --- data-parallel training under torchrun (DistributedDataParallel; NCCL on GPUs, gloo on CPU) ---

def is_distributed():
    """True inside a torchrun job with more than one rank (after `init_distributed`)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def is_main_process():
    """Rank 0, or not distributed: the one process that writes files and prints."""
    return not is_distributed() or torch.distributed.get_rank() == 0


def init_distributed():
    """Join the torchrun job named by the environment (WORLD_SIZE > 1): NCCL when the ranks have GPUs,
    gloo on CPU. Does nothing in a plain process. Called by `run_script`, so every exp_*.py runs under
    `torchrun --nproc_per_node G`; `train_model` then trains data-parallel."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.distributed.is_initialized():
        gpu = torch.cuda.is_available()
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group("nccl" if gpu else "gloo")


def finish_distributed():
    """Leave the torchrun job cleanly (every rank waits for rank 0's writes); nothing in a plain process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiable: the gradient of a sum over ranks is the sum over ranks of the gradients."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        torch.distributed.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad


class _SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics are those of the global batch (all ranks), P1/P2's
    batch-128 BN under data parallelism. Same semantics as torch.nn.SyncBatchNorm, which is GPU-only; this
    one is written with differentiable all-reduces so it also runs (and is tested) on CPU with gloo.
    Installed over a model's BatchNorm modules by `sync_batchnorm` (same parameters and buffers)."""

    def _check_input_dim(self, x):  # (the swapped-in module keeps BatchNorm1d/2d's own input rules)
        pass

    def forward(self, x):
        if not self.training:  # evaluation inside training (per-epoch measurements, attacks): the running statistics
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        n = all_reduce(torch.tensor(float(x.numel() // x.shape[1]), device=x.device))
        mean = all_reduce(x.sum(dims)) / n
        var = all_reduce(((x - mean.view(shape)) ** 2).sum(dims)) / n  # two passes, as a single-process BN
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1))  # unbiased, as nn.BatchNorm
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


@contextlib.contextmanager
def sync_batchnorm(model):
    """Within the block every BatchNorm1d/2d of `model` normalizes over the global batch of all ranks
    (`_SyncBatchNorm`); the modules keep their parameters, buffers and state_dict names, and get their
    own class back afterwards (evaluation is unchanged: eval-mode BN uses the running statistics)."""
    bns = [(m, m.__class__) for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    try:
        for m, _ in bns:
            m.__class__ = _SyncBatchNorm
        yield model
    finally:
        for m, cls in bns:
            m.__class__ = cls


def make_optimizer(name, params, lr, momentum=0.9, weight_decay=0.0):
    """sgd (momentum, default 0.9) | adam | adagrad, with L2 weight decay added to the gradient."""
    check_choice("optimizer", name, ("sgd", "adam", "adagrad"))
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.Adagrad(params, lr=lr, weight_decay=weight_decay)


def lr_at(epoch, base_lr, milestones=(), gamma=0.1, warmup_epochs=0.0):
    """Learning rate at fractional `epoch`: linear warm-up from 0 over `warmup_epochs`, then base_lr
    times gamma for every milestone passed (step schedule, applied per iteration as in the P1
    authors' code)."""
    lr = base_lr * gamma ** sum(epoch >= m for m in milestones)
    return lr * min(1.0, epoch / warmup_epochs) if warmup_epochs > 0 else lr


def run_attack(model, x, y, spec, generator=None):
    """Apply one evaluation spec to a batch. spec['kind']: clean | noise (x + sigma*N(0, I), clipped
    to spec['clip'] if given) | fgsm | bim | pgd (all other keys are passed on: eps, steps,
    step_size, norm, loss, kappa, targeted, rand_init, clip)."""
    kind = spec["kind"]
    kw = {k: v for k, v in spec.items() if k not in ("kind", "name", "sigma")}
    if kind == "clean":
        return x
    if kind == "noise":
        return _clip(x + spec["sigma"] * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype),
                     spec.get("clip"))
    if kind == "fgsm":
        return fgsm(model, x, y, **kw)
    if kind == "bim":
        return bim(model, x, y, **kw)
    if kind == "pgd":
        return pgd(model, x, y, generator=generator, **kw)
    raise ValueError(f"attack kind={kind!r} is not one of clean, noise, fgsm, bim, pgd")


def evaluate(model, x, y, specs, batch_size=500, seed=0):
    """Accuracy (fraction) of `model` under every spec in `specs` ({name: spec}, see `run_attack`),
    batched, in eval mode. Noise and random starts are drawn from a generator seeded with `seed`,
    so repeated evaluations agree."""
    out = {}
    for name, spec in specs.items():
        g = torch.Generator(device=x.device).manual_seed(seed)
        correct = 0
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            xa = run_attack(model, xb, yb, spec, g)
            with torch.no_grad(), eval_mode(model):
                correct += (model(xa).argmax(1) == yb).sum()
        out[name] = float(correct) / len(y)
    return out


def epoch_metrics(model, x_all, y_all, x_sub, y_sub, eps, steps, sigma=0.01, seed=0, perturbations=("gaussian",),
                  batch_size=250):
    """P1 Sec. 4 per-epoch measurements (App. B.2): clean accuracy on the whole test set; l2 PGD
    robust accuracy (eps, `steps` steps of 2.5*eps/steps) and LIGS (P1 Eq. 1) for each perturbation on
    a fixed class-balanced subset. LIGS noise is the same draw at every call (seeded), so a curve
    over epochs shows the model changing, not the noise. The clean input gradient of the subset is
    computed once and shared by the PGD's first step and every LIGS perturbation (bit-identical to
    computing it in each). Keys: clean_acc, robust_acc, ligs (Gaussian), ligs_<perturbation>, and the
    matching *_skipped counts."""
    out = dict(clean_acc=evaluate(model, x_all, y_all, {"c": dict(kind="clean")})["c"])
    with eval_mode(model):
        g0 = torch.cat([ce_input_grad(model, xb, yb) for xb, yb in zip(x_sub.split(batch_size), y_sub.split(batch_size))])
    correct = 0
    for i in range(0, len(y_sub), batch_size):
        xb, yb = x_sub[i:i + batch_size], y_sub[i:i + batch_size]
        xa = pgd(model, xb, yb, eps, steps, norm="l2", grad0=g0[i:i + batch_size])
        with torch.no_grad(), eval_mode(model):
            correct += (model(xa).argmax(1) == yb).sum()
    out["robust_acc"] = float(correct) / len(y_sub)
    for p in perturbations:
        g = torch.Generator(device=x_sub.device).manual_seed(seed)
        value, skipped = ligs(model, x_sub, y_sub, perturbation=p, sigma=sigma, generator=g, batch_size=batch_size, g0=g0)
        key = "ligs" if p == "gaussian" else f"ligs_{p}"
        out[key], out[key + "_skipped"] = value, skipped
    return out


def landscape_probe(model, x, y, step_sizes):
    """Santurkar et al. 2018 probes along the gradient (P1 Sec. 4.4, App. H; DECISIONS.md D17): with
    g = grad_w L(w; B) on the batch B, for every s in step_sizes evaluate L and its gradient at
    w - s*g on the same batch. Returns loss_min/loss_max (loss variation), gdiff_min/gdiff_max
    (l2 gradient change ||g - g_s||) and beta = max_s ||g - g_s|| / (s ||g||) (effective smoothness).
    Runs in train mode like the training step (BN uses batch statistics) through
    torch.func.functional_call on copies of the parameters and buffers, so the model's parameters, BN
    running statistics and any optimizer state are left bit-identical."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}

    def loss_and_grad(p):
        p = {k: v.clone().requires_grad_(True) for k, v in p.items()}
        b = {k: v.clone() for k, v in buffers.items()}  # running-stat updates land on throw-away copies
        with torch.enable_grad():
            loss = F.cross_entropy(torch.func.functional_call(model, {**p, **b}, (x,)), y)
            grads = torch.autograd.grad(loss, list(p.values()), allow_unused=True)
        return loss.detach(), torch.cat([(gr if gr is not None else torch.zeros_like(v)).flatten()
                                         for gr, v in zip(grads, p.values())])

    flags = [m.training for m in model.modules()]
    model.train()
    try:
        _, g = loss_and_grad(params)
        sizes = [v.numel() for v in params.values()]
        losses, diffs, betas = [], [], []
        for s in step_sizes:
            shifted = {k: v - s * gk.view_as(v) for (k, v), gk in zip(params.items(), g.split(sizes))}
            loss_s, g_s = loss_and_grad(shifted)
            d = (g - g_s).norm()
            losses.append(loss_s)
            diffs.append(d)
            betas.append(d / (s * g.norm()).clamp_min(torch.finfo(g.dtype).tiny))
    finally:
        for m, flag in zip(model.modules(), flags):
            m.training = flag
    losses, diffs = torch.stack(losses), torch.stack(diffs)
    return dict(loss_min=float(losses.min()), loss_max=float(losses.max()), gdiff_min=float(diffs.min()),
                gdiff_max=float(diffs.max()), beta=float(torch.stack(betas).max()))


def save_atomic(obj, path):
    """torch.save to a temp file and rename, so an interrupted write never leaves a torn checkpoint."""
    if not is_main_process():  # under torchrun only rank 0 writes
        return
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: shards may write the same file
    torch.save(obj, tmp)
    os.replace(tmp, path)


RECIPE_DEFAULTS = dict(optimizer="sgd", momentum=0.9, weight_decay=0.0, milestones=(), gamma=0.1, warmup_epochs=0.0,
                       augment=False, adv=None, input_fn=None, ligs_lambda=0.0, ligs_sigma=0.01)
RECIPE_REQUIRED = ("epochs", "batch_size", "lr")
DDP_BN = dict(mode="sync")  # BN under torchrun when train_model is not told: run_script sets it from --ddp-bn


def train_model(model, data, recipe, seed=0, ckpt=None, log=print, amp=False, on_epoch=None, on_step=None, tag="",
                key=None, ddp_bn=None):
    """Train `model` on data.x_train (already on the model's device) with `recipe`, a dict of
      epochs, batch_size, lr, optimizer ('sgd'|'adam'|'adagrad'), momentum, weight_decay,
      milestones (epochs), gamma, warmup_epochs, augment (crop+flip), adv (None, or an attack spec
      for `run_attack`: adversarial training on adversarial examples only, DECISIONS.md D15), and
      input_fn (optional: maps [0,1] batches to the model's input space, e.g. a Standardize layer),
      ligs_lambda, ligs_sigma (P1 Fig 5: loss = CE + lambda * ligs_penalty, double backprop).
    Every random source is a seeded generator: data order and augmentation (CPU generator) and
    attack starts (device generator). After every epoch the full state is checkpointed atomically to
    `ckpt` (if given); calling again with the same ckpt resumes and ends with the same numbers as an
    uninterrupted run. on_epoch(epoch, model) -> dict adds per-epoch measurements (epoch 0 = before
    training); on_step(step, model, x, y) -> dict or None runs before each optimizer step on that
    step's batch (landscape probes), its results kept as history rows with a "step" key. Divergence
    (non-finite loss) or a final training accuracy no better than chance stops the run and is
    reported, not raised.
    A recipe key that is not one of RECIPE_REQUIRED or RECIPE_DEFAULTS is an error (a misspelt key
    would otherwise be silently ignored). `key` (any JSON-able value, see `cache_path`) is stored in
    the checkpoint; an existing checkpoint with another key is refused rather than resumed.
    Under torchrun (`init_distributed`) the model trains data-parallel: every rank draws the same
    permutation and augmentation of each global batch and takes its contiguous slice of it, gradients are
    averaged by DistributedDataParallel with the loss scaled so that the step is that of the global-batch
    mean, so batch size, LR schedule and data order are the single-process run's. BN: ddp_bn='sync'
    (default, `sync_batchnorm`) normalizes over the global batch, which is P1/P2's BN; 'local' normalizes
    each rank's B/G samples, a different model (its cache key says so). Adversarial starts are drawn per
    rank (not bitwise the single-process draws). Rank 0 alone writes checkpoints and logs.
    Returns dict(status='ok'|'failed', reason, history=[per-epoch dicts])."""
    unknown = sorted(set(recipe) - set(RECIPE_DEFAULTS) - set(RECIPE_REQUIRED))
    missing = [k for k in RECIPE_REQUIRED if k not in recipe]
    if unknown or missing:
        raise ValueError(f"training recipe: unknown key(s) {unknown}, missing {missing}; expected "
                         f"{', '.join(RECIPE_REQUIRED)} and optionally {', '.join(RECIPE_DEFAULTS)}")
    r = RECIPE_DEFAULTS | recipe
    ddp, rank, world = is_distributed(), 0, 1
    if ddp:
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        ddp_bn = ddp_bn or DDP_BN["mode"]
        check_choice("--ddp-bn", ddp_bn, ("sync", "local"))
        if r["ligs_lambda"] > 0 or on_step is not None:
            raise ValueError("under torchrun, training with the LIGS regularizer or per-step probes is not supported; "
                             "run one process per GPU with --shard instead")
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        if ddp_bn == "local" and has_bn and key is not None:  # a different model from the single-process one
            key = dict(key=key, per_rank_bn=world)
        log = log if rank == 0 else (lambda s: None)
    key = json.loads(json.dumps(key, sort_keys=True, default=str))  # compare as stored (tuples -> lists)
    dev = data.x_train.device
    to_input = r["input_fn"] or (lambda t: t)
    opt = make_optimizer(r["optimizer"], model.parameters(), r["lr"], r["momentum"], r["weight_decay"])
    g_data = torch.Generator().manual_seed(seed)
    g_attack = torch.Generator(device=dev).manual_seed(seed + 1 + 7919 * rank)  # rank 0 = the single-process draws
    state = dict(epoch=0, history=[], status="running", reason="")
    if ddp:
        torch.distributed.barrier()  # every rank looks for the checkpoint before rank 0 may write one
    if ckpt is not None and pathlib.Path(ckpt).exists():
        saved = torch.load(ckpt, map_location=dev, weights_only=False)
        if "key" in saved and saved["key"] != key:  # (checkpoints of older versions carry no key)
            raise ValueError(f"checkpoint {ckpt} was trained with another configuration ({saved.get('key')}), not {key}")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        g_data.set_state(saved["g_data"])
        g_attack.set_state(saved["g_attack"].to(g_attack.get_state().device))
        state = saved["state"]
        log(f"{tag} resumed from {ckpt} after epoch {state['epoch']} ({state['status']})")

    def checkpoint():
        if ckpt is not None:
            save_atomic(dict(model=model.state_dict(), opt=opt.state_dict(), g_data=g_data.get_state(),
                             g_attack=g_attack.get_state(), state=state, key=key), ckpt)

    if state["epoch"] == 0 and not state["history"]:
        state["history"].append(dict(epoch=0, **(on_epoch(0, model) if on_epoch else {})))
    n, bs = len(data.y_train), r["batch_size"]
    steps_per_epoch = math.ceil(n / bs)
    use_amp = amp and dev.type == "cuda"
    net, stack = model, contextlib.ExitStack()
    if ddp:
        if ddp_bn == "sync":
            stack.enter_context(sync_batchnorm(model))
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    while state["status"] == "running" and state["epoch"] < r["epochs"]:
        epoch, t0 = state["epoch"], time.time()
        model.train()
        perm = torch.randperm(n, generator=g_data).to(dev)
        loss_sum, correct = torch.zeros((), device=dev), torch.zeros((), device=dev)
        for i in range(steps_per_epoch):
            idx = perm[i * bs:(i + 1) * bs]
            xb, yb = data.x_train[idx], data.y_train[idx]
            if r["augment"]:
                xb = augment_crop_flip(xb, g_data)
            n_batch = len(yb)
            if ddp:  # this rank's slice of the global batch (permuted and augmented above exactly as one process)
                part = torch.arange(n_batch, device=dev).tensor_split(world)[rank]
                xb, yb = xb[part], yb[part]
            xb = to_input(xb)
            if r["adv"] is not None:  # adversarial examples only (Madry et al.; DECISIONS.md D15), made in eval mode
                xb = run_attack(model, xb, yb, r["adv"], g_attack)
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch + i / steps_per_epoch, r["lr"], r["milestones"], r["gamma"], r["warmup_epochs"])
            probe = on_step(epoch * steps_per_epoch + i, model, xb, yb) if on_step else None
            if probe:
                state["history"].append(dict(epoch=epoch + i / steps_per_epoch, step=epoch * steps_per_epoch + i, **probe))
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                if r["ligs_lambda"] > 0:  # P1 Fig 5: CE + lambda * (1 - LIGS), noise from the checkpointed generator
                    penalty, logits = ligs_penalty(model, xb, yb, r["ligs_sigma"], g_attack)
                    loss = F.cross_entropy(logits.float(), yb) + r["ligs_lambda"] * penalty
                elif ddp:  # DDP averages over ranks: scale the slice's sum so the step is the global-batch mean's
                    logits = net(xb)
                    loss_local = F.cross_entropy(logits.float(), yb, reduction="sum")
                    loss = loss_local * (world / n_batch)
                else:
                    logits = model(xb)
                    loss = F.cross_entropy(logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss_local.detach() if ddp else loss.detach() * len(yb)
            correct += (logits.argmax(1) == yb).sum()
        if ddp:
            totals = torch.stack([loss_sum, correct.to(loss_sum.dtype)])
            torch.distributed.all_reduce(totals)
            loss_sum, correct = totals[0], totals[1]
        train_loss, train_acc = float(loss_sum) / n, float(correct) / n  # one sync per epoch
        state["epoch"] = epoch + 1
        if not math.isfinite(train_loss):
            state["status"], state["reason"] = "failed", f"diverged: non-finite training loss in epoch {epoch + 1}"
        elif state["epoch"] == r["epochs"] and train_acc <= 1.0 / data.num_classes + 0.05:
            state["status"], state["reason"] = "failed", f"no better than chance: final training accuracy {train_acc:.3f}"
        row = dict(epoch=epoch + 1, train_loss=train_loss, train_acc=train_acc, lr=opt.param_groups[0]["lr"],
                   time_s=time.time() - t0)
        if on_epoch and math.isfinite(train_loss):  # a run that ends at chance is measured too; a diverged one is not
            row |= on_epoch(epoch + 1, model)
        state["history"].append(row)
        base_keys = ("epoch", "train_loss", "train_acc", "lr", "time_s")
        extra = "".join(f" | {k} {v:.4f}" for k, v in row.items() if k not in base_keys)
        log(f"{tag} epoch {epoch + 1:3d}/{r['epochs']} | loss {train_loss:.4f} | train acc {train_acc:.4f} | "
            f"lr {row['lr']:.4g} | {row['time_s']:.1f}s{extra}")
        if state["status"] == "running" and state["epoch"] == r["epochs"]:
            state["status"] = "ok"
        checkpoint()
    if ddp:
        stack.close()
        for b in model.buffers():  # per-rank BN statistics differ: every rank keeps rank 0's (the checkpointed ones)
            torch.distributed.broadcast(b, 0)
    if state["status"] == "failed":
        log(f"{tag} FAILED: {state['reason']}")
    return dict(status=state["status"], reason=state["reason"], history=state["history"])


# ================================================================================================
# 12. P2's mechanism analyses: Yang et al.'s depth limit and the plug-in entropy of the output (P2 Figs 2, 3)
# ================================================================================================

def lambda_G(batch_size):
    """Per-layer growth rate of the squared gradient norm in a ReLU-BN fully connected net at
    initialization, Yang et al. 2019 Thm 8 with alpha = 1 (DECISIONS.md D21):
        lambda_G(B) = (J'(c) + B - 1) / ((B - 3)(1 - J(c))) - 1/(B - 3),  c = -1/(B - 1),
    with the arc-cosine kernel J(x) = (sqrt(1 - x^2) + (pi - arccos x) x) / pi and
    J'(x) = (pi - arccos x) / pi. Decreases to pi/(pi - 1) as B -> infinity; needs B > 3."""
    B = float(batch_size)
    if not B > 3:
        raise ValueError(f"batch size {batch_size}: Yang et al.'s formula needs B > 3")
    c = -1.0 / (B - 1)
    J = (math.sqrt(1 - c * c) + (math.pi - math.acos(c)) * c) / math.pi
    dJ = (math.pi - math.acos(c)) / math.pi
    return (dJ + B - 1) / ((B - 3) * (1 - J)) - 1 / (B - 3)


def max_trainable_depth(batch_size):
    """Yang et al.'s depth scale drawn over P2 Fig 2: L_max(B) = 16 / ln lambda_G(B) (about 41.8 layers
    for large B; DECISIONS.md D21)."""
    return 16.0 / math.log(lambda_G(batch_size))


def quantized_entropy_bits(probs, bits=7):
    """Plug-in (maximum-likelihood) entropy in bits of the softmax outputs quantized to `bits` bits per
    class (P2 Fig 3: I(X;T) = H(T) for a deterministic net). probs: (N, K) rows of probabilities."""
    levels = 2 ** bits
    codes = (probs * levels).floor().clamp(max=levels - 1).to(torch.int64)
    _, counts = torch.unique(codes, dim=0, return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(p * p.log2()).sum())


def entropy_ci_bits(n_samples, bits=7, n_classes=10):
    """Half-width of P2 Fig 3's confidence interval for the plug-in entropy (Paninski 2003 bound as
    used by P2): [log2(1 + (m - 1)/N) + N^(-1/2) log2 m] * K with m = 2^bits symbols per class;
    about 0.316 bits for N = 60000, m = 128, K = 10 (P2 Fig 3)."""
    m = 2 ** bits
    return (math.log2(1 + (m - 1) / n_samples) + math.log2(m) / math.sqrt(n_samples)) * n_classes


# ================================================================================================
# 13. Claims: intervals, verdicts, attack sanity checks, the checkpoint cache (DECISIONS.md D7, D25)
# ================================================================================================

def t_quantile(p, df):
    """Quantile of Student's t distribution with `df` (> 0, may be fractional) degrees of freedom,
    for p in (0, 1): Simpson integration of the density from 0 and bisection, accurate to ~1e-8
    (tested against scipy; scipy is not a runtime dependency)."""
    if not (0 < p < 1 and df > 0):
        raise ValueError(f"t_quantile(p={p}, df={df}): expected 0 < p < 1 and df > 0")
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(t):  # P(T <= t) for t >= 0
        n = 2000  # even number of Simpson intervals
        h = t / n
        f = [math.exp(logc - (df + 1) / 2 * math.log1p((i * h) ** 2 / df)) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    q = p if p >= 0.5 else 1 - p
    lo, hi = 0.0, 1.0
    while cdf(hi) < q:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    t = (lo + hi) / 2
    return t if p >= 0.5 else -t


def welch_interval(a, b=None, level=0.95):
    """Difference of means mean(a) - mean(b) with Welch's t interval (unequal variances,
    Welch-Satterthwaite degrees of freedom); with b=None the one-sample t interval of mean(a).
    Returns (effect, lo, hi, n_a, n_b); lo = hi = NaN when a group has fewer than 2 values, and
    lo = hi = effect when every value is identical (zero spread)."""
    a = [float(v) for v in a if v is not None and math.isfinite(float(v))]
    b = None if b is None else [float(v) for v in b if v is not None and math.isfinite(float(v))]
    nb = 0 if b is None else len(b)
    if not a or (b is not None and not b):
        return float("nan"), float("nan"), float("nan"), len(a), nb
    effect = sum(a) / len(a) - (sum(b) / nb if b else 0.0)
    if len(a) < 2 or (b is not None and nb < 2):
        return effect, float("nan"), float("nan"), len(a), nb
    groups = [a] if b is None else [a, b]
    v = [sum((x - sum(g) / len(g)) ** 2 for x in g) / (len(g) - 1) / len(g) for g in groups]  # squared SEMs
    se = math.sqrt(sum(v))
    if se == 0:
        return effect, effect, effect, len(a), nb
    df = se ** 4 / sum(vi ** 2 / (len(g) - 1) for vi, g in zip(v, groups))
    half = t_quantile(0.5 + level / 2, df) * se
    return effect, effect - half, effect + half, len(a), nb


def _matches(row, flt):
    """A record matches a filter {key: value or [values]} when every key has one of the values."""
    return all(row.get(k) in (v if isinstance(v, (list, tuple)) else [v]) for k, v in (flt or {}).items())


def evaluate_claims(claims, rows, level=0.95):
    """Test the papers' claims on per-run rows (one dict per trained model and seed).
    Each claim is a dict (declared next to its artifact in every exp_*.py):
      id, paper ("P1 Table 1"), claim (one sentence), paper_value (the paper's number, as text),
      metric (row key), a (filter), b (filter, or None for a one-sample claim against `ref`, default 0),
      where (filter applied to both groups), per (keys: the claim is tested separately in every
      group of their values, e.g. ("dataset", "arch")), expect ("<" or ">": the sign of
      mean(a) - mean(b) the paper predicts), scale (display factor: 100 for accuracies in points).
    The effect mean(a) - mean(b) gets Welch's t interval at `level` across seeds (`welch_interval`);
    the verdict is "held" when the interval lies entirely on the predicted side, "reversed" when
    entirely on the other, and "inconclusive" when it contains 0 or a group has fewer than 2 seeds.
    Rows with status other than "ok" are left out."""
    expanded = []
    for c in claims:  # `per`: test the claim separately in every group of these keys (e.g. each dataset and arch)
        keys = c.get("per") or ()
        groups = dict.fromkeys(tuple(r.get(k) for k in keys) for r in rows
                               if r.get("status", "ok") == "ok" and _matches(r, c.get("where")))
        expanded += [c | dict(where=(c.get("where") or {}) | dict(zip(keys, g))) for g in groups] or [c]
    out = []
    for c in expanded:
        rows_c = [r for r in rows if r.get("status", "ok") == "ok" and _matches(r, c.get("where"))]
        va = [r.get(c["metric"]) for r in rows_c if _matches(r, c["a"])]
        vb = None if c.get("b") is None else [r.get(c["metric"]) for r in rows_c if _matches(r, c["b"])]
        effect, lo, hi, na, nb = welch_interval(va, vb, level)
        if c.get("b") is None:
            ref = c.get("ref", 0.0)
            effect, lo, hi = effect - ref, lo - ref, hi - ref
        sign = 1 if c["expect"] == ">" else -1
        if not math.isfinite(lo):
            verdict = "not run" if (na == 0 or (c.get("b") is not None and nb == 0)) else "inconclusive"
        elif min(sign * lo, sign * hi) > 0:
            verdict = "held"
        elif max(sign * lo, sign * hi) < 0:
            verdict = "reversed"
        else:
            verdict = "inconclusive"
        out.append({k: c.get(k) for k in ("id", "paper", "claim", "paper_value", "metric", "expect", "scale")} |
                   dict(a=c["a"], b=c.get("b"), where=c.get("where"), ref=c.get("ref", 0.0), effect=effect, lo=lo, hi=hi,
                        n_a=na, n_b=nb, level=level, method="Welch t" if c.get("b") is not None else "one-sample t",
                        verdict=verdict))
    return out


def _describe(flt):
    return ", ".join(f"{k}={'/'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in (flt or {}).items())


def fmt_effect(c):
    """'+1.2 [−0.3, +2.7]' in the claim's display scale (the interval is omitted when undefined)."""
    s = c.get("scale") or 1.0
    if not math.isfinite(c["effect"]):
        return "–"
    digits = 1 if s >= 100 else 3
    text = f"{s * c['effect']:+.{digits}f}"
    return text + (f" [{s * c['lo']:+.{digits}f}, {s * c['hi']:+.{digits}f}]" if math.isfinite(c["lo"]) else "")


def comparison_text(c):
    """The measured comparison of a claim in words, e.g. 'pgd_l2: norm=bn − norm=none < 0 (arch=resnet18)'."""
    rhs = _describe(c["b"]) if c.get("b") is not None else f"{c.get('ref', 0.0):g}"
    where = f" ({_describe(c['where'])})" if c.get("where") else ""
    return f"{c['metric']}: {_describe(c['a'])} − {rhs} {c['expect']} 0{where}"


CLAIMS_LEGEND = ("Effect = mean(a) − mean(b) over seeds (accuracies in percentage points), with a 95 % Welch t interval "
                 "(one-sample t where the claim compares to a fixed value; DECISIONS.md D25). Verdict: **held** (interval "
                 "on the paper's side of 0), **reversed** (entirely on the other side), **inconclusive** (contains 0, or "
                 "fewer than 2 seeds per group).")


def claims_table(results):
    """Markdown table lines, one row per evaluated claim (used by claims.md and the README)."""
    lines = ["| claim | source | paper's number | measured comparison | effect [95 % CI] | n | verdict |",
             "|---|---|---|---|---|---|---|"]
    for c in results:
        n = f"{c['n_a']}" + (f" vs {c['n_b']}" if c.get("b") is not None else "")
        lines.append(f"| {c['claim']} | {c['paper']} | {c['paper_value']} | {comparison_text(c)} | {fmt_effect(c)} | {n} | "
                     f"**{c['verdict']}** |")
    return lines


def claims_markdown(results, header, checks=None):
    """claims.md: one row per claim (paper, claim, paper's number, measured comparison, effect with
    its interval, n per group, verdict), then the attack sanity checks (`check_attack`) if any."""
    lines = [header, "", CLAIMS_LEGEND, ""] + claims_table(results)
    if checks is not None:
        lines += ["", "Attack sanity checks (Carlini et al. 2019, \"On evaluating adversarial robustness\"), per model on "
                  "the first evaluation samples: share of zero input gradients; accuracy must not rise with eps "
                  "(0.5, 1, 2 × eps); the iterative attack must not be weaker than its one-step version; a 10 × eps "
                  "budget must drive accuracy to ≤ 10 %.", ""]
        failed = [(who, f) for who, f in checks if f]
        lines.append(f"{len(checks)} model × attack checks, {len(failed)} flagged." +
                     ("" if failed else " Nothing flagged."))
        lines += [f"- **flagged** {who}: {f}" for who, f in failed]
    return "\n".join(lines) + "\n"


def write_claims(run_dir, claims, rows, header, records=None, label=None):
    """Evaluate `claims` on the per-run `rows`, write claims.md (with the attack checks found in
    `records` under chk_*_flags keys, each model named by `label(record)`) and add the results to
    results.json under "claims". Claims with no run of either group are left out. Returns them."""
    run_dir = pathlib.Path(run_dir)
    results = [c for c in evaluate_claims(claims, rows) if c["verdict"] != "not run"]
    checks = None
    if records is not None:
        checks = [(f"{label(r)} {k[4:-6]}", r[k]) for r in records for k in r if k.startswith("chk_") and k.endswith("_flags")]
    write_text_atomic(run_dir / "claims.md", claims_markdown(results, header, checks if checks else None))
    path = run_dir / "results.json"
    saved = json.loads(path.read_text())
    write_text_atomic(path, json.dumps(saved | dict(claims=results), indent=1, default=str))
    return results


def check_attack(model, x, y, spec, n=100, large=10.0, seed=0):
    """The cheap checks against a broken or masked attack of Carlini et al. 2019 for one attack
    `spec` (see `run_attack`: pgd, bim or fgsm), on the first `n` of (x, y). Returns flat keys
    zero_grad (share of samples whose CE input gradient is exactly 0), acc_x0.5/acc_x1/acc_x2
    (accuracy at 0.5, 1, 2 times eps), acc_onestep (one step of size eps in the same norm: FGSM
    for linf), acc_large (`large` times eps), and flags: "" or the failed checks joined by "; "."""
    x, y = x[:n], y[:n]
    eps = spec["eps"]
    acc = {}

    def run(sp):
        return evaluate(model, x, y, {"a": sp}, batch_size=n, seed=seed)["a"]

    for f in (0.5, 1.0, 2.0, large):
        sp = dict(spec, eps=eps * f)
        if "step_size" in sp and sp.get("kind") != "fgsm":
            sp["step_size"] = spec["step_size"] * f
        acc[f] = run(sp)
    if spec["kind"] == "fgsm":
        one = acc[1.0]
    else:
        one = run(dict(kind="pgd", norm=spec.get("norm", "linf"), loss=spec.get("loss", "ce"), eps=eps, steps=1, step_size=eps,
                       clip=spec.get("clip")))
    with eval_mode(model):
        g = ce_input_grad(model, x, y)
    zero = float((g.flatten(1).abs().amax(1) == 0).float().mean())
    tol = 1.0 / len(y) + 1e-9  # one sample
    flags = []
    if not (acc[0.5] + tol >= acc[1.0] and acc[1.0] + tol >= acc[2.0] and acc[2.0] + tol >= acc[large]):
        flags.append(f"accuracy rises with eps ({acc[0.5]:.2f}, {acc[1.0]:.2f}, {acc[2.0]:.2f}, {acc[large]:.2f})")
    if spec["kind"] != "fgsm" and acc[1.0] > one + tol:
        flags.append(f"iterative attack weaker than one step ({acc[1.0]:.2f} > {one:.2f})")
    if acc[large] > 0.10:
        flags.append(f"{large:g} x eps leaves {acc[large]:.0%} accuracy")
    if zero > 0:
        flags.append(f"{zero:.0%} zero input gradients")
    return {"zero_grad": zero, "acc_x0.5": acc[0.5], "acc_x1": acc[1.0], "acc_x2": acc[2.0], "acc_onestep": one,
            "acc_large": acc[large], "flags": "; ".join(flags)}


def cache_path(cache_dir, key):
    """Checkpoint path for a trained model in the shared cache (--cache DIR): the file name is a hash
    of `key`, a JSON-able dict of everything that determines the weights (dataset and its
    preprocessing, architecture, norm, width, every recipe value, seed). `train_model` stores the key
    in the checkpoint and refuses one whose key differs, so a cached model is reused only when all of
    it matches. None when cache_dir is None."""
    if cache_dir is None:
        return None
    text = json.dumps(key, sort_keys=True, default=str)
    return pathlib.Path(cache_dir) / f"{hashlib.sha256(text.encode()).hexdigest()[:20]}.pt"


# ================================================================================================
# 14. Run records, presets and command-line plumbing (every exp_*.py)
# ================================================================================================

def mean_sem(values):
    """(mean, standard error of the mean, n) of the finite values; SEM = std(ddof=1)/sqrt(n), as P2 reports."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return float("nan"), float("nan"), 0
    m = sum(v) / len(v)
    sem = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1) / len(v)) if len(v) > 1 else float("nan")
    return m, sem, len(v)


def fmt_mean_sem(values, scale=100.0, digits=1):
    """'mean ± sem' in percent (P2's style); just the mean when n = 1; '–' when nothing finished."""
    m, s, n = mean_sem(values)
    if n == 0:
        return "–"
    return f"{m * scale:.{digits}f}" if n == 1 else f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def show(path):
    """Print a text file the run just wrote (table.md, claims.md): rank 0 only under torchrun."""
    if is_main_process():
        print(pathlib.Path(path).read_text())


def save_figure(fig, path, dpi=110):
    """Save a matplotlib figure atomically (format from the suffix) and close it; rank 0 only under torchrun."""
    import matplotlib.pyplot as plt
    path = pathlib.Path(path)
    if is_main_process():
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        fig.savefig(tmp, dpi=dpi, format=path.suffix[1:])
        os.replace(tmp, path)
    plt.close(fig)


def write_text_atomic(path, text):
    """Write text to a temp file and rename it into place (readers never see a half-written file; the temp
    name is per process, so shards writing one shared directory never write into each other's temp file)."""
    if not is_main_process():  # under torchrun only rank 0 writes
        return
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_records(run_dir, records, finished):
    """results.json ({"records": [...], "finished": bool}) and results.csv, both written atomically.
    Records are flat dicts of plain values (one per model/seed[/epoch]). With a `Sweep` these two files are
    a summary rebuilt from the per-run files in RUN_DIR/records/, which are what resume and merge read."""
    run_dir = pathlib.Path(run_dir)
    write_text_atomic(run_dir / "results.json", json.dumps(dict(records=records, finished=finished), indent=1, default=str))
    keys = list(dict.fromkeys(k for r in records for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(records)
    write_text_atomic(run_dir / "results.csv", buf.getvalue())


def _read_record_files(run_dir):
    """{run name: {"run", "index", "finished", "records"}} from RUN_DIR/records/*.json."""
    out = {}
    for f in sorted((pathlib.Path(run_dir) / "records").glob("*.json")):
        try:
            d = json.loads(f.read_text())
            out[d["run"]] = d
        except (json.JSONDecodeError, KeyError) as e:
            raise DataError(f"corrupt record file {f}: {e}") from None
    return out


def load_records(run_dir):
    """The records of a run directory (for --plot-only and --resume): from its per-run files in
    RUN_DIR/records/ (in run order), or from results.json for a run made before those existed."""
    run_dir = pathlib.Path(run_dir)
    if (run_dir / "records").is_dir():
        files = _read_record_files(run_dir)
        return [r for d in sorted(files.values(), key=lambda d: d["index"]) for r in d["records"]]
    path = run_dir / "results.json"
    if not path.exists():
        raise DataError(f"no results.json in {run_dir}: not a run directory of this project")
    try:
        return json.loads(path.read_text())["records"]
    except (json.JSONDecodeError, KeyError) as e:
        raise DataError(f"corrupt {path}: {e}") from None


def add_scale_out_flags(parser, unit):
    """--shard K/N and --ddp-bn, the same in every exp_*.py (README: running at paper scale)."""
    parser.add_argument("--shard", type=parse_shard, metavar="K/N", help=f"run only the {unit} with index = K mod N "
                        "(SLURM arrays, one process per GPU); every shard writes its own record files into the shared --out")
    parser.add_argument("--ddp-bn", default="sync", choices=["sync", "local"], help="BN under torchrun: statistics of "
                        "the global batch (sync, P1/P2's BN) or of each rank's slice (local, a different model)")


def parse_shard(text):
    """argparse type of --shard K/N (0 <= K < N): this process runs the runs whose index is K mod N."""
    m = re.fullmatch(r"(\d+)/(\d+)", str(text))
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected K/N with 0 <= K < N, e.g. 0/4 "
                                         f"($SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return [int(m.group(1)), int(m.group(2))]


def _file_name(name):
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", name)


class Sweep:
    """The independent runs of one invocation, each with its own record file, and the --shard selection.

    `runs` is the script's full list of (name, params) in a fixed order that depends only on the
    configuration: a run's name, seed and index never depend on --shard, so N shards together do exactly
    the work of one process. `params` are the record fields that identify the run (used to adopt the
    records of a run directory made before per-run files existed). Shard K of N takes the runs with
    index = K mod N. Each finished run is written to RUN_DIR/records/<name>.json atomically, so shards
    sharing one directory (a cluster file system) never clobber each other, and a killed shard resumed
    with --resume redoes only its unfinished runs. A run may save partial records (finished=False) and
    continue from `previous(name)` when resumed (exp_table1.py's seed retries). DECISIONS.md D31."""

    def __init__(self, run_dir, runs, shard=None, adopt_complete=None):
        self.dir = pathlib.Path(run_dir) / "records"
        self.runs = list(runs)
        self.index = {name: i for i, (name, _) in enumerate(self.runs)}
        files = [_file_name(n) for n, _ in self.runs]
        if len(set(files)) != len(files):
            dup = next(n for n in files if files.count(n) > 1)
            raise ValueError(f"two runs share the record file name {dup}: the sweep's run names must be unique")
        self.shard = shard
        if not self.dir.exists() and (pathlib.Path(run_dir) / "results.json").exists():
            self._adopt(json.loads((pathlib.Path(run_dir) / "results.json").read_text())["records"], adopt_complete)

    def _adopt(self, old, complete):
        """A run directory of an earlier version (one results.json): its records become per-run files, so
        that --resume keeps them; records matching no run are kept under the run name 'earlier'."""
        rest = list(old)
        for name, params in self.runs:
            mine = [r for r in rest if _matches(r, params)]
            if mine:
                rest = [r for r in rest if not _matches(r, params)]
                self.save(name, mine, finished=complete(params, mine) if complete else True)
        if rest:
            self.save("earlier", rest)

    def mine(self):
        """This process's runs: (index, name, params), all of them without --shard."""
        k, n = self.shard or (0, 1)
        return [(i, name, params) for i, (name, params) in enumerate(self.runs) if i % n == k]

    def finished(self):
        return {name for name, d in _read_record_files(self.dir.parent).items() if d.get("finished", True)}

    def todo(self):
        """This process's runs that have no finished record file yet, in run order."""
        done = self.finished()
        return [(i, name, params) for i, name, params in self.mine() if name not in done]

    def previous(self, name):
        """The records a run saved before it was interrupted ([] if none)."""
        path = self.dir / f"{_file_name(name)}.json"
        return json.loads(path.read_text())["records"] if path.exists() else []

    def save(self, name, records, finished=True):
        """Write one run's records (atomically, its own file) and refresh results.json / results.csv."""
        write_text_atomic(self.dir / f"{_file_name(name)}.json",
                          json.dumps(dict(run=name, index=self.index.get(name, -1), finished=finished, records=records),
                                     indent=1, default=str))
        self.write_summary()

    def records(self):
        return load_records(self.dir.parent) if self.dir.exists() else []

    def missing(self):
        """Names of all runs (every shard's) that have not finished, in run order."""
        done = self.finished()
        return [name for name, _ in self.runs if name not in done]

    def write_missing(self):
        """The unfinished runs, also written to RUN_DIR/missing.txt (removed once nothing is missing)."""
        missing = self.missing()
        if missing:
            write_text_atomic(self.dir.parent / "missing.txt", "".join(f"{m}\n" for m in missing))
        elif is_main_process():
            (self.dir.parent / "missing.txt").unlink(missing_ok=True)
        return missing

    def report(self):
        """'' when every run is finished, else the line that says what is missing (also in missing.txt)."""
        missing = self.write_missing()
        if not missing:
            return ""
        return (f"\n{len(missing)} of {len(self.runs)} runs are not finished yet (other shards', listed in missing.txt): "
                f"the tables above cover the rest; rerun --plot-only {self.dir.parent} when they are done")

    def write_summary(self):
        """results.json / results.csv of every record present; `finished` once no run is missing. With
        shards this is a snapshot (the record files are the truth; --plot-only rebuilds it)."""
        save_records(self.dir.parent, self.records(), finished=not self.missing())


def merge_runs(run_dirs, script, runs_of):
    """--plot-only RUN_DIR [RUN_DIR ...]: the configuration of the first directory and the records of all
    of them, merged run by run (the first copy of a run wins) into the first directory's records/, so
    that shards run into separate directories (or machines) can be combined. Returns (run_dir, cfg,
    records, missing), where `missing` names the runs of `runs_of(cfg)` that no directory has finished:
    tables, figures and claims are built from what exists and the missing runs are listed (missing.txt)."""
    run_dir = pathlib.Path(run_dirs[0])
    cfg = load_run_config(run_dir, script)
    for other in run_dirs[1:]:
        other_cfg = load_run_config(other, script)
        diff = sorted(k for k in set(cfg) | set(other_cfg) if k not in RESUME_FREE and cfg.get(k) != other_cfg.get(k))
        if diff:
            raise DataError(f"--plot-only {other}: its configuration differs from {run_dir}'s in "
                            f"{', '.join('--' + k.replace('_', '-') for k in diff)}; only shards of one run merge")
    runs = runs_of(argparse.Namespace(**cfg))
    if not (run_dir / "records").is_dir():  # a run directory of an earlier version: one results.json, read as is
        if len(run_dirs) > 1:
            raise DataError(f"--plot-only {run_dir}: made before per-run record files existed; it cannot be merged")
        records = load_records(run_dir)
        return run_dir, cfg, records, [name for name, params in runs if not any(_matches(r, params) for r in records)]
    sweep = Sweep(run_dir, runs)
    have = _read_record_files(run_dir)
    for other in run_dirs[1:]:
        for name, d in _read_record_files(other).items():
            if name not in have or (not have[name].get("finished", True) and d.get("finished", True)):
                sweep.save(name, d["records"], d.get("finished", True))
                have[name] = d
    sweep.write_summary()
    missing = sweep.write_missing()
    if missing:
        print(f"{len(missing)} of {len(runs)} runs are missing (listed in {run_dir / 'missing.txt'}): "
              f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    return run_dir, cfg, sweep.records(), missing


def load_run_config(run_dir, script):
    """The resolved arguments saved in RUN_DIR/config.json (for --plot-only); one clear error if RUN_DIR
    is not a run directory of `script`."""
    path = pathlib.Path(run_dir) / "config.json"
    if not path.exists():
        raise DataError(f"--plot-only {run_dir}: no config.json there (not a run directory of {script})")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"--plot-only {run_dir}: corrupt config.json ({e})") from None
    if cfg.get("script") != script:
        raise DataError(f"--plot-only {run_dir}: that run was made by {cfg.get('script')}, not {script}")
    return cfg["args"]


def prepare_run_dir(script, out=None, resume=False, shard=None):
    """Resolve --out (default runs/<script>/<timestamp>) and refuse to silently overwrite: an existing
    run directory is only continued with --resume, or joined by another shard of the same run (--shard,
    whose configuration `write_config` checks against the saved one)."""
    if shard and not out:
        raise ValueError("--shard needs --out RUN_DIR: the directory every shard of the run writes into")
    if out is None and is_distributed():  # every rank must agree on the timestamped directory
        box = [pathlib.Path("runs") / script / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")]
        torch.distributed.broadcast_object_list(box, src=0)
        out = box[0]
    out = pathlib.Path(out or pathlib.Path("runs") / script / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    if is_main_process():
        if (out / "config.json").exists() and not resume and not shard:
            raise ValueError(f"--out {out} already holds a run; pass --resume to continue it or choose another --out")
        if resume and not (out / "config.json").exists():
            raise ValueError(f"--resume: {out} holds no run to continue (pass the run's --out)")
    _RUNS.append(out)
    if not out.exists():
        _CREATED.append(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


_RUNS = []  # run directories used by this process (named in the Ctrl-C hint)
_CREATED = []  # those it made itself: removed again by `run_script` if a start fails
_START_FILES = {"config.json", "code.py", "log.txt"}  # what a run directory holds before any work is saved
_START_PREFIX = "log.shard-"


def run_script(main, get_args):
    """The __main__ of every exp_*.py. Bad input and missing data end in one 'error:' line; Ctrl-C ends in
    a hint to resume. A run directory this process created is removed again when nothing but its start
    files was written (so a corrected rerun with the same --out works); finished work is never removed."""
    def discard_empty():
        for d in _CREATED if is_main_process() else []:
            if d.exists() and all(f.name in _START_FILES or f.name.startswith(_START_PREFIX) for f in d.iterdir()):
                shutil.rmtree(d)
    init_distributed()
    if not is_main_process():  # under torchrun: every rank runs the script, rank 0 alone prints and writes
        sys.stdout = open(os.devnull, "w")
    try:
        args = get_args()
        DDP_BN["mode"] = getattr(args, "ddp_bn", None) or "sync"
        main(args)
        finish_distributed()
    except (DataError, ValueError) as e:
        discard_empty()
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        discard_empty()
        kept = [d for d in _RUNS if d.exists()]
        sys.exit("interrupted: " + (f"finished work is kept; continue with --resume --out {kept[0]}" if kept else
                                    "nothing was saved"))


class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for st in self.streams:
            st.write(text)
        return len(text)

    def flush(self):
        for st in self.streams:
            st.flush()


def log_to(run_dir, shard=None):
    """From now on, copy everything the script prints into RUN_DIR/log.txt (appended on --resume;
    log.shard-K-of-N.txt for a shard, so shards sharing a directory keep separate logs)."""
    if not is_main_process():
        return
    name = f"log.shard-{shard[0]}-of-{shard[1]}.txt" if shard else "log.txt"
    f = open(pathlib.Path(run_dir) / name, "a", buffering=1, encoding="utf-8")
    sys.stdout = _Tee(sys.stdout, f)


def git_commit():
    """The project's current git commit (None outside a checkout), recorded in every config.json."""
    try:
        root = pathlib.Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_config(run_dir, args, script_path, device):
    """config.json: every resolved argument, argv, versions, device and git commit; plus a copy of
    the script's own source (code.py), so a run directory holds what is needed to redo it."""
    cfg = dict(args=vars(args), argv=sys.argv, script=pathlib.Path(script_path).name, git_commit=git_commit(),
               device=str(device), torch=torch.__version__, numpy=np.__version__, python=platform.python_version(),
               cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               time=datetime.datetime.now().isoformat(timespec="seconds"))
    old = pathlib.Path(run_dir) / "config.json"
    if getattr(args, "shard", None) and old.exists() and not getattr(args, "resume", False):
        saved = json.loads(old.read_text())["args"]  # another shard started this run: join it if it is the same run
        mine = json.loads(json.dumps(vars(args), default=str))
        diff = sorted(k for k in set(saved) | set(mine) if k not in RESUME_FREE and saved.get(k) != mine.get(k))
        if diff:
            raise ValueError(f"--out {run_dir} holds a run with other settings ({', '.join(diff[:5])} differ); "
                             f"every shard of a run needs the same arguments apart from --shard")
        return
    if getattr(args, "resume", False) and old.exists():  # keep the command that started the run; log the resumption
        first = json.loads(old.read_text())
        resumed = first.get("resumed", []) + [{k: cfg[k] for k in ("argv", "git_commit", "device", "time")}]
        cfg.update(argv=first["argv"], git_commit=first["git_commit"], time=first["time"], resumed=resumed)
    write_text_atomic(pathlib.Path(run_dir) / "config.json", json.dumps(cfg, indent=1, default=str))
    write_text_atomic(pathlib.Path(run_dir) / "code.py", pathlib.Path(script_path).read_text())


def parse_with_presets(parser, resolve, argv=None):
    """Parse the command line with the values that will actually run as defaults: `resolve(preset,
    artifact)` -> {dest: value} (the chosen preset's settings for the chosen artifact) becomes the
    parser's defaults, so explicit flags win and `--help` shows the resolved values instead of None.
    --preset and --artifact are read first by a small parser without -h. Errors are one line (no usage
    block), and --resume takes the saved configuration (see `_resumed`)."""
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message}\n")
    pre = argparse.ArgumentParser(add_help=False)
    valid = True
    for a in parser._actions:
        if a.dest in ("preset", "artifact"):
            pre.add_argument(*a.option_strings, dest=a.dest, default=a.default)
    known, _ = pre.parse_known_args(argv)
    for a in parser._actions:  # a bad --preset/--artifact is reported by the full parser below
        if a.dest in ("preset", "artifact") and a.choices and getattr(known, a.dest) not in a.choices:
            valid = False
    if valid:
        parser.set_defaults(**resolve(known.preset, getattr(known, "artifact", None)))
    args = parser.parse_args(argv)
    return _resumed(parser, args, argv) if getattr(args, "resume", False) else args


def check_numbers(parser, args, at_least_one=(), positive=(), non_negative=()):
    """One clear line (parser.error) for a nonsensical number: at_least_one = integer counts >= 1, positive =
    finite > 0, non_negative = finite >= 0. Arguments may hold None (not set) or lists (every item checked)."""
    rules = [(at_least_one, lambda v: v >= 1, "an integer >= 1"), (positive, lambda v: v > 0 and math.isfinite(v),
             "a finite number > 0"), (non_negative, lambda v: v >= 0 and math.isfinite(v), "a finite number >= 0")]
    for names, ok, expected in rules:
        for name in names:
            value = getattr(args, name)
            if value is not None and not all(ok(v) for v in (value if isinstance(value, list) else [value])):
                parser.error(f"--{name.replace('_', '-')} {value}: expected {expected}")


RESUME_FREE = ("resume", "out", "device", "plot_only", "shard")  # the only arguments a resumed run may change


def _resumed(parser, args, argv):
    """--resume: the configuration is the one saved in RUN_DIR/config.json, so that finished and resumed
    models share one recipe; a flag given now that contradicts it is one clear error."""
    if not args.out:
        parser.error("--resume needs --out RUN_DIR (the run to continue)")
    path = pathlib.Path(args.out) / "config.json"
    if not path.exists():
        parser.error(f"--resume: {args.out} holds no run to continue (no config.json there)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        parser.error(f"--resume: corrupt {path} ({e})")
    if parser.prog.endswith(".py") and cfg.get("script") != parser.prog:
        parser.error(f"--resume --out {args.out}: that run was made by {cfg.get('script')}, not {parser.prog}")
    saved = cfg["args"]
    explicit = copy.deepcopy(parser)  # parses only the flags given on this command line
    explicit._defaults = {}
    for a in explicit._actions:
        a.default = argparse.SUPPRESS
    for k, v in vars(explicit.parse_args(argv)).items():
        if k not in RESUME_FREE and k in saved and json.loads(json.dumps(v, default=str)) != saved[k]:
            parser.error(f"--{k.replace('_', '-')} {v} contradicts the run being resumed ({saved[k]}); a resumed run "
                         f"keeps the configuration saved in {path}")
    # arguments a run made by an older version did not save keep today's defaults
    return argparse.Namespace(**(vars(args) | saved | {k: getattr(args, k) for k in RESUME_FREE if hasattr(args, k)}))


def print_config(args):
    """Print the resolved configuration at start (it is also saved to config.json)."""
    print("config: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))


# ================================================================================================
# 15. Corruptions: a batched CIFAR-10-C generator, the released files, BN-statistics adaptation
#     (P1 Fig 1, Table 7, App. F; P2 Table 4; Hendrycks & Dietterich 2019; DECISIONS.md D26-D28)
# ================================================================================================

# The 19 CIFAR-10-C corruptions by category (P2 Sec. 3: four categories) and their severity constants
# (1..5) from Hendrycks & Dietterich's CIFAR generator. Pixels are in [0, 1]; every result is clipped,
# multiplied by 255 and truncated to uint8, as in the released files.
CORRUPTIONS = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "gaussian_blur"),
    "weather": ("snow", "frost", "fog", "spatter", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression", "saturate"),
}
CORRUPTION_NAMES = tuple(n for names in CORRUPTIONS.values() for n in names)
APPROXIMATE = ("motion_blur", "snow")  # ImageMagick's motion blur, re-implemented (DECISIONS.md D27)
SEVERITY = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # disk radius, alias blur
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),  # sigma, max shift, passes
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),  # radius, sigma
    "zoom_blur": (1.06, 1.11, 1.16, 1.21, 1.26),  # zoom factors 1, 1.01, ... below this bound
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "snow": ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),  # strength, plasma-fractal wibble decay
    "spatter": ((0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
                (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)),  # last: 0 water, 1 mud
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "elastic_transform": ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    "jpeg_compression": (80, 65, 58, 50, 40),
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
}
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")  # the generator draws 1 of 5


def _pad_index(n, r, mode, device):
    """Source index of every position of a length-n axis padded by r on both sides, for the border
    rules of the reference libraries: 'nearest' (edge), 'mirror' (d c b | a b c d: OpenCV's default
    BORDER_REFLECT_101, scipy 'mirror') and 'reflect' (c b a | a b c: scipy/skimage 'reflect')."""
    i = torch.arange(-r, n + r, device=device)
    if mode == "nearest":
        return i.clamp(0, n - 1)
    period = 2 * n - 2 if mode == "mirror" else 2 * n
    i = i.remainder(max(period, 1))
    return torch.where(i < n, i, period - i - (0 if mode == "mirror" else 1))


def _filter_matrix(n, k, mode, device):
    """1-D correlation with kernel k over a length-n axis, borders by the rule of `_pad_index`, as an
    (n, n) matrix: filtering a 32-pixel axis is then one small matrix product (on a CPU much faster
    than a float64 convolution, and the same on every device)."""
    r = len(k) // 2
    src = _pad_index(n, r, mode, "cpu")
    m = torch.zeros(n, n, dtype=torch.float64)
    rows = torch.arange(n)
    for t in range(len(k)):
        m.index_put_((rows, src[t:t + n]), k[t].double().expand(n), accumulate=True)
    return m.to(device)


def _filter2d(x, kh, kw=None, mode="nearest"):
    """Separable correlation of (B, C, H, W) with the 1-D kernels kh (rows) and kw (columns, default kh)
    under a border rule of `_pad_index` -- scipy.ndimage / skimage / cv2 filtering, batched."""
    kw = kh if kw is None else kw
    H, W = x.shape[-2:]
    mh, mw = _filter_matrix(H, kh, mode, x.device).to(x.dtype), _filter_matrix(W, kw, mode, x.device).to(x.dtype)
    return _sandwich(mh, x, mw)


def _sandwich(mh, x, mw):
    """mh @ x @ mw.T over the last two axes of x (einsum: a broadcast mh @ x runs one tiny product per
    image on a CPU)."""
    return torch.einsum("hk,...kw->...hw", mh, x @ mw.T)


def _gauss1d(sigma, truncate=4.0):
    """scipy.ndimage's Gaussian kernel: radius int(truncate * sigma + 0.5), normalized to sum 1."""
    r = int(truncate * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * t ** 2 / max(sigma, 1e-12) ** 2) if sigma > 0 else (t == 0).double()
    return k / k.sum()


def _gaussian(x, sigma, mode="nearest", truncate=4.0):
    """skimage.filters.gaussian per channel (scipy gaussian_filter over H and W)."""
    return _filter2d(x, _gauss1d(sigma, truncate), mode=mode) if sigma > 0 else x


def _zoom_matrix(n_in, n_out, device):
    """scipy.ndimage.zoom(order=1) along one axis as an (n_out, n_in) matrix: output i samples the input
    at i * (n_in - 1) / (n_out - 1), linearly interpolated."""
    pos = torch.arange(n_out, dtype=torch.float64) * ((n_in - 1) / max(n_out - 1, 1))
    lo = pos.floor().long().clamp(0, n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    w = pos - lo
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m[torch.arange(n_out), lo] += 1 - w
    m[torch.arange(n_out), hi] += w
    return m.to(device)


def _clipped_zoom_matrix(n, z, device):
    """The generator's clipped_zoom along one axis: crop the centre ceil(n / z) pixels, zoom them by z
    (output length round(ceil(n / z) * z), scipy's rule), trim the centre n."""
    ch = int(math.ceil(n / z))
    top = (n - ch) // 2
    n_out = int(round(ch * z))
    trim = (n_out - n) // 2
    m = torch.zeros(n, n, dtype=torch.float64, device=device)
    m[:, top:top + ch] = _zoom_matrix(ch, n_out, device)[trim:trim + n]
    return m


def _trunc_u8(x):
    """[0, 1] floats -> uint8 the way the released files were made: clip, times 255, truncate."""
    return (x.clamp(0, 1) * 255).nan_to_num(0.0).to(torch.uint8)


_LINEAR_MAPS = {}


def _linear_map(x, key, fn):
    """fn(x) for a linear map fn of (B, C, H, W) float64 images that acts on each (H, W) plane alike.
    For small images fn is turned once into a sparse (HW, HW) matrix (its response to every basis
    image), cached under `key`: one sparse product then replaces fn's many small steps (zoom blur sums
    up to 26 zooms). Exact up to the order of floating-point additions."""
    B, C, H, W = x.shape
    if H * W > 64 * 64:
        return fn(x)
    k = (key, H, W, str(x.device))
    if k not in _LINEAR_MAPS:
        basis = torch.eye(H * W, dtype=torch.float64, device=x.device).view(H * W, 1, H, W)
        with warnings.catch_warnings():  # torch calls its sparse CSR tensors a beta feature
            warnings.simplefilter("ignore")
            _LINEAR_MAPS[k] = fn(basis).reshape(H * W, H * W).T.to_sparse_csr()
    return (_LINEAR_MAPS[k] @ x.reshape(B * C, H * W).T).T.reshape(B, C, H, W)


def rgb_to_hsv(x):
    """(B, 3, H, W) RGB in [0, 1] -> HSV in [0, 1], skimage.color.rgb2hsv's conventions (grey: hue 0,
    saturation 0; ties in the maximum resolved blue over green over red)."""
    r, g, b = x.unbind(1)
    v = torch.maximum(torch.maximum(r, g), b)
    delta = v - torch.minimum(torch.minimum(r, g), b)
    grey = delta == 0
    s = torch.where(grey, 0.0, delta / torch.where(v == 0, 1.0, v))
    top_b, top_g = b == v, g == v
    num = torch.where(top_b, r - g, torch.where(top_g, b - r, g - b))
    h = torch.where(top_b, 4.0, torch.where(top_g, 2.0, 0.0)) + num / torch.where(grey, 1.0, delta)
    h = torch.where(grey, 0.0, (h / 6.0).remainder(1.0))
    return torch.stack([h, s, v], 1)


def hsv_to_rgb(x):
    """Inverse of `rgb_to_hsv` (skimage.color.hsv2rgb): the sector floor(6h) mod 6 picks, per channel,
    one of v, p = v(1 - s), q = v(1 - fs), t = v(1 - (1 - f)s)."""
    h, s, v = x.unbind(1)
    hi = torch.floor(h * 6)
    f = h * 6 - hi
    cand = torch.stack([v, v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)])  # v, p, q, t
    pick = torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]], device=x.device)
    idx = pick[hi.long().remainder(6)].movedim(-1, 1)  # (B, 3, H, W): which candidate each channel takes
    return cand.movedim(0, 1).gather(1, idx)


def plasma_fractal(n, size, decay, generator=None, device="cpu"):
    """n plasma fractals (diamond-square, Fournier et al. 1982) of side `size` (a power of two), each in
    [0, 1]: the generator's fog texture, with its amplitudes (wibble 100, divided by `decay` per level)."""
    m = torch.zeros(n, size, size, dtype=torch.float64, device=device)
    step, wibble = size, 100.0

    def noisy_mean(a):  # a / 4 + wibble * U(-wibble, wibble)
        return a / 4 + wibble * (2 * _rand(a.shape, generator, device) - 1) * wibble

    while step >= 2:
        h = step // 2
        corners = m[:, 0::step, 0::step]
        sq = corners + corners.roll(-1, 1)
        m[:, h::step, h::step] = noisy_mean(sq + sq.roll(-1, 2))
        centres, corners = m[:, h::step, h::step], m[:, 0::step, 0::step]
        m[:, 0::step, h::step] = noisy_mean(centres + centres.roll(1, 1) + corners + corners.roll(-1, 2))
        m[:, h::step, 0::step] = noisy_mean(centres + centres.roll(1, 2) + corners + corners.roll(-1, 1))
        step, wibble = h, wibble / decay
    m = m - m.amin((1, 2), keepdim=True)
    return m / m.amax((1, 2), keepdim=True)


def _gen_device(generator):
    return generator.device if generator is not None else "cpu"


def _rand(shape, generator, device, kind="rand", low=0, high=None):
    """Random numbers from `generator` (drawn on its own device, so a CPU generator gives the same
    stream for every device of x), moved to `device`: kind rand (U[0, 1)), randn, or randint [low, high)."""
    gd = _gen_device(generator)
    if kind == "randint":
        return torch.randint(low, high, shape, generator=generator, device=gd).to(device)
    fn = torch.rand if kind == "rand" else torch.randn
    # drawn in float32 (torch's float64 normal sampler is ~5x slower on a CPU), used in float64
    return fn(shape, generator=generator, device=gd).to(device, torch.float64)


def motion_blur_kernel(radius, sigma):
    """ImageMagick's motion-blur weights: width 2*ceil(radius)+1 taps of a one-sided Gaussian,
    normalized (MagickCore MotionBlurImage)."""
    i = torch.arange(2 * math.ceil(radius) + 1, dtype=torch.float64)
    k = torch.exp(-i ** 2 / (2 * sigma ** 2))
    return k / k.sum()


def _motion_blur(x, radius, sigma, angle_deg):
    """ImageMagick-style motion blur of (B, C, H, W), one angle per image (degrees): pixel (r, c) is the
    weighted sum of the pixels (r + round(i sin a), c + round(i cos a)), i = 0..width-1, with edge
    pixels repeated beyond the border. An approximation of the generator's Wand call: ImageMagick
    works at 16-bit depth and its rounding cannot be matched bit for bit (DECISIONS.md D27)."""
    B, C, H, W = x.shape
    k = motion_blur_kernel(radius, sigma).to(x)
    a = torch.deg2rad(angle_deg.to(x))
    out = torch.zeros_like(x)
    rows, cols = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    b = torch.arange(B, device=x.device)[:, None, None]
    for i in range(len(k)):
        dx = torch.ceil(i * torch.cos(a) - 0.5).long()  # MagickCore: ceil(i*cos - 0.5), ceil(i*sin - 0.5)
        dy = torch.ceil(i * torch.sin(a) - 0.5).long()
        r = (rows[None, :] + dy[:, None]).clamp(0, H - 1)[:, :, None]
        c = (cols[None, :] + dx[:, None]).clamp(0, W - 1)[:, None, :]
        out += k[i] * x.permute(0, 2, 3, 1)[b, r, c].permute(0, 3, 1, 2)
    return out


def _pil_box_matrix(n_in, n_out):
    """Pillow's Image.resize(BOX) along one axis as an (n_out, n_in) matrix (ImagingResample's
    precompute_coeffs with the box filter: input pixels whose centre falls in the output pixel's
    support, equally weighted)."""
    scale = n_in / n_out
    fscale = max(scale, 1.0)
    support = 0.5 * fscale
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        centre = (o + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
        for i in range(lo, hi):
            t = (i - centre + 0.5) / fscale
            m[o, i] = 1.0 if -0.5 < t <= 0.5 else 0.0
        m[o] /= m[o].sum()
    return m


def _pil_resize_box(u8, size):
    """Pillow's 8-bit BOX resize of uint8 (B, C, H, W): horizontal pass, rounded to 8 bits, then the
    vertical pass, rounded (Pillow's two-pass fixed-point resampling; ties may differ by one level)."""
    B, C, H, W = u8.shape
    mw = _pil_box_matrix(W, size).to(u8.device)
    mh = _pil_box_matrix(H, size).to(u8.device)
    t = torch.floor(u8.double() @ mw.T + 0.5).clamp(0, 255)
    return torch.floor(torch.einsum("hk,...kw->...hw", mh, t) + 0.5).clamp(0, 255)


def _jpeg(u8, quality):
    """JPEG re-encoding with Pillow (libjpeg), one image at a time on the CPU: a codec, not batchable."""
    from PIL import Image
    out = []
    for img in u8.permute(0, 2, 3, 1).cpu().numpy():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=quality)
        out.append(np.asarray(Image.open(buf).convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(u8.device)


def _glass_swaps(u8, shifts, delta):
    """The generator's local pixel shuffle on uint8 (B, C, H, W): for h, then w, running down from
    n - delta to delta + 1, swap pixel (h, w) with (h + dy, w + dx); shifts (passes, positions, 2, B)
    hold (dx, dy) in {-delta, ..., delta - 1} (numpy's randint excludes its upper bound). The swaps are
    sequential in the positions, as in the generator: they are followed on a permutation of pixel
    indices in numpy (one cheap host step per position, batched over images), then applied at once."""
    B, C, H, W = u8.shape
    hw = np.array([(h, w) for h in range(H - delta, delta, -1) for w in range(W - delta, delta, -1)])
    s = shifts.cpu().numpy()
    base = np.arange(B) * H * W
    p = base + (hw[:, 0] * W + hw[:, 1])[:, None]  # (positions, B) in the flattened (B * H * W) pixels
    perm = np.arange(B * H * W)
    for it in range(s.shape[0]):
        q = base + (hw[:, 0, None] + s[it, :, 1]) * W + hw[:, 1, None] + s[it, :, 0]
        for pj, qj in zip(p, q):
            perm[pj], perm[qj] = perm[qj], perm[pj]
    perm = torch.from_numpy(perm % (H * W)).to(u8.device).view(B, 1, H * W).expand(B, C, H * W)
    return u8.reshape(B, C, H * W).gather(2, perm).view(B, C, H, W)


def _sobel_canny(u8, low=50, high=150):
    """OpenCV's Canny edge detector (3x3 Sobel with replicated borders, L1 gradient magnitude,
    non-maximum suppression with OpenCV's fixed-point tan(22.5 deg) test and its tie rules, then
    8-connected hysteresis) on uint8 (B, H, W) -> bool edges."""
    B, H, W = u8.shape
    x = u8.double()[:, None]
    dx = _filter2d(x, torch.tensor([1.0, 2.0, 1.0]), torch.tensor([-1.0, 0.0, 1.0]))[:, 0].long()
    dy = _filter2d(x, torch.tensor([-1.0, 0.0, 1.0]), torch.tensor([1.0, 2.0, 1.0]))[:, 0].long()
    mag = dx.abs() + dy.abs()
    mp = F.pad(mag, (1, 1, 1, 1))  # magnitudes outside the image are 0

    def at(di, dj):  # the magnitude of the neighbour (row + di, col + dj)
        return mp[:, 1 + di:1 + di + H, 1 + dj:1 + dj + W]

    ax, ay = dx.abs(), dy.abs() << 15
    tg22 = ax * 13573  # round(tan(22.5 deg) * 2^15)
    tg67 = tg22 + (ax << 16)
    s = torch.where((dx ^ dy) < 0, -1, 1)
    diag = torch.where(s < 0, (mag > at(-1, 1)) & (mag > at(1, -1)), (mag > at(-1, -1)) & (mag > at(1, 1)))
    local_max = torch.where(ay < tg22, (mag > at(0, -1)) & (mag >= at(0, 1)),
                            torch.where(ay > tg67, (mag > at(-1, 0)) & (mag >= at(1, 0)), diag))
    cand = local_max & (mag > low)
    strong, weak = cand & (mag > high), cand & (mag <= high)
    def dilate(m):  # 3x3 binary dilation
        p = F.pad(m, (1, 1, 1, 1))
        m = p[:, :, :-2] | p[:, :, 1:-1] | p[:, :, 2:]
        return m[:, :-2] | m[:, 1:-1] | m[:, 2:]

    while True:  # hysteresis: grow the strong edges through 8-connected weak pixels
        grown = strong | (weak & dilate(strong))
        if torch.equal(grown, strong):
            return strong
        strong = grown


def _chamfer_distance(zero, cap=20.0):
    """OpenCV's distanceTransform(DIST_L2, mask 5): the 5x5 chamfer distance (steps 1, 1.4 and 2.1969,
    summed in float32 as OpenCV 5 does) to the nearest True pixel of `zero` (B, H, W), capped at `cap`
    (all the generator keeps). Bellman-Ford relaxation: after k sweeps every distance below k is final."""
    one, diag, knight = (torch.tensor(v, dtype=torch.float32) for v in (1.0, 1.4, 2.1969))
    big = torch.tensor(cap + 10.0)
    d = torch.where(zero, torch.tensor(0.0), big).float()
    B, H, W = d.shape
    moves = [(0, 1, one), (1, 0, one), (1, 1, diag), (1, -1, diag), (1, 2, knight), (2, 1, knight), (1, -2, knight),
             (2, -1, knight)]
    for _ in range(int(cap) + 2):
        p = F.pad(d, (2, 2, 2, 2), value=float(big))
        new = d
        for di, dj, cost in moves + [(-a, -b, c) for a, b, c in moves]:
            new = torch.minimum(new, p[:, 2 + di:2 + di + H, 2 + dj:2 + dj + W] + cost.to(d.device))
        if torch.equal(new, d):
            break
        d = new
    return d.clamp(max=cap)


def _equalize_hist(u8):
    """OpenCV's equalizeHist on uint8 (B, H, W): the lookup table round(255 * cdf excluding the first
    occupied level / (N - its count)); a constant image stays constant."""
    B = u8.shape[0]
    flat = u8.reshape(B, -1).long()
    hist = torch.zeros(B, 256, dtype=torch.long, device=u8.device).scatter_add_(1, flat, torch.ones_like(flat))
    first = (hist > 0).long().argmax(1, keepdim=True)
    n_first = hist.gather(1, first)
    total = flat.shape[1]
    cum = hist.cumsum(1) - n_first  # counts above the first occupied level
    scale = 255.0 / (total - n_first).clamp(min=1).double()
    lut = torch.round(cum.double() * scale).clamp(0, 255)
    lut = torch.where(torch.arange(256, device=u8.device) <= first, 0.0, lut)
    lut = torch.where(n_first == total, first.double().expand(-1, 256), lut)
    return lut.gather(1, flat).view(u8.shape)


def _spatter(x, c, generator):
    """The generator's spatter: a thresholded, blurred Gaussian 'liquid' layer drawn as water (severities
    1-3: edge-shaded pale turquoise, via OpenCV's Canny, distance transform and histogram equalization,
    re-implemented above) or mud (4-5: brown blots)."""
    B, _, H, W = x.shape
    liquid = _gaussian((c[0] + c[1] * _rand((B, 1, H, W), generator, x.device, "randn")), c[2])[:, 0]
    liquid = torch.where(liquid < c[3], 0.0, liquid)
    if c[5] == 0:
        lu8 = (liquid * 255).floor().remainder(256)  # numpy's astype(uint8): a liquid value above 1 wraps around
        dist = _chamfer_distance(_sobel_canny(lu8.to(torch.uint8))).float().double()[:, None]
        box = torch.ones(3, dtype=torch.float64)
        dist = (_filter2d(dist, box, mode="mirror") / 9).float().floor()  # cv2.blur -> astype(uint8)
        dist = _equalize_hist(dist[:, 0].to(torch.uint8)).double()[:, None]
        ker = torch.tensor([[-2.0, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=torch.float64)
        dist = _linear_map(dist, ("emboss",), lambda e: _filter2d_2d(e, ker, "mirror"))
        dist = torch.round(dist).clamp(0, 255)  # filter2D to uint8 (saturating)
        dist = torch.round(_filter2d(dist, box, mode="mirror") / 9)  # cv2.blur on uint8 rounds
        m = (lu8[:, None] * dist).float().double()
        m = m / m.amax((2, 3), keepdim=True) * c[4]  # 0/0 -> NaN -> a black image, as in the generator
        colour = torch.tensor([175, 238, 238], dtype=torch.float64, device=x.device).view(1, 3, 1, 1) / 255
        return x + m * colour
    m = _gaussian(torch.where(liquid > c[3], 1.0, 0.0)[:, None], c[4])
    m = torch.where(m < 0.8, 0.0, m)
    colour = torch.tensor([63, 42, 20], dtype=torch.float64, device=x.device).view(1, 3, 1, 1) / 255
    return x * (1 - m) + colour * m


def _warp_affine(x, M):
    """cv2.warpAffine(x, M) with bilinear interpolation and BORDER_REFLECT_101 on float (B, C, H, W), one
    2x3 matrix per image (B, 2, 3) mapping source to destination: each output pixel samples the input at
    M^-1 (x, y). (OpenCV 5 samples float images at these exact positions; OpenCV 3, which made the
    released files, rounded them to 1/32 pixel: a difference of at most 1/64 pixel.)"""
    B, C, H, W = x.shape
    a, b, c0, d, e, f0 = M.double().reshape(B, 6).unbind(1)
    det = a * e - b * d
    inv = torch.where(det != 0, 1 / det, torch.zeros_like(det))
    A11, A12, A21, A22 = e * inv, -b * inv, -d * inv, a * inv
    B1, B2 = -A11 * c0 - A12 * f0, -A21 * c0 - A22 * f0
    ys = torch.arange(H, dtype=torch.float64, device=x.device).view(1, H, 1)
    xs = torch.arange(W, dtype=torch.float64, device=x.device).view(1, 1, W)
    v = lambda t: t.view(B, 1, 1)
    return _bilinear(x, v(A21) * xs + v(A22) * ys + v(B2), v(A11) * xs + v(A12) * ys + v(B1), "mirror")


def _bilinear(x, rows, cols, mode):
    """Sample (B, C, H, W) at fractional (rows, cols) (B, H, W), bilinearly, neighbours beyond the border
    taken by the rule of `_pad_index`: grid_sample's reflection about the border pixels' centres
    (align_corners=True) is 'mirror', about their outer edges (align_corners=False) is 'reflect'."""
    H, W = x.shape[-2:]
    if mode == "mirror":
        grid = torch.stack([cols * (2 / (W - 1)) - 1, rows * (2 / (H - 1)) - 1], -1)
    else:
        grid = torch.stack([(2 * cols + 1) / W - 1, (2 * rows + 1) / H - 1], -1)
    return F.grid_sample(x, grid.to(x.dtype), "bilinear", "reflection", align_corners=mode == "mirror")


def _elastic(x, c, generator):
    """The generator's elastic transform: a random affine warp of three control points (cv2), then a
    displacement field of Gaussian-smoothed uniform noise applied with linear interpolation (scipy
    map_coordinates, 'reflect' borders). Constants are fractions of the image size."""
    B, C, H, W = x.shape
    alpha, sigma, shift = (v * H for v in c)
    cy, cx, sq = H // 2, W // 2, min(H, W) // 3
    src = torch.tensor([[cx + sq, cy + sq], [cx + sq, cy - sq], [cx - sq, cy - sq]], dtype=torch.float64)  # (x, y)
    dst = src + shift * (2 * _rand((B, 3, 2), generator, "cpu").float().double() - 1)
    dst = dst.float().double()  # float32 points, as in the generator
    P = torch.cat([src, torch.ones(3, 1, dtype=torch.float64)], 1)  # solve M @ [x, y, 1] = dst for each image
    M = torch.linalg.solve(P, dst).transpose(1, 2).to(x.device)
    x = _warp_affine(x.float().double(), M).float().double()
    fields = [(_gaussian(2 * _rand((B, 1, H, W), generator, x.device) - 1, sigma, "reflect", 3.0) * alpha).float()
              for _ in range(2)]
    dx, dy = (f.double()[:, 0] for f in fields)
    rows = torch.arange(H, dtype=torch.float64, device=x.device).view(1, H, 1) + dy
    cols = torch.arange(W, dtype=torch.float64, device=x.device).view(1, 1, W) + dx
    return _bilinear(x, rows, cols, "reflect").float().double()


_FROST_CACHE = {}


def _frost_images(frost_dir, device):
    """Hendrycks's frost pictures from `frost_dir`, scaled by 0.2 (bilinear, as cv2.resize) -> uint8-valued
    float tensors (3, h, w). A missing file is a DataError naming it."""
    key = (str(frost_dir), str(device))
    if key not in _FROST_CACHE:
        from PIL import Image
        imgs = []
        for name in FROST_FILES:
            path = pathlib.Path(frost_dir) / name
            if not path.exists():
                raise DataError(f"frost image {path} not found: --frost-dir must hold {', '.join(FROST_FILES)} "
                                f"(from Hendrycks's robustness repository, ImageNet-C/create_c)")
            a = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).double()
            size = (int(round(a.shape[1] * 0.2)), int(round(a.shape[2] * 0.2)))
            a = F.interpolate(a[None], size=size, mode="bilinear", align_corners=False)[0]
            imgs.append(torch.round(a).clamp(0, 255).to(device))
        _FROST_CACHE[key] = imgs
    return _FROST_CACHE[key]


def corrupt(x, name, severity, generator=None, frost_dir=None):
    """One CIFAR-10-C corruption (Hendrycks & Dietterich 2019) at `severity` 1..5 of a batch x
    (B, 3, H, W) in [0, 1], on x's device, computed in float64 as the reference generator does, and
    returned as uint8 (B, 3, H, W) truncated like the released files. Random numbers come from
    `generator` (a torch.Generator on any device; the same generator state gives the same images on
    every device of x). Severity constants are CIFAR-10-C's (32x32 images; DECISIONS.md D26).
    Exact ports (same uint8 output up to floating-point ties, tested against numpy/scipy/skimage/
    Pillow/OpenCV): every corruption but motion_blur and snow, whose ImageMagick motion blur is
    re-implemented approximately (DECISIONS.md D27), and frost, whose pictures come from `frost_dir`."""
    check_choice("corruption", name, CORRUPTION_NAMES)
    if not (isinstance(severity, int) and 1 <= severity <= 5):
        raise ValueError(f"severity {severity!r}: expected an integer in 1..5")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"corrupt expects RGB images (B, 3, H, W), got {tuple(x.shape)}")
    c = SEVERITY[name][severity - 1]
    g, dev = generator, x.device
    B, _, H, W = x.shape
    x = x.double()
    if name == "gaussian_noise":
        out = x + c * _rand(x.shape, g, dev, "randn")
    elif name == "shot_noise":
        rate = (x * c).to(_gen_device(g))
        out = torch.poisson(rate, generator=g).to(dev) / c
    elif name == "impulse_noise":  # skimage random_noise('s&p'): each element flipped w.p. c, to 1 or 0 w.p. 1/2
        flip, salt = _rand(x.shape, g, dev) < c, _rand(x.shape, g, dev) < 0.5
        out = torch.where(flip, salt.double(), x)
    elif name == "speckle_noise":
        out = x + x * c * _rand(x.shape, g, dev, "randn")
    elif name == "gaussian_blur":
        out = _gaussian(x, c)
    elif name == "defocus_blur":
        k = _defocus_kernel(*c)
        out = _linear_map(x, ("defocus", c), lambda e: _filter2d_2d(e, k, "mirror"))
    elif name == "glass_blur":
        sigma, delta, passes = c
        u = _trunc_u8(_gaussian(x, sigma))
        n = (H - 2 * delta) * (W - 2 * delta)
        shifts = _rand((passes, n, 2, B), g, dev, "randint", -delta, delta)
        out = _gaussian(_glass_swaps(u, shifts, delta).double() / 255, sigma)
    elif name == "motion_blur":  # rounded to 8 bits by the PNG round trip, not truncated
        angle = _rand((B,), g, dev) * 90 - 45
        return torch.round(_motion_blur(x * 255, c[0], c[1], angle)).clamp(0, 255).to(torch.uint8)
    elif name == "zoom_blur":  # the mean of x and its zooms by 1, 1.01, ... (float32 x, as in the generator)
        zooms = np.arange(1, c, 0.01)

        def zoom_mean(e):
            return (e + sum(_clipped_zoom_matrix(H, z, dev) @ e @ _clipped_zoom_matrix(W, z, dev).T for z in zooms)
                    ) / (len(zooms) + 1)

        out = _linear_map(x.float().double(), ("zoom", c), zoom_mean)
    elif name == "snow":
        xf = x.float().double()
        layer = c[0] + c[1] * _rand((B, 1, H, W), g, dev, "randn")
        layer = _sandwich(_clipped_zoom_matrix(H, c[2], dev), layer, _clipped_zoom_matrix(W, c[2], dev))
        layer = torch.where(layer < c[3], 0.0, layer)
        layer = (layer.clamp(0, 1) * 255).floor()  # an 8-bit greyscale image before ImageMagick
        angle = _rand((B,), g, dev) * 90 - 135
        layer = torch.round(_motion_blur(layer, c[4], c[5], angle)).clamp(0, 255) / 255
        grey = (0.299 * xf[:, 0] + 0.587 * xf[:, 1] + 0.114 * xf[:, 2])[:, None].float().double()
        xf = c[6] * xf + (1 - c[6]) * torch.maximum(xf, grey * 1.5 + 0.5)
        out = xf + layer + layer.flip(2, 3)
    elif name == "frost":
        if frost_dir is None:
            raise ValueError("frost needs Hendrycks's frost images: pass their folder as frost_dir (--frost-dir)")
        imgs = _frost_images(frost_dir, dev)
        pick = _rand((B,), g, "cpu", "randint", 0, len(imgs)).tolist()
        u = _rand((B, 2), g, "cpu")
        crops = []
        for i, k in enumerate(pick):
            h, w = imgs[k].shape[1:]
            r0, c0 = int(u[i, 0] * (h - H)), int(u[i, 1] * (w - W))
            crops.append(imgs[k][:, r0:r0 + H, c0:c0 + W])
        return (c[0] * torch.round(x * 255) + c[1] * torch.stack(crops)).clamp(0, 255).to(torch.uint8)
    elif name == "fog":
        size = 1 << max(0, (max(H, W) - 1).bit_length())
        plasma = plasma_fractal(B, size, c[1], g, dev)[:, None, :H, :W]
        top = x.amax((1, 2, 3), keepdim=True)
        out = (x + c[0] * plasma) * top / (top + c[0])
    elif name == "spatter":
        out = _spatter(x.float().double(), c, g)
    elif name in ("brightness", "saturate"):
        hsv = rgb_to_hsv(x)
        if name == "brightness":
            hsv[:, 2] = (hsv[:, 2] + c).clamp(0, 1)
        else:
            hsv[:, 1] = (hsv[:, 1] * c[0] + c[1]).clamp(0, 1)
        out = hsv_to_rgb(hsv)
    elif name == "contrast":
        m = x.mean((2, 3), keepdim=True)
        out = (x - m) * c + m
    elif name == "elastic_transform":
        out = _elastic(x, c, g)
    elif name == "pixelate":
        u = torch.round(x * 255)
        return _pil_resize_box(_pil_resize_box(u, int(H * c)), H).to(torch.uint8)
    else:  # jpeg_compression
        return _jpeg(torch.round(x * 255).to(torch.uint8), c)
    return _trunc_u8(out)


def _defocus_kernel(radius, alias_blur):
    """The generator's defocus kernel: an aliased disk of `radius` on a 17x17 grid, normalized, then
    smoothed by cv2.GaussianBlur(3x3, sigma=alias_blur) in float32."""
    t = torch.arange(-8, 9, dtype=torch.float32)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius ** 2).float()
    disk = disk / disk.sum()
    g = torch.exp(-torch.tensor([-1.0, 0.0, 1.0]) ** 2 / (2 * alias_blur ** 2))
    g = (g / g.sum()).float()
    k = _filter2d(disk[None, None].double(), g.double(), mode="mirror")[0, 0].float()
    r = int((k != 0).any(0).nonzero().max()) - 8  # drop the all-zero border (the disk is small at CIFAR's radii)
    return k[8 - r:9 + r, 8 - r:9 + r]


def _filter2d_2d(x, k, mode):
    """Correlation of (B, C, H, W) with a 2-D kernel (cv2.filter2D per channel)."""
    B, C, H, W = x.shape
    r = k.shape[0] // 2
    p = x[:, :, _pad_index(H, r, mode, x.device)][:, :, :, _pad_index(W, r, mode, x.device)]
    return F.conv2d(p.reshape(B * C, 1, H + 2 * r, W + 2 * r), k.to(x)[None, None]).view(B, C, H, W)


CIFAR10C_URL = "https://zenodo.org/record/2535967/files/CIFAR-10-C.tar"  # 2,918,471,680 bytes
SOURCES["cifar10c"] = ("", [("CIFAR-10-C.tar", CIFAR10C_URL, "56bf5dcef84df0e2308c6dcbcbbd8499")], ["CIFAR-10-C/labels.npy"])


def read_cifar10c(root, name, test_labels, download_ok=False):
    """The released CIFAR-10-C file of one corruption, memory-mapped: --data-root/CIFAR-10-C/<name>.npy,
    uint8 (5 N, 32, 32, 3) -- severities 1..5 in blocks of N test images in CIFAR-10 test order -- checked
    against labels.npy and `test_labels` (the CIFAR-10 test labels, N of them) block by block.
    A missing, truncated or mislabelled file is a DataError naming it."""
    check_choice("corruption", name, CORRUPTION_NAMES)
    base = _require("cifar10c", root, download_ok) / "CIFAR-10-C"
    n = len(test_labels)

    def load(fname, shape):
        path = base / fname
        if not path.exists():
            raise DataError(f"CIFAR-10-C file {path} not found (expected {fname} with uint8 shape {shape})")
        try:
            a = np.load(path, mmap_mode="r")
        except Exception as e:  # truncated header or data, not a .npy file
            raise DataError(f"corrupt CIFAR-10-C file {path}: {e.__class__.__name__}: {e}") from None
        if a.dtype != np.uint8 or a.shape != shape:
            raise DataError(f"corrupt CIFAR-10-C file {path}: {a.dtype} {a.shape}, expected uint8 {shape}")
        return a

    labels = load("labels.npy", (5 * n,))
    expected = np.asarray(test_labels, dtype=np.int64)
    for s in range(5):
        if not np.array_equal(labels[s * n:(s + 1) * n].astype(np.int64), expected):
            raise DataError(f"CIFAR-10-C labels {base / 'labels.npy'}: severity block {s + 1} differs from the CIFAR-10 "
                            f"test labels (a different test set or a reordered file)")
    return load(f"{name}.npy", (5 * n, 32, 32, 3))


def adapt_bn(model, x, batch_size=500):
    """Re-estimate every BatchNorm's running statistics on x (P1 Table 7, App. F; Li et al. 2016, AdaBN):
    reset them, then run x through the model with only the BN layers in train mode, under no_grad, with
    momentum None so that the statistics are the exact cumulative average over the batches (each batch
    weighted equally: a batch_size dividing len(x), or >= len(x), gives the set's own mean and unbiased
    variance). Momentum and every module's mode are restored afterwards. A model without BN is left
    untouched. Returns the model."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for xb in x.split(batch_size):
            model(xb)
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    for m, t in modes.items():
        m.train(t)
    return model
