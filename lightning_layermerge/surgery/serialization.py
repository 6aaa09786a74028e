"""Save, load and export compressed networks (torch only).

A compressed network is a ``torch.fx.GraphModule`` made by ``prune`` (and ``merge``). Its
class is generated code, so it cannot be rebuilt from a constructor the way a user's model
can. :func:`save_compressed` writes one safetensors file that supports two ways back:

1. **Self-contained** (``load_compressed(path)``): the graph is stored as data (see
   :mod:`lightning_layermerge.surgery.graphdata`) and rebuilt from it. Needs neither the original
   model nor its library (diffusers' attention and timestep modules, timm's DropPath are
   stored as equivalent modules of :mod:`lightning_layermerge.modules`).
2. **Rebuild** (``load_compressed(path, original=model)``): from the original, uncompressed
   model (any weights), the stored plan and the stored weights: ``trace`` -> ``prune`` ->
   ``merge`` -> ``load_state_dict(strict=True)``. Works for any network, also one whose
   graph uses something the data format cannot name (then only this way is stored).

**Loading runs no code from the file.** The file is a safetensors file: raw tensor bytes
plus a JSON header, read without pickle. The header's graph names functions, tensor
methods and module classes only through allow-lists written in this package, so a file
can only combine torch operations the package already trusts; nothing it names is
imported, and modules are created without running their constructors. Node names, which
``torch.fx`` writes into the code it generates, must be identifiers. Files of the previous
layout (format 1: a pickled GraphModule inside ``torch.save``) are refused unless
``trusted=True`` is passed; ``original=`` rebuilds them without unpickling code.

The header holds ``{"format", "kind" ("pruned"|"merged"), "plan", "inputs", "meta",
"graph" (or ``None`` and "unportable": why), "state_dict" (state-dict key -> tensor key)}``.
``inputs`` holds the shapes and dtypes of the example input the plan was traced with (the
chain fingerprint depends on them); ``LayerMergeCallback`` records them in
``model.meta["layermerge"]["inputs"]``, and for networks from the functional API pass
``example_input=`` to :func:`save_compressed`.

:func:`read_checkpoint` reads Lightning checkpoints with ``torch.load(weights_only=True)``.
:func:`export_torchscript` and :func:`export_onnx` write the usual deployment formats; both
work on merged networks (plain ``nn.Conv2d`` / activation / add graphs), loaded or not.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .adapters import unwrap_compressed
from .capture import ExampleInput, as_args
from .graphdata import NotPortableError, from_data, state_dict_data, to_data
# The example-input records live in .meta with the rest of the network's record; they are
# re-exported here, where callers have always found them.
from .meta import InputSpec, SurgeryMeta, attach_input_spec, example_from_spec, input_spec
from .rebuild import rebuild_compressed

__all__ = [
    "FORMAT",
    "InputSpec",
    "attach_input_spec",
    "example_from_spec",
    "export_onnx",
    "export_torchscript",
    "input_spec",
    "load_compressed",
    "read_checkpoint",
    "save_compressed",
]

#: Version of the file layout written by :func:`save_compressed` (1: pickled, no longer written).
FORMAT = 2
_LEGACY_FORMAT = 1
#: ``format`` entry of the safetensors metadata.
_MAGIC = "lightning_layermerge.compressed"

def save_compressed(model: fx.GraphModule, path: str | os.PathLike, *,
                    example_input: ExampleInput | None = None) -> Path:
    """Write a pruned or merged network to ``path`` (safetensors; see the module docstring).

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

    Warns:
        UserWarning: the graph uses a function, method or module class the data format
            cannot name; the file then holds plan and weights only (load it with
            ``original=``). The warning names what was not portable.
    """
    model = unwrap_compressed(model)  # e.g. a LayerMergeUNet2DModel holds the network as .network
    meta = SurgeryMeta.of(model)
    inputs = input_spec(example_input) if example_input is not None else meta.inputs
    try:
        graph, tensors = to_data(model)
        state, unportable = graph.pop("state_dict"), None
    except NotPortableError as err:
        graph, unportable = None, str(err)
        state, tensors = state_dict_data(model)
        warnings.warn(f"save_compressed: {err}. The file holds the plan and the weights only; load it with "
                      "load_compressed(path, original=<the uncompressed model>)", stacklevel=2)
    header = {
        "format": FORMAT,
        "kind": "merged" if meta.merged else "pruned",
        "plan": meta.plan,
        "inputs": inputs,
        "meta": {**meta.to_dict(), "inputs": inputs},
        "graph": graph,
        "unportable": unportable,
        "state_dict": state,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": _MAGIC, "header": json.dumps(header)})
    return path


def load_compressed(path: str | os.PathLike, original: nn.Module | None = None, *,
                    example_input: ExampleInput | None = None, trusted: bool = False) -> fx.GraphModule:
    """Load a network written by :func:`save_compressed`, running no code from the file.

    The graph is rebuilt from data whose every function, method and module class is looked
    up in allow-lists of this package (see the module docstring), and the weights come from
    safetensors; so a file from someone else cannot run code on load.

    Args:
        path: The file.
        original: The original, uncompressed model (same architecture; its weights do not
            matter). Given: the network is rebuilt from the plan and the stored weights.
            ``None``: the stored graph is rebuilt (no original class needed).
        example_input: Overrides the recorded example input shapes (rebuild path only).
        trusted: Only for files of the previous layout (format 1), which pickle the network:
            ``True`` unpickles them, which runs whatever code the file holds, so pass it only
            for files you made yourself. Re-save the result to get the safe layout.

    Returns:
        The network, on CPU, in eval mode if it is merged. It has the original's call
        signature and output type (a tensor, or a UNet output with ``.sample``).

    Raises:
        ValueError: the file is not a compressed-network file, is of another format version,
            is of the old pickled layout (without ``trusted=True``), holds a graph element
            outside the allow-lists (named in the message), or the rebuild has no example
            input shapes or does not match ``original``.
    """
    if _is_torch_file(path):
        return _load_legacy(path, original, example_input, trusted)
    header, tensors = _read_safetensors(path)
    if original is not None:
        state = {k: _tensor(tensors, v, path) for k, v in header["state_dict"].items()}
        return _rebuild(header, state, original, example_input, path)
    if header.get("graph") is None:
        raise ValueError(f"{path} holds no self-contained graph ({header.get('unportable')}); load it with "
                         "load_compressed(path, original=<the uncompressed model>)")
    try:
        model = from_data(header["graph"], tensors)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as err:  # refused/malformed
        raise ValueError(f"{path}: refusing to load the stored graph: {err}") from err
    saved_names = [n["name"] for n in header["graph"]["nodes"]]
    _restore_meta(header["meta"], saved_names, model).write(model)
    return model.eval() if header["kind"] == "merged" else model


def _is_torch_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` was written by ``torch.save`` (zip archive or bare pickle), not safetensors.

    A safetensors file starts with the 8-byte length of its JSON header, then ``{``.
    """
    with open(path, "rb") as f:
        head = f.read(9)
    size = os.path.getsize(path)
    safetensors = len(head) == 9 and head[8:] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size
    return not safetensors and (head.startswith(b"PK") or head[:1] == b"\x80")


