"""Calibration and chain solving: the search for the table budget whose plan measures within the
budget (observed through an injected ``measure``), the reachable floor and the Depth filter."""

from __future__ import annotations

import math

import pytest
import torch
from lm_helpers import FAST_LATENCY, TinyNet
from torch import nn

from lightning_layermerge import LatencySettings, LatencyTable, Plan, build_latency_table, merge, prune, trace
from lightning_layermerge.planning.calibrate import CALIBRATION_SLACK, MAX_REPLANS, calibrate
from lightning_layermerge.planning.chain_solve import reachable_floor_ms, solve_chain
from lightning_layermerge.surgery import fold_batchnorm


def conv_cost(module: nn.Module) -> float:
    """Multiply-adds per output pixel of every conv: a deterministic stand-in for latency."""
    return sum(m.kernel_size[0] ** 2 * m.in_channels * m.out_channels / m.groups
               for m in module.modules() if isinstance(m, nn.Conv2d))


def mac_table(chain) -> LatencyTable:
    """A deterministic table (multiply-adds in millions as ms, 5 % outside the chain): cases that
    must not depend on this machine's timings."""
    entries = {s.key: 0.0 if s.identity else math.prod(s.out_shape) * s.in_shape[1] / s.groups * s.k * s.k * 1e-6
               for s in chain.segments}
    chain_ms = sum(entries[k] for k in Plan.keep_all(chain).keys)
    return LatencyTable(entries, total_ms=chain_ms * 1.05, chain_ms=chain_ms, settings=LatencySettings())


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


@pytest.mark.parametrize("machine_factor", [0.5, 1.6])
def test_calibration_moves_the_table_budget_until_the_measurement_fits(setting, machine_factor: float) -> None:
    """A table that is pessimistic (x0.5) or optimistic (x1.6) about the real network."""
    model, chain, table, importance = setting
    original = conv_cost(fold_batchnorm(model, chain))
    measured: list[tuple] = []

    def measure(plan: Plan) -> float:
        measured.append(tuple(plan.keys))
        return min(1.0, machine_factor * conv_cost(merge(prune(model, chain, plan))) / original)

    budget = 0.7
    start_ms = table.budget_for(budget)
    first = Plan.from_segments(chain, solve_chain(table, importance, chain, start_ms, "layermerge").segments)
    result = calibrate(table, importance, chain, first, start_ms, budget=budget, method="layermerge",
                       measure=measure)
    rounds = result.rounds
    assert [tuple(r["segments"]) for r in rounds] == measured  # every round is one measure() call
    assert rounds[0]["segments"] == first.keys and 1 <= len(rounds) <= 1 + MAX_REPLANS
    assert all(r["measured"] <= 1.0 and r["spread"] is None for r in rounds)
    chosen_ratio = result.measured
    fitting = [r["measured"] for r in rounds if r["measured"] <= budget]
    assert result.fits == bool(fitting)
    if fitting:
        assert chosen_ratio <= budget
    first_ratio = rounds[0]["measured"]
    if first_ratio < (1 - CALIBRATION_SLACK) * budget:
        assert chosen_ratio >= first_ratio
    if first_ratio > budget:
        assert len(rounds) > 1 and chosen_ratio < first_ratio  # over budget: a tighter plan was tried


@pytest.mark.parametrize("price_error", [1.0, 0.7])
def test_calibration_times_a_looser_plan_only_if_it_may_fit(setting, price_error: float) -> None:
    """The DP's plan measures far under the budget. With an exact table (1.0) that is because
    nothing fits between it and the budget: the looser plan is priced over the budget and is not
    timed. With a table that prices every plan 1 / 0.7 too high, the looser plan may fit: it is
    timed and, fitting, chosen."""
    _, chain, _, importance = setting
    table = mac_table(chain)
    ratio = lambda plan: table.predicted_ms(plan.keys) / table.total_ms  # noqa: E731
    budget = 0.6  # the DP's plans on this table: 0.39, 0.695 and 1.0 of the original
    start_ms = table.budget_for(budget)
    first = Plan.from_segments(chain, solve_chain(table, importance, chain, start_ms, "layermerge").segments)
    looser = Plan.from_segments(chain, solve_chain(table, importance, chain, table.budget_for(0.9), "layermerge").segments)
    # The case this test is about: far under the budget; the next plan over it as priced, within it 30 % lower.
    assert ratio(first) < (1 - CALIBRATION_SLACK) * budget
    assert ratio(looser) > budget >= 0.7 * ratio(looser)

    def measure(plan: Plan) -> float:
        return price_error * ratio(plan)

    result = calibrate(table, importance, chain, first, start_ms, budget=budget, method="layermerge", measure=measure)
    if price_error == 1.0:
        assert len(result.rounds) == 1 and result.plan.keys == first.keys
    else:
        assert result.rounds[1]["segments"] == looser.keys and result.fits
        assert sum(importance[k] for k in result.plan.keys) > sum(importance[k] for k in first.keys)


