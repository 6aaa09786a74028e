"""The allow-lists of the saved-network format: everything a file may name, written in this package.

A saved graph names functions (``call_function``), tensor methods (``call_method``), attributes
read with ``getattr`` and module classes only by keys of these tables, which are looked up here,
never imported; so a file can make torch's own code compute, but adds no code.
:mod:`~lightning_layermerge.surgery.graphdata` writes and reads the format.
"""

from __future__ import annotations

import builtins
import operator
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import modules as portable_modules
from .adapters import diffusers as _diffusers_adapter

__all__ = ["ATTRIBUTES", "CLASS_NAMES", "FUNCTIONS", "FUNCTION_NAMES", "METHODS", "MODULE_CLASSES", "MODULE_INTERNALS",
           "NAME_PATTERN", "PATH_PART_PATTERN", "NotPortableError"]

_OPERATORS = (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "matmul", "getitem",
    "eq", "ne", "lt", "le", "gt", "ge", "iadd", "isub", "imul", "itruediv", "and_", "or_",
)
_TORCH = (
    "abs", "add", "addmm", "amax", "amin", "arange", "argmax", "baddbmm", "bmm", "cat", "chunk", "clamp",
    "clip", "concat", "conv2d", "cos", "div", "einsum", "exp", "flatten", "flip", "full", "gelu", "log",
    "matmul", "max", "maximum", "mean", "min", "minimum", "mul", "narrow", "neg", "ones", "ones_like",
    "permute", "pow", "relu", "relu_", "reshape", "roll", "rsqrt", "sigmoid", "sin", "softmax", "split",
    "sqrt", "squeeze", "stack", "sub", "sum", "tanh", "tensor", "transpose", "unsqueeze", "where", "zeros",
    "zeros_like",
)
_FUNCTIONAL = (
    "adaptive_avg_pool2d", "adaptive_max_pool2d", "avg_pool2d", "batch_norm", "celu", "conv2d", "dropout",
    "dropout2d", "elu", "gelu", "glu", "group_norm", "hardsigmoid", "hardswish", "hardtanh", "interpolate",
    "layer_norm", "leaky_relu", "linear", "log_softmax", "logsigmoid", "max_pool2d", "mish", "normalize", "pad",
    "pixel_shuffle", "pixel_unshuffle", "relu", "relu6", "relu_", "scaled_dot_product_attention", "selu",
    "sigmoid", "silu", "softmax", "softplus", "tanh",
)


def _function_table() -> dict[str, Callable]:
    table: dict[str, Callable] = {f"operator.{n}": getattr(operator, n) for n in _OPERATORS}
    table["builtins.getattr"] = builtins.getattr
    table.update({f"torch.{n}": getattr(torch, n) for n in _TORCH if hasattr(torch, n)})
    table.update({f"torch.nn.functional.{n}": getattr(F, n) for n in _FUNCTIONAL if hasattr(F, n)})
    table.update(_PACKAGE_FUNCTIONS)
    return table


# Functions of this package a graph may call, by the name written into saved files. The names
# are the modules' paths when the format was introduced; they are spelled out (not derived from
# ``fn.__module__``) so that moving a module does not change the format or orphan saved files.
_PACKAGE_FUNCTIONS: dict[str, Callable] = {
    "lightning_layermerge.adapters.diffusers._broadcast_timesteps": _diffusers_adapter._broadcast_timesteps,
    "lightning_layermerge.adapters.diffusers._unet_output": _diffusers_adapter._unet_output,
    "lightning_layermerge.modules.stochastic_depth": portable_modules.stochastic_depth,
}


#: Functions a ``call_function`` node may call, by the name stored in the file.
FUNCTIONS: dict[str, Callable] = _function_table()
FUNCTION_NAMES: dict[int, str] = {id(fn): name for name, fn in reversed(list(FUNCTIONS.items()))}

#: Tensor methods a ``call_method`` node may call.
METHODS = frozenset({
    "abs", "add", "add_", "amax", "bernoulli_", "bmm", "chunk", "clamp", "clamp_", "clamp_max", "clamp_min",
    "contiguous", "detach", "dim", "div", "div_", "double", "exp", "expand", "expand_as", "flatten", "flip",
    "float", "half", "bfloat16", "hardtanh_", "matmul", "max", "mean", "min", "mul", "mul_", "narrow", "neg",
    "new_empty", "new_ones", "new_zeros", "numel", "permute", "pow", "relu", "relu_", "repeat",
    "repeat_interleave", "reshape", "reshape_as", "roll", "rsqrt", "sigmoid", "sigmoid_", "size", "softmax",
    "split", "sqrt", "squeeze", "std", "sub", "sub_", "sum", "t", "tanh", "tanh_", "to", "transpose",
    "type_as", "unbind", "unsqueeze", "var", "view", "view_as",
})

#: Attribute names a ``getattr`` node may read (tensor properties and a UNet output's field).
ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim", "T", "mT", "is_cuda", "layout", "requires_grad",
                        "sample"})


def _module_classes() -> dict[str, type[nn.Module]]:
    table: dict[str, type[nn.Module]] = {}
    for name in torch.nn.modules.__all__:
        cls = getattr(nn, name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            table[f"torch.nn.{name}"] = cls
    for name in portable_modules.__all__:
        cls = getattr(portable_modules, name)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            table[f"lightning_layermerge.modules.{name}"] = cls
    return table


#: Module classes a file may name.
MODULE_CLASSES: dict[str, type[nn.Module]] = _module_classes()
CLASS_NAMES: dict[type, str] = {cls: name for name, cls in MODULE_CLASSES.items()}
#: What ``nn.Module.__init__`` sets up itself; not stored, never overwritten.
MODULE_INTERNALS = frozenset(vars(nn.Module())) - {"training"}
#: A node name: an identifier (fx writes it into the code it generates).
NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A module or parameter name (torchvision's RegNet has "block1-0"): fx writes it into its code
# as `getattr(self, "name")` when it is no identifier, so no quotes or backslashes; no dunders.
PATH_PART_PATTERN = re.compile(r"(?!__)[A-Za-z0-9_-]+")


class NotPortableError(ValueError):
    """The network holds something the data format cannot name (see :func:`to_data`)."""
