"""The target submodule inside a LightningModule: find it, capture its input, trace it, and
merge it with a numerical check (Lightning glue used by ``LayerMergeCallback``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..surgery.graph import Chain, trace
from ..surgery.merge import merge
from ..surgery.meta import attach_input_spec
from .paths import get_path

__all__ = ["MERGE_TOLERANCE", "capture_input", "default_target", "example_input", "like_memory_format", "merge_checked",
           "relative_error", "resolve_target", "trace_target"]

#: Relative tolerance for "merged equals pruned" on the example input (float32 rounding).
MERGE_TOLERANCE = 1e-3


class _Captured(Exception):
    """Raised by a pre-hook to stop a forward once the target's input is known."""


def resolve_target(pl_module: pl.LightningModule, target: str | None) -> str:
    """The attribute path of the submodule to compress (``target`` or :func:`default_target`).

    Raises:
        ValueError: The path does not exist, or the submodule holds no ``nn.Conv2d``.
    """
    path = target or default_target(pl_module)
    try:
        module = get_path(pl_module, path)
    except AttributeError:
        children = [n for n, _ in pl_module.named_children()]
        raise ValueError(
            f"LayerMergeCallback(target={path!r}): {type(pl_module).__name__} has no submodule '{path}'; "
            f"its children are {children}. Pass the attribute path of the network to compress"
        ) from None
    if not any(isinstance(m, nn.Conv2d) for m in module.modules()):
        raise ValueError(
            f"LayerMergeCallback(target={path!r}): '{path}' ({type(module).__name__}) holds no nn.Conv2d; "
            "LayerMerge compresses convolutional networks. Pass the submodule that holds the convolutions"
        )
    return path


def example_input(pl_module: pl.LightningModule, target: nn.Module, first_batch: Callable[[], Any]) -> tuple:
    """The target's positional input: from ``example_input_array``, else one training batch.

    Args:
        pl_module: The user's module.
        target: Its submodule to compress.
        first_batch: Returns a training batch (only called without ``example_input_array``).

    Raises:
        ValueError: The target is not reached by the module's forward / training step.
    """
    if pl_module.example_input_array is not None:
        example = move_data_to_device(pl_module.example_input_array, pl_module.device)
        args = capture_input(pl_module, target, lambda: _call_forward(pl_module, example))
        where = "example_input_array"
    else:
        batch = move_data_to_device(first_batch(), pl_module.device)
        args = capture_input(pl_module, target, lambda: pl_module.training_step(batch, 0))
        where = "the first training batch"
    if args is None:
        raise ValueError(
            f"LayerMergeCallback could not find the input of the target while running {where}: the target "
            "was not called. Set `example_input_array` on your LightningModule (an input of its forward)"
        )
    return args


def default_target(pl_module: pl.LightningModule) -> str:
    """``"model"`` if it holds a conv, else the one direct child holding every conv."""
    model = getattr(pl_module, "model", None)
    if isinstance(model, nn.Module) and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return "model"
    total = sum(isinstance(m, nn.Conv2d) for m in pl_module.modules())
    holders = [name for name, child in pl_module.named_children()
               if total and sum(isinstance(m, nn.Conv2d) for m in child.modules()) == total]
    if len(holders) == 1:
        return holders[0]
    with_convs = [name for name, child in pl_module.named_children()
                  if any(isinstance(m, nn.Conv2d) for m in child.modules())]
    if not total:
        raise ValueError(f"LayerMergeCallback: {type(pl_module).__name__} holds no nn.Conv2d; nothing to compress")
    raise ValueError(
        f"LayerMergeCallback: cannot choose the target automatically: the convolutions of "
        f"{type(pl_module).__name__} are spread over {with_convs}. Pass target= (e.g. target={with_convs[0]!r})"
    )


def _call_forward(pl_module: pl.LightningModule, example: Any) -> Any:
    if isinstance(example, Mapping):
        return pl_module(**example)
    if isinstance(example, (tuple, list)):
        return pl_module(*example)
    return pl_module(example)


