"""Planner.calibrate: the search for the table budget whose plan measures within the budget."""

from __future__ import annotations

import pytest
import torch
from lm_helpers import FAST_IMPORTANCE, FAST_LATENCY, TinyNet
from torch import nn

from lightning_layermerge import Plan, merge, prune, trace
from lightning_layermerge.fit.planner import CALIBRATION_SLACK, Planner, min_chain_ms
from lightning_layermerge import build_latency_table


def conv_cost(module: nn.Module) -> float:
    """Multiply-adds per output pixel of every conv: a deterministic stand-in for latency."""
    return sum(m.kernel_size[0] ** 2 * m.in_channels * m.out_channels / m.groups
               for m in module.modules() if isinstance(m, nn.Conv2d))


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    model = TinyNet().eval()
    chain = trace(model, torch.randn(16, 1, 8, 8))
    table = build_latency_table(model, chain, FAST_LATENCY, progress=False)
    # Like a real table: each removed conv or activation costs some Perf.
    importance = {}
    for seg in chain.segments:
        removed_convs = (seg.j - seg.i) - len(seg.convs)
        importance[seg.key] = 1.0 - 0.15 * removed_convs - 0.05 * (seg.j - seg.i - 1)
    return model, chain, table, importance


def planner_for(budget: float, table, importance) -> Planner:
    planner = Planner(budget=budget, method="layermerge", monitor=None, mode="min", importance=FAST_IMPORTANCE,
                      latency=FAST_LATENCY, calibrate=True, cache_dir=None, verbose=False)
    planner.latency_table, planner.importance_table = table, importance
    return planner


@pytest.mark.parametrize("machine_factor", [0.5, 1.6])
def test_calibration_moves_the_table_budget_until_the_measurement_fits(setting, machine_factor: float,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A table that is pessimistic (x0.5) or optimistic (x1.6) about the real network."""
    model, chain, table, importance = setting
    original = conv_cost(merge(prune(model, chain, Plan.keep_all(chain))))

    def measured_ratio(self, trainer, folded, candidate, inputs):
        return min(1.0, machine_factor * conv_cost(candidate) / original)

    monkeypatch.setattr(Planner, "measured_ratio", measured_ratio)
    budget = 0.7
    planner = planner_for(budget, table, importance)
    start_ms = table.budget_for(budget)
    first = Plan.from_segments(chain, planner.solve(table, importance, chain, start_ms))
    chosen = planner.calibrate(None, model, chain, first, start_ms)
    rounds = planner.calibration
    assert rounds[0]["segments"] == first.keys
    assert len(rounds) >= 1 and all(r["measured"] <= 1.0 for r in rounds)
    chosen_ratio = next(r["measured"] for r in rounds if r["segments"] == chosen.keys)
    fitting = [r["measured"] for r in rounds if r["measured"] <= budget]
    if fitting:
        assert chosen_ratio <= budget
    first_ratio = rounds[0]["measured"]
    if first_ratio < (1 - CALIBRATION_SLACK) * budget:
        assert len(rounds) > 1  # far under budget: a looser plan was tried
        assert chosen_ratio >= first_ratio
    if first_ratio > budget:
        assert len(rounds) > 1 and chosen_ratio < first_ratio  # over budget: a tighter plan was tried


def test_min_chain_ms_is_the_fastest_covering(setting) -> None:
    _, chain, table, _ = setting
    floor = min_chain_ms(table, chain, "layermerge")
    assert floor <= table.chain_ms
    assert floor == pytest.approx(min(table.predicted_ms(Plan.remove_all(chain).keys) - table.outside_ms,
                                      table.chain_ms), rel=1.0)  # never above the keep-all chain
    # depth keeps every conv, so it can never be faster than layermerge
    assert min_chain_ms(table, chain, "depth") >= floor - 1e-9


def test_depth_skips_pairs_without_an_all_kept_segment() -> None:
    """A strided conv followed by a 3x3 cannot merge with both kept (the strided-conv rule), so the
    pair has segments but none keeps every conv; Depth must plan around it (it used to raise)."""
    from lightning_layermerge.fit.planner import solve_for
    from lightning_layermerge import LatencySettings, LatencyTable

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    chain = trace(model, torch.randn(1, 3, 16, 16))
    kept = chain.all_kept_kernels()
    assert any(s.key[:2] not in kept for s in chain.segments)  # the case this test is about
    entries = {s.key: 1.0 + 0.1 * s.k for s in chain.segments}
    table = LatencyTable(entries, total_ms=10.0, chain_ms=sum(entries[k] for k in Plan.keep_all(chain).keys),
                         settings=LatencySettings())
    importance = {s.key: 1.0 for s in chain.segments}
    sol = solve_for(table, importance, chain, budget_ms=sum(entries.values()), method="depth")
    plan = Plan.from_segments(chain, sol.segments)
    assert plan.kept_convs == frozenset(range(1, chain.num_layers + 1))
    assert all(k[:2] in kept for k in sol.segments)
