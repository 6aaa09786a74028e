"""Plain-torch stand-ins for third-party leaf modules, used by the self-contained file format.

A compressed network keeps some library modules as opaque leaves (diffusers' ``Attention``
and ``Timesteps``, timm's ``DropPath``). :func:`~lightning_layermerge.save_compressed`
stores the network as data, and data can only name classes on an allow-list; so before
saving, an adapter replaces such a leaf by the equivalent module defined here, which holds
the *same* child modules and parameters (same state-dict keys) and computes the same
function with the same torch calls (torchvision's ``stochastic_depth`` function likewise).
The loaded network then needs neither the library nor any code from the file.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DropPath", "SelfAttention", "SinusoidalTimesteps", "UNetOutput", "stochastic_depth"]


class SelfAttention(nn.Module):
    """Self-attention over the pixels (or tokens) of its input: diffusers' ``Attention`` with
    its default ``AttnProcessor2_0``, without cross-attention, masks or spatial norms.

    Holds ``group_norm`` (or ``None``), ``to_q``, ``to_k``, ``to_v`` and ``to_out`` (a
    ``ModuleList`` of the output ``Linear`` and a ``Dropout``), like ``Attention``.

    Args:
        heads: Number of attention heads.
        residual_connection: Add the input to the output.
        rescale_output_factor: The output is divided by it.
    """

    def __init__(self, heads: int, residual_connection: bool, rescale_output_factor: float) -> None:
        super().__init__()
        self.heads = heads
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        """Attention of ``hidden_states`` ((N, C, H, W) or (N, L, C)) to itself."""
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("SelfAttention supports self-attention only (no encoder_hidden_states/attention_mask)")
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = self.to_q(hidden_states)
        key = self.to_k(hidden_states)
        value = self.to_v(hidden_states)
        head_dim = key.shape[-1] // self.heads
        query = query.view(batch_size, -1, self.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, self.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, self.heads, head_dim).transpose(1, 2)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                                       is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, self.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = self.to_out[0](hidden_states)
        hidden_states = self.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if self.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / self.rescale_output_factor


class SinusoidalTimesteps(nn.Module):
    """The DDPM sinusoidal timestep features (diffusers' ``Timesteps``).

    Args:
        num_channels: Embedding size.
        flip_sin_to_cos: Order ``cos, sin`` instead of ``sin, cos``.
        downscale_freq_shift: Shift of the frequency denominator.
        scale: Factor applied to the angles.
        max_period: Lowest frequency's period.
    """

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float,
                 scale: float = 1, max_period: int = 10000) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale
        self.max_period = max_period

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(N,) timesteps -> (N, num_channels) features."""
        if timesteps.ndim != 1:
            raise ValueError(f"timesteps must be 1-d, got shape {tuple(timesteps.shape)}")
        half_dim = self.num_channels // 2
        exponent = -math.log(self.max_period) * torch.arange(start=0, end=half_dim, dtype=torch.float32,
                                                             device=timesteps.device)
        exponent = exponent / (half_dim - self.downscale_freq_shift)
        emb = torch.exp(exponent)
        emb = timesteps[:, None].float() * emb[None, :]
        emb = self.scale * emb
        emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
        if self.flip_sin_to_cos:
            emb = torch.cat([emb[:, half_dim:], emb[:, :half_dim]], dim=-1)
        if self.num_channels % 2 == 1:
            emb = F.pad(emb, (0, 1, 0, 0))
        return emb


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's ``DropPath``): the identity in eval mode.

    Args:
        drop_prob: Probability of dropping a sample's residual branch while training.
        scale_by_keep: Divide the kept samples by ``1 - drop_prob``.
    """

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with whole samples zeroed at random while training."""
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
        if keep_prob > 0.0 and self.scale_by_keep:
            random_tensor.div_(keep_prob)
        return x * random_tensor


def stochastic_depth(input: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:
    """torchvision's ``stochastic_depth``: drop whole samples ("row") or the batch with probability ``p``."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
    if mode not in ("batch", "row"):
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
    if not training or p == 0.0:
        return input
    survival_rate = 1.0 - p
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device).bernoulli_(survival_rate)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    return input * noise


@dataclass
class UNetOutput:
    """A UNet's output where diffusers is not installed: ``.sample``, ``out[0]``, ``out["sample"]``."""

    sample: torch.Tensor

    def __getitem__(self, key: int | str) -> torch.Tensor:
        if key in (0, "sample"):
            return self.sample
        raise KeyError(key)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.sample,))

    def to_tuple(self) -> tuple[torch.Tensor]:
        """``(sample,)``, like diffusers' outputs."""
        return (self.sample,)
