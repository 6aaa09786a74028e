"""Save, load and export compressed networks (torch only).

A compressed network is a ``torch.fx.GraphModule`` made by ``prune`` (and ``merge``). Its
class is generated code, so it cannot be rebuilt from a constructor the way a user's model
can. :func:`save_compressed` therefore writes one file that supports two ways back:

1. **Self-contained** (``load_compressed(path)``): the GraphModule itself, pickled. Needs no
   original model, but unpickling runs code, so only load files you trust (like any
   ``torch.load(weights_only=False)``); the classes of leaf modules (e.g. a custom
   activation) must be importable.
2. **Rebuild** (``load_compressed(path, original=model)``): from the original, uncompressed
   model (any weights), the stored plan and the stored state dict: ``trace`` -> ``prune`` ->
   ``merge`` -> ``load_state_dict(strict=True)``. This path reads the file with
   ``torch.load(weights_only=True)`` (no code runs) and is the one to use across package
   versions.

The file is a dict: ``{"format", "kind" ("pruned"|"merged"), "plan", "inputs",
"state_dict", "module" (the pickled GraphModule as bytes)}``. ``inputs`` holds the shapes and
dtypes of the example input the plan was traced with (the chain fingerprint depends on
them); ``LayerMergeCallback`` records them in ``model.meta["layermerge"]["inputs"]``, and
for networks from the functional API pass ``example_input=`` to :func:`save_compressed`.

:func:`export_torchscript` and :func:`export_onnx` write the usual deployment formats; both
work on merged networks (plain ``nn.Conv2d`` / activation / add graphs).
"""

from __future__ import annotations

import copy
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from .capture import ExampleInput, as_args
from .graph import trace
from .merge import merge
from .plan import Plan
from .prune import META_KEY, prune

__all__ = [
    "FORMAT",
    "attach_input_spec",
    "export_onnx",
    "export_torchscript",
    "load_compressed",
    "save_compressed",
]

#: Version of the file layout written by :func:`save_compressed`.
FORMAT = 1

InputSpec = list[tuple[list[int], str]]


def input_spec(example: ExampleInput) -> InputSpec:
    """Shapes and dtypes of the tensor arguments of ``example`` (what a trace depends on).

    Raises:
        TypeError: an argument is not a tensor (it cannot be recreated from a spec).
    """
    spec = []
    for arg in as_args(example):
        if not isinstance(arg, torch.Tensor):
            raise TypeError(f"cannot record a non-tensor example argument ({type(arg).__name__}); pass tensors only")
        spec.append((list(arg.shape), str(arg.dtype).removeprefix("torch.")))
    return spec


def example_from_spec(spec: Sequence[Sequence[Any]]) -> tuple[torch.Tensor, ...]:
    """Zero tensors with the recorded shapes and dtypes (enough to trace; values do not matter)."""
    return tuple(torch.zeros(tuple(shape), dtype=getattr(torch, dtype)) for shape, dtype in spec)


def attach_input_spec(model: fx.GraphModule, example: ExampleInput) -> None:
    """Record ``example``'s shapes in ``model.meta`` so :func:`save_compressed` can store them."""
    _meta(model)["inputs"] = input_spec(example)


def _meta(model: nn.Module) -> dict:
    meta = getattr(model, "meta", None)
    if not isinstance(model, fx.GraphModule) or not isinstance(meta, dict) or META_KEY not in meta:
        raise TypeError(
            f"expected a network returned by lightning_layermerge.prune(...) or merge(...), got "
            f"{type(model).__name__}; after LayerMergeCallback, pass the compressed submodule (e.g. module.model)"
        )
    return meta[META_KEY]


