"""timm: norm+activation modules, stochastic depth and activation classes.

Matched by class location and structure, so importing this file does not import timm.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..modules import DropPath
from . import register_activation, register_decomposition, register_identity, register_portable


def _from_timm(m: nn.Module, package: str) -> bool:
    return type(m).__module__.startswith(package)


def _is_norm_act(m: nn.Module) -> bool:
    """timm's BatchNormAct2d family: BatchNorm2d whose forward also applies .drop and .act."""
    return (
        isinstance(m, nn.BatchNorm2d)
        and type(m).forward is not _BatchNorm.forward
        and isinstance(getattr(m, "act", None), nn.Module)
        and isinstance(getattr(m, "drop", None), nn.Module)
    )


def _split_norm_act(m: nn.Module) -> list[tuple[str, nn.Module]]:
    bn = nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    # Share the parameters and buffers so state-dict keys and values stay the same.
    for name in ("weight", "bias"):
        setattr(bn, name, getattr(m, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(bn, name, getattr(m, name))
    bn
    parts: list[tuple[str, nn.Module]] = [("", bn)]
    if not isinstance(m.drop, nn.Identity):
        parts.append(("_drop", m.drop))
    if not isinstance(m.act, nn.Identity):
        parts.append(("_act", m.act))
    return parts


register_decomposition(_is_norm_act, _split_norm_act)


def _is_drop_path(m: nn.Module) -> bool:
    return _from_timm(m, "timm.layers") and type(m).__name__ in {"DropPath", "DropBlock2d"}


def _is_timm_activation(m: nn.Module) -> bool:
    return _from_timm(m, "timm.layers.activations")


register_identity(_is_drop_path)
register_activation(_is_timm_activation)


def _portable_drop_path(m: nn.Module) -> nn.Module:
    return DropPath(float(m.drop_prob), bool(getattr(m, "scale_by_keep", True)))


register_portable(lambda m: _from_timm(m, "timm.layers") and type(m).__name__ == "DropPath", _portable_drop_path)


#: timm activations whose forward is exactly a torch.nn module's (saved as that module).
_TIMM_ACTIVATIONS = {"GELU": lambda m: nn.GELU(), "GELUTanh": lambda m: nn.GELU(approximate="tanh"),
                     "Sigmoid": lambda m: nn.Sigmoid(), "Tanh": lambda m: nn.Tanh()}


def _portable_activation(m: nn.Module) -> nn.Module:
    if getattr(m, "inplace", False):
        raise ValueError("an in-place timm activation has no out-of-place torch.nn equivalent")
    return _TIMM_ACTIVATIONS[type(m).__name__](m)


register_portable(lambda m: _is_timm_activation(m) and type(m).__name__ in _TIMM_ACTIVATIONS, _portable_activation)
