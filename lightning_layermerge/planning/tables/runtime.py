"""Runtimes a network is timed in: eager PyTorch, TorchScript, ONNX Runtime (torch only, no Lightning).

A latency table is only as good as its match with the runtime the network is deployed in:
ONNX Runtime fuses and schedules differently from eager PyTorch, and per-call overheads
differ by an order of magnitude. :func:`prepare_call` turns a module and its inputs into a
zero-argument callable that runs one forward pass in the runtime named by the settings.
For ``"torchscript"`` and ``"onnxruntime"`` the module is exported with the package's own
:func:`~lightning_layermerge.serialization.export_torchscript` /
:func:`~lightning_layermerge.serialization.export_onnx` to a temporary file and that file is
loaded back, so the timed program is the exported one.

ONNX Runtime is an optional extra: ``pip install -e ".[onnx]"``.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["MEMORY_FORMATS", "RUNTIMES", "check_runtime", "prepare_call", "session_options"]

#: Runtimes a latency can be measured in.
RUNTIMES = ("eager", "torchscript", "onnxruntime")
#: Memory formats of the timed weights and inputs (eager and TorchScript).
MEMORY_FORMATS = ("contiguous", "channels_last")


def check_runtime(runtime: str, memory_format: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise a ``ValueError`` saying what to do unless the combination can be timed.

    Args:
        runtime: One of :data:`RUNTIMES`.
        memory_format: One of :data:`MEMORY_FORMATS`.
        device: The timing device.
        dtype: The timing dtype.

    Raises:
        ValueError: Unknown runtime or memory format, ``channels_last`` with ONNX Runtime
            (which chooses its own layouts), bfloat16 with ONNX Runtime, or ONNX Runtime not
            installed.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"LatencySettings.runtime must be one of {list(RUNTIMES)}, got {runtime!r}")
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"LatencySettings.memory_format must be one of {list(MEMORY_FORMATS)}, got {memory_format!r}")
    if runtime != "onnxruntime":
        return
    if memory_format != "contiguous":
        raise ValueError("memory_format='channels_last' applies to runtime='eager' and 'torchscript'; ONNX Runtime "
                         "chooses its own layouts, use memory_format='contiguous'")
    if dtype == torch.bfloat16:
        raise ValueError("runtime='onnxruntime' cannot be fed bfloat16 inputs from numpy; use dtype='float32' or 'float16'")
    _onnxruntime()


def _onnxruntime() -> Any:
    """The ``onnxruntime`` module, or an ``ImportError`` naming the extra to install."""
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("runtime='onnxruntime' needs ONNX Runtime: pip install -e \".[onnx]\" "
                          "(or pip install onnx onnxruntime)") from None
    return onnxruntime


def _to(value: Any, device: torch.device, dtype: torch.dtype, channels_last: bool) -> Any:
    """A tensor on ``device``; floating tensors also get ``dtype``; 4-D ones channels-last if asked."""
    if not isinstance(value, torch.Tensor):
        return value
    value = value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device=device)
    if channels_last and value.dim() == 4:
        value = value.contiguous(memory_format=torch.channels_last)
    return value


def prepare_call(module: nn.Module, inputs: tuple, *, runtime: str, memory_format: str, device: torch.device,
                 dtype: torch.dtype, threads: int | None) -> Callable[[], Any]:
    """A callable running one forward pass of ``module`` on ``inputs`` in ``runtime``.

    The module is moved to ``device``/``dtype`` (and ``memory_format``) *in place* and put in
    eval mode, as the timing functions document. Calls must be made under ``torch.no_grad``
    (the timing functions do).

    Args:
        module: The module to run.
        inputs: Positional arguments of its forward.
        runtime: ``"eager"``, ``"torchscript"`` or ``"onnxruntime"``.
        memory_format: ``"contiguous"`` or ``"channels_last"``.
        device: Where to run.
        dtype: Floating-point dtype of weights and floating inputs.
        threads: Intra-op threads for ONNX Runtime (``None``: its default, all cores); eager
            and TorchScript follow ``torch.set_num_threads``, which the caller sets.

    Returns:
        ``fn()`` running one forward pass (its output is returned and discarded by callers).
    """
    check_runtime(runtime, memory_format, device, dtype)
    channels_last = memory_format == "channels_last"
    module.to(device=device, dtype=dtype).eval()
    if channels_last:
        module.to(memory_format=torch.channels_last)
    args = tuple(_to(a, device, dtype, channels_last) for a in inputs)
    if runtime == "eager":
        return lambda: module(*args)
    if runtime == "torchscript":
        return _torchscript_call(module, args, device)
    return _onnxruntime_call(module, args, device, threads)


def _torchscript_call(module: nn.Module, args: tuple, device: torch.device) -> Callable[[], Any]:
    """Export with ``export_torchscript``, load the file back, and call it."""
    from ...surgery.serialization import export_torchscript  # torch-only module; imported late to keep tables light

    with tempfile.TemporaryDirectory(prefix="layermerge-ts-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer/scripting chatter about the timing copy, not the user's model
        path = export_torchscript(module, Path(tmp) / "timed.pt", example_input=args)
        loaded = torch.jit.load(str(path), map_location=device).eval()
    return lambda: loaded(*args)


def session_options(threads: int | None) -> Any:
    """ONNX Runtime session options for timing: ``threads`` intra-op threads, sequential, quiet."""
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's default (all physical cores)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    # Workers spin while a run lasts (ONNX Runtime's default, as a deployed session runs) and
    # stop when it returns: a pool that kept spinning would steal the cores of the next session
    # timed interleaved with this one (the original and the compressed network alternate pass
    # by pass). Measured on 2 cores, 2 threads, three sessions in turn: spinning kept on, 45-590 %
    # spread between blocks of passes; spinning off (each pass wakes sleeping workers), 3-8 %
    # and 10-20 % slower; spin-and-stop, 0-1.4 % once warm.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


def _onnxruntime_call(module: nn.Module, args: tuple, device: torch.device, threads: int | None) -> Callable[[], Any]:
    """Export with ``export_onnx``, open an ONNX Runtime session on the file, and run it."""
    from ...surgery.serialization import export_onnx

    ort = _onnxruntime()
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise ValueError("runtime='onnxruntime' needs a forward whose arguments are all tensors")
    options = session_options(threads)
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError("runtime='onnxruntime' on CUDA needs onnxruntime-gpu (CUDAExecutionProvider); "
                             "install it or time on device='cpu'")
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0})]
    with tempfile.TemporaryDirectory(prefix="layermerge-onnx-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notices, once per timed module
        path = export_onnx(module, Path(tmp) / "timed.onnx", args, dynamic_batch=False)
        session = ort.InferenceSession(str(path), options, providers=providers)
    # The exporter drops arguments the graph does not read; feed the ones it kept, by name.
    arrays = {f"input{n}": a.detach().cpu().numpy() for n, a in enumerate(args)}
    feed = {i.name: arrays[i.name] for i in session.get_inputs()}
    return lambda: session.run(None, feed)
