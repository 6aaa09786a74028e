"""Tests of the timing runtimes (lightning_layermerge.tables.runtime): eager, TorchScript, ONNX Runtime.

No milliseconds are asserted: the tests check that each runtime runs the exported program,
gives the module's output, and that the table and side-by-side measurements use it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_layermerge import Plan, merge, prune, serialization, trace
from lightning_layermerge.planning import side_by_side
from lightning_layermerge import LatencySettings, build_latency_table
from lightning_layermerge.planning.tables.runtime import check_runtime, prepare_call


def conv_relu() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())


def run(module: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    kwargs = {"runtime": "eager", "memory_format": "contiguous", "device": torch.device("cpu"),
              "dtype": torch.float32, "threads": 1, **kwargs}
    with torch.no_grad():
        out = prepare_call(module, (x,), **kwargs)()
    return torch.as_tensor(out[0] if isinstance(out, list) else out)


@pytest.mark.parametrize("runtime", ["eager", "torchscript", "onnxruntime"])
def test_each_runtime_computes_the_module(runtime: str) -> None:
    if runtime == "onnxruntime":
        pytest.importorskip("onnxruntime")
    module, x = conv_relu(), torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        expected = module(x)
    assert torch.allclose(run(module, x, runtime=runtime), expected, atol=1e-5)


def test_the_exported_files_are_the_ones_timed(monkeypatch) -> None:
    exported: list[str] = []
    for name in ("export_torchscript", "export_onnx"):
        real = getattr(serialization, name)
        monkeypatch.setattr(serialization, name, lambda *a, _real=real, _n=name, **k: exported.append(_n) or _real(*a, **k))
    module, x = conv_relu(), torch.randn(1, 3, 8, 8)
    run(module, x, runtime="torchscript")
    assert exported == ["export_torchscript"]
    if pytest.importorskip("onnxruntime"):
        run(conv_relu(), x, runtime="onnxruntime")
        assert exported == ["export_torchscript", "export_onnx"]


def test_channels_last_moves_weights_and_inputs() -> None:
    module, x = conv_relu(), torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        expected = module(x)
    out = run(module, x, memory_format="channels_last")
    assert module[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.allclose(out, expected, atol=1e-5)


def test_unsupported_combinations_say_what_to_do() -> None:
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="runtime must be one of"):
        check_runtime("tvm", "contiguous", cpu, torch.float32)
    with pytest.raises(ValueError, match="use memory_format='contiguous'"):
        check_runtime("onnxruntime", "channels_last", cpu, torch.float32)
    with pytest.raises(ValueError, match="bfloat16"):
        check_runtime("onnxruntime", "contiguous", cpu, torch.bfloat16)


def test_missing_onnxruntime_names_the_extra(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_ort(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[onnx\]"'):
        check_runtime("onnxruntime", "contiguous", torch.device("cpu"), torch.float32)


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(self.a(x)))


@pytest.mark.parametrize("runtime, memory_format", [("torchscript", "channels_last"), ("onnxruntime", "contiguous")])
def test_table_and_side_by_side_in_another_runtime(runtime: str, memory_format: str) -> None:
    if runtime == "onnxruntime":
        pytest.importorskip("onnxruntime")
    model = Small().eval()
    chain = trace(model, torch.randn(2, 3, 8, 8))
    settings = LatencySettings(warmup=1, repeats=3, runtime=runtime, memory_format=memory_format, max_spread=10.0)
    table = build_latency_table(model, chain, settings, progress=False)
    assert table.settings.runtime == runtime and table.total_ms > 0
    assert all(table.entries[s.key] > 0 for s in chain.segments if not s.identity)
    folded = merge(prune(model, chain, Plan.keep_all(chain)))
    timed = side_by_side({"original": folded, "removed": merge(prune(model, chain, Plan.remove_all(chain)))},
                         chain.example, table.settings)
    assert timed.settings.runtime == runtime and set(timed.ratio) == {"original", "removed"}
    assert timed.ratio["original"] == 1.0 and np.isfinite(timed.ratio["removed"]) and timed.ratio["removed"] > 0


def test_ort_kernels_are_assigned_by_name_then_shape_then_padded_shape() -> None:
    from lightning_layermerge.planning.tables.ort_profile import assign_kernels

    signatures = [("merged_0_1", "merged_0_1", (16, 1, 3, 3)), ("merged_1_2", "merged_1_2", (8, 16, 1, 1)),
                  ("merged_2_3", "merged_2_3", (24, 8, 1, 1)), ("short", "layers.0.short", (24, 16, 1, 1))]
    kernels = [("/stem/Relu_output_0_nchwc", (16, 1, 3, 3)),  # fused: found by its weight shape
               ("/merged_1_2/Conv_output_0_nchwc", (16, 16, 1, 1)),  # padded, but named after the conv
               ("ReorderOutput", None),  # not a conv
               ("/relu_2/Relu_output_0_nchwc", (32, 8, 1, 1)),  # 24 output channels padded to 32
               ("/shortcut/Conv_output_0_nchwc", (32, 16, 1, 1))]
    assert assign_kernels(signatures, kernels) == {
        "/stem/Relu_output_0_nchwc": "merged_0_1", "/merged_1_2/Conv_output_0_nchwc": "merged_1_2",
        "/relu_2/Relu_output_0_nchwc": "merged_2_3", "/shortcut/Conv_output_0_nchwc": "short"}


def test_ort_node_times_cover_every_conv_of_the_session() -> None:
    pytest.importorskip("onnxruntime")
    from lightning_layermerge.planning.tables.ort_profile import ort_node_times

    model = Small().eval()
    chain = trace(model, torch.randn(2, 3, 8, 8))
    folded = merge(prune(model, chain, Plan.keep_all(chain)))
    times = ort_node_times(folded, chain.example, LatencySettings(warmup=1, repeats=3, runtime="onnxruntime"))
    convs = [n.name for n in folded.graph.nodes
             if n.op == "call_module" and isinstance(folded.get_submodule(str(n.target)), nn.Conv2d)]
    assert convs and all(times.get(c, 0.0) > 0 for c in convs)


def test_onnxruntime_tables_are_priced_in_context_additively() -> None:
    pytest.importorskip("onnxruntime")
    from lightning_layermerge.planning.tables import latency as latency_module
    from lightning_layermerge.planning.tables.pricing import in_context_additive

    model = Small().eval()
    chain = trace(model, torch.randn(2, 3, 8, 8))
    settings = LatencySettings(warmup=1, repeats=3, runtime="onnxruntime", max_spread=10.0)
    table = build_latency_table(model, chain, settings, progress=False)
    assert latency_module._cache_key(chain, table.settings, None)["context"] is True
    assert table.entries != table.alone  # the alone sessions' layout conversions are taken out
    # The keep-all layers come out at exactly their in-place time, whatever the alone times were.
    keep = Plan.keep_all(chain).segments
    alone = {s.key: 1.0 + s.j for s in chain.segments}
    in_place = {s.j: 0.25 * s.j for s in keep}
    moved = in_context_additive(chain, alone, in_place)
    assert all(moved[s.key] == pytest.approx(in_place[s.j]) for s in keep if not s.identity)
    assert all(v >= 0 for v in moved.values())


def test_onnxruntime_sessions_spin_only_while_a_run_lasts() -> None:
    # Spinning kept on after a run steals the cores of the next interleaved session; spinning
    # off makes every pass wake sleeping workers. Timing sessions spin and stop at the run's end.
    from lightning_layermerge.planning.tables.runtime import session_options

    options = session_options(2)
    assert options.intra_op_num_threads == 2
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"


@pytest.mark.parametrize("runtime, torch_threads", [("onnxruntime", 1), ("eager", 2)])
def test_torch_keeps_one_thread_while_onnxruntime_is_timed(runtime: str, torch_threads: int) -> None:
    # torch only exports for ONNX Runtime; its spinning OpenMP workers would share the cores.
    from lightning_layermerge.planning.tables.timing import timing_environment

    before = torch.get_num_threads()
    with timing_environment(LatencySettings(runtime=runtime, threads=2)):
        assert torch.get_num_threads() == torch_threads
    assert torch.get_num_threads() == before


def test_fitted_overhead_keeps_layers_exact_and_removes_the_whole_fixed_cost_from_merges() -> None:
    """Multi-thread ONNX Runtime pricing: alone = in place + fixed + per-element x sizes, recovered exactly."""
    from lightning_layermerge.planning.tables.pricing import _overhead_fit, in_context_fitted

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 32, 1), nn.ReLU(), nn.Conv2d(32, 8, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    chain = trace(model, torch.randn(2, 3, 6, 6))
    fixed, per = 0.02, 1e-5
    size = lambda seg: math.prod(seg.in_shape) + math.prod(seg.out_shape)  # noqa: E731
    keep = {s.j: s for s in Plan.keep_all(chain).segments}
    in_place = {l: 0.1 * l for l in keep}
    alone = {}
    for seg in chain.segments:  # every segment alone pays exactly fixed + per x its sizes over its in-network time
        true = 0.05 * (seg.j - seg.i) if seg.j - seg.i > 1 else in_place[seg.j]
        alone[seg.key] = 0.0 if seg.identity else true + fixed + per * size(seg)
    assert _overhead_fit([(size(keep[l]), fixed + per * size(keep[l])) for l in keep]) == pytest.approx((fixed, per))
    priced = in_context_fitted(chain, alone, in_place)
    for seg in chain.segments:
        if seg.identity:
            continue
        true = 0.05 * (seg.j - seg.i) if seg.j - seg.i > 1 else in_place[seg.j]
        assert priced[seg.key] == pytest.approx(true), seg.key


def test_overhead_fit_never_goes_negative() -> None:
    from lightning_layermerge.planning.tables.pricing import _overhead_fit

    assert _overhead_fit([]) == (0.0, 0.0)
    assert _overhead_fit([(1.0, 0.3), (2.0, 0.2), (3.0, 0.1)]) == pytest.approx((0.2, 0.0))  # falling: constant
    fixed, per = _overhead_fit([(1.0, 0.0), (2.0, 0.5), (3.0, 1.0)])  # through the origin instead of below it
    assert fixed == 0.0 and per > 0


def test_a_correction_larger_than_a_merged_segment_never_prices_it_at_zero() -> None:
    """Two noisy layers can fit an overhead above a small merged segment's alone time: floor, not 0."""
    from lightning_layermerge.planning.tables.pricing import in_context_additive, in_context_fitted

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()).eval()
    chain = trace(model, torch.randn(2, 3, 8, 8))
    keep = {s.j: s for s in Plan.keep_all(chain).segments}
    alone = {s.key: 0.0 if s.identity else 1.0 for s in chain.segments}
    merged = [s.key for s in chain.segments if not s.identity and s.j - s.i > 1]
    assert merged
    for key in merged:
        alone[key] = 0.1  # a merged segment much cheaper alone than the layers' session overheads
    in_place = {l: (0.4 if l == min(keep) else 0.5) for l in keep if not keep[l].identity}
    for price in (in_context_fitted, in_context_additive):
        priced = price(chain, alone, in_place)
        # The corrections exceed 0.1 ms; the merged entries stop at half the smallest ratio (0.4) x 0.1 ms.
        assert all(priced[key] == pytest.approx(0.5 * 0.4 * 0.1) for key in merged), price
        assert all(priced[keep[l].key] == pytest.approx(in_place[l]) for l in in_place)