def test_calibration_keeps_the_fastest_plan_when_none_fits(setting) -> None:
    """A machine on which nothing reaches the budget: the fastest measured plan, flagged as not fitting."""
    _, chain, table, importance = setting
    start_ms = table.budget_for(0.7)
    first = Plan.from_segments(chain, solve_chain(table, importance, chain, start_ms, "layermerge").segments)

    def measure(plan: Plan) -> tuple[float, float]:
        return 0.9 + 0.001 * len(plan.kept_convs), 0.01  # always over budget; fewer convs = faster

    result = calibrate(table, importance, chain, first, start_ms, budget=0.7, method="layermerge", measure=measure)
    assert not result.fits
    assert result.measured == min(r["measured"] for r in result.rounds)
    assert all(r["spread"] == 0.01 for r in result.rounds)


def test_reachable_floor_is_the_fastest_covering(setting) -> None:
    _, chain, table, _ = setting
    floor = reachable_floor_ms(table, chain, "layermerge")
    assert floor <= table.chain_ms
    fastest = {k: -v for k, v in table.entries.items()}
    roomy = sum(table.entries.values()) + 1.0
    # The floor is the latency of the plan the DP picks when it is told to be as fast as possible.
    assert floor == pytest.approx(solve_chain(table, fastest, chain, roomy, "layermerge").latency)
    # depth keeps every conv, so it can never be faster than layermerge
    assert reachable_floor_ms(table, chain, "depth") >= floor - 1e-9
    with pytest.raises(ValueError, match="infeasible"):
        solve_chain(table, fastest, chain, floor * 0.99, "layermerge", resolution=64000)


def test_depth_skips_pairs_without_an_all_kept_segment() -> None:
    """A strided conv followed by a 3x3 cannot merge with both kept (the strided-conv rule), so the
    pair has segments but none keeps every conv; Depth must plan around it (it used to raise)."""
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
    sol = solve_chain(table, importance, chain, budget_ms=sum(entries.values()), method="depth")
    plan = Plan.from_segments(chain, sol.segments)
    assert plan.kept_convs == frozenset(range(1, chain.num_layers + 1))
    assert all(k[:2] in kept for k in sol.segments)
    assert reachable_floor_ms(table, chain, "depth") <= sol.latency + 1e-9


def test_a_looser_plan_that_may_fit_is_found_between_the_steps(setting) -> None:
    """The re-plan step lands on the keep-all plan (1.0, over the budget even 20 % cheaper than
    priced); bisection on the table budget, with no measurement, finds the plan between (0.695
    priced, 0.556 expected) that may fit 0.6."""
    from lightning_layermerge.planning.calibrate import _looser_that_may_fit
    from lightning_layermerge.planning.chain_solve import RESOLUTIONS

    _, chain, _, importance = setting
    table = mac_table(chain)
    ratio = lambda keys: table.predicted_ms(list(keys)) / table.total_ms  # noqa: E731
    plan_at = lambda fraction: solve_chain(table, importance, chain, table.budget_for(fraction), "layermerge")  # noqa: E731
    first, middle = plan_at(0.4).segments, plan_at(0.7).segments
    assert round(ratio(first), 2) == 0.39 and round(ratio(middle), 3) == 0.695
    rounds = [{"segments": list(first), "measured": 0.8 * ratio(first), "predicted": ratio(first)}]
    tried = {tuple(first): 0.8 * ratio(first)}
    keep_all = (Plan.keep_all(chain), table.budget_for(1.2))
    found = _looser_that_may_fit(table, importance, chain, "layermerge", RESOLUTIONS[0], keep_all, tried, rounds,
                                 budget=0.6, low_ms=table.budget_for(0.4))
    assert found is not None and found[0].keys == list(middle)
    # At a budget no looser plan may fit (0.5: 0.695 x 0.8 = 0.556 > 0.5), nothing is timed.
    assert _looser_that_may_fit(table, importance, chain, "layermerge", RESOLUTIONS[0], keep_all, tried, rounds,
                                budget=0.5, low_ms=table.budget_for(0.4)) is None
