"""Shared primitives for reproducing two papers on normalization and adversarial robustness.

P1: "Batch normalization increases adversarial vulnerability: disentangling usefulness and
    robustness of model features" (LIGS, Ilyas-style feature datasets).
P2: Galloway et al., "Batch Normalization is a Cause of Adversarial Vulnerability".

What lives here: what two or more scripts use, or what the papers name; nothing else (the CIFAR-10-C generator,
used by exp_corruption.py alone, lives there). Each exp_*.py owns its experiment: which recipe each model gets,
its sweep, measurements, table, figure and claims. The file reads in two parts (banners below):

Part I. The papers (sections 1-11): what a reader comes for.
   1. Basics: choices, seeds
   2. Normalization layers
   3. VGG
   4. ResNets (with Fixup variants)
   5. WideResNet
   6. MLPs and the deep linear network
   7. make_model: the single entry point for scripts
   8. Attacks: FGSM, BIM, PGD-linf/l2 with CE or CW margin loss, attack specs, Carlini et al.'s sanity checks
   9. LIGS (P1 Eq. 1) and its differentiable regularizer
  10. Training and evaluation: the papers' recipes, train_model, evaluate, per-epoch metrics, landscape probes,
      BN-statistics adaptation
  11. P2's mechanism analyses
Part II. Running them (sections 12-15): plumbing a reader may skip.
  12. Data: readers, checksummed download, bundled digits, synthetic images
  13. Devices and torchrun
  14. Claims: a claim as data, intervals, verdicts
  15. Run records, the checkpoint cache, presets and the command line

Input spaces (DECISIONS.md D2; INPUT_SPACES) -- the attacks do not care which one a script uses:
  - "pixels" (P1): data in [0,1]; the model standardizes inside (`mean=`, `std=` -> a `Standardize`
    first layer); eps in pixel units; attacks use clip=(0, 1).
  - "standardized" (P2): data standardized outside the model (no `mean`/`std`); eps in standardized units; attacks
    use the paper's clip range, e.g. clip=(-2, 2) for CIFAR-10, (-1, 1) for SVHN, None for MNIST.

Importing this module has no side effects (no argparse parsing, no global torch flags, no I/O).
"""
import argparse
import collections
import contextlib
import copy
import csv
import datetime
import functools
import gzip
import hashlib
import http.client
import inspect
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
import types
import urllib.request

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

NORMS = ("none", "bn", "in", "ln", "gn")
ACTS = ("relu", "leaky_relu", "selu")
ATTACK_NORMS = ("linf", "l2")
ATTACK_LOSSES = ("ce", "cw", "dlr")
PERTURBATIONS = ("gaussian", "uniform", "fgsm", "pgd")


# ################################################################################################
# PART I. THE PAPERS: models, attacks, LIGS, training and evaluation, P2's analyses
# ################################################################################################

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
      none: nn.Identity (in VGGs and MLPs the preceding conv/linear then has a bias, see `_has_bias`).
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
    # VGGs and MLPs: a norm with a learned shift makes a preceding bias redundant, so a bias only for 'none'.
    # ResNets and WRNs have no conv biases with any norm, as the authors' models (P1's MadryLab ResNet replaces BN by
    # the identity and keeps bias=False; P2's Fixup code has no conv biases): DECISIONS.md D10.
    return norm == "none"


def make_act(act):
    """relu | leaky_relu (slope 0.1, P1 Fig 8; DECISIONS.md D16) | selu. Never in-place: LIGS needs
    double backprop and attacks need clean graphs."""
    check_choice("act", act, ACTS)
    return {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.1), "selu": nn.SELU}[act]()


class Standardize(nn.Module):
    """(x - mean) / std per channel as the model's first layer, so that attacks and LIGS work in
    [0,1] pixel space (P1 convention; the robustness-library `Normalize` layer)."""

    def __init__(self, mean, std, persistent=True):
        super().__init__()
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != std.shape or (std <= 0).any():
            raise ValueError(f"Standardize: mean and std need the same shape and std > 0, got {mean.tolist()}, {std.tolist()}")
        # (persistent=False: not in state_dict, so that torchvision's weight files load with strict=True)
        self.register_buffer("mean", mean.reshape(-1), persistent=persistent)
        self.register_buffer("std", std.reshape(-1), persistent=persistent)

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)  # (1, C, 1, 1) for images, (1, D) for vectors
        return (x - self.mean.view(shape)) / self.std.view(shape)


def _input_layer(mean, std, persistent=True):
    return nn.Identity() if mean is None and std is None else Standardize(mean, std, persistent)


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
        self.conv1, self.n1, self.act1 = conv3x3(c_in, c, stride), norm_layer(norm, c, gn_groups=gn_groups), make_act(act)
        self.conv2, self.n2, self.act2 = conv3x3(c, c, 1), norm_layer(norm, c, gn_groups=gn_groups), make_act(act)
        self.shortcut, self.proj = shortcut, None
        self.c_out, self.stride = c, stride
        if shortcut and (stride != 1 or c_in != c) and proj == "conv":
            self.proj = nn.Sequential(conv1x1(c_in, c, stride), norm_layer(norm, c, gn_groups=gn_groups))

    def branch(self, x):
        return self.n2(self.conv2(self.act1(self.n1(self.conv1(x)))))

    def forward(self, x, fake_relu=False):
        out = self.branch(x)
        if self.shortcut:
            out = out + (self.proj(x) if self.proj is not None else _identity_or_pad(x, self.c_out, self.stride))
        return _fake_relu(out) if fake_relu else self.act2(out)


class _FakeReLU(torch.autograd.Function):
    """ReLU forward, identity backward: the robustness library's `fake_relu`, through which Ilyas et al. and P1's
    authors invert the representation (P1 App. B.3), so that units the last ReLU zeroes still pass a gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        return grad


def _fake_relu(x):
    return _FakeReLU.apply(x)


def _identity_or_pad(x, c_out, stride):
    return x if stride == 1 and x.shape[1] == c_out else _pad_shortcut(x, c_out, stride)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (x4 channels) bottleneck of CIFAR ResNet-50 (kuangliu/MadryLab layout), the
    ResNet50 of P1 Table 1 and of the feature-dataset source models (P1 App. E)."""
    expansion = 4

    def __init__(self, c_in, c, stride=1, norm="bn", act="relu", shortcut=True, proj="conv", gn_groups=None):
        super().__init__()
        c_out = 4 * c
        self.conv1, self.n1, self.act1 = conv1x1(c_in, c, 1), norm_layer(norm, c, gn_groups=gn_groups), make_act(act)
        self.conv2, self.n2, self.act2 = conv3x3(c, c, stride), norm_layer(norm, c, gn_groups=gn_groups), make_act(act)
        self.conv3, self.n3, self.act3 = conv1x1(c, c_out, 1), norm_layer(norm, c_out, gn_groups=gn_groups), make_act(act)
        self.shortcut, self.proj = shortcut, None
        self.c_out, self.stride = c_out, stride
        if shortcut and (stride != 1 or c_in != c_out) and proj == "conv":
            self.proj = nn.Sequential(conv1x1(c_in, c_out, stride), norm_layer(norm, c_out, gn_groups=gn_groups))

    def branch(self, x):
        out = self.act1(self.n1(self.conv1(x)))
        out = self.act2(self.n2(self.conv2(out)))
        return self.n3(self.conv3(out))

    def forward(self, x, fake_relu=False):
        out = self.branch(x)
        if self.shortcut:
            out = out + (self.proj(x) if self.proj is not None else _identity_or_pad(x, self.c_out, self.stride))
        return _fake_relu(out) if fake_relu else self.act3(out)


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

    def forward(self, x, fake_relu=False):
        xb = x + self.bias1a
        sc = self.proj(xb) if self.proj is not None else _identity_or_pad(xb, self.c_out, self.stride)
        return _fake_relu(self.branch(x) + sc) if fake_relu else self.act2(self.branch(x) + sc)


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

    def forward(self, x, fake_relu=False):
        xb = x + self.bias1a
        sc = self.proj(xb) if self.proj is not None else _identity_or_pad(xb, self.c_out, self.stride)
        return _fake_relu(self.branch(x) + sc) if fake_relu else self.act3(self.branch(x) + sc)


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
        self.stem = conv3x3(in_channels, widths[0])
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

    def features(self, x, fake_relu=False):
        """Penultimate representation g(x): the globally average-pooled vector before the classifier. fake_relu:
        the last block's ReLU passes the gradient unchanged (`_FakeReLU`; representation inversion, P1 App. B.3)."""
        out = self.stem_norm(self.stem(self.input_norm(x)))
        if self.fixup:
            out = out + self.bias1  # Fixup: scalar bias before the activation
        out = self.layers[:-1](self.stem_act(out))
        out = F.adaptive_avg_pool2d(self.layers[-1](out, fake_relu=fake_relu), 1).flatten(1)
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
        self.n1, self.act1 = norm_layer(norm, c_in, gn_groups=gn_groups), make_act(act)
        self.conv1 = conv3x3(c_in, c, stride)
        self.n2, self.act2, self.conv2 = norm_layer(norm, c, gn_groups=gn_groups), make_act(act), conv3x3(c, c, 1)
        self.proj = conv1x1(c_in, c, stride) if (stride != 1 or c_in != c) else None

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
        self.stem = conv3x3(in_channels, 16)
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
    """Deep *linear* network of P2 Figs 1 and 7, no nonlinearity, PyTorch default init (P2: the dynamic range
    shrinks with depth "under default initialization"), then Linear(num_classes). bn_first=False: `depth` x
    (Linear(width) -> [BN]); bn_first=True, the authors' notebook: Linear(width), then `depth` x ([BN] ->
    Linear(width, width)). Without BN the whole net is one linear map; with BN in train mode each mini-batch gets
    its own affine map (P2 Figs 1, 7)."""

    def __init__(self, in_dim=2, width=128, depth=16, num_classes=2, norm="none", bn_momentum=0.1, bn_first=False):
        super().__init__()
        check_choice("norm", norm, ("none", "bn"))
        bn = lambda: norm_layer(norm, width, dim=1, bn_momentum=bn_momentum)
        self.input = nn.Linear(in_dim, width) if bn_first else nn.Identity()
        self.layers = nn.ModuleList()
        d = width if bn_first else in_dim
        for _ in range(depth):
            self.layers.append(nn.Sequential(bn(), nn.Linear(d, width)) if bn_first else
                               nn.Sequential(nn.Linear(d, width), bn()))
            d = width
        self.fc = nn.Linear(d, num_classes)

    def layer_outputs(self, x):
        """[x, h_1, ..., h_depth]: the input and every block's output, for the per-layer PCA plots."""
        outs = [x, self.layers[0](self.input(x))]
        for layer in self.layers[1:]:
            outs.append(layer(outs[-1]))
        return outs

    def features(self, x):
        return self.layer_outputs(x)[-1]

    def forward(self, x):
        return self.fc(self.features(x))


# ================================================================================================
# 6b. ImageNet models whose state_dict is torchvision's (P1 Table 1 ImageNet rows, Fig 11; P2 Tables 5, 10)
# ================================================================================================


TV_WEIGHT_FILES = {  # torchvision's released ImageNet weights (IMAGENET1K_V1); the 8 hex digits start the sha256
    "vgg11": "vgg11-8a719046.pth", "vgg13": "vgg13-19584684.pth", "vgg16": "vgg16-397923af.pth",
    "vgg19": "vgg19-dcbb9e9d.pth", "vgg11_bn": "vgg11_bn-6002323d.pth", "vgg13_bn": "vgg13_bn-abd245e5.pth",
    "vgg16_bn": "vgg16_bn-6c64b313.pth", "vgg19_bn": "vgg19_bn-c79401a0.pth", "resnet18": "resnet18-f37072fd.pth",
    "resnet50": "resnet50-0676ba61.pth", "alexnet": "alexnet-owt-7be5be79.pth", "densenet121": "densenet121-a639ec97.pth",
}
TV_URL = "https://download.pytorch.org/models/"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's pretrained models


class ImageNetVGG(nn.Module):
    """Simonyan & Zisserman's VGG as torchvision builds it, so that its weight files load with strict=True:
    `features` = [conv3x3 (bias), BatchNorm2d if bn, ReLU] per conv and MaxPool2d(2) per "M" of VGG_CFGS; `avgpool` =
    AdaptiveAvgPool2d(7); `classifier` = Linear(25088, 4096), ReLU, Dropout, Linear(4096, 4096), ReLU, Dropout,
    Linear(4096, classes) -- keys features.<i>.*, classifier.{0,3,6}.*. mean/std: a first layer standardizing [0,1]
    pixels (P1's convention), kept out of the state_dict."""

    def __init__(self, depth=16, bn=False, num_classes=1000, mean=None, std=None):
        super().__init__()
        check_choice("vgg depth", depth, (11, 13, 16, 19))
        self.input_norm = _input_layer(mean, std, persistent=False)
        layers, c_in = [], 3
        for v in VGG_CFGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers += [nn.Conv2d(c_in, v, 3, padding=1)] + ([nn.BatchNorm2d(v)] if bn else []) + [nn.ReLU(inplace=True)]
            c_in = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, 4096),
                                        nn.ReLU(True), nn.Dropout(), nn.Linear(4096, num_classes))
        for m in self.modules():  # torchvision's init (for training from scratch)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(self.input_norm(x))).flatten(1))


