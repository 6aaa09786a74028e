"""What each node of a captured graph is, as far as merging is concerned.

Every fx node is sorted into one of a few kinds. Only the first five can take part in a
merge; everything else is a *barrier* with a human-readable reason, so an operation the
tracer does not understand can cost speed-up but never correctness.
"""

from __future__ import annotations

import enum
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm


class Kind(enum.Enum):
    """Role of a graph node in the chain model."""

    CONV = "conv"  # a supported nn.Conv2d
    NORM = "norm"  # BatchNorm2d with running statistics: an affine map in eval mode
    IDENTITY = "identity"  # identity in eval mode (Identity, Dropout, DropPath, ...)
    ACT = "act"  # element-wise non-linearity with one tensor input
    ADD = "add"  # sum of two tensors of the same shape
    # x + b with b of shape (N or 1, C, 1, 1) computed independently of the data input
    # (a diffusion UNet's time embedding): linear in x, and carried exactly through a merge.
    # Assigned by the graph analysis, which knows shapes and dependencies.
    BIAS = "bias"
    # A normalisation with test-time statistics (GroupNorm): cannot be folded into a conv.
    # Between convs that are merged it is moved after them (the paper's DDPM rule, App. A).
    MOVABLE_NORM = "movable_norm"
    PAD = "pad"  # constant zero F.pad (inserted by `prune` to move padding)
    BARRIER = "barrier"  # anything else
    INPUT = "input"
    OUTPUT = "output"


LINEAR_KINDS = frozenset({Kind.CONV, Kind.NORM, Kind.IDENTITY, Kind.ADD, Kind.PAD, Kind.BIAS})


@dataclass(frozen=True)
class Op:
    """Classification of one node: its kind and, for barriers, why."""

    kind: Kind
    reason: str = ""


ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.ELU,
    nn.SELU, nn.CELU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.PReLU, nn.Softplus,
)
ACTIVATION_FUNCTIONS = frozenset({
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid,
    F.leaky_relu, F.elu, F.selu, F.celu, F.mish, F.softplus, F.hardtanh, torch.sigmoid,
    torch.tanh, F.sigmoid, F.tanh,
})
ACTIVATION_METHODS = frozenset({"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"})
IDENTITY_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
MOVABLE_NORM_MODULES: tuple[type[nn.Module], ...] = (nn.GroupNorm,)
ADD_FUNCTIONS = frozenset({operator.add, operator.iadd, torch.add})
ADD_METHODS = frozenset({"add", "add_", "__add__", "__iadd__"})

# Extra tests for modules that are identity in eval mode or element-wise activations;
# adapters (e.g. timm's DropPath) register into these.
IDENTITY_PREDICATES: list = []
ACTIVATION_PREDICATES: list = []


def conv_unsupported_reason(conv: nn.Module) -> str:
    """Return why a Conv2d cannot be merged, or "" if it can."""
    if type(conv).forward is not nn.Conv2d.forward:
        return f"{type(conv).__name__} overrides Conv2d.forward"
    if conv.kernel_size[0] != conv.kernel_size[1]:
        return f"non-square kernel {tuple(conv.kernel_size)}"
    if conv.stride[0] != conv.stride[1]:
        return f"non-square stride {tuple(conv.stride)}"
    if tuple(conv.dilation) != (1, 1):
        return f"dilation {tuple(conv.dilation)}"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r}"
    if conv.padding[0] != conv.padding[1]:
        return f"asymmetric padding {tuple(conv.padding)}"
    return ""


def norm_unsupported_reason(norm: nn.Module) -> str:
    """Return why a BatchNorm cannot be folded, or "" if it can."""
    if type(norm).forward is not _BatchNorm.forward:
        return f"{type(norm).__name__} overrides BatchNorm.forward"
    if not isinstance(norm, nn.BatchNorm2d):
        return f"{type(norm).__name__} is not BatchNorm2d"
    if norm.running_mean is None or norm.running_var is None:
        return "BatchNorm without running statistics cannot be folded"
    return ""


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.args if isinstance(a, fx.Node)]


def _is_zero_pad(node: fx.Node) -> bool:
    if node.target is not F.pad:
        return False
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    # Symmetric only: merging reads one amount for all four sides (an asymmetric pad, such
    # as diffusers' Downsample2D (0, 1, 0, 1), is a barrier).
    return (mode == "constant" and not value and isinstance(pad, (tuple, list)) and len(pad) == 4
            and len(set(pad)) == 1)


def classify(node: fx.Node, modules: dict[str, nn.Module]) -> Op:
    """Sort one fx node into a `Kind` (module lookups use `modules`)."""
    if node.op == "placeholder":
        return Op(Kind.INPUT)
    if node.op == "output":
        return Op(Kind.OUTPUT)
    if node.op == "call_module":
        return _classify_module(modules[str(node.target)], str(node.target))
    if node.op == "call_function":
        return _classify_function(node)
    if node.op == "call_method":
        return _classify_method(node)
    return Op(Kind.BARRIER, f"{node.op} {node.target}")


def _classify_module(mod: nn.Module, name: str) -> Op:
    label = f"{name} ({type(mod).__name__})"
    if isinstance(mod, nn.Conv2d):
        why = conv_unsupported_reason(mod)
        return Op(Kind.BARRIER, f"conv {label}: {why}") if why else Op(Kind.CONV)
    if isinstance(mod, _BatchNorm):
        why = norm_unsupported_reason(mod)
        return Op(Kind.BARRIER, f"norm {label}: {why}") if why else Op(Kind.NORM)
    if type(mod) in MOVABLE_NORM_MODULES:  # exact type: a subclass may compute something else
        return Op(Kind.MOVABLE_NORM)
    if isinstance(mod, IDENTITY_MODULES) or any(p(mod) for p in IDENTITY_PREDICATES):
        return Op(Kind.IDENTITY)
    if isinstance(mod, ACTIVATION_MODULES) or any(p(mod) for p in ACTIVATION_PREDICATES):
        return Op(Kind.ACT)
    return Op(Kind.BARRIER, f"module {label}")


def _classify_function(node: fx.Node) -> Op:
    name = getattr(node.target, "__name__", str(node.target))
    if node.target in ACTIVATION_FUNCTIONS and len(_tensor_args(node)) == 1:
        return Op(Kind.ACT)
    if node.target in ADD_FUNCTIONS and _is_plain_binary(node):
        return Op(Kind.ADD)
    if _is_zero_pad(node):
        return Op(Kind.PAD)
    return Op(Kind.BARRIER, f"function {name}")


def _classify_method(node: fx.Node) -> Op:
    if node.target in ACTIVATION_METHODS and len(node.args) == 1:
        return Op(Kind.ACT)
    if node.target in ADD_METHODS and _is_plain_binary(node):
        return Op(Kind.ADD)
    return Op(Kind.BARRIER, f"method .{node.target}()")


def _is_plain_binary(node: fx.Node) -> bool:
    """An add of exactly two graph tensors, without `alpha=`."""
    return len(node.args) == 2 and len(_tensor_args(node)) == 2 and not node.kwargs
