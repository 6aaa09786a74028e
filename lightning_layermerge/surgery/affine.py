"""The algebra of merged convolutions (float64, exact): :class:`AffineConv` and :class:`Pointwise`.

A value inside a segment is an :class:`AffineConv` of the segment input padded by ``P``:
``t[y] = sum_u W[u] * x_pad[S*y + u] + b``. Convolutions compose by a transposed convolution of
their kernels, BatchNorm scales rows, a crop widens the kernel symmetrically, and residual
additions add kernels. Grouped/depthwise convs are handled densely and re-emitted grouped when
the result is still block-diagonal. A dense 1x1 conv after a large kernel is kept as a matrix
(:class:`Pointwise`) until something needs the kernel, which saves composing it twice.
:func:`~lightning_layermerge.surgery.merge.merge` walks a segment's graph with these maps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

__all__ = ["AffineConv", "Map", "Pointwise", "deferrable", "regroup", "resolved", "sum_maps", "unreachable_taps"]


@dataclass
class AffineConv:
    """t[y] = sum_u W[u] x_p[S*y + u] + b, where x_p is the segment input padded by ``pad``.

    Weights are stored grouped like ``nn.Conv2d`` weights. ``extent`` is the larger spatial
    size of the segment input: taps that can only ever read zero padding are trimmed
    (symmetrically, lowering ``pad``), which is exact and keeps kernels merged over small
    feature maps from growing beyond them.
    """

    weight: torch.Tensor  # [C_out, C_in / groups, K, K]
    bias: torch.Tensor  # [C_out]
    stride: int
    groups: int
    pad: int
    extent: int
    crop_of_identity: int | None = None  # set while the map is just a cropped input

    @classmethod
    def identity(cls, channels: int, device: torch.device, pad: int = 0, extent: int = 1 << 30) -> AffineConv:
        """The segment input itself, padded by ``pad``."""
        ones = torch.ones(channels, 1, 1, 1, dtype=torch.float64, device=device)
        zeros = torch.zeros(channels, dtype=torch.float64, device=device)
        return cls(ones, zeros, 1, channels, pad, extent, 0)

    @property
    def kernel(self) -> int:
        return self.weight.shape[-1]

    def _with(self, weight: torch.Tensor, bias: torch.Tensor, stride: int, groups: int,
              crop_of_identity: int | None = None) -> AffineConv:
        return AffineConv(weight, bias, stride, groups, self.pad, self.extent, crop_of_identity).trimmed()

    def trimmed(self) -> AffineConv:
        """Drop taps that read only zero padding for every output position (exact; :func:`unreachable_taps`)."""
        c = unreachable_taps(self.kernel, self.pad, self.stride, self.extent)
        if c == 0 or self.crop_of_identity is not None:
            return self
        w = self.weight[..., c:-c, c:-c]
        return AffineConv(w, self.bias, self.stride, self.groups, self.pad - c, self.extent)

    def with_pad(self, pad: int) -> AffineConv:
        """The same map expressed on the input padded by ``pad`` (>= ``self.pad``)."""
        grow = pad - self.pad
        if grow < 0:
            raise ValueError("cannot express a map on a less padded input")
        w = F.pad(self.weight, (grow,) * 4)
        crop = None if self.crop_of_identity is None else self.crop_of_identity + grow
        return AffineConv(w, self.bias, self.stride, self.groups, pad, self.extent, crop)

    def crop(self, c: int) -> AffineConv:
        """The map of this value with ``c`` pixels removed from every border."""
        if c < 0:
            raise ValueError("cannot pad a value inside a merged segment")
        w = F.pad(self.weight, (self.stride * c,) * 4)
        crop = None if self.crop_of_identity is None else self.crop_of_identity + c
        return self._with(w, self.bias, self.stride, self.groups, crop)

    def regroup(self, groups: int) -> AffineConv:
        """The same map with a coarser group structure (``groups`` divides ``self.groups``)."""
        if groups == self.groups:
            return self
        return AffineConv(regroup(self.weight, self.groups, groups), self.bias, self.stride, groups,
                          self.pad, self.extent)

    def then_conv(self, conv: nn.Conv2d) -> AffineConv:
        """Apply an unpadded ``conv`` after this map."""
        w = conv.weight.detach().to(torch.float64)  # [C_out, C_mid/g, k, k]
        groups = math.gcd(self.groups, conv.groups)
        if self.crop_of_identity is not None:  # the common case: a conv of the segment input
            weight = F.pad(w, (self.crop_of_identity,) * 4)
            groups = conv.groups
        elif conv.groups == conv.in_channels == conv.out_channels:  # depthwise: no channel mixing
            weight, groups = _compose_depthwise(w, self.weight, self.stride), self.groups
        else:
            inner = self.regroup(groups).weight
            weight = _compose(regroup(w, conv.groups, groups), groups, inner, self.stride)
        taps = w.sum(dim=(2, 3))  # [C_out, C_mid/g]: the bias passes through every tap
        bias = (taps * self.bias.reshape(conv.groups, -1).repeat_interleave(w.shape[0] // conv.groups, 0)).sum(1)
        if conv.bias is not None:
            bias = bias + conv.bias.detach().to(torch.float64)
        return self._with(weight, bias, self.stride * conv.stride[0], groups)

    def then_norm(self, bn: nn.BatchNorm2d) -> AffineConv:
        """Apply an eval-mode BatchNorm after this map."""
        scale, shift = _norm_affine(bn)
        return self._with(self.weight * scale[:, None, None, None], self.bias * scale + shift, self.stride, self.groups)

    def plus(self, other: AffineConv) -> AffineConv:
        """Sum of two maps of the same input (a folded residual addition)."""
        groups = math.gcd(self.groups, other.groups)
        pad = max(self.pad, other.pad)
        a, b = self.regroup(groups).with_pad(pad), other.regroup(groups).with_pad(pad)
        if a.stride != b.stride or a.weight.shape != b.weight.shape:
            raise ValueError(
                f"cannot fold a residual addition of maps with kernels {tuple(a.weight.shape)} stride "
                f"{a.stride} and {tuple(b.weight.shape)} stride {b.stride}"
            )
        return AffineConv(a.weight + b.weight, a.bias + b.bias, a.stride, groups, pad, self.extent).trimmed()

    def to_conv(self, like: torch.Tensor) -> nn.Conv2d:
        """The single ``nn.Conv2d`` for this map, in the dtype/device of ``like``."""
        c_out, c_in_g, k, _ = self.weight.shape
        # skip_init: the weights are overwritten, and initialising big merged kernels is slow.
        conv = skip_init(nn.Conv2d, c_in_g * self.groups, c_out, k, stride=self.stride, padding=self.pad,
                         groups=self.groups, bias=True, device=like.device, dtype=like.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.weight)
            conv.bias.copy_(self.bias)
        return conv


def unreachable_taps(kernel: int, padding: int, stride: int, extent: int) -> int:
    """Taps per side of a merged kernel that can only ever read zero padding.

    A kernel merged over a small feature map can outgrow it; those taps multiply zeros
    for every output position, so ``merge`` trims them (exactly) and the latency table
    times the trimmed conv.
    """
    size = (extent + 2 * padding - kernel) // stride + 1
    return max(0, min(padding - stride * (size - 1), kernel - padding - extent))


def _compose(w: torch.Tensor, groups: int, inner: torch.Tensor, stride: int) -> torch.Tensor:
    """Kernel of conv ``w`` applied after the map ``inner`` (stride ``stride``), both grouped.

    Y[o, c, v*S + u] = sum_m w[o, m, v] * inner[m, c, u] within each group: one batched
    matrix product per tap v of ``w``.
    """
    c_out, m_g, k, _ = w.shape
    c_mid, c_in_g, size_in, _ = inner.shape
    size = (k - 1) * stride + size_in
    out = inner.new_zeros(c_out, c_in_g, size, size)
    flat = inner.reshape(groups, c_mid // groups, c_in_g * size_in * size_in)
    taps = w.reshape(groups, c_out // groups, m_g, k, k)
    for vy in range(k):
        for vx in range(k):
            prod = torch.bmm(taps[..., vy, vx], flat).reshape(c_out, c_in_g, size_in, size_in)
            out[:, :, vy * stride: vy * stride + size_in, vx * stride: vx * stride + size_in] += prod
    return out


def _compose_depthwise(w: torch.Tensor, inner: torch.Tensor, stride: int) -> torch.Tensor:
    """Kernel of a depthwise conv ``w`` [C, 1, k, k] applied after the map ``inner``.

    Each output channel only scales and shifts its own row of ``inner``, so the inner
    map's group structure is kept and no dense channel product is needed.
    """
    k, size_in = w.shape[-1], inner.shape[-1]
    size = (k - 1) * stride + size_in
    out = inner.new_zeros(*inner.shape[:2], size, size)
    for vy in range(k):
        for vx in range(k):
            out[:, :, vy * stride: vy * stride + size_in, vx * stride: vx * stride + size_in] += (
                w[:, 0, vy, vx, None, None, None] * inner
            )
    return out


def regroup(weight: torch.Tensor, groups: int, coarser: int) -> torch.Tensor:
    """Re-express a conv weight with ``groups`` groups using ``coarser`` groups (zeros fill in)."""
    if coarser == groups:
        return weight
    c_out, in_g, k, _ = weight.shape
    c_in = in_g * groups
    new_in = c_in // coarser
    out = weight.new_zeros(c_out, new_in, k, k)
    rows = torch.arange(c_out, device=weight.device)
    old_group = rows // (c_out // groups)
    new_group = rows // (c_out // coarser)
    cols = (old_group * in_g - new_group * new_in)[:, None] + torch.arange(in_g, device=weight.device)[None, :]
    out[rows[:, None], cols] = weight
    return out


@dataclass
class Pointwise:
    """``left @ inner + bias``: 1x1 convs and norms applied after a many-tap map, not yet composed.

    Composing a 1x1 conv into a map with ``K*K`` taps costs ``C_out * C_mid * C_in * K*K``;
    a chain of 1x1 convs (a bottleneck's 1x1s, BatchNorms, identity or projection shortcuts
    of the same inner map) is much cheaper multiplied out as plain matrices first, and
    applied to the taps once (remove-all ResNet-50: one product instead of twenty). Only
    dense inner maps (``groups == 1``) are deferred, so grouped results keep their groups.
    """

    left: torch.Tensor  # [C_out, C_inner]
    bias: torch.Tensor  # [C_out]
    inner: AffineConv

    @classmethod
    def over(cls, inner: AffineConv) -> Pointwise:
        c = inner.weight.shape[0]
        eye = torch.eye(c, dtype=inner.weight.dtype, device=inner.weight.device)
        return cls(eye, torch.zeros_like(inner.bias), inner)

    def then_conv(self, conv: nn.Conv2d) -> Pointwise:
        w = conv.weight.detach().to(torch.float64)[:, :, 0, 0]
        bias = w @ self.bias
        if conv.bias is not None:
            bias = bias + conv.bias.detach().to(torch.float64)
        return Pointwise(w @ self.left, bias, self.inner)

    def then_norm(self, bn: nn.BatchNorm2d) -> Pointwise:
        scale, shift = _norm_affine(bn)
        return Pointwise(self.left * scale[:, None], self.bias * scale + shift, self.inner)

    def resolve(self) -> AffineConv:
        """The composed map."""
        inner = self.inner
        c_mid, c_in, k, _ = inner.weight.shape
        weight = (self.left @ inner.weight.reshape(c_mid, -1)).reshape(-1, c_in, k, k)
        return AffineConv(weight, self.left @ inner.bias + self.bias, inner.stride, 1, inner.pad,
                          inner.extent).trimmed()


Map = AffineConv | Pointwise


def resolved(m: Map) -> AffineConv:
    return m.resolve() if isinstance(m, Pointwise) else m


def deferrable(m: Map, conv: nn.Conv2d) -> bool:
    """Whether ``conv`` after ``m`` is a dense 1x1 that is cheaper kept as a matrix for now."""
    pointwise = conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1 and conv.padding == (0, 0)
    if not pointwise:
        return False
    if isinstance(m, Pointwise):
        return True
    return m.crop_of_identity is None and m.groups == 1 and m.kernel > 1


def sum_maps(a: Map, b: Map) -> Map:
    """Sum of two maps of the segment input; stays deferred when both share the inner map."""
    inner_a = a.inner if isinstance(a, Pointwise) else a
    inner_b = b.inner if isinstance(b, Pointwise) else b
    if inner_a is inner_b and inner_a.groups == 1 and (isinstance(a, Pointwise) or isinstance(b, Pointwise)):
        pa = a if isinstance(a, Pointwise) else Pointwise.over(a)
        pb = b if isinstance(b, Pointwise) else Pointwise.over(b)
        return Pointwise(pa.left + pb.left, pa.bias + pb.bias, inner_a)
    return resolved(a).plus(resolved(b))


def _norm_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``scale, shift`` of an eval-mode BatchNorm, in float64."""
    scale = torch.rsqrt(bn.running_var.detach().to(torch.float64) + bn.eps)
    shift = -bn.running_mean.detach().to(torch.float64) * scale
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(torch.float64)
        shift = shift * bn.weight.detach().to(torch.float64)
    if bn.bias is not None:
        shift = shift + bn.bias.detach().to(torch.float64)
    return scale, shift