def _read_safetensors(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON header and the tensors of a format-2 file (no pickle involved)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        # Own, aligned memory per tensor: the file's are views at 8-byte offsets, on which CPU
        # kernels may take other code paths and round differently than on the saved network.
        tensors = {k: v.clone() for k, v in load_file(str(path)).items()}
    except Exception as err:  # safetensors raises its own error types for foreign files
        raise ValueError(f"{path} was not written by lightning_layermerge.save_compressed ({err})") from err
    if metadata.get("format") != _MAGIC:
        raise ValueError(f"{path} was not written by lightning_layermerge.save_compressed (a safetensors file "
                         "without its header)")
    try:
        header = json.loads(metadata["header"])
    except (KeyError, ValueError, RecursionError) as err:
        raise ValueError(f"{path} has a damaged header ({type(err).__name__}: {err})") from err
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a damaged header (not a JSON object)")
    if header.get("format") != FORMAT:
        raise ValueError(f"{path} has format version {header.get('format')}; this version reads {FORMAT}")
    return header, tensors


def _tensor(tensors: dict[str, torch.Tensor], key: str, path: Any) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"{path} is damaged: tensor {key!r} is missing")
    return tensors[key]


def _load_legacy(path: str | os.PathLike, original: nn.Module | None, example_input: ExampleInput | None,
                 trusted: bool) -> fx.GraphModule:
    """A format-1 file: rebuilt from plan + weights (``weights_only``), or unpickled if ``trusted``."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as err:
        raise ValueError(_refusal(path, err)) from err
    if not isinstance(data, dict) or data.get("format") is None or "plan" not in data:
        raise ValueError(f"{path} was not written by lightning_layermerge.save_compressed")
    if data["format"] != _LEGACY_FORMAT:
        raise ValueError(f"{path} has format version {data['format']}; this version reads {FORMAT}")
    if original is not None:
        return _rebuild(data, data["state_dict"], original, example_input, path)
    if not trusted:
        raise ValueError(
            f"{path} has the old layout (format 1), which stores the network pickled: loading it would run code "
            "from the file. Pass original=<the uncompressed model> to rebuild it from its plan and weights "
            "(no code from the file runs), or, only for a file you made yourself, trusted=True; then "
            "save_compressed the result again to get the safe layout"
        )
    model = torch.load(io.BytesIO(data["module"]), map_location="cpu", weights_only=False)
    _restore_meta(data["meta"], data["nodes"], model).write(model)
    return model


def _refusal(path: Any, err: Exception, hint: str = "") -> str:
    """What torch's weights-only unpickler refused (the line naming the object) and what to do."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    what = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else type(err).__name__)
    return (f"refusing to read {path}: it holds objects other than tensors and plain data, and reading them would "
            f"run code from the file (torch.load(weights_only=True): {what}). Pass trusted=True only if you trust "
            f"the file's source{hint}")


