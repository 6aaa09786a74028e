"""The report object: numbers, text, JSON, PNG, and the side-by-side timer."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image as mpimg
import pytest
import torch
from torch import nn

from lightning_layermerge.planning.report import LayerMergeReport, count_parameters
from lightning_layermerge.planning import measure_side_by_side
from lightning_layermerge import LatencySettings


def make_report(**overrides) -> LayerMergeReport:
    values = dict(
        budget=0.6, method="layermerge", target="model", num_layers=5,
        layer_names=["stem.0", "block.conv1", "block.conv2", "head.0", "head.1"],
        segments=[(0, 1, 3), (1, 3, 5), (3, 5, 3)], kept_activations=[1, 3], kept_convs=[1, 2, 3, 5],
        irreducible=[1], latency_settings={"device": "cpu", "batch_size": 64, "dtype": "float32", "threads": 1},
        table_original_ms=10.0, predicted_ms=5.5, measured_original_ms=12.0, measured_ms=6.0,
        params_before=1000, params_after=800, monitor="val_loss", mode="min", metric_before=0.10,
        metric_after=0.12, merged=True, merge_max_error=2e-7,
        calibration=[{"segments": [[0, 5, 3]], "predicted": 0.7, "measured": 0.65}, {"segments": [[0, 5, 3]], "predicted": 0.55, "measured": 0.5}],
    )
    values.update(overrides)
    return LayerMergeReport(**values)


def test_derived_numbers() -> None:
    r = make_report()
    assert r.predicted_ratio == pytest.approx(0.55)
    assert r.measured_ratio == pytest.approx(0.5)
    assert r.predicted_speedup == pytest.approx(10 / 5.5)
    assert r.measured_speedup == pytest.approx(2.0)
    assert r.within_budget is True
    assert make_report(measured_ms=7.7).within_budget is False  # 0.642 > 0.63
    assert make_report(measured_ms=None).measured_ratio is None


def test_dict_json_metrics_and_text(tmp_path: Path) -> None:
    r = make_report()
    data = r.to_dict()
    assert data["segments"] == [[0, 1, 3], [1, 3, 5], [3, 5, 3]]
    assert data["measured_speedup"] == pytest.approx(2.0)
    path = r.to_json(tmp_path / "sub" / "r.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(data))
    metrics = r.metrics()
    assert metrics["layermerge/measured_speedup"] == pytest.approx(2.0)
    assert metrics["layermerge/kept_convs"] == 4.0 and metrics["layermerge/merged"] == 1.0
    assert all(isinstance(v, float) for v in metrics.values())
    assert "layermerge/metric_after" not in make_report(metric_after=None).metrics()
    text = str(r)
    for fragment in ["budget 0.6", "kept 4/5 convs, 2/4 activations", "(1,3,5)", "measured 6.000 ms (0.500x",
                     "speed-up 2.00x", "1,000 -> 800", "val_loss (min) : 0.1000 -> 0.1200", "threads=1",
                     "2 candidate(s) timed before fine-tuning (predicted->measured: 0.700->0.650, 0.550->0.500)"]:
        assert fragment in text, fragment


def test_png(tmp_path: Path) -> None:
    path = make_report().plot(tmp_path / "plan.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = mpimg.imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 500
    # Missing measurements still draw (bars at 0).
    make_report(measured_ms=None, measured_original_ms=None, predicted_ms=None).plot(tmp_path / "partial.png")
    assert (tmp_path / "partial.png").stat().st_size > 1000


def test_measure_side_by_side_leaves_modules_alone() -> None:
    small = nn.Conv2d(8, 8, 1).train()
    big = nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(6)])
    settings = LatencySettings(batch_size=8, threads=1, warmup=2, repeats=15, dtype="float64")
    times = measure_side_by_side({"small": small, "big": big}, (torch.randn(8, 8, 16, 16),), settings)
    assert set(times) == {"small", "big"}
    assert times["big"] > times["small"] > 0
    assert small.training and small.weight.dtype == torch.float32  # the caller's modules are untouched
    assert count_parameters(small) == 8 * 8 + 8


def test_text_says_when_the_table_left_timings_unrepeatable() -> None:
    report = make_report(table_max_spread=0.217, table_unreliable=12,
                         latency_settings={"device": "cpu", "threads": 1, "max_spread": 0.05})
    text = report.to_text()
    assert "table max spread 21.7% (12 timing(s) above the 5% limit: prices may be off by more, trust the measured " \
           "ratio)" in text
    assert report.metrics()["layermerge/table_unreliable"] == 12.0
    assert json.loads(json.dumps(report.to_dict()))["table_unreliable"] == 12
    steady = make_report(table_max_spread=0.021, table_unreliable=0).to_text()
    assert "table max spread 2.1%, table measured" in steady and "limit" not in steady
    unknown = make_report(table_max_spread=0.021)  # a state from an older checkpoint
    assert "table max spread 2.1%, table measured" in unknown.to_text()
    assert "layermerge/table_unreliable" not in unknown.metrics()


def test_text_names_runtime_threads_batch_and_spreads() -> None:
    from lightning_layermerge.planning.report import settings_dict
    from lightning_layermerge import LatencySettings

    settings = settings_dict(LatencySettings(batch_size=16, runtime="torchscript"))
    assert settings["threads"] == 1 and settings["clock"] == "thread" and settings["runtime"] == "torchscript"
    report = make_report()
    report.latency_settings = settings
    report.measured_spread, report.table_max_spread, report.table_build_s = 0.021, 0.043, 12.0
    report.calibration = [{"segments": [], "predicted": 0.58, "measured": 0.6, "spread": 0.012}]
    report.load_note = "another process is using the CPU"
    text = report.to_text()
    assert "runtime=torchscript" in text and "batch_size=16" in text and "threads=1" in text and "clock=thread" in text
    assert f"allocator={settings['allocator']}" in text and settings["allocator"].startswith(("cached", "system"))
    assert "measured ratio spread 2.1%" in text and "table max spread 4.3%" in text and "12 s" in text
    assert "0.580->0.600 (±1.2%)" in text and "another process is using the CPU" in text
    metrics = report.metrics()
    assert metrics["layermerge/measured_spread"] == pytest.approx(0.021)
    assert metrics["layermerge/table_max_spread"] == pytest.approx(0.043)