def save_compressed(model: fx.GraphModule, path: str | os.PathLike, *,
                    example_input: ExampleInput | None = None) -> Path:
    """Write a pruned or merged network to ``path`` (see the module docstring for the format).

    Args:
        model: The output of ``prune`` or ``merge`` (e.g. ``module.model`` after
            ``LayerMergeCallback``).
        path: File to write (parent directories are created).
        example_input: The example input the plan was traced with. Needed for the rebuild
            path unless ``model`` carries it already (networks from ``LayerMergeCallback`` do).

    Returns:
        The written path.

    Raises:
        TypeError: ``model`` is not a network from ``prune``/``merge``.
    """
    meta = _meta(model)
    inputs = input_spec(example_input) if example_input is not None else meta.get("inputs")
    blob = io.BytesIO()
    torch.save(model, blob)
    data = {
        "format": FORMAT,
        "kind": "merged" if meta.get("merged") else "pruned",
        "plan": meta["plan"],
        "inputs": inputs,
        # Plain data: pickling a GraphModule drops .meta and re-traces its code, which can rename
        # nodes; the node order is kept, so the names in graph order let _restore_meta map them.
        "meta": {**meta, "inputs": inputs},
        "nodes": [n.name for n in model.graph.nodes],
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "module": blob.getvalue(),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return path


def load_compressed(path: str | os.PathLike, original: nn.Module | None = None, *,
                    example_input: ExampleInput | None = None) -> fx.GraphModule:
    """Load a network written by :func:`save_compressed`.

    Args:
        path: The file.
        original: The original, uncompressed model (same architecture; its weights do not
            matter). Given: the network is rebuilt from the plan and the stored weights, and
            the file is read with ``weights_only=True``. ``None``: the pickled GraphModule is
            returned (``weights_only=False``: load trusted files only).
        example_input: Overrides the recorded example input shapes (rebuild path only).

    Returns:
        The network, on CPU, in eval mode if it is merged.

    Raises:
        ValueError: the file is not a compressed-network file, is of another format version,
            or the rebuild has no example input shapes or does not match ``original``.
    """
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") is None or "plan" not in data:
        raise ValueError(f"{path} was not written by lightning_layermerge.save_compressed")
    if data["format"] != FORMAT:
        raise ValueError(f"{path} has format version {data['format']}; this version reads {FORMAT}")
    if original is None:
        model = torch.load(io.BytesIO(data["module"]), map_location="cpu", weights_only=False)
        model.meta[META_KEY] = _restore_meta(data["meta"], data["nodes"], model)
        return model
    return _rebuild(data, original, example_input, path)


def _restore_meta(meta: dict, saved_nodes: list[str], model: fx.GraphModule) -> dict:
    """The saved meta with region node names mapped onto the unpickled graph (same node order)."""
    names = [n.name for n in model.graph.nodes]
    if len(names) != len(saved_nodes):
        raise ValueError("the unpickled graph does not match the saved one; load with original= to rebuild instead")
    if meta.get("merged"):
        return meta  # regions only matter for merging, which is done
    rename = dict(zip(saved_nodes, names))
    regions = [{**r, "entry": rename[r["entry"]], "output": rename[r["output"]]} for r in meta.get("regions", [])]
    return {**meta, "regions": regions}


def _rebuild(data: dict, original: nn.Module, example_input: ExampleInput | None, path: Any) -> fx.GraphModule:
    if example_input is None:
        if not data.get("inputs"):
            raise ValueError(
                f"{path} records no example input shapes; pass example_input= (the input the plan was traced with)"
            )
        example_input = example_from_spec(data["inputs"])
    chain = trace(original, example_input)
    plan = Plan.from_dict(chain, data["plan"])
    model = prune(original, chain, plan)
    if data["kind"] == "merged":
        model = merge(model)
    model.load_state_dict(data["state_dict"], strict=True)
    attach_input_spec(model, example_input)
    return model


def export_torchscript(model: nn.Module, path: str | os.PathLike,
                       example_input: ExampleInput | None = None) -> Path:
    """Save ``model`` as TorchScript (``torch.jit.script``; ``torch.jit.trace`` as fallback).

    Args:
        model: Usually the merged network.
        path: Output file (load with ``torch.jit.load``).
        example_input: Needed only if scripting fails and tracing is used.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        scripted = torch.jit.script(_without_annotations(model))
    except Exception as err:  # scripting fails on many Python constructs; tracing is the fallback
        if example_input is None and isinstance(model, fx.GraphModule):
            example_input = example_from_spec(model.meta.get(META_KEY, {}).get("inputs") or [])
        if not example_input:
            raise ValueError(
                f"torch.jit.script failed ({type(err).__name__}: {err}); pass example_input= to trace instead"
            ) from err
        with torch.no_grad():
            scripted = torch.jit.trace(model, as_args(example_input))
    scripted.save(str(path))
    return path


def _without_annotations(model: nn.Module) -> nn.Module:
    """A GraphModule copy without type annotations (fx writes names such as ``_torch_Tensor_``
    for them, which TorchScript cannot resolve); other modules are returned as they are."""
    if not isinstance(model, fx.GraphModule):
        return model
    gm = copy.deepcopy(model)
    for node in gm.graph.nodes:
        node.type = None
    gm.recompile()
    return gm


def export_onnx(model: nn.Module, path: str | os.PathLike, example_input: ExampleInput, *,
                opset: int = 17, dynamic_batch: bool = True) -> Path:
    """Export ``model`` to ONNX with the TorchScript-based exporter (``dynamo=False``).

    The dynamo exporter needs ``onnxscript``; the classic one needs only ``onnx``.

    Args:
        model: Usually the merged network (put in eval mode for the export).
        path: Output ``.onnx`` file.
        example_input: A tensor or tuple of positional arguments.
        opset: ONNX opset version.
        dynamic_batch: Make dimension 0 of every input and output dynamic.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = as_args(example_input)
    names = [f"input{i}" for i in range(len(args))]
    axes = {n: {0: "batch"} for n in [*names, "output"]} if dynamic_batch else None
    was_training = model.training
    model.eval()
    try:
        torch.onnx.export(model, args, str(path), input_names=names, output_names=["output"],
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
    finally:
        model.train(was_training)
    return path