class _TVBlock(nn.Module):
    """torchvision's ResNet blocks (keys conv1, bn1, conv2, bn2[, conv3, bn3], downsample.{0,1}), with any norm of
    `norm_layer` in the bn* places (none: identity, no parameters). Bottleneck strides in its 3x3 conv (ResNet v1.5,
    as torchvision's weights)."""

    def __init__(self, c_in, planes, stride, bottleneck, norm, gn_groups=None):
        super().__init__()
        self.expansion = 4 if bottleneck else 1
        c_out, nl = planes * self.expansion, lambda c: norm_layer(norm, c, gn_groups=gn_groups)
        if bottleneck:
            self.conv1, self.bn1 = conv1x1(c_in, planes), nl(planes)
            self.conv2, self.bn2 = conv3x3(planes, planes, stride), nl(planes)
            self.conv3, self.bn3 = conv1x1(planes, c_out), nl(c_out)
        else:
            self.conv1, self.bn1 = conv3x3(c_in, planes, stride), nl(planes)
            self.conv2, self.bn2 = conv3x3(planes, planes), nl(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.Sequential(conv1x1(c_in, c_out, stride), nl(c_out)) if stride != 1 or c_in != c_out else None

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if hasattr(self, "conv3"):
            out = self.bn3(self.conv3(self.relu(out)))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ImageNetResNet(nn.Module):
    """He et al.'s ImageNet ResNet-18/50 as torchvision builds it (7x7 stride-2 stem, 3x3 max-pool, four stages,
    average pool, fc; keys conv1, bn1, layer<k>.<i>.*, fc), with P1's norm option (Sec. 4.3, Fig 11: none | bn | in
    | ln | gn in every bn* place; no conv biases with any norm, D10). torchvision's init: He fan-out convs, norm
    weights 1, biases 0."""

    def __init__(self, depth=50, norm="bn", num_classes=1000, gn_groups=None, mean=None, std=None):
        super().__init__()
        check_choice("imagenet resnet depth", depth, (18, 50))
        bottleneck, blocks = depth == 50, [2, 2, 2, 2] if depth == 18 else [3, 4, 6, 3]
        self.input_norm = _input_layer(mean, std, persistent=False)
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(norm, 64, gn_groups=gn_groups)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        c_in = 64
        for k, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            stage = []
            for i in range(n):
                stage.append(_TVBlock(c_in, planes, 2 if k > 0 and i == 0 else 1, bottleneck, norm, gn_groups))
                c_in = stage[-1].expansion * planes
            setattr(self, f"layer{k + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x):
        """Penultimate representation g(x): the average-pooled output of layer4."""
        out = self.maxpool(self.relu(self.bn1(self.conv1(self.input_norm(x)))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.avgpool(out).flatten(1)

    def forward(self, x):
        return self.fc(self.features(x))


class ImageNetAlexNet(nn.Module):
    """Krizhevsky's one-GPU AlexNet ("one weird trick") as torchvision builds it (P2 Table 5's AlexNet row): five
    convs (keys features.{0,3,6,8,10}), AdaptiveAvgPool2d(6), classifier Dropout, Linear(9216, 4096), ReLU, Dropout,
    Linear(4096, 4096), ReLU, Linear(4096, classes) (keys classifier.{1,4,6}). No normalization."""

    def __init__(self, num_classes=1000, mean=None, std=None):
        super().__init__()
        self.input_norm = _input_layer(mean, std, persistent=False)
        conv = lambda c_in, c_out, k, **kw: [nn.Conv2d(c_in, c_out, k, **kw), nn.ReLU(inplace=True)]
        pool = lambda: [nn.MaxPool2d(3, stride=2)]
        self.features = nn.Sequential(*conv(3, 64, 11, stride=4, padding=2), *pool(), *conv(64, 192, 5, padding=2),
                                      *pool(), *conv(192, 384, 3, padding=1), *conv(384, 256, 3, padding=1),
                                      *conv(256, 256, 3, padding=1), *pool())
        self.avgpool = nn.AdaptiveAvgPool2d(6)
        self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(4096, 4096), nn.ReLU(True), nn.Linear(4096, num_classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(self.input_norm(x))).flatten(1))


class _DenseLayer(nn.Module):
    """DenseNet-BC layer (keys norm1, conv1, norm2, conv2): BN-ReLU-conv1x1 to 4k channels, BN-ReLU-conv3x3 to k."""

    def __init__(self, c_in, growth=32, bn_size=4):
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(c_in), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c_in, bn_size * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(bn_size * growth), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class _DenseBlock(nn.Module):
    """Each layer sees the concatenation of the block's input and every earlier layer's output (keys denselayer<i>)."""

    def __init__(self, n, c_in, growth=32):
        super().__init__()
        for i in range(n):
            self.add_module(f"denselayer{i + 1}", _DenseLayer(c_in + i * growth, growth))

    def forward(self, x):
        for layer in self.children():
            x = torch.cat([x, layer(x)], 1)
        return x


class ImageNetDenseNet(nn.Module):
    """Huang et al.'s DenseNet-121 (growth 32, blocks 6-12-24-16, BC compression 1/2) as torchvision builds it (P2
    Table 5's DenseNet121 row): `features` = conv0, norm0, relu0, pool0, denseblock1..4 with transition1..3 (norm,
    relu, conv, pool) between them, norm5; then ReLU, global average pool, `classifier`. torchvision's released
    file keeps the old names denselayer<i>.norm.1 (for norm1) etc.; `load_tv_weights` renames them as torchvision
    does."""

    def __init__(self, num_classes=1000, mean=None, std=None, growth=32, blocks=(6, 12, 24, 16)):
        super().__init__()
        self.input_norm = _input_layer(mean, std, persistent=False)
        c = 64
        self.features = nn.Sequential(collections.OrderedDict(
            conv0=nn.Conv2d(3, c, 7, stride=2, padding=3, bias=False), norm0=nn.BatchNorm2d(c), relu0=nn.ReLU(True),
            pool0=nn.MaxPool2d(3, stride=2, padding=1)))
        for i, n in enumerate(blocks):
            self.features.add_module(f"denseblock{i + 1}", _DenseBlock(n, c, growth))
            c += n * growth
            if i < len(blocks) - 1:
                self.features.add_module(f"transition{i + 1}", nn.Sequential(collections.OrderedDict(
                    norm=nn.BatchNorm2d(c), relu=nn.ReLU(True), conv=nn.Conv2d(c, c // 2, 1, bias=False),
                    pool=nn.AvgPool2d(2, stride=2))))
                c //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(c))
        self.classifier = nn.Linear(c, num_classes)
        for m in self.modules():  # torchvision's init (He fan-in convs; norm weights 1 and biases 0 by default)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(F.relu(self.features(self.input_norm(x))), 1).flatten(1))


def _legacy_densenet_keys(state):
    """torchvision's DenseNet files name a dense layer's modules norm.1, relu.1, conv.1, ... (dots were allowed in
    module names then); torchvision renames them to norm1, ... when it loads them, and so does this."""
    old = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var))$")
    for k in list(state):  # in place: the file's _metadata (module versions) stays with it
        if m := old.match(k):
            state[m[1] + m[2]] = state.pop(k)
    return state


def tv_weights_path(folder, name):
    """The torchvision weight file of model `name` (e.g. vgg16_bn) in `folder`, checked as torch.hub checks it: named
    <name>-<hex>.pth (the release name, TV_WEIGHT_FILES, or an older release of the same model, e.g.
    vgg11-bbd30ac9.pth, alexnet-owt-4df8aa71.pth) with the file's sha256 starting with those hex digits. One DataError
    line otherwise."""
    check_choice("torchvision model", name, tuple(TV_WEIGHT_FILES))
    folder, base = pathlib.Path(folder), TV_WEIGHT_FILES[name].rsplit("-", 1)[0]  # (alexnet's is alexnet-owt)
    pattern = rf"{re.escape(base)}-[0-9a-f]{{8,64}}\.pth"
    found = sorted(p for p in folder.glob(f"{base}-*.pth") if re.fullmatch(pattern, p.name))
    if not found:
        raise DataError(f"{folder / TV_WEIGHT_FILES[name]}: missing; put torchvision's {name} ImageNet weights there "
                        f"under their release name (or pass --download): {TV_URL}{TV_WEIGHT_FILES[name]}")
    path = next((p for p in found if p.name == TV_WEIGHT_FILES[name]), found[0])
    prefix = path.stem.rsplit("-", 1)[1]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if not h.hexdigest().startswith(prefix):
        raise DataError(f"{path}: sha256 {h.hexdigest()[:8]}... does not start with {prefix}, as its name says: a renamed, "
                        "truncated or corrupt file")
    return path


def fetch_tv_weights(folder, name):
    """Download torchvision's released weights of `name` into `folder` under their release name, sha256-checked
    (--download; for a user with a network). Returns the path."""
    path = pathlib.Path(folder) / TV_WEIGHT_FILES[name]
    if not path.is_file():
        print(f"downloading {TV_URL}{path.name} to {folder}")
        download(TV_URL + path.name, path, sha256_prefix=path.stem.rsplit("-", 1)[1], timeout=600.0)
    return tv_weights_path(folder, name)


def load_tv_weights(model, folder, name):
    """Load torchvision's released weights of `name` into `model` (ImageNetVGG / ImageNetResNet) from `folder`:
    hash-checked (`tv_weights_path`), weights_only=True, strict=True (a key or shape mismatch is one DataError)."""
    path = tv_weights_path(folder, name)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if name.startswith("densenet"):
        state = _legacy_densenet_keys(state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DataError(f"{path}: does not fit {name}: {str(e).splitlines()[0]}") from None
    return model


# ================================================================================================
# 7. make_model: the single entry point for scripts
# ================================================================================================


RESNET_SPECS = {  # name -> (block kind, blocks per stage)
    "resnet18": ("basic", [2, 2, 2, 2]), "resnet34": ("basic", [3, 4, 6, 3]), "resnet50": ("bottleneck", [3, 4, 6, 3]),
    **{f"resnet{d}": ("basic", [(d - 2) // 6] * 3) for d in (20, 32, 44, 56, 110)},
}
ARCHS = tuple(f"vgg{d}" for d in VGG_CFGS) + tuple(RESNET_SPECS) + ("wrn<depth>_<k>", "mlp", "deep_linear") + \
    ("imagenet_vgg11|13|16|19", "imagenet_resnet18|50", "imagenet_alexnet", "imagenet_densenet121")


def make_model(arch, norm="bn", width=1.0, num_classes=10, in_channels=3, **kw):
    """Build any model of both papers by name (the architectures of P1 and P2).

    arch: vgg8|vgg11|vgg13|vgg16|vgg19, resnet18|resnet34|resnet50, resnet20|32|44|56|110,
          wrn<depth>_<k> (e.g. wrn28_10), mlp (needs in_dim=, hidden=), deep_linear; imagenet_vgg11|13|16|19 (norm
          none|bn), imagenet_resnet18|50 (any norm), imagenet_alexnet (none), imagenet_densenet121 (bn):
          torchvision's ImageNet models, whose weight files load into
          them (`load_tv_weights`; pass num_classes=1000 for those); width and in_channels do not apply.
    norm: none|bn|in|ln|gn, or 'fixup' for the ResNets and WRNs (Fixup init, no norm layers).
    width: channel multiplier (smoke runs use e.g. 1/16); for wrn the width is k.
    kw: passed to the class (act, shortcut, gn_groups, n_fc, final_bn, mean/std, ...).
    Returns an nn.Module with forward(x) -> logits and features(x) -> penultimate g(x).
    """
    arch = str(arch).lower()
    fixup = norm == "fixup"
    if arch in ("imagenet_alexnet", "imagenet_densenet121"):  # P2 Table 5's other torchvision models, as released
        check_choice("norm", norm, ("none",) if arch.endswith("alexnet") else ("bn",))
        kw = {k: v for k, v in kw.items() if k in ("mean", "std")}
        return (ImageNetAlexNet if arch.endswith("alexnet") else ImageNetDenseNet)(num_classes, **kw)
    tv = re.fullmatch(r"imagenet_(vgg|resnet)(\d+)", arch)
    if tv:  # torchvision's ImageNet models (state_dict keys and shapes), 1000 classes unless num_classes says otherwise
        check_choice("norm", norm, ("none", "bn") if tv[1] == "vgg" else NORMS)
        kw = {k: v for k, v in kw.items() if k in ("mean", "std", "gn_groups")}
        if tv[1] == "vgg":
            kw.pop("gn_groups", None)
            return ImageNetVGG(int(tv[2]), norm == "bn", num_classes, **kw)
        return ImageNetResNet(int(tv[2]), norm, num_classes, **kw)
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
# 8. Attacks: FGSM, BIM, PGD-linf/l2 with CE or CW loss, APGD-CE/DLR, attack specs and their sanity checks
#    (P1 App. B.2; P2 Sec. 3 and App. A.2; Croce & Hein 2020; Carlini et al. 2019). All work on any input shape (B, ...)
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


def _per_sample(v, like):
    """A budget or step size as it multiplies `like`: a number as is, a (B,) tensor viewed per sample."""
    return _bview(v, like) if torch.is_tensor(v) else v


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


def dlr_loss(logits, y):
    """Difference-of-logits-ratio loss (Croce & Hein 2020, Eq. 5): -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12),
    pi sorting the logits in decreasing order. Invariant to shifting and (positive) scaling of the logits, so a model
    cannot hide behind large or flat logits; needs at least 3 classes. Per sample; the attacker ascends it."""
    if logits.shape[1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, got {logits.shape[1]}")
    top = logits.topk(3, dim=1).values
    return -cw_margin(logits, y) / (top[:, 0] - top[:, 2] + 1e-12)


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
        logits = model(x).float()  # (under bf16 autocast the softmax and its residual stay float32)
        g, = torch.autograd.grad(logits, x, grad_outputs=softmax_residual(logits, y), create_graph=create_graph)
    return g


def attack_objective(logits, y, loss="ce", kappa=50.0, targeted=False):
    """Per-sample objective that an attack *ascends* (P1 App. B.2, P2 Sec. 3). Untargeted: CE(z, y),
    cw_loss(z, y) or dlr_loss(z, y). Targeted towards label y: -CE(z, y), or -ReLU(max_{j!=y} z_j - z_y + kappa)."""
    if loss == "ce":
        ce = F.cross_entropy(logits, y, reduction="none")
        return -ce if targeted else ce
    if loss == "dlr":
        if targeted:
            raise ValueError("loss='dlr' is untargeted (the targeted DLR of AutoAttack is not implemented)")
        return dlr_loss(logits, y)
    margin = cw_margin(logits, y)
    return -F.relu(kappa - margin) if targeted else -F.relu(margin + kappa)


def _check_xy(x, y):
    if x.dim() < 2 or y.dim() != 1 or len(x) != len(y):
        raise ValueError(f"expected x of shape (B, ...) and labels y of shape (B,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if not x.is_floating_point() or y.dtype != torch.long:
        raise ValueError(f"expected floating-point x and int64 labels y, got {x.dtype} and {y.dtype}")


def _check_attack_args(x, y, eps, steps, norm, loss, step_size=None, kappa=50.0):
    check_choice("attack norm", norm, ATTACK_NORMS)
    check_choice("attack loss", loss, ATTACK_LOSSES)
    if torch.is_tensor(eps):  # per-sample budgets (B,), e.g. the bisection of `minimal_eps`
        if eps.shape != (len(x),) or not bool(((eps >= 0) & torch.isfinite(eps)).all()):
            raise ValueError(f"eps: a tensor of budgets must have shape ({len(x)},) and finite values >= 0")
    elif not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps={eps}: expected a finite number >= 0")
    if torch.is_tensor(step_size):  # per sample, with per-sample budgets: > 0, or 0 where the budget is 0
        if step_size.shape != (len(x),) or not bool((torch.isfinite(step_size) & ((step_size > 0) | (
                (step_size == 0) & (torch.as_tensor(eps) == 0)))).all()):
            raise ValueError(f"step_size: a tensor of step sizes must have shape ({len(x)},) and finite values > 0 "
                             "(0 only where the budget is 0)")
    elif step_size is not None and not ((step_size > 0 or eps == step_size == 0) and math.isfinite(step_size)):
        raise ValueError(f"step_size={step_size}: expected a finite number > 0")  # a negative step is a defence
    if not kappa >= 0:
        raise ValueError(f"kappa={kappa}: expected a number >= 0")
    if steps < 1:
        raise ValueError(f"steps={steps}: expected >= 1")
    _check_xy(x, y)


def _clip(x, clip):
    return x if clip is None else x.clamp(clip[0], clip[1])


def _random_start(x0, eps, norm, generator):
    if norm == "linf":  # uniform in the eps-box
        return (torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) * 2 - 1) * _per_sample(eps, x0)
    # uniform in the eps-ball: Gaussian direction, radius eps * U^(1/d)
    d = x0[0].numel()
    g = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    r = eps * torch.rand(len(x0), generator=generator, device=x0.device, dtype=x0.dtype) ** (1.0 / d)
    return _unit_l2(g) * _bview(r, g)


def _objective_and_grad(model, xa, y, loss, kappa=50.0, targeted=False):
    """(logits, per-sample `attack_objective`, its input gradient) at xa, logits detached. For CE the gradient is
    J^T (softmax - onehot) with the cancellation-free `softmax_residual`: a confidently classified sample (p_y rounds
    to 1 in float32) still gets its true step direction, instead of a zero or wrong one that would stall the attack
    and overstate robustness."""
    with torch.enable_grad():
        xa = xa.detach().requires_grad_(True)
        logits = model(xa).float()  # (under bf16 autocast the objective and its residual stay float32)
        if loss == "ce":
            g, = torch.autograd.grad(logits, xa, grad_outputs=softmax_residual(logits.detach(), y))
            obj = attack_objective(logits.detach(), y, loss, kappa, targeted)
            return logits.detach(), obj, -g if targeted else g
        obj = attack_objective(logits, y, loss, kappa, targeted)
        g, = torch.autograd.grad(obj.sum(), xa)
    return logits.detach(), obj.detach(), g


def _objective_grad(model, xa, y, loss, kappa, targeted):
    """Input gradient of the summed `attack_objective` (see `_objective_and_grad`)."""
    return _objective_and_grad(model, xa, y, loss, kappa, targeted)[2]


def pgd(model, x, y, eps, steps, step_size=None, norm="linf", loss="ce", kappa=50.0, targeted=False,
        clip=(0.0, 1.0), delta0=None, grad0=None):
    """Projected gradient ascent on `attack_objective` from one start (Madry et al. 2018; P1 App. B.2, P2 Sec. 3).

    x, y: inputs (B, ...) and labels (B,) -- true labels, or target labels when targeted=True.
    eps: radius of the linf or l2 ball around x, in the units of x (see the module docstring); a number, or a (B,)
         tensor of per-sample budgets.
    step_size: None means 2.5 * eps / steps (MadryLab rule, P1); P2 passes eps/10 explicitly (a number or (B,)).
    norm='linf': x <- clip(x0 + clamp(x + a*sign(g) - x0, -eps, eps)).
    norm='l2':   x <- x + a * g/||g|| (per sample; a zero gradient gives a zero step), then
                 delta = x - x0 is rescaled by min(1, eps/||delta||) per sample, then clipped.
    loss: 'ce' or 'cw' (margin loss with kappa, P1's "CW" attack).
    clip: (lo, hi) box for the adversarial input, or None for no box (P2 MNIST).
    delta0: the start x0 + delta0 (None: x itself, as every experiment of the papers); random starts and
            restarts are `pgd_random_starts`.
    grad0: the objective's input gradient at x, if the caller already has it (`epoch_metrics` shares one
           clean CE gradient between LIGS and PGD); used for the first step. The result is bit-identical to
           recomputing it. Only for an untargeted CE attack from x itself (else a ValueError).

    Runs the model in eval mode (restored afterwards), touches no parameter .grad and no BN
    statistics, works under torch.no_grad(), and never modifies `x`. Returns a detached tensor.
    The CE gradient is computed without softmax cancellation (see `_objective_grad`), so attacks on
    confidently classified float32 samples do not stall.
    """
    _check_attack_args(x, y, eps, steps, norm, loss, step_size, kappa)
    if grad0 is not None and (loss != "ce" or targeted or delta0 is not None):
        raise ValueError("grad0 is the clean CE gradient: only for an untargeted CE attack without a start offset")
    step_size = _per_sample(2.5 * eps / steps if step_size is None else step_size, x)
    x0 = x.detach()
    tiny = torch.finfo(x0.dtype).tiny
    xa = _clip(x0 if delta0 is None else x0 + delta0, clip)  # (P2's standardized CIFAR-10 reaches outside its box)
    grad0 = grad0 if grad0 is not None and torch.equal(xa, x0) else None  # (a clipped start has its own gradient)
    with eval_mode(model), torch.enable_grad():
        for k in range(steps):
            g = grad0 if k == 0 and grad0 is not None else _objective_grad(model, xa, y, loss, kappa, targeted)
            with torch.no_grad():  # the step, then the projection onto the eps-ball around x0 and the box
                if norm == "linf":
                    e = _per_sample(eps, x0)
                    delta = torch.clamp(xa + step_size * g.sign() - x0, -e, e)
                else:
                    delta = xa + step_size * _unit_l2(g) - x0
                    delta = delta * _bview((eps / _l2(delta).clamp_min(tiny)).clamp(max=1.0), delta)
                xa = _clip(x0 + delta, clip)
    return xa.detach()


def pgd_random_starts(model, x, y, eps, steps, restarts=1, generator=None, **kw):
    """`pgd` from `restarts` uniform random starts in the eps-box (linf) or eps-ball (l2), drawn from
    `generator` (a torch.Generator on x's device; None uses the global RNG), keeping per sample the worst
    case: a successful attack beats an unsuccessful one, ties go to the larger objective. No experiment of
    the papers uses it (both start PGD at x); it is here for users who want Madry et al.'s random start."""
    norm, loss, targeted = kw.get("norm", "linf"), kw.get("loss", "ce"), kw.get("targeted", False)
    _check_attack_args(x, y, eps, steps, norm, loss, kw.get("step_size"), kw.get("kappa", 50.0))
    if restarts < 1:
        raise ValueError(f"restarts={restarts}: expected >= 1")
    best_x, best_obj, best_succ = None, None, None
    for _ in range(restarts):
        xa = pgd(model, x, y, eps, steps, delta0=_random_start(x.detach(), eps, norm, generator), **kw)
        if restarts == 1:
            return xa
        with torch.no_grad(), eval_mode(model):
            logits = model(xa)
            obj = attack_objective(logits, y, loss, kw.get("kappa", 50.0), targeted)
            succ = (logits.argmax(1) == y) if targeted else (logits.argmax(1) != y)
        if best_x is None:
            best_x, best_obj, best_succ = xa, obj, succ
            continue
        better = (succ & ~best_succ) | ((succ == best_succ) & (obj > best_obj))
        best_x = torch.where(_bview(better, xa), xa, best_x)
        best_obj, best_succ = torch.where(better, obj, best_obj), torch.where(better, succ, best_succ)
    return best_x


def fgsm(model, x, y, eps, clip=(0.0, 1.0)):
    """Fast gradient sign method (Goodfellow et al. 2015; P1 App. G, Table 8):
    x' = clip(x + eps * sign(grad_x CE)). Identical to one linf PGD step of size eps."""
    return pgd(model, x, y, eps, steps=1, step_size=eps, norm="linf", clip=clip)


def bim(model, x, y, eps, steps, step_size, clip=(0.0, 1.0)):
    """Basic iterative method (Kurakin et al. 2017; P2 Sec. 4, App. A.2): `steps` sign steps of
    `step_size`, each projected onto the linf eps-box and clipped; no random start."""
    return pgd(model, x, y, eps, steps=steps, step_size=step_size, norm="linf", clip=clip)


def _apgd_windows(steps):
    """APGD's checkpoints as (iteration, window) pairs: the step size is checked after iteration i over the last
    `window` iterations. The first window is max(int(0.22 N), 1) iterations, each next one shorter by
    max(int(0.03 N), 1) down to max(int(0.06 N), 1): Croce & Hein 2020, Sec. 3.2's p_{j+1} = p_j + max(p_j - p_{j-1}
    - 0.03, 0.06), p_1 = 0.22, in the integer arithmetic of the authors' code (100 steps: 21, 40, 56, 69, 79, 86, 92,
    98)."""
    first, smallest, shrink = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    out, i, k = [], first - 1, first
    while i < steps:
        out.append((i, k))
        k = max(k - shrink, smallest)
        i += k
    return out


def _apgd_start(x0, eps, norm, generator):
    """AutoAttack's random start: on the boundary of the ball -- eps * t / max|t| for t ~ U[-1, 1] (linf), eps * t /
    ||t||_2 for t ~ N(0, I) (l2), per sample."""
    if norm == "linf":
        t = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) * 2 - 1
        return _per_sample(eps, t) * t / _bview(t.flatten(1).abs().amax(1) + 1e-12, t)
    t = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return _per_sample(eps, t) * t / _bview(_l2(t) + 1e-12, t)


def apgd(model, x, y, eps, steps=100, norm="linf", loss="ce", rho=0.75, restarts=1, clip=(0.0, 1.0), delta0=None,
         generator=None):
    """Auto-PGD (Croce & Hein 2020, Alg. 1), the white-box half of AutoAttack: APGD-CE (loss='ce') and APGD-DLR
    (loss='dlr', `dlr_loss`), untargeted, in the linf or l2 ball of radius eps around x, in `clip`.

    From a random start on the ball's boundary (`_apgd_start`, drawn from `generator`; or x + delta0), step size
    eta = 2 eps. Each iteration: z = P(x_k + eta * step(grad)), step = sign (linf) or grad/||grad||_2 (l2), then the
    momentum step x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k - x_{k-1})) (the first iteration takes z itself);
    P projects onto the ball and the box. At each checkpoint of `_apgd_windows` the step size is halved, and the
    iterate reset to the best point so far, for the samples where (1) the objective rose on at most rho * window of
    the window's iterations, or (2) the step was not halved at the last checkpoint and the best objective has not
    improved since. As in the authors' code: the first window compares the first iterate's objective with 0 (their
    loss history is read at index -1 before it is filled), and the l2 projection rescales the perturbation to norm
    min(eps, ||delta||) then clips to the box.
    Departures, both where the authors' code loses the direction: the CE gradient is computed without softmax
    cancellation (`softmax_residual`), and the l2 direction is normalised by `_unit_l2` (no underflow of ||g||^2).

    restarts: further runs from fresh random starts on the samples not yet misclassified (AutoAttack's rule).
    Returns, per sample, the last misclassified iterate if there was one, else the iterate of highest objective; so
    accuracy on the result is APGD's robust accuracy. Eval mode (restored), no parameter .grad, no BN statistics
    touched, x unchanged; works under torch.no_grad(). A detached tensor."""
    _check_attack_args(x, y, eps, steps, norm, loss)
    if not 0 < rho <= 1 or restarts < 1:
        raise ValueError(f"rho={rho}, restarts={restarts}: expected 0 < rho <= 1 and restarts >= 1")
    if delta0 is not None and delta0.shape != x.shape:
        raise ValueError(f"delta0 {tuple(delta0.shape)}: expected the shape of x, {tuple(x.shape)}")
    x0 = x.detach()
    out = x0.clone()
    todo = torch.ones(len(x0), dtype=torch.bool, device=x0.device)
    with eval_mode(model), torch.enable_grad():
        for r in range(restarts):
            idx = todo.nonzero().squeeze(1) if r else torch.arange(len(x0), device=x0.device)
            if len(idx) == 0:
                break
            e = eps[idx] if torch.is_tensor(eps) else eps
            start = delta0 if delta0 is not None and r == 0 else _apgd_start(x0[idx], e, norm, generator)
            adv, fooled = _apgd_run(model, x0[idx], y[idx], e, steps, norm, loss, rho, clip, start)
            out[idx] = torch.where(_bview(fooled, adv), adv, out[idx]) if r else adv  # (a restart keeps its successes)
            todo[idx] = ~fooled
    return out.detach()


def _apgd_run(model, x0, y, eps, steps, norm, loss, rho, clip, delta0):
    """One APGD run from x0 + delta0 (see `apgd`). Returns (adversarial per sample, misclassified at some iterate)."""
    e = _per_sample(eps, x0)

    def project(v):
        if norm == "linf":
            return _clip(torch.minimum(torch.maximum(v, x0 - e), x0 + e), clip)
        d = v - x0
        n = _l2(d)
        cap = torch.minimum(n, eps) if torch.is_tensor(eps) else n.clamp(max=eps)  # min(eps, ||delta||)
        return _clip(x0 + d / _bview(n + 1e-12, d) * _bview(cap, d), clip)

    def direction(g):
        return g.sign() if norm == "linf" else _unit_l2(g)

    xa = _clip(x0 + delta0, clip)
    logits, obj, grad = _objective_and_grad(model, xa, y, loss)
    correct = logits.argmax(1) == y
    x_best, obj_best, grad_best, x_fooled = xa.clone(), obj.clone(), grad.clone(), xa.clone()
    history = torch.zeros(steps, len(x0), dtype=obj.dtype, device=x0.device)
    eta = (2.0 * torch.as_tensor(eps, dtype=x0.dtype, device=x0.device)).expand(len(x0)).clone()
    checks = dict(_apgd_windows(steps))
    obj_at_check, halved_at_check = obj_best.clone(), torch.ones_like(correct)
    x_prev = xa
    for i in range(steps):
        with torch.no_grad():
            a = 0.75 if i > 0 else 1.0
            z = project(xa + _bview(eta, xa) * direction(grad))
            xa, x_prev = project(xa + a * (z - xa) + (1 - a) * (xa - x_prev)), xa
        logits, obj, grad = _objective_and_grad(model, xa, y, loss)
        with torch.no_grad():
            wrong = logits.argmax(1) != y
            correct = correct & ~wrong
            x_fooled = torch.where(_bview(wrong, xa), xa, x_fooled)
            history[i] = obj
            better = obj > obj_best
            x_best = torch.where(_bview(better, xa), xa, x_best)
            grad_best = torch.where(_bview(better, grad), grad, grad_best)
            obj_best = torch.where(better, obj, obj_best)
            if i in checks:
                k = checks[i]
                rises = sum((history[i - j] > history[i - j - 1]).to(obj.dtype) for j in range(k))  # [-1]: see apgd
                halve = (rises <= k * rho) | (~halved_at_check & (obj_at_check >= obj_best))
                halved_at_check, obj_at_check = halve, obj_best.clone()
                eta = torch.where(halve, eta / 2, eta)
                xa = torch.where(_bview(halve, xa), x_best, xa)
                grad = torch.where(_bview(halve, grad), grad_best, grad)
    fooled = ~correct
    return torch.where(_bview(fooled, xa), x_fooled, x_best), fooled


@torch.no_grad()
def invert_features(model, x_target, x_start, steps, step_size, clip=(0.0, 1.0), fake_relu=False):
    """Representation inversion (Ilyas et al. 2019, Alg. 1; P1 App. B.3 and E): starting at x_start,
    minimise ||g(x_r) - g(x_target)||_2 over x_r, g = model.features (the penultimate representation),
    with `steps` steps of l2 length `step_size` along the per-sample normalised negative gradient (the
    robustness library's L2Step), x_r clamped to `clip` after every step, and no bound on ||x_r -
    x_start|| (P1 App. B.3: 1000 steps of 0.1). fake_relu=True descends through the last ReLU as through the
    identity (the robustness library's `fake_relu`, which Ilyas et al.'s and P1's authors' inversion uses; needs
    a ResNet's `features`). Descends the squared distance, whose direction is the
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
            target = model.features(x_target.detach())  # (fake_relu changes gradients only, not values)
        if fake_relu and "fake_relu" not in inspect.signature(model.features).parameters:
            raise ValueError("invert_features: fake_relu=True needs a ResNet (its features() takes fake_relu)")
        feats = functools.partial(model.features, fake_relu=True) if fake_relu else model.features
        xr = _clip(x_start.detach(), clip).clone()
        for _ in range(steps):
            xr.requires_grad_(True)
            g, = torch.autograd.grad((feats(xr) - target).pow(2).sum(), xr)  # sum: each sample its own
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


def accuracy(model, x, y, batch_size=1000, input_fn=None):
    """Top-1 accuracy (fraction in [0, 1]) of `model` in eval mode on tensors x, y (P1 "usefulness",
    P1 Sec. 3.1; robust accuracy when x is adversarial); `input_fn` maps each batch to the model's input space."""
    f = input_fn or (lambda t: t)
    with torch.no_grad(), eval_mode(model):
        correct = sum((model(f(xb)).argmax(1) == yb).sum() for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    return float(correct) / len(y)


def run_attack(model, x, y, spec, generator=None):
    """Apply one evaluation spec to a batch. spec['kind']: clean | noise (x + sigma*N(0, I), clipped
    to spec['clip'] if given) | fgsm | bim | pgd (all other keys are passed on: eps, steps,
    step_size, norm, loss, kappa, targeted, clip; rand_init=True or restarts: `pgd_random_starts`) | apgd (eps,
    steps, norm, loss 'ce' or 'dlr', rho, restarts, clip; its random starts from `generator`) | worst (spec['attacks'],
    a list of specs: per sample the first adversarial input any of them finds, the worst case)."""
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
    if kind == "pgd" and (kw.pop("rand_init", False) or "restarts" in kw):
        return pgd_random_starts(model, x, y, generator=generator, **kw)
    if kind == "pgd":
        return pgd(model, x, y, **kw)
    if kind == "apgd":
        return apgd(model, x, y, generator=generator, **kw)
    if kind == "worst":  # per sample, the first of the attacks that fools the model (x itself if none does)
        out, done = x, torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for sub in spec["attacks"]:
            xa = run_attack(model, x, y, sub, generator)
            with torch.no_grad(), eval_mode(model):
                take = (model(xa).argmax(1) != y) & ~done
            out, done = torch.where(_bview(take, xa), xa, out), done | take
        return out
    raise ValueError(f"attack kind={kind!r} is not one of clean, noise, fgsm, bim, pgd, apgd, worst")


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


def minimal_eps(model, x, y, attack, hi, iters=8, batch_size=500):
    """Per-sample smallest budget at which `attack` finds an adversarial input: a budget-free robustness statistic
    (its median over samples does not depend on a chosen eps, and varies far less across seeds than the accuracy at
    one budget on the steep part of the accuracy-vs-eps curve).

    attack(xb, yb, eps) -> adversarial xb, for a (B,) tensor of per-sample budgets (e.g. `pgd` or `apgd` with a
    step size that scales with eps). Bisection on [0, hi], `iters` halvings, all samples of a batch at once:
    0 for a sample misclassified clean; inf if the attack does not break it at hi; else the budget of the last
    success, within hi / 2^iters above the smallest budget at which this attack succeeds when success grows with
    the budget (always an upper bound: the attack found an adversarial input there). Costs iters + 1 attacks.
    Returns a float64 CPU tensor (B,)."""
    _check_xy(x, y)
    if not (hi > 0 and math.isfinite(hi)) or iters < 0:
        raise ValueError(f"minimal_eps: hi={hi}, iters={iters}: expected a finite hi > 0 and iters >= 0")
    out = []
    with eval_mode(model):
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            def fooled(eps):
                xa = attack(xb, yb, eps)
                with torch.no_grad():
                    return model(xa).argmax(1) != yb
            with torch.no_grad():
                wrong = model(xb).argmax(1) != yb
            up = torch.full((len(xb),), float(hi), dtype=xb.dtype, device=xb.device)
            lo = torch.zeros_like(up)
            broken = wrong | fooled(up)
            for _ in range(iters):
                mid = (lo + up) / 2
                ok = fooled(mid)
                up, lo = torch.where(ok, mid, up), torch.where(ok, lo, mid)
            found = torch.where(wrong, 0.0, up.double())
            out.append(torch.where(broken, found, float("inf")).cpu())
    return torch.cat(out)


def min_eps_summary(d, hi):
    """Per-sample minimal budgets `d` (from `minimal_eps` with range end hi) as the scripts record them: (median over
    the samples, share censored). A sample not broken within hi counts as hi, so the median is exact unless over half
    are censored, when it is hi (the censored share says so)."""
    censored = torch.isinf(d)
    return float(torch.where(censored, hi, d).median()), float(censored.double().mean())


def median_minimal_eps(model, x, y, attack, hi, iters=8):
    """`minimal_eps` summarised by `min_eps_summary`: (median minimal budget, share censored)."""
    return min_eps_summary(minimal_eps(model, x, y, attack, hi, iters=iters), hi)


def curve_area(grid, acc):
    """Normalised area under an accuracy-vs-eps curve: the trapezoid integral over the grid divided by its span
    (1 for a model the attack never breaks, 0 for one wrong everywhere)."""
    g, a = np.asarray(grid, dtype=float), np.asarray(acc, dtype=float)
    if len(g) < 2 or np.any(np.diff(g) <= 0):
        raise ValueError(f"curve_area: the grid must hold at least two increasing budgets, got {list(grid)}")
    return float(np.sum((a[1:] + a[:-1]) / 2 * np.diff(g)) / (g[-1] - g[0]))


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
    # Replace the left-out rows by ones before the norm (its gradient at 0 is undefined; torch.where rather than
    # boolean indexing, which would wait for the GPU to learn how many rows are left) and divide by the max-abs
    # entry: the cosine is scale-free, and float32 squared norms of gradients ~1e-23 would underflow to 0.
    one = torch.ones((), dtype=a.dtype, device=a.device)
    a = torch.where(ok[:, None], a / torch.where(ok, sa, one)[:, None], one)
    b = torch.where(ok[:, None], b / torch.where(ok, sb, one)[:, None], one)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    penalty = torch.where(ok, 1 - cos, 0).sum() / ok.sum().clamp(min=1)
    return penalty, logits


# ================================================================================================
# 10. Training and evaluation: the papers' recipes, train_model, evaluate, per-epoch metrics, landscape probes,
#     BN-statistics adaptation (P1 App. B.1, Sec. 4.4, Table 7; P2 Sec. 3)
# ================================================================================================

# The papers' training recipes (SGD, momentum 0.9; batch size and weight decay come from each script's flags). One
# table for every script: exp_table1.py, exp_corruption.py and exp_transfer.py build the same dict for the same model,
# so a model trained by one is a --cache hit for the others.
RECIPES = {
    "p1_cifar_vgg": dict(epochs=200, lr=0.01, milestones=(100, 150), augment=True),  # P1 Table 4 is empty: DECISIONS.md D1
    "p1_svhn_vgg": dict(epochs=50, lr=0.01, milestones=(25, 40), augment=False),     # DECISIONS.md D1
    "p1_resnet": dict(epochs=350, lr=0.1, milestones=(150, 250), augment=True),      # P1 App. B.1 (ResNet50)
    "p2_svhn": dict(epochs=50, lr=0.01, milestones=(25, 40), augment=False),         # P2 Sec. 3
    "p2_cifar": dict(epochs=150, lr=0.01, milestones=(), augment=True),              # P2 Table 2: fixed LR
    "p2_depth": dict(epochs=350, milestones=(150, 250), augment=True),               # P2 Table 3: lr 0.1 with BN, 0.01 without
}
# The two input spaces (DECISIONS.md D2): P1 attacks [0, 1] pixels and the model standardizes inside; P2 attacks
# standardized inputs with the paper's clip range, so standardization happens outside the model.
INPUT_SPACES = ("pixels", "standardized")
P2_INPUT = {"svhn": ((0.5,) * 3, (0.5,) * 3)}  # P2 SVHN: (x - 0.5) / 0.5, clip [-1, 1]; other datasets their own stats


def paper_recipe(name, norm=None):
    """RECIPES[name] as a new dict; P2 Table 3's depth protocol trains BN models at LR 0.1 and the others at 0.01.
    Which recipe a model gets is the experiment's choice (each script says it next to its models)."""
    r = dict(RECIPES[name])
    if name == "p2_depth":
        r["lr"] = 0.1 if norm == "bn" else 0.01
    return r


def with_overrides(r, args, dataset):
    """A paper recipe with the script's flags: --batch-size, --weight-decay, --warmup-epochs; --epochs (milestones
    kept at the same fraction of training); --lr; crop+flip only on CIFAR-10 (flipping digits changes them)."""
    r = dict(r, batch_size=args.batch_size, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs)
    if args.epochs is not None:
        scale = args.epochs / r["epochs"]
        r |= dict(epochs=args.epochs, milestones=tuple(max(1, round(m * scale)) for m in r["milestones"]))
    if args.lr is not None:
        r["lr"] = args.lr
    if dataset != "cifar10":
        r["augment"] = False
    return r


def model_kwargs(arch, norm, data, width=1.0, gn_groups=None):
    """make_model's arguments for a CNN of the papers' tables on `data`: WideResNets have no width multiplier
    or GroupNorm option, and Fixup-WRN keeps one final BN (P2 footnote 7)."""
    kw = dict(norm=norm, width=width, num_classes=data.num_classes, in_channels=data.shape[0])
    if gn_groups:
        kw["gn_groups"] = gn_groups
    if arch.startswith("wrn"):
        kw.pop("width")
        kw.pop("gn_groups", None)
        if norm == "fixup":
            kw["final_bn"] = True
    return kw


def model_in_space(arch, kw, input_space, mean, std, device):
    """(model, input_fn): in pixel space the model standardizes inside (a `Standardize` first layer, input_fn None);
    in standardized space it takes standardized inputs and input_fn = Standardize(mean, std) maps pixels to them.
    Convolutional models get `fast_layout`."""
    check_choice("input space", input_space, INPUT_SPACES)
    if input_space == "pixels":
        model, input_fn = make_model(arch, mean=mean, std=std, **kw).to(device), None
    else:
        model, input_fn = make_model(arch, **kw).to(device), Standardize(mean, std).to(device)
    return (model if arch.startswith("mlp") else fast_layout(model)), input_fn


def fast_layout(model):
    """`model` in the memory format that is fast for it on its device: channels_last for convnets (measured on 2 CPU
    cores: PGD 2.4x faster for VGG11, 1.15x for ResNet18), except GroupNorm-based ones (in, ln, gn) on CUDA, whose
    GroupNorm kernel converts channels_last inputs back to NCHW in every layer."""
    on_cuda = next(model.parameters()).device.type == "cuda"
    if on_cuda and any(isinstance(m, nn.GroupNorm) for m in model.modules()):
        return model
    return model.to(memory_format=torch.channels_last)


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
                  batch_size=250, sigma_dm=None):
    """P1 Sec. 4 per-epoch measurements (App. B.2): clean accuracy on the whole test set; l2 PGD
    robust accuracy (eps, `steps` steps of 2.5*eps/steps) and LIGS (P1 Eq. 1) for each perturbation on
    a fixed class-balanced subset. LIGS noise is the same draw at every call (seeded), so a curve
    over epochs shows the model changing, not the noise. The clean input gradient of the subset is
    computed once and shared by the PGD's first step and every LIGS perturbation (bit-identical to
    computing it in each). Keys: clean_acc, robust_acc, ligs (Gaussian), ligs_<perturbation>, and the
    matching *_skipped counts; with `sigma_dm`, also ligs_dm: Gaussian LIGS at that sigma (the dimension-matched
    sigma of inputs smaller than CIFAR's, `ligs_sigma_matched`)."""
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
    if sigma_dm is not None:
        g = torch.Generator(device=x_sub.device).manual_seed(seed)
        out["ligs_dm"], out["ligs_dm_skipped"] = ligs(model, x_sub, y_sub, sigma=sigma_dm, generator=g,
                                                      batch_size=batch_size, g0=g0)
    return out


def ligs_sigma_matched(sigma, shape, d_ref=3 * 32 * 32):
    """P1's LIGS sigma (0.01 on CIFAR's 3x32x32 = 3072 values) for inputs of another `shape`, keeping the noise's
    expected l2 norm sigma*sqrt(d) the same: sigma * sqrt(3072 / d). On the 256 values of a 16x16 digit it is 3.5x
    larger; the same sigma there is a relatively smaller perturbation."""
    return sigma * math.sqrt(d_ref / math.prod(shape))


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


RECIPE_DEFAULTS = dict(optimizer="sgd", momentum=0.9, weight_decay=0.0, milestones=(), gamma=0.1, warmup_epochs=0.0,
                       augment=False, jitter=False, adv=None, input_fn=None, ligs_lambda=0.0, ligs_sigma=0.01,
                       select="final")
RECIPE_REQUIRED = ("epochs", "batch_size", "lr")


def check_recipe(recipe):
    """RECIPE_DEFAULTS completed by `recipe`; a key that is not one of RECIPE_REQUIRED or RECIPE_DEFAULTS is an
    error (a misspelt key would otherwise be silently ignored), and so is a missing required one."""
    unknown = sorted(set(recipe) - set(RECIPE_DEFAULTS) - set(RECIPE_REQUIRED))
    missing = [k for k in RECIPE_REQUIRED if k not in recipe]
    if unknown or missing:
        raise ValueError(f"training recipe: unknown key(s) {unknown}, missing {missing}; expected "
                         f"{', '.join(RECIPE_REQUIRED)} and optionally {', '.join(RECIPE_DEFAULTS)}")
    check_choice("recipe select", recipe.get("select", "final"), ("final", "best_test"))
    return RECIPE_DEFAULTS | recipe


def batch_loss(model, xb, yb, r, g_attack, amp=False, ddp=None, n_global=None):
    """The training loss of one batch: mean CE (P1 App. B.1, P2 Sec. 3; in bf16 autocast with amp), or
    CE + lambda * (1 - LIGS) in float32 with the noise drawn from the checkpointed `g_attack` (P1 Fig 5, double
    backprop). Returns (loss to backpropagate, logits, the batch's summed CE for the epoch's log). Under torchrun
    (`ddp`) the slice's summed CE is scaled by world / n_global, so that DistributedDataParallel's average over ranks
    is the global-batch mean."""
    if r["ligs_lambda"] > 0:  # float32 even under --amp: in bf16 the penalty's noise floor is ~5 % of its value
        penalty, logits = ligs_penalty(model, xb, yb, r["ligs_sigma"], g_attack)
        loss = F.cross_entropy(logits.float(), yb) + r["ligs_lambda"] * penalty
        return loss, logits, loss.detach() * len(yb)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        if ddp is not None:
            logits = ddp.net(xb)
            summed = F.cross_entropy(logits.float(), yb, reduction="sum")
            return summed * (ddp.world / n_global), logits, summed.detach()
        else:
            logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb)
    return loss, logits, loss.detach() * len(yb)


def train_epoch(model, data, r, opt, epoch, g_data, g_attack, amp=False, on_step=None, history=None, ddp=None):
    """One epoch: a permutation of the training set from `g_data`, then per batch crop+flip (if r["augment"], same
    generator), the input map, adversarial examples (if r["adv"]: made in eval mode from `g_attack`, DECISIONS.md
    D15), the LR of this fraction of an epoch, `on_step` probes (appended to `history`), loss and SGD step.
    Under torchrun every rank draws the same global batch and trains on its slice (`ddp_slice`).
    Returns (mean training loss, training accuracy) as floats: one host sync per epoch."""
    dev, n, bs = data.x_train.device, len(data.y_train), r["batch_size"]
    steps = math.ceil(n / bs)
    model.train()
    perm = torch.randperm(n, generator=g_data).to(dev)
    if r["augment"] or r["jitter"]:  # every step's draws in one host-to-device copy (the same draws, the same order)
        aug = augment_draws(g_data, [min(bs, n - i * bs) for i in range(steps)], dev, jitter=r["jitter"])
    loss_sum, correct = torch.zeros((), device=dev), torch.zeros((), device=dev)
    for i in range(steps):
        idx = perm[i * bs:(i + 1) * bs]
        xb, yb = data.x_train[idx], data.y_train[idx]
        if r["augment"]:
            xb = augment_crop_flip(xb, draws=aug[i])
        if r["jitter"]:
            xb = jitter_rotate(xb, aug[i])
        n_global = len(yb)
        if ddp is not None:
            xb, yb = ddp_slice(xb, yb, ddp)
        xb = r["input_fn"](xb) if r["input_fn"] is not None else xb
        if r["adv"] is not None:  # adversarial examples only (Madry et al.; DECISIONS.md D15), bf16 with amp
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                xb = run_attack(model, xb, yb, r["adv"], g_attack)
        for group in opt.param_groups:
            group["lr"] = lr_at(epoch + i / steps, r["lr"], r["milestones"], r["gamma"], r["warmup_epochs"])
        probe = on_step(epoch * steps + i, model, xb, yb) if on_step else None
        if probe:
            history.append(dict(epoch=epoch + i / steps, step=epoch * steps + i, **probe))
        loss, logits, summed = batch_loss(model, xb, yb, r, g_attack, amp, ddp, n_global)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += summed
        correct += (logits.argmax(1) == yb).sum()
    if ddp is not None:
        loss_sum, correct = ddp_sum(loss_sum, correct)
    return float(loss_sum) / n, float(correct) / n


def load_checkpoint(ckpt, key, model, opt, g_data, g_attack, reseed):
    """The training state saved in `ckpt` (model, optimizer, both generators restored in place), or None when there
    is no such file. A checkpoint trained under another `key` is refused rather than resumed. Checkpoints load on
    any device: everything is read onto the CPU (`load_tensors`) and copied to where the model and optimizer live;
    the CPU data generator's state is device-free; the attack generator's state only fits a generator of the
    device type that saved it (a CPU state is 5,056 bytes, a CUDA one 16), so on another device type it is re-seeded
    with `reseed(epoch)` -- deterministic, though not the draws the saving device would have made."""
    if ckpt is None or not pathlib.Path(ckpt).exists():
        return None
    saved = load_tensors(ckpt)
    if "key" in saved and saved["key"] != key:  # (checkpoints of older versions carry no key)
        raise ValueError(f"checkpoint {ckpt} was trained with another configuration ({saved.get('key')}), not {key}")
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError as e:  # e.g. a no-norm ResNet cached before ResNets lost their conv biases (DECISIONS.md D10)
        raise ValueError(f"checkpoint {ckpt} does not fit this model (written by an earlier version?): "
                         f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None
    opt.load_state_dict(saved["opt"])  # (moves the optimizer state to the parameters' device)
    g_data.set_state(saved["g_data"])
    if saved.get("g_attack_device", "cpu") == g_attack.device.type:
        g_attack.set_state(saved["g_attack"])
    else:
        g_attack.manual_seed(reseed(saved["state"]["epoch"]))
    return saved["state"]


def end_epoch(state, epochs, train_loss, train_acc, num_classes, **extra):
    """Close an epoch in the training state: count it; a non-finite loss is divergence and a final training accuracy
    no better than chance (+5 points) a failure, both recorded with their reason, not raised; the last epoch of a
    healthy run makes it "ok". Appends and returns the epoch's history row."""
    state["epoch"] += 1
    if not math.isfinite(train_loss):
        state["status"], state["reason"] = "failed", f"diverged: non-finite training loss in epoch {state['epoch']}"
    elif state["epoch"] == epochs and train_acc <= 1.0 / num_classes + 0.05:
        state["status"], state["reason"] = "failed", f"no better than chance: final training accuracy {train_acc:.3f}"
    elif state["epoch"] == epochs:
        state["status"] = "ok"
    row = dict(epoch=state["epoch"], train_loss=train_loss, train_acc=train_acc, **extra)
    state["history"].append(row)
    return row


def train_model(model, data, recipe, seed=0, ckpt=None, log=print, amp=False, on_epoch=None, on_step=None, tag="",
                key=None, ddp_bn="sync"):
    """Train `model` on data.x_train (already on the model's device) with `recipe` (`check_recipe`): epochs,
    batch_size, lr, optimizer ('sgd'|'adam'|'adagrad'), momentum, weight_decay, milestones (epochs), gamma,
    warmup_epochs, augment (crop+flip), jitter (`jitter_rotate`), adv (None, or an attack spec for `run_attack`:
    adversarial training on adversarial examples only, DECISIONS.md D15), input_fn (optional: maps [0,1] batches
    to the model's input space, e.g. a Standardize layer), ligs_lambda, ligs_sigma (P1 Fig 5: loss = CE + lambda *
    ligs_penalty), select ('final', or 'best_test': also keep the weights of the epoch with the best clean test
    accuracy, P2 Table 2 "the best model in terms of test accuracy", returned as res["best"]).
    Every random source is a seeded generator: data order and augmentation (CPU) and attack starts (device).
    After every epoch the full state is checkpointed atomically to `ckpt` (if given); calling again with the same
    ckpt resumes and ends with the same numbers as an uninterrupted run. `key` (any JSON-able value, see
    `cache_path`) is stored in the checkpoint, and a checkpoint with another key is refused.
    on_epoch(epoch, model) -> dict adds per-epoch measurements (epoch 0 = before training); on_step(step, model,
    x, y) -> dict or None runs before each optimizer step on that step's batch (landscape probes), its results
    kept as history rows with a "step" key. Divergence (non-finite loss) or a final training accuracy no better
    than chance stops the run and is reported, not raised.
    Under torchrun the model trains data-parallel with the single-process run's batches, LR schedule and data
    order (`ddp_wrap`); ddp_bn='sync' normalizes over the global batch (P1/P2's BN), 'local' over each rank's
    slice (a different model: its cache key says so). Rank 0 alone writes checkpoints and logs.
    Returns dict(status='ok'|'failed', reason, history=[per-epoch dicts], best=None or dict(epoch, test_acc, model=
    state_dict on the CPU))."""
    r = check_recipe(recipe)
    key, rank = ddp_key(model, key, r, on_step, ddp_bn), ddp_rank()
    log = log if rank == 0 else (lambda s: None)
    key = json.loads(json.dumps(key, sort_keys=True, default=str))  # compare as stored (tuples -> lists)
    dev = data.x_train.device
    opt = make_optimizer(r["optimizer"], model.parameters(), r["lr"], r["momentum"], r["weight_decay"])
    g_data = torch.Generator().manual_seed(seed)
    g_attack = torch.Generator(device=dev).manual_seed(seed + 1 + 7919 * rank)  # rank 0 = the single-process draws
    reseed = lambda epoch: seed + 1 + 7919 * rank + 104729 * epoch  # a device change: fresh attack draws per epoch
    with checkpoint_lock(ckpt if rank == 0 else None, log, tag) as refresh:  # one process trains one cached model
        if is_distributed():
            torch.distributed.barrier()  # every rank looks for the checkpoint before rank 0 may write one
        state = load_checkpoint(ckpt, key, model, opt, g_data, g_attack, reseed)
        if state is not None:
            log(f"{tag} resumed from {ckpt} after epoch {state['epoch']} ({state['status']})")
        else:
            state = dict(epoch=0, history=[dict(epoch=0, **(on_epoch(0, model) if on_epoch else {}))], status="running",
                         reason="")
        ddp = ddp_wrap(model, dev, ddp_bn)
        while state["status"] == "running" and state["epoch"] < r["epochs"]:
            t0 = time.time()
            loss, acc = train_epoch(model, data, r, opt, state["epoch"], g_data, g_attack, amp and dev.type == "cuda",
                                    on_step, state["history"], ddp)
            row = end_epoch(state, r["epochs"], loss, acc, data.num_classes, lr=opt.param_groups[0]["lr"],
                            time_s=time.time() - t0)
            if on_epoch and math.isfinite(loss):  # a run that ends at chance is measured too; a diverged one is not
                row |= on_epoch(state["epoch"], model)
            if r["select"] == "best_test" and math.isfinite(loss):
                keep_best(state, row, model, data, r["input_fn"])
            extra = "".join(f" | {k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "train_loss", "train_acc",
                                                                                   "lr", "time_s"))
            log(f"{tag} epoch {state['epoch']:3d}/{r['epochs']} | loss {loss:.4f} | train acc {acc:.4f} | "
                f"lr {row['lr']:.4g} | {row['time_s']:.1f}s{extra}")
            if ckpt is not None:
                save_atomic(dict(model=model.state_dict(), opt=opt.state_dict(), g_data=g_data.get_state(),
                                 g_attack=g_attack.get_state().cpu(), g_attack_device=dev.type, state=state, key=key),
                            ckpt)
                refresh()
        ddp_unwrap(model, ddp)
    if state["status"] == "failed":
        log(f"{tag} FAILED: {state['reason']}")
    best = None if "best_model" not in state else dict(epoch=state["best_epoch"], test_acc=state["best_acc"],
                                                        model=state["best_model"])
    return dict(status=state["status"], reason=state["reason"], history=state["history"], best=best)


# He et al. 2016 Sec. 3.4, the ImageNet recipe P1 App. B.1 names for its ImageNet ResNets (Table 1, Fig 11): SGD with
# momentum 0.9, batch 256, weight decay 1e-4, LR 0.1 divided by 10 at epochs 30 and 60, 90 epochs, random-resized
# crops and flips (ImageNetFolder(train=True))
HE_IMAGENET = dict(epochs=90, lr=0.1, milestones=(30, 60), batch_size=256, weight_decay=1e-4)


def train_stream(model, train_set, r, ckpt=None, key=None, seed=0, workers=4, amp=False, on_epoch=None, tag="",
                 num_classes=1000):
    """Train `model` (on its device) on a dataset streamed from disk (ImageNet: ImageNetFolder with train=True) by
    `workers` DataLoader processes, recipe `r`: epochs, lr, milestones, batch_size, weight_decay, warmup_epochs, clip
    (the gradient norm's bound, or None). SGD with momentum 0.9, the LR of `lr_at` per iteration, bf16 autocast with
    amp on CUDA. Epoch e visits a permutation seeded by (seed, e) and augments image i from (seed, e, i), so a run
    resumed from its per-epoch checkpoint `ckpt` trains on the batches of an uninterrupted one, whatever `workers`.
    on_epoch(epoch, model) -> dict adds measurements to the history (epoch 0 = before training), as in
    `train_model`; a progress line says images/s. Divergence, or a final training accuracy no better than the chance
    of a `num_classes`-way classifier, fails the run (`end_epoch`). Returns dict(status='ok'|'failed', reason,
    history)."""
    single_process("streamed ImageNet training")
    dev = next(model.parameters()).device
    opt = make_optimizer("sgd", model.parameters(), r["lr"], 0.9, r["weight_decay"])
    g_unused = torch.Generator()  # (load_checkpoint restores two generators; this loop draws from neither)
    amp = amp and dev.type == "cuda"
    with checkpoint_lock(ckpt, print, tag) as refresh:
        state = load_checkpoint(ckpt, key, model, opt, g_unused, torch.Generator(), lambda e: 0)
        if state is not None:
            print(f"{tag} resumed from {ckpt} after epoch {state['epoch']} ({state['status']})")
        state = state or dict(epoch=0, history=[dict(epoch=0, **(on_epoch(0, model) if on_epoch else {}))],
                              status="running", reason="")
        while state["status"] == "running" and state["epoch"] < r["epochs"]:
            epoch, t0 = state["epoch"], time.time()
            train_set.epoch_seed = seed * 1000 + epoch
            loader = imagenet_loader(train_set, r["batch_size"], workers=workers, shuffle=True, seed=seed * 1000 + epoch)
            model.train()
            loss_sum, correct, n = torch.zeros((), device=dev), torch.zeros((), device=dev), 0
            for i, (xb, yb) in enumerate(worker_errors(loader)):
                xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
                for group in opt.param_groups:
                    group["lr"] = lr_at(epoch + i / len(loader), r["lr"], r["milestones"], 0.1, r["warmup_epochs"])
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    logits = model(xb)
                loss = F.cross_entropy(logits.float(), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if r.get("clip"):
                    nn.utils.clip_grad_norm_(model.parameters(), r["clip"])
                opt.step()
                loss_sum += loss.detach() * len(yb)
                correct += (logits.argmax(1) == yb).sum()
                n += len(yb)
                if i % 20 == 0 or i == len(loader) - 1:  # (a host sync every 20 steps; a diverged loss stops the epoch)
                    if not math.isfinite(float(loss_sum)):
                        break
                    print(f"\r{tag} epoch {epoch + 1}/{r['epochs']}: {n}/{len(train_set)} images, "
                          f"{n / max(time.time() - t0, 1e-9):.0f} images/s, loss {float(loss_sum) / n:.3f}", end="",
                          flush=True)
            print()
            row = end_epoch(state, r["epochs"], float(loss_sum) / max(n, 1), float(correct) / max(n, 1), num_classes,
                            lr=opt.param_groups[0]["lr"], time_s=time.time() - t0)
            if on_epoch and state["status"] != "failed":
                row |= on_epoch(state["epoch"], model)
            print(f"{tag} epoch {state['epoch']}/{r['epochs']} | " + " | ".join(
                f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "lr", "time_s")) + f" | {row['time_s']:.0f}s")
            if ckpt is not None:
                save_atomic(dict(model=model.state_dict(), opt=opt.state_dict(), g_data=g_unused.get_state(),
                                 g_attack=g_unused.get_state(), g_attack_device="cpu", state=state, key=key), ckpt)
                refresh()
    return dict(status=state["status"], reason=state["reason"], history=state["history"])


def keep_best(state, row, model, data, input_fn):
    """Model selection by clean test accuracy (P2 Table 2, "the best model in terms of test accuracy"): the epoch's
    test accuracy goes into its history row, and the weights of the best epoch so far into the training state (so
    into the checkpoint: a resumed run selects as an uninterrupted one). Ties keep the earlier epoch."""
    acc = accuracy(model, data.x_test, data.y_test, input_fn=input_fn)
    row["test_acc"] = acc
    if acc > state.get("best_acc", -1.0):
        state["best_acc"], state["best_epoch"] = acc, state["epoch"]
        state["best_model"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


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
    model.eval()
    for m in bns:
        m.train()
    cumulative_bn_stats(model, x.split(batch_size), bns)
    for m, t in modes.items():
        m.train(t)
    return model


@torch.no_grad()
def cumulative_bn_stats(model, batches, bns):
    """Reset the BatchNorm modules `bns` and run `batches` through `model` (in the modes it is in) so that their
    running statistics are the exact cumulative average over the batches, each batch weighted equally. That is BN
    with momentum None; the momentum 1/k of the k-th batch is set here instead, because momentum None makes PyTorch
    read its batch counter from the device in every layer of every batch (a host-device sync). Momenta restored."""
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
    for k, xb in enumerate(batches, 1):
        for m in bns:
            m.momentum = 1.0 / k  # = PyTorch's 1 / num_batches_tracked for momentum None
        model(xb)
    for m, mom in zip(bns, momenta):
        m.momentum = mom


# ================================================================================================
# 11. P2's mechanism analyses: Yang et al.'s depth limit and the plug-in entropy of the output (P2 Figs 2, 3)
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


# ################################################################################################
# PART II. RUNNING THEM: data, devices and torchrun, claims, run records and the command line
# ################################################################################################

# ================================================================================================
# 12. Data: real on-disk formats, download with checksum, bundled digits, synthetic images (DECISIONS.md D23)
# ================================================================================================


class DataError(ValueError):
    """A dataset is missing, corrupt or mis-specified. The message is one line a user can act on."""


# Per-channel statistics for the in-model `Standardize` layer (P1) or for standardizing outside (P2).
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet100": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's, as torchvision's models
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


def download(url, dest, md5=None, timeout=60.0, chunk=1 << 20, sha256_prefix=None):
    """Fetch `url` to `dest`, checking the byte count announced by the server and the md5 (or, for torch.hub-style
    files, that the sha256 starts with `sha256_prefix`). Streams into `dest.part` and renames only after the checks
    pass, so an interrupted or corrupt transfer leaves nothing at `dest`."""
    dest = pathlib.Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    h, h256, n = hashlib.md5(), hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as f:
            expected = resp.headers.get("Content-Length")
            while True:
                block = resp.read(chunk)
                if not block:
                    break
                f.write(block)
                h.update(block)
                h256.update(block)
                n += len(block)
        if expected is not None and n != int(expected):
            raise DataError(f"download of {url} was interrupted ({n} of {expected} bytes); run again")
        if md5 is not None and h.hexdigest() != md5:
            raise DataError(f"download of {url} failed its checksum (md5 {h.hexdigest()}, expected {md5}); nothing was kept")
        if sha256_prefix is not None and not h256.hexdigest().startswith(sha256_prefix):
            raise DataError(f"download of {url} failed its checksum (sha256 {h256.hexdigest()[:8]}..., expected "
                            f"{sha256_prefix}...); nothing was kept")
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


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles what CIFAR-10's python batches hold -- dicts, lists, bytes, numbers and numpy arrays -- and nothing
    else: a pickle can name any callable, so a doctored file in --data-root would otherwise run code on load."""
    ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")} | \
        {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}  # (bytes pickled by Python 3, protocol 2)

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: not something a CIFAR-10 batch holds")
        return super().find_class(module, name)


def read_cifar10(root, download_ok=False):
    """CIFAR-10 python pickle batches (cifar-10-batches-py/data_batch_1..5, test_batch) ->
    dict of uint8 images (N, 3, 32, 32) and int64 labels."""
    base = _require("cifar10", root, download_ok) / "cifar-10-batches-py"

    def load(fname):
        try:
            with open(base / fname, "rb") as f:
                d = _CifarUnpickler(f, encoding="bytes").load()
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


def _pil_resize_short(img, size):
    """torchvision's Resize(size) on a PIL image: the short side to `size`, the long side to int(size * long / short),
    PIL bilinear (which filters when it shrinks, as torchvision's PIL path does)."""
    from PIL import Image
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_long = int(size * long / short)
    return img.resize((size, new_long) if w <= h else (new_long, size), Image.BILINEAR)


def _pil_center_crop(img, size):
    """torchvision's CenterCrop(size) on a PIL image at least `size` on each side: top = int(round((h - size) / 2)),
    left likewise."""
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def random_resized_crop_box(w, h, g, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """The box (left, top, width, height) of Szegedy et al.'s random-resized crop (He et al.'s ImageNet augmentation)
    drawn from generator `g` with torchvision's RandomResizedCrop rule: up to 10 tries of an area fraction uniform in
    `scale` and a log-uniform aspect ratio in `ratio`, rounded, kept if it fits, placed uniformly; otherwise the
    centred crop of the whole image clamped to `ratio`."""
    area, lo, hi = w * h, math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(4, generator=g, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(lo + (hi - lo) * u[1])
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(u[2] * (w - cw + 1)), int(u[3] * (h - ch + 1)), cw, ch
    if w / h < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif w / h > ratio[1]:
        cw, ch = int(round(h * ratio[1])), h
    else:
        cw, ch = w, h
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def pil_to_tensor01(img):
    """An RGB PIL image as a float32 (3, H, W) tensor in [0, 1] (torchvision's ToTensor)."""
    a = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(255.0)


class ImageNetFolder(torch.utils.data.Dataset):
    """ImageNet from its files with Pillow alone (no torchvision). Two layouts:
      root/<split>/<wnid>/*.JPEG -- class index = position of the wnid among the sorted wnids (the order of
          torchvision's ImageFolder, hence of its pretrained models' outputs);
      root/val/ILSVRC2012_val_*.JPEG flat, with the devkit's ground truth: root/ILSVRC2012_devkit_t12/data/
          ILSVRC2012_validation_ground_truth.txt (one ILSVRC2012_ID per image, in file-name order) and meta.mat (ID ->
          wnid; read with scipy, as the SVHN .mat files), labels mapped to the sorted-wnid index.
    Items are ([0,1] float tensor (3, size, size), label). Evaluation: the short side resized to 256 * size / 224
    and a centre crop of size (torchvision's Resize(256), CenterCrop(224) on the PIL image). train=True: He et al.'s
    augmentation, a random-resized crop to size x size (`random_resized_crop_box`, bilinear) and a horizontal flip
    with probability 1/2, drawn from a generator seeded by (`epoch_seed`, index): the draws of an image depend on
    neither the worker that loads it nor the order, so a resumed epoch is the uninterrupted one (set epoch_seed
    before each epoch). A missing folder, an empty class or an unreadable image is one DataError line naming the
    path."""

    EXTENSIONS = (".jpeg", ".jpg", ".png")

    def __init__(self, root, split="val", size=224, train=False):
        root = pathlib.Path(root)
        folder = root / split
        if not folder.is_dir():
            raise DataError(f"ImageNet not found: expected {folder}/<wnid>/*.JPEG" +
                            (" (or the flat validation folder with the devkit)" if split == "val" else ""))
        self.size, self.train, self.epoch_seed = size, train, 0
        wnids = sorted(d.name for d in folder.iterdir() if d.is_dir())
        if wnids:
            self.classes = wnids
            self.samples = []
            for k, wnid in enumerate(wnids):
                files = sorted(f for f in (folder / wnid).iterdir() if f.suffix.lower() in self.EXTENSIONS)
                if not files:
                    raise DataError(f"{folder / wnid}: an empty class folder (expected *.JPEG images)")
                self.samples += [(f, k) for f in files]
        else:
            self.classes, self.samples = self._flat_val(root, folder)

    @staticmethod
    def _flat_val(root, folder):
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in ImageNetFolder.EXTENSIONS)
        data = root / "ILSVRC2012_devkit_t12" / "data"
        gt, meta = data / "ILSVRC2012_validation_ground_truth.txt", data / "meta.mat"
        if not files:
            raise DataError(f"ImageNet not found: no class folders and no images in {folder}")
        if not gt.is_file() or not meta.is_file():
            raise DataError(f"{folder}: a flat validation folder needs the devkit's {gt} and {meta} (or move the images "
                            f"into {folder}/<wnid>/)")
        ids = [int(t) for t in gt.read_text().split()]
        if len(ids) != len(files):
            raise DataError(f"{gt}: {len(ids)} labels for {len(files)} images in {folder}")
        try:
            import scipy.io
        except ImportError:
            raise DataError(f"{meta}: reading the devkit's meta.mat needs scipy (pip install scipy), or use "
                            f"{folder}/<wnid>/ folders") from None
        synsets = scipy.io.loadmat(str(meta), squeeze_me=True)["synsets"]
        id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
        wnids = sorted(id_to_wnid.values())
        index = {w: k for k, w in enumerate(wnids)}
        return wnids, [(f, index[id_to_wnid[i]]) for f, i in zip(files, ids)]

    def __len__(self):
        return len(self.samples)

    def load(self, i):
        """The i-th image as an RGB PIL image (torchvision's loader converts every image to RGB)."""
        from PIL import Image
        path = self.samples[i][0]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: unreadable image ({e.__class__.__name__}: {e})") from None

    def __getitem__(self, i):
        img = self.load(i)
        if self.train:
            from PIL import Image
            g = torch.Generator().manual_seed(self.epoch_seed * 100_000_007 + i)
            left, top, cw, ch = random_resized_crop_box(*img.size, g)
            img = img.crop((left, top, left + cw, top + ch)).resize((self.size, self.size), Image.BILINEAR)  # resized_crop
            if float(torch.rand(1, generator=g)) < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            img = _pil_center_crop(_pil_resize_short(img, 256 * self.size // 224), self.size)
        return pil_to_tensor01(img), self.samples[i][1]


def read_imagenet100(root, size=64, workers=None):
    """P1 Fig 11's labelled substitute: 100 ImageNet classes (every 10th of the sorted wnids of root/imagenet/train)
    at size x size (short side resized to 256/224 * size, centre crop: torchvision's evaluation transform, scaled),
    train and val, as uint8 arrays {x_train, y_train, x_test, y_test} with labels 0..99 in sorted-wnid order. Read
    through a DataLoader with worker processes (the ~130,000 training JPEGs)."""
    base = pathlib.Path(root) / "imagenet"
    out = {}
    keep = None
    for split, key in (("train", "train"), ("val", "test")):
        ds = ImageNetFolder(base, split, size=size)
        if keep is None:
            keep = ds.classes[::max(1, len(ds.classes) // 100)][:100]
        missing = sorted(set(keep) - set(ds.classes))
        if missing:
            raise DataError(f"{base / split}: lacks the class folder {missing[0]} (and {len(missing) - 1} more) that "
                            f"{base / 'train'} has")
        index = {ds.classes.index(w): k for k, w in enumerate(keep)}
        ds.samples = [(f, index[c]) for f, c in ds.samples if c in index]
        loader = imagenet_loader(ds, batch_size=256, workers=min(8, os.cpu_count() or 1) if workers is None else workers)
        x, y = collect(loader, f"ImageNet-100 {split}", uint8=True)
        out[f"x_{key}"], out[f"y_{key}"] = x.numpy(), y.numpy()
    return out


def imagenet_loader(dataset, batch_size, workers=4, shuffle=False, seed=0):
    """A DataLoader streaming `dataset` (ImageNet does not fit on the device like CIFAR) with `workers` worker
    processes; shuffled by a seeded generator when asked."""
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                                       generator=g, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)


def imagenet_subset(dataset, n, seed=0):
    """(x, y) tensors of n images drawn without replacement with a fixed seed (class-stratified draws are not needed at
    n in the thousands), loaded through `imagenet_loader`, with a progress line in images/s."""
    n = min(n, len(dataset))
    pick = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    loader = imagenet_loader(torch.utils.data.Subset(dataset, pick), batch_size=64, workers=min(4, os.cpu_count() or 1))
    return collect(loader, "ImageNet")


def collect(loader, tag, uint8=False):
    """Every batch of an ImageNet DataLoader as (x, y) tensors (x as uint8 0..255 when asked: a quarter of the memory),
    with a progress line in images/s."""
    xs, ys, t0 = [], [], time.time()
    for xb, yb in worker_errors(loader):
        xs.append((xb * 255).round().to(torch.uint8) if uint8 else xb)
        ys.append(yb)
        n = sum(len(b) for b in ys)
        print(f"\r{tag}: {n}/{len(loader.dataset)} images, {n / max(time.time() - t0, 1e-9):.0f} images/s", end="",
              flush=True)
    print()
    return torch.cat(xs), torch.cat(ys)


def worker_errors(loader):
    """Iterate a DataLoader, turning a DataError raised in a worker process (which the loader re-raises with the
    worker's traceback in its message) back into its own one line."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except DataError as e:
            raise DataError(str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None
        yield batch


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


DATASETS = ("cifar10", "svhn", "mnist", "digits", "synthetic", "imagenet100")


def build_dataset(name, root="data", device="cpu", download=False, size=None, channels=None, upscale="nearest",
                  n_train=None, n_test=None, seed=0):
    """Load `name` into memory on `device` as a `Data`.
    cifar10 | svhn | mnist: the real files under `root` (see SOURCES), fetched when download=True.
    digits: the bundled UCI digits (size default 8, channels default 1).
    synthetic: make_synthetic_images (size default 16, channels default 3; n_train/n_test default 1000/200).
    size/channels resize and repeat channels; n_train/n_test take the first samples (after the fixed
    split), for smoke runs."""
    check_choice("dataset", name, DATASETS)
    if name == "imagenet100":
        d = {k: torch.from_numpy(v) for k, v in read_imagenet100(root, size or 64).items()}
        d = {k: v.float() / 255.0 if k.startswith("x") else v for k, v in d.items()}
        num_classes = int(d["y_train"].max()) + 1
    elif name == "digits":
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
    return Data(name, *(d[k].to(device) for k in ("x_train", "y_train", "x_test", "y_test")), mean, std,
                num_classes=num_classes if name == "imagenet100" else 10)


def class_balanced_subset(y, per_class, seed=0):
    """Indices of a fixed class-balanced subset: the first `per_class` of each class in a seeded
    permutation (P1 App. B.2: 1000 test samples, 100 per class, for robust accuracy and LIGS)."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).to(y.device)
    idx = [perm[y[perm] == c][:per_class] for c in torch.unique(y).tolist()]
    return torch.cat(idx).sort().values


def augment_draws(generator, batch_sizes, device, pad=4, flip=True, jitter=False):
    """The random numbers of a training epoch's augmentation, drawn from a CPU `generator` batch after batch (the
    stream is the same on every device, and the same as drawing them one batch at a time) and copied to `device`
    in one transfer, instead of twice per step. One (rows, B) tensor per batch; rows: crop row and column offsets,
    flip (`augment_crop_flip`); with jitter also brightness, contrast and saturation factors in [0.75, 1.25], three
    keys whose argsort is the order of those three, and a rotation angle in [-2, 2] degrees (`jitter_rotate`)."""
    draws = []
    for b in batch_sizes:
        rows = [torch.randint(0, 2 * pad + 1, (2, b), generator=generator).float(),
                (torch.rand(1, b, generator=generator) < 0.5).float() if flip else torch.zeros(1, b)]
        if jitter:
            rows += [0.75 + 0.5 * torch.rand(3, b, generator=generator), torch.rand(3, b, generator=generator),
                     4 * torch.rand(1, b, generator=generator) - 2]
        draws.append(torch.cat(rows))
    return torch.cat(draws, 1).to(device).split(list(batch_sizes), 1)


def augment_crop_flip(x, generator=None, pad=4, flip=True, draws=None):
    """Random crop with zero padding `pad` plus horizontal flip (standard CIFAR augmentation,
    1.5), for a whole batch at once on x's device. The random numbers come from a CPU `generator`, or are this
    batch's `draws` from `augment_draws`."""
    B, C, H, W = x.shape
    if draws is None:
        draws = augment_draws(generator, [B], x.device, pad, flip)[0]
    off = draws[:2].long()
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = (off[0][:, None] + torch.arange(H, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (off[1][:, None] + torch.arange(W, device=x.device))[:, None, :]  # (B, 1, W)
    out = xp.permute(0, 2, 3, 1)[torch.arange(B, device=x.device)[:, None, None], rows, cols].permute(0, 3, 1, 2)
    if flip:
        out = torch.where(draws[2].bool()[:, None, None, None], out.flip(3), out)
    return out.contiguous()


def jitter_rotate(x, draws):
    """ColorJitter(brightness=.25, contrast=.25, saturation=.25) in a random order per image, then RandomRotation(2)
    (nearest, zero fill): the rest of the robustness library's CIFAR training augmentation, with which Ilyas et al.
    and P1's authors train on the feature datasets (P1 Table 6). Batched on x's device, in floating point (the
    library works on 8-bit PIL images), from this batch's `augment_draws(..., jitter=True)`."""
    B, C, H, W = x.shape
    fac, order, angle = draws[3:6], draws[6:9].argsort(0), draws[9] * math.pi / 180
    gray = lambda t: (t * t.new_tensor([0.2989, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True) if C == 3 else t
    ops = [lambda t, f: t * f,  # brightness: blend with black
           lambda t, f: f * t + (1 - f) * gray(t).mean((1, 2, 3), keepdim=True),  # contrast: with the mean grey level
           lambda t, f: f * t + (1 - f) * gray(t)]  # saturation: with the grey image
    for pos in range(3):
        for k, op in enumerate(ops):
            f = fac[k].view(B, 1, 1, 1)
            x = torch.where((order[pos] == k).view(B, 1, 1, 1), op(x, f).clamp(0, 1), x)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


# The 19 CIFAR-10-C corruptions by category (P2 Sec. 3: four categories), as the released files name them
# (Hendrycks & Dietterich 2019); exp_corruption.py holds the generator.
CORRUPTIONS = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "gaussian_blur"),
    "weather": ("snow", "frost", "fog", "spatter", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression", "saturate"),
}
CORRUPTION_NAMES = tuple(n for names in CORRUPTIONS.values() for n in names)
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


# ================================================================================================
# 13. Devices and torchrun: data-parallel training with a synchronized BatchNorm (DECISIONS.md D31)
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


def is_distributed():
    """True inside a torchrun job with more than one rank (after `init_distributed`)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def single_process(what):
    """Refuse torchrun for work that is not data-parallel (every rank would redo all of it): the models of such an
    artifact are independent, so --shard k/N gives each GPU its own. Scripts call it before any long work starts."""
    if is_distributed():
        raise ValueError(f"{what} runs in one process per GPU: use --shard k/N, not torchrun")


def is_main_process():
    """Rank 0, or not distributed: the one process that writes files and prints."""
    return not is_distributed() or torch.distributed.get_rank() == 0


def precision_policy(args):
    """The precision and determinism of a run, applied by `run_script` before any work (README: precision and
    determinism). Default, for speed: cuDNN picks its fastest algorithms (benchmark) and float32 matmuls and
    convolutions may run in TF32 on Ampere/Hopper GPUs. --deterministic: TF32 off, deterministic cuDNN and
    torch.use_deterministic_algorithms, for bit-reproducible GPU runs (resume = uninterrupted, N shards = one process;
    on a CPU they are bit-identical either way). --amp: bf16 autocast for the training steps and the attack steps of
    adversarial training (the LIGS regularizer and every evaluation stay float32); it needs CUDA, so on a CPU it is an
    error, not silence. Returns the flags in force, recorded in config.json."""
    deterministic, amp = getattr(args, "deterministic", False), getattr(args, "amp", False)
    if amp and pick_device(getattr(args, "device", "auto")).type != "cuda":
        raise ValueError("--amp: bf16 autocast is for CUDA runs and this one runs on the CPU (drop --amp, or --device cuda)")
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for deterministic matmuls
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not deterministic
    torch.use_deterministic_algorithms(deterministic)
    return precision_in_force()


def precision_in_force():
    """The torch flags that decide a run's precision and determinism, as config.json records them."""
    return dict(deterministic_algorithms=torch.are_deterministic_algorithms_enabled(),
                cudnn_benchmark=torch.backends.cudnn.benchmark, tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                tf32_cudnn=torch.backends.cudnn.allow_tf32)


def init_distributed(device="auto"):
    """Join the torchrun job named by the environment (WORLD_SIZE > 1): NCCL when the ranks train on GPUs (--device
    cuda, or auto with a GPU present), gloo otherwise -- NCCL's collectives fail on CPU tensors, so `--device cpu` on
    a GPU machine must not pick it. Does nothing in a plain process. Called by `run_script` with the script's
    --device, so every exp_*.py runs under `torchrun --nproc_per_node G`; `train_model` then trains data-parallel."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.distributed.is_initialized():
        gpu = device in ("auto", "cuda") and torch.cuda.is_available()
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group("nccl" if gpu else "gloo")


def finish_distributed():
    """Leave the torchrun job cleanly (every rank waits for rank 0's writes); nothing in a plain process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


class _AllGather(torch.autograd.Function):
    """Every rank's `x` stacked in rank order (G, ...), differentiable: the gradient of rank k's x is the sum over
    ranks of the gradients of row k (one all-reduce back, as torch.nn.SyncBatchNorm's backward)."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(out, x.contiguous())
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad)
        return grad[torch.distributed.get_rank()]


class _SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics are those of the global batch (all ranks), P1/P2's
    batch-128 BN under data parallelism. Same semantics and collectives as torch.nn.SyncBatchNorm (one all-gather
    of the per-rank count, mean and centred sum of squares forward, one all-reduce backward), but written with a
    differentiable all-gather, so it also runs (and is tested) on CPU with gloo; torch's is GPU-only.
    Installed over a model's BatchNorm modules by `sync_batchnorm` (same parameters and buffers)."""

    def _check_input_dim(self, x):  # (the swapped-in module keeps BatchNorm1d/2d's own input rules)
        pass

    def forward(self, x):
        if not self.training:  # evaluation inside training (per-epoch measurements, attacks): the running statistics
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        n_here = x.numel() // x.shape[1]  # (from the shape: no host copy; the count is filled on the device)
        mean_here = x.sum(dims) / max(n_here, 1)
        m2_here = ((x - mean_here.view(shape)) ** 2).sum(dims)
        count = torch.full((1,), float(n_here), dtype=x.dtype, device=x.device)
        stats = _AllGather.apply(torch.cat([mean_here, m2_here, count]))  # (G, 2C + 1)
        c = x.shape[1]
        means, m2s, counts = stats[:, :c], stats[:, c:2 * c], stats[:, 2 * c:]
        n = counts.sum()
        mean = (counts * means).sum(0) / n
        # Chan et al.'s combination of per-rank centred sums of squares: exact, and stable like two passes
        var = (m2s + counts * (means - mean) ** 2).sum(0) / n
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


def ddp_rank():
    """This process's rank under torchrun, 0 in a plain process."""
    return torch.distributed.get_rank() if is_distributed() else 0


def ddp_key(model, key, r, on_step, ddp_bn):
    """The checkpoint key of a training run under torchrun (unchanged in a plain process): per-rank BN statistics
    (ddp_bn='local') make a different model from the single-process one, so its key says so. The LIGS regularizer
    and per-step probes are refused there (one clear error): run one process per GPU with --shard instead."""
    if not is_distributed():
        return key
    check_choice("--ddp-bn", ddp_bn, ("sync", "local"))
    if r["ligs_lambda"] > 0 or on_step is not None:
        raise ValueError("under torchrun, training with the LIGS regularizer or per-step probes is not supported; "
                         "run one process per GPU with --shard instead")
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if ddp_bn == "local" and has_bn and key is not None:
        return dict(key=key, per_rank_bn=torch.distributed.get_world_size())
    return key


def ddp_wrap(model, dev, ddp_bn):
    """Under torchrun: the DistributedDataParallel wrapper of `model` with this rank and the world size, its
    BatchNorm layers synchronized over the global batch when ddp_bn='sync' (`sync_batchnorm`) until `ddp_unwrap`.
    None in a plain process."""
    if not is_distributed():
        return None
    stack = contextlib.ExitStack()
    if ddp_bn == "sync":
        stack.enter_context(sync_batchnorm(model))
    net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    return types.SimpleNamespace(net=net, rank=ddp_rank(), world=torch.distributed.get_world_size(), stack=stack)


def ddp_slice(xb, yb, ddp):
    """This rank's contiguous slice of a global batch (drawn and augmented by every rank exactly as by one process)."""
    part = torch.arange(len(yb), device=yb.device).tensor_split(ddp.world)[ddp.rank]
    return xb[part], yb[part]


def ddp_sum(*totals):
    """Per-rank sums (0-d tensors) summed over ranks, in one all-reduce."""
    t = torch.stack([v.to(totals[0].dtype) for v in totals])
    torch.distributed.all_reduce(t)
    return tuple(t)


def ddp_unwrap(model, ddp):
    """End data-parallel training: BatchNorm gets its own class back, and every rank keeps rank 0's buffers (per-rank
    BN statistics differ; rank 0's are the checkpointed ones). Nothing in a plain process."""
    if ddp is None:
        return
    ddp.stack.close()
    for b in model.buffers():
        torch.distributed.broadcast(b, 0)


# ================================================================================================
# 14. Claims: a claim as data, Welch intervals, verdicts (DECISIONS.md D7, D25)
# ================================================================================================


def claim(id, paper, text, paper_value, metric, a, b=None, expect="<", per=(), scale=1.0, paper_effect=None, **kw):
    """A claim of a paper as data, tested by `evaluate_claims` on a script's rows: mean(metric | rows matching `a`)
    minus mean(metric | rows matching `b`) (or the mean of `a` alone when b is None) is expected `expect` 0,
    separately for every combination of the fields in `per`. `scale` = 100 reports fractions as percentage points;
    `paper_effect` is the paper's own effect in those display units (its smallest reported row where it gives several;
    None where it gives no number on this metric), used to say when seeds are too few to decide it (`seeds_needed`);
    extra keys (e.g. `where`, a filter on every row) are passed on."""
    return dict(id=id, paper=paper, claim=text, paper_value=paper_value, metric=metric, a=a, b=b, expect=expect, per=per,
                scale=scale, paper_effect=paper_effect, **kw)


Z_POWER = 1.959964 + 0.841621  # z_0.975 + z_0.80: a two-sided 5 % test with 80 % power


def seeds_needed(sd_a, sd_b, effect):
    """Seeds per group for 80 % power to find `effect` (the paper's, in the metric's units) at the 5 % level, given the
    measured seed-to-seed standard deviations (sd_b None for a one-sample claim): n = (z_.975 + z_.8)^2 (sd_a^2 +
    sd_b^2) / effect^2, the normal approximation (Cohen 1988, ch. 2), at least 2."""
    var = sd_a ** 2 + (sd_b ** 2 if sd_b is not None else 0.0)
    return max(2, math.ceil(Z_POWER ** 2 * var / effect ** 2))


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


def _sd(values):
    """Sample standard deviation of the finite values (0 for fewer than 2)."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if len(v) < 2:
        return 0.0
    m = sum(v) / len(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


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
    entirely on the other, and "inconclusive" when it contains 0 or a group has fewer than 2 seeds -- or
    "underpowered" when it contains 0 and, at the measured seed spread, more seeds per group than were run would be
    needed for 80 % power against the paper's own effect (`paper_effect`, `seeds_needed`: then the run cannot tell
    the paper's effect from none; a plain "inconclusive" with enough seeds means a paper-sized effect was not found).
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
        need = None
        if not math.isfinite(lo):
            verdict = "not run" if (na == 0 or (c.get("b") is not None and nb == 0)) else "inconclusive"
        elif min(sign * lo, sign * hi) > 0:
            verdict = "held"
        elif max(sign * lo, sign * hi) < 0:
            verdict = "reversed"
        else:
            verdict = "inconclusive"
            if c.get("paper_effect"):  # too few seeds to decide an effect of the paper's size? (D25)
                need = seeds_needed(_sd(va), None if vb is None else _sd(vb), c["paper_effect"] / c.get("scale", 1.0))
                verdict = "underpowered" if need > min(na, nb if vb is not None else na) else verdict
        out.append({k: c.get(k) for k in ("id", "paper", "claim", "paper_value", "metric", "expect", "scale",
                                           "paper_effect")} |
                   dict(a=c["a"], b=c.get("b"), where=c.get("where"), ref=c.get("ref", 0.0), effect=effect, lo=lo, hi=hi,
                        n_a=na, n_b=nb, level=level, method="Welch t" if c.get("b") is not None else "one-sample t",
                        verdict=verdict, seeds_needed=need))
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
                 "fewer than 2 seeds per group), **underpowered** (contains 0, and at the measured seed spread ~n seeds per "
                 "group would be needed to find the paper's own effect size with 80 % power: the run cannot decide it).")


def claims_table(results):
    """Markdown table lines, one row per evaluated claim (used by claims.md and the README)."""
    lines = ["| claim | source | paper's number | measured comparison | effect [95 % CI] | n | verdict |",
             "|---|---|---|---|---|---|---|"]
    for c in results:
        n = f"{c['n_a']}" + (f" vs {c['n_b']}" if c.get("b") is not None else "")
        need = f" (~{c['seeds_needed']} seeds)" if c["verdict"] == "underpowered" else ""
        lines.append(f"| {c['claim']} | {c['paper']} | {c['paper_value']} | {comparison_text(c)} | {fmt_effect(c)} | {n} | "
                     f"**{c['verdict']}**{need} |")
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


# ================================================================================================
# 15. Run records, the checkpoint cache, presets and the command line (every exp_*.py)
# ================================================================================================

def load_tensors(path, what="checkpoint"):
    """torch.load(path) on the CPU with weights_only=True: tensors, numbers, strings, lists, tuples and dicts, and
    nothing that could run code (a pickle in a shared --cache or a downloaded file would otherwise run in every
    process that loads it). A file holding anything else, or not a torch file at all, is one DataError line."""
    if not pathlib.Path(path).is_file():
        raise DataError(f"{what} {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise DataError(f"{what} {path} is not a plain tensor file (refused, nothing of it was run): {first}") from None


def save_atomic(obj, path):
    """torch.save to a temp file and rename, so an interrupted write never leaves a torn checkpoint."""
    if not is_main_process():  # under torchrun only rank 0 writes
        return
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: shards may write the same file
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


@contextlib.contextmanager
def checkpoint_lock(ckpt, log=print, tag="", poll_s=2.0, stale_s=3600.0):
    """Hold CKPT.lock while training into `ckpt`, so that two processes sharing a --cache never train the same model
    at once: the lock is created atomically (O_EXCL), and a second process waits for it, then resumes from or reuses
    what the first one saved (checkpoints are written atomically, so it never reads a partial file). A lock whose
    owner died on this host, or that no checkpoint has refreshed for `stale_s` seconds (an owner on another host),
    is taken over. Yields refresh(), called after each checkpoint. Does nothing for ckpt None."""
    if ckpt is None:
        yield lambda: None
        return
    lock = pathlib.Path(f"{ckpt}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = dict(host=platform.node(), pid=os.getpid())
    said = False
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                owner, age = json.loads(lock.read_text() or "{}"), time.time() - lock.stat().st_mtime
            except (OSError, json.JSONDecodeError):  # released, or being written, just now
                continue
            if _lock_is_stale(owner, age, stale_s):
                lock.unlink(missing_ok=True)
                continue
            if not said:
                log(f"{tag} waiting for {owner.get('host')}:{owner.get('pid')}, which trains this model into {ckpt} "
                    f"(if that process is gone, delete {lock})")
                said = True
            time.sleep(poll_s)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(me))
    try:
        yield lambda: os.utime(lock)
    finally:
        lock.unlink(missing_ok=True)


def _lock_is_stale(owner, age, stale_s):
    if owner.get("host") == platform.node() and isinstance(owner.get("pid"), int):
        try:
            os.kill(owner["pid"], 0)  # signal 0: does the process exist?
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return age > stale_s


def model_key(dataset, size, arch, kw, recipe, seed, amp, input_space, mean, std, channels=None):
    """The cache key of a CNN of the papers' tables (exp_table1.py, exp_corruption.py, exp_transfer.py and the
    sources of exp_feature_datasets.py build it alike, so a model trained by one is reused by the others):
    everything that determines the weights. The input space is spelt as the first versions did ("p1"/"p2"), so
    caches filled by them still hit."""
    key = dict(dataset=dataset, size=size, arch=arch, model=kw, recipe=recipe, seed=seed, amp=amp,
               input=dict(conv={"pixels": "p1", "standardized": "p2"}[input_space], mean=mean, std=std))
    if channels:
        key["channels"] = channels
    return key



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
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun: every rank runs the script, rank 0 alone prints and writes
        sys.stdout = open(os.devnull, "w")
    try:
        args = get_args()
        init_distributed(getattr(args, "device", "auto"))
        if not getattr(args, "plot_only", None):
            precision_policy(args)
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
               precision=precision_in_force(), time=datetime.datetime.now().isoformat(timespec="seconds"))
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


def fmt_default(v):
    """A default as --help shows it: floats to 4 significant digits, except those that need more and are a whole
    number of 255ths (eps budgets such as 1/255), which show as k/255; lists space-separated."""
    if isinstance(v, (list, tuple)):
        return " ".join(fmt_default(x) for x in v)
    if isinstance(v, float) and not v.is_integer() and float(f"{v:.4g}") != v:  # (0.2 stays 0.2, not 51/255)
        k = v * 255
        return f"{round(k)}/255" if abs(k - round(k)) < 1e-9 and 0 < abs(round(k)) < 255 else f"{v:.4g}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help of every exp_*.py: the script's docstring as written, then each flag with the value that will run
    for the chosen --preset/--artifact (none shown where there is none)."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = not any(action.default is d for d in (None, False, argparse.SUPPRESS)) and action.option_strings
        return text + (f" (default: {fmt_default(action.default)})".replace("%", "%%") if shown else "")


def make_parser(doc, artifacts, default_artifact, presets, skipped=()):
    """(parser, its first group "what to reproduce") of an exp_*.py: the script's docstring as the description,
    --artifact (the reproduced ones only; a skipped one is explained by `parse_with_presets`) and --preset."""
    p = argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)
    p.skipped = dict(skipped)
    g = p.add_argument_group("what to reproduce")
    g.add_argument("--artifact", default=default_artifact, choices=list(artifacts),
                   help="the paper's table or figure" + (f" (not reproduced here: {', '.join(p.skipped)})" if skipped else ""))
    g.add_argument("--preset", default="paper", choices=list(presets),
                   help="paper: the paper's settings; quick: the bundled digits on a CPU in minutes; smoke: a test run")
    return p, g


def add_run_flags(parser, script, unit="runs", data=None, download="fetch missing datasets (md5-checked)", cache=None,
                  outputs="table.md, claims.md and the figures"):
    """The flags every exp_*.py shares, in two groups: data and device (--data-root holding `data`, --download,
    --device, --amp, --deterministic: `precision_policy`), and run management (--cache, --out, --resume, --shard,
    --ddp-bn, --plot-only). `unit` names what one record holds (runs, models, cells); data=None leaves out the data
    flags; cache=None leaves out --cache. Returns the "data and device" group, for the script's own data flags."""
    g = parser.add_argument_group("data and device")
    if data is not None:
        g.add_argument("--data-root", default="data", help=f"folder holding {data}")
        g.add_argument("--download", action="store_true", help=download)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False, help="bf16 autocast for the training "
                   "steps and the attack steps of adversarial training (CUDA only; the LIGS regularizer and every "
                   "evaluation stay float32)")
    g.add_argument("--deterministic", action="store_true", help="bit-reproducible GPU runs: TF32 off, deterministic "
                   "cuDNN and torch algorithms (default: speed -- cuDNN benchmark, TF32 allowed)")
    g = parser.add_argument_group("run management")
    if cache is not None:
        g.add_argument("--cache", metavar="DIR", help=cache)
    g.add_argument("--out", metavar="RUN_DIR", help=f"run directory (none: runs/{script}/<timestamp>)")
    g.add_argument("--resume", action="store_true", help=f"continue the run in --out, keeping finished {unit}")
    g.add_argument("--shard", type=parse_shard, metavar="K/N", help=f"run only the {unit} with index = K mod N "
                   "(SLURM arrays, one process per GPU); every shard writes its own record files into the shared --out")
    g.add_argument("--ddp-bn", default="sync", choices=["sync", "local"], help="BN under torchrun: statistics of "
                   "the global batch (sync, P1/P2's BN) or of each rank's slice (local, a different model)")
    g.add_argument("--plot-only", metavar="RUN_DIR", nargs="+", help=f"redraw {outputs} from the records of "
                   "RUN_DIR (several: the shards of one run, merged)")
    return parser._action_groups[-2]


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
    if getattr(known, "artifact", None) in getattr(parser, "skipped", {}):
        print(f"skipped {known.artifact}: {parser.skipped[known.artifact]}")
        sys.exit(0)
    for a in parser._actions:  # a bad --preset/--artifact is reported by the full parser below
        if a.dest in ("preset", "artifact") and a.choices and getattr(known, a.dest) not in a.choices:
            valid = False
    if valid:
        parser.set_defaults(**resolve(known.preset, getattr(known, "artifact", None)))
    args = parser.parse_args(argv)
    return _resumed(parser, args, argv) if getattr(args, "resume", False) else args


def arch_seeds_arg(text):
    """argparse type of --arch-seeds ARCH=N: seeds for one architecture (P2 trains WRNs with 5 seeds, VGGs with 3)."""
    arch, _, n = text.partition("=")
    if not arch or not n.isdigit() or int(n) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ARCH=N with N >= 1 (e.g. wrn28_10=5)")
    return arch, int(n)


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
