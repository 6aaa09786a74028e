"""diffusers: ``UNet2DModel`` (DDPM) and its blocks.

torch.fx cannot trace diffusers' own forwards: the timestep handling calls ``len`` and
``torch.is_tensor`` on its input, and the resampling blocks assert on shapes. This adapter
gives the capture

* *leaves* for the pieces that stay opaque: ``Attention`` (self-attention, so a barrier:
  no segment crosses it), ``Timesteps`` / ``GaussianFourierProjection`` (the sinusoidal
  time features, off the main path);
* fx-traceable *forwards* for ``UNet2DModel``, ``Upsample2D`` and ``Downsample2D`` that
  compute the same function with the shape assertions and ``.contiguous()`` calls left out.
  The upsampling conv is then an ordinary chain conv between the interpolation and the
  skip concatenation (both barriers), so it is a pruning candidate, as in the paper.
  ``capture`` checks the traced graph against the model's own forward on the example input,
  so a diffusers version whose forward differs is refused rather than mis-captured.

``ResnetBlock2D`` is traced as it is: GroupNorm is a movable norm and the time-embedding
add a per-channel bias in the core (``ops.Kind``), which is all the paper's DDPM rules need.

The compressed UNet is handed back as a diffusers model by ``wrap_compressed``
(:class:`~lightning_layermerge.adapters.diffusers_model.LayerMergeUNet2DModel`: pipelines,
``save_pretrained`` / ``from_pretrained``).

Matched by class name and module, so importing this file does not import diffusers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..modules import SelfAttention, SinusoidalTimesteps
from . import register_forward, register_leaf, register_portable, register_wrapper


def _diffusers_class(m: nn.Module, *names: str) -> bool:
    return type(m).__module__.startswith("diffusers.") and type(m).__name__ in names


register_leaf(lambda m: _diffusers_class(m, "Attention", "Timesteps", "GaussianFourierProjection"))


@fx.wrap
def _broadcast_timesteps(timestep: Any, batch: int, device: torch.device, class_labels: Any = None) -> torch.Tensor:
    """UNet2DModel's timestep handling (int, 0-d or 1-d tensor), run eagerly at call time.

    Also raises diffusers' error for class labels given to an unconditional UNet (checked
    here rather than in a node of its own, which dead-code elimination would drop).
    """
    if class_labels is not None:
        raise ValueError("class_embedding needs to be initialized in order to use class conditioning")
    timesteps = timestep
    if not torch.is_tensor(timesteps):
        timesteps = torch.tensor([timesteps], dtype=torch.long, device=device)
    elif len(timesteps.shape) == 0:
        timesteps = timesteps[None].to(device)
    return timesteps * torch.ones(batch, dtype=timesteps.dtype, device=timesteps.device)


@fx.wrap
def _unet_output(sample: torch.Tensor, return_dict: bool) -> Any:
    """``UNet2DOutput(sample=...)`` or ``(sample,)``, decided at call time like diffusers does."""
    if not return_dict:
        return (sample,)
    try:
        from diffusers.models.unets.unet_2d import UNet2DOutput
    except ImportError:  # a network loaded with load_compressed runs without diffusers
        from ..modules import UNetOutput as UNet2DOutput
    return UNet2DOutput(sample=sample)


def _unet2d_forward(self: nn.Module, sample: torch.Tensor, timestep: Any, class_labels: Any = None,
                    return_dict: bool = True) -> Any:
    """``UNet2DModel.forward`` (diffusers 0.30-0.42), traceable; same signature and outputs."""
    config = self.config
    if self.class_embedding is not None:
        raise ValueError("class-conditional UNet2DModel (class_embed_type set) is not supported yet")
    if any(hasattr(block, "skip_conv") for block in (*self.down_blocks, *self.up_blocks)):
        raise ValueError("UNet2DModel with Skip*Block2D blocks is not supported yet")
    if config.center_input_sample:
        sample = 2 * sample - 1.0
    timesteps = _broadcast_timesteps(timestep, sample.shape[0], sample.device, class_labels)
    t_emb = self.time_proj(timesteps)
    # diffusers casts to self.dtype; read it from a weight at call time so that a later
    # .half()/.double() of the pruned network is followed.
    t_emb = t_emb.to(dtype=self.time_embedding.linear_1.weight.dtype)
    emb = self.time_embedding(t_emb)

    sample = self.conv_in(sample)
    down_block_res_samples = (sample,)
    for downsample_block in self.down_blocks:
        sample, res_samples = downsample_block(hidden_states=sample, temb=emb)
        down_block_res_samples += res_samples
    if self.mid_block is not None:
        sample = self.mid_block(sample, emb)
    for upsample_block in self.up_blocks:
        res_samples = down_block_res_samples[-len(upsample_block.resnets):]
        down_block_res_samples = down_block_res_samples[: -len(upsample_block.resnets)]
        sample = upsample_block(sample, res_samples, emb)

    sample = self.conv_norm_out(sample)
    sample = self.conv_act(sample)
    sample = self.conv_out(sample)
    if config.time_embedding_type == "fourier":
        sample = sample / timesteps.reshape((sample.shape[0], 1, 1, 1))
    return _unet_output(sample, return_dict)


def _upsample2d_forward(self: nn.Module, hidden_states: torch.Tensor, output_size: Any = None,
                        *args: Any, **kwargs: Any) -> torch.Tensor:
    """``Upsample2D.forward`` without its shape assertion and memory-layout branches."""
    if self.norm is not None:
        hidden_states = self.norm(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    if self.use_conv_transpose:
        return self.conv(hidden_states)
    if self.interpolate:
        if output_size is None:
            hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
        else:
            hidden_states = F.interpolate(hidden_states, size=output_size, mode="nearest")
    if self.use_conv:
        hidden_states = self.conv(hidden_states) if self.name == "conv" else self.Conv2d_0(hidden_states)
    return hidden_states


def _downsample2d_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``Downsample2D.forward`` without its shape assertions."""
    if self.norm is not None:
        hidden_states = self.norm(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    if self.use_conv and self.padding == 0:
        hidden_states = F.pad(hidden_states, (0, 1, 0, 1), mode="constant", value=0)
    return self.conv(hidden_states)


register_forward(lambda m: _diffusers_class(m, "UNet2DModel"), _unet2d_forward)
register_forward(lambda m: _diffusers_class(m, "Upsample2D"), _upsample2d_forward)
register_forward(lambda m: _diffusers_class(m, "Downsample2D"), _downsample2d_forward)


#: Attention features the portable ``SelfAttention`` does not have; each must be None/False.
_ATTENTION_UNSUPPORTED = ("spatial_norm", "norm_cross", "norm_q", "norm_k", "added_kv_proj_dim", "add_q_proj",
                          "is_cross_attention", "only_cross_attention", "is_causal")


def _portable_attention(m: nn.Module) -> nn.Module:
    """``Attention`` as ``SelfAttention`` (same submodules), for the default processor only."""
    used = [name for name in _ATTENTION_UNSUPPORTED if getattr(m, name, None)]
    processor = type(getattr(m, "processor", None)).__name__
    if used or processor != "AttnProcessor2_0" or len(m.to_out) != 2:
        why = f"uses {', '.join(used)}" if used else f"has processor {processor}"
        raise ValueError(f"diffusers Attention {why}; only plain self-attention with AttnProcessor2_0 is portable")
    out = SelfAttention(m.heads, bool(m.residual_connection), float(m.rescale_output_factor))
    out.group_norm = m.group_norm
    out.to_q, out.to_k, out.to_v, out.to_out = m.to_q, m.to_k, m.to_v, m.to_out
    return out


def _portable_timesteps(m: nn.Module) -> nn.Module:
    return SinusoidalTimesteps(m.num_channels, m.flip_sin_to_cos, m.downscale_freq_shift, m.scale)


register_portable(lambda m: _diffusers_class(m, "Attention"), _portable_attention)
register_portable(lambda m: _diffusers_class(m, "Timesteps"), _portable_timesteps)


def _wrap_unet(original: nn.Module, network: fx.GraphModule) -> nn.Module:
    # Imports diffusers, so only reached with a diffusers model; the class lives outside surgery/
    # because diffusers writes its module path into saved pipelines (see lightning_layermerge.adapters).
    from ...adapters.diffusers_model import wrap_unet

    return wrap_unet(original, network)


register_wrapper(lambda m: _diffusers_class(m, "UNet2DModel"), _wrap_unet)
