"""In-place operation times inside an ONNX Runtime session (torch only, ONNX Runtime optional).

The latency table prices segments "in context" from one node-by-node pass over the BN-folded
original (:mod:`~lightning_layermerge.planning.tables.pricing`). Eager PyTorch can be run node by
node; an ONNX Runtime session cannot, and it fuses operations: a conv, the residual addition
after it and the ReLU become one kernel, named after the fused group's last output
(``/relu_2/Relu_output_0_nchwc``). ONNX Runtime's own profiler
(``SessionOptions.enable_profiling``) times every kernel of a normal run, and every conv kernel
records its weight and output shapes. :func:`ort_node_times` runs the exported network with the
profiler on and assigns each conv kernel to the network's conv module of the same weight and
output shape, in execution order (both orders are topological orders of the same graph). A fused
addition or activation is thereby priced with the conv it was fused into, which is where ONNX
Runtime spends it; kernels that match no conv (pooling, layout reorders, the classifier) stay
unassigned and end up outside the chain.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

from torch import fx, nn

from .latency_settings import LatencySettings
from .runtime import _onnxruntime, session_options

__all__ = ["ort_node_times"]


def _conv_signatures(gm: fx.GraphModule) -> list[tuple[str, str, tuple]]:
    """``(node name, module path, weight shape)`` of every conv module call, in graph order."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if isinstance(module, nn.Conv2d):
                out.append((node.name, str(node.target), tuple(module.weight.shape)))
    return out


def _kernel_events(trace: list[dict]) -> list[dict]:
    """The profiler's per-kernel events (``<node>_kernel_time``), in execution order."""
    return [e for e in trace if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")]


def _weight_shape(event: dict) -> tuple | None:
    """The weight shape of a conv kernel event (its second input), or None for other kernels."""
    args = event.get("args", {})
    if args.get("op_name") not in ("Conv", "FusedConv", "NchwcConv"):
        return None
    inputs = args.get("input_type_shape") or []
    if len(inputs) < 2:
        return None
    (shape,) = inputs[1].values()
    return tuple(shape)


def _padded(ort_shape: tuple, shape: tuple) -> bool:
    """Whether ``ort_shape`` is ``shape`` with its channel dimensions padded to ONNX Runtime's
    blocked layout (NCHWc: channels rounded up to a multiple of 8 or 16)."""
    if len(ort_shape) != len(shape) or ort_shape[2:] != shape[2:]:
        return False
    return all(o == c or (o > c and o % 8 == 0 and o - c < 16) for o, c in zip(ort_shape[:2], shape[:2]))


def assign_kernels(signatures: list[tuple[str, str, tuple]], kernels: list[tuple[str, tuple | None]]) -> dict[str, str]:
    """Match profiled conv kernels to conv nodes.

    Three passes, each kernel to the first still unmatched node that fits: a kernel named after
    a conv module (``/merged_2_3/Conv...``), then equal weight shapes, then weight shapes equal up
    to ONNX Runtime's channel padding (:func:`_padded`). Kernels of a fused group are named after
    the group's last output, so most need the shape passes; both lists are in topological order.

    Args:
        signatures: ``(node name, module path, weight shape)`` in graph order (:func:`_conv_signatures`).
        kernels: ``(kernel name, weight shape or None)`` in execution order (one run).

    Returns:
        ``{kernel name: node name}`` for the kernels that matched.
    """
    unmatched = list(signatures)
    out: dict[str, str] = {}
    fits = (
        lambda kernel, shape, path, node_shape: kernel.startswith(f"/{path}/"),
        lambda kernel, shape, path, node_shape: shape == node_shape,
        lambda kernel, shape, path, node_shape: _padded(shape, node_shape),
    )
    for fit in fits:
        for kernel, shape in kernels:
            if shape is None or kernel in out:
                continue
            for index, (node, path, node_shape) in enumerate(unmatched):
                if fit(kernel, shape, path, node_shape):
                    out[kernel] = node
                    del unmatched[index]
                    break
    return out


def ort_node_times(gm: fx.GraphModule, inputs: tuple, settings: LatencySettings) -> dict[str, float]:
    """Median ms of every conv node of ``gm`` as it runs inside an ONNX Runtime session.

    ``gm`` is exported with the package's ``export_onnx`` (as the table's whole-network timing
    does), run ``settings.warmup`` times and then ``settings.repeats`` times with ONNX Runtime's
    profiler on. Kernels that match no conv node are returned under their own kernel names (so
    that the times add up to the profiled network).

    Args:
        gm: The BN-folded original (``fold_batchnorm``), on the CPU.
        inputs: Its positional example arguments (tensors).
        settings: Threads, warm-up and repeats.

    Returns:
        ``{node name: ms}`` (kernel times summed per node when several kernels match it).
    """
    from ...surgery.serialization import export_onnx

    ort = _onnxruntime()
    gm = gm.to(dtype=settings.torch_dtype).eval()
    args = tuple(a.to(dtype=settings.torch_dtype) if a.is_floating_point() else a for a in inputs)
    with tempfile.TemporaryDirectory(prefix="layermerge-ort-profile-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_onnx(gm, Path(tmp) / "profiled.onnx", args, dynamic_batch=False)
        options = session_options(settings.threads)  # as the timed sessions
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        arrays = {f"input{n}": a.detach().cpu().numpy() for n, a in enumerate(args)}
        feed = {i.name: arrays[i.name] for i in session.get_inputs()}
        for _ in range(settings.warmup + settings.repeats):  # _per_node drops the warm-up runs
            session.run(None, feed)
        trace = json.loads(Path(session.end_profiling()).read_text())
    return _per_node(_conv_signatures(gm), _kernel_events(trace), settings)


def _per_node(signatures: list[tuple[str, str, tuple]], events: list[dict], settings: LatencySettings) -> dict[str, float]:
    """Median ms per node over the profiled runs after the warm-up ones."""
    per_run = _split_runs(events)
    runs = per_run[settings.warmup:] or per_run
    names = assign_kernels(signatures, [(_name(e), _weight_shape(e)) for e in runs[0]])
    samples: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        totals: dict[str, float] = defaultdict(float)
        for event in run:
            kernel = _name(event)
            totals[names.get(kernel, kernel)] += float(event.get("dur", 0.0)) / 1000.0  # us -> ms
        for node, ms in totals.items():
            samples[node].append(ms)
    return {node: statistics.median(values) for node, values in samples.items()}


def _name(event: dict) -> str:
    return str(event["name"])[: -len("_kernel_time")]


def _split_runs(events: list[dict]) -> list[list[dict]]:
    """Kernel events grouped per run: a run starts again when its first kernel name comes back."""
    runs: list[list[dict]] = []
    first: Any = None
    for event in events:
        if first is None:
            first = event["name"]
        if event["name"] == first:
            runs.append([])
        runs[-1].append(event)
    return runs