def capture_input(pl_module: pl.LightningModule, target: nn.Module, run: Callable[[], Any]) -> tuple | None:
    """Positional args of the target's first call during ``run()``; the run is stopped right there."""
    captured: list[tuple] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs:
            raise ValueError(f"the target is called with keyword arguments {sorted(kwargs)}; LayerMerge traces "
                             "positional inputs only. Compress a submodule called positionally")
        captured.append(tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args))
        raise _Captured

    modes = {m: m.training for m in pl_module.modules()}
    handle = target.register_forward_pre_hook(hook, with_kwargs=True)
    pl_module.eval()
    try:
        with torch.no_grad():
            run()
    except _Captured:
        pass
    except ValueError:
        raise
    except Exception as err:  # the user's code failed before reaching the target
        if not captured:
            raise ValueError(
                f"LayerMergeCallback could not run the module to find the target's input ({type(err).__name__}: "
                f"{err}). Set `example_input_array` on your LightningModule"
            ) from err
    finally:
        handle.remove()
        for m, mode in modes.items():
            m.training = mode
    return captured[0] if captured else None


def trace_target(target: nn.Module, example: tuple, path: str) -> Chain:
    """``trace(target, example)`` with the callback's argument named in errors."""
    try:
        return trace(target, example)
    except ValueError as err:
        raise ValueError(f"LayerMergeCallback(target={path!r}): {err}") from err


def merge_checked(pruned: fx.GraphModule, example: tuple, *,
                  merge_fn: Callable[..., fx.GraphModule] = merge) -> tuple[nn.Module, bool, float]:
    """``merge(pruned)`` if it equals ``pruned`` on the example input, else ``pruned`` (with a warning).

    ``merge_fn`` is the merge to check (``merge``; a test passes a faulty one to see the fallback).
    """
    pruned.eval()
    example = _like_parameters(example, pruned)
    try:
        merged = merge_fn(pruned, share=True)  # the caller keeps one of the two
        with torch.no_grad():
            error = relative_error(pruned(*example), merged(*example))
    except Exception as err:  # a failed merge must not lose the fine-tuned network
        rank_zero_warn(f"LayerMergeCallback: merging failed ({type(err).__name__}: {err}); keeping the pruned network")
        return pruned, False, float("nan")
    if not error <= MERGE_TOLERANCE:
        rank_zero_warn(f"LayerMergeCallback: the merged network differs from the pruned one by {error:.2e} "
                       f"(relative, > {MERGE_TOLERANCE}); keeping the pruned network")
        return pruned, False, error
    attach_input_spec(merged, example)
    return merged, True, error


def _like_parameters(example: tuple, net: nn.Module) -> tuple:
    """``example`` with its floating tensors on the device and in the dtype of ``net``'s parameters
    (a network trained with ``precision="64-true"`` or ``"bf16-true"`` takes inputs of its dtype)."""
    param = next(net.parameters(), None)
    if param is None:
        return example
    return tuple(a.to(param.device, param.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in example)


def relative_error(want: Any, got: Any) -> float:
    """max |want - got| / max |want| over the floating tensors of two outputs of the same structure."""
    pairs = [(a, b) for a, b in zip(pytree.tree_leaves(want), pytree.tree_leaves(got))
             if isinstance(a, torch.Tensor) and a.is_floating_point()]
    if not pairs:
        return 0.0
    diff = max(float((a - b).abs().max()) for a, b in pairs)
    scale = max(float(a.abs().max()) for a, _ in pairs)
    return diff / max(scale, 1e-12)


def like_memory_format(net: nn.Module, reference: nn.Module) -> nn.Module:
    """``net`` in the memory format of ``reference``'s conv weights (``channels_last`` survives surgery)."""
    weights = [p for p in reference.parameters() if p.dim() == 4]
    if weights and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                       for p in weights):
        net = net.to(memory_format=torch.channels_last)
    return net