def read_checkpoint(path: str | os.PathLike, *, trusted: bool = False) -> dict:
    """Read a (Lightning) checkpoint with ``torch.load(weights_only=True)``: no code from the file runs.

    Everything ``LayerMergeCallback`` stores is plain data, so its checkpoints load this way.
    A checkpoint can still hold other objects, e.g. ``hyper_parameters`` with custom classes
    saved by ``save_hyperparameters``; those need ``trusted=True`` (or
    ``torch.serialization.add_safe_globals([...])`` for the named classes).

    Args:
        path: The checkpoint file.
        trusted: Unpickle arbitrary objects (``weights_only=False``), which runs code from the
            file; only for checkpoints you made yourself.

    Returns:
        The checkpoint dict, tensors on CPU.

    Raises:
        ValueError: the checkpoint holds objects other than tensors and plain data (the
            message names the first) and ``trusted`` is false.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as err:
        hint = (" (read_checkpoint, state_from_checkpoint and restore_pruned take it; for "
                "LayerMergeCallback(plan=...) pass plan=state_from_checkpoint(path, trusted=True))")
        raise ValueError(_refusal(path, err, hint)) from err


def _restore_meta(meta: dict, saved_nodes: list[str], model: fx.GraphModule) -> SurgeryMeta:
    """The saved record with region node names mapped onto the loaded graph (same node order)."""
    names = [n.name for n in model.graph.nodes]
    if len(names) != len(saved_nodes):
        raise ValueError("the loaded graph does not match the saved one; load with original= to rebuild instead")
    record = SurgeryMeta.from_dict(meta)
    if not record.merged:  # regions only matter for merging
        rename = dict(zip(saved_nodes, names))
        record.regions = [r.renamed(rename) for r in record.regions]
    return record


def _rebuild(data: dict, state_dict: dict, original: nn.Module, example_input: ExampleInput | None,
             path: Any) -> fx.GraphModule:
    if example_input is None:
        if not data.get("inputs"):
            raise ValueError(
                f"{path} records no example input shapes; pass example_input= (the input the plan was traced with)"
            )
        example_input = example_from_spec(data["inputs"])
    model = rebuild_compressed(original, data["plan"], example_input, merged=data["kind"] == "merged")
    model.load_state_dict(state_dict, strict=True)
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
            example_input = example_from_spec(SurgeryMeta.of(model).inputs or []) if SurgeryMeta.present(model) else ()
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
