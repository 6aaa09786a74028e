"""Numeric tests of lightning_layermerge.solve against exhaustive search over all coverings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_layermerge import Solution, solve

Entry = tuple[int, int, int]
EPS = 1e-9  # relative float tolerance on the budget (see the solve module docstring)


# --------------------------------------------------------------------------- helpers


def random_table(seed: int, num_layers: int, *, unit: float | None = None,
                 max_len: int = 4) -> tuple[dict[Entry, float], dict[Entry, float]]:
    """Random latency/importance tables with 1-3 kernels per pair and some pairs missing.

    Every single-layer pair exists with a "kept" kernel (3) and a "removed" kernel (1) so that
    all three methods have a covering. When ``unit`` is given, latencies are integer multiples
    of it (``n * unit`` in floats, so with the usual float noise).
    """
    rng = np.random.default_rng(seed)
    lat: dict[Entry, float] = {}
    imp: dict[Entry, float] = {}
    for i in range(num_layers):
        for j in range(i + 1, min(num_layers, i + max_len) + 1):
            if j == i + 1:
                ks = [1, 3]
            elif rng.random() < 0.35:
                continue  # a missing pair (e.g. a segment crossing a skip addition)
            else:
                ks = sorted(rng.choice([1, 3, 5, 7, 9], size=rng.integers(1, 4), replace=False))
            for k in ks:
                key = (i, j, int(k))
                if unit is None:
                    lat[key] = float(rng.uniform(0.1, 3.0))
                else:
                    lat[key] = int(rng.integers(0, 30)) * unit
                imp[key] = float(rng.normal(1.0, 0.5))
    return lat, imp


def coverings(keys, num_layers: int) -> list[list[Entry]]:
    """All segment lists that cover 0..num_layers using ``keys``."""
    by_start: dict[int, list[Entry]] = {}
    for key in keys:
        by_start.setdefault(key[0], []).append(key)
    out: list[list[Entry]] = []

    def extend(at: int, prefix: list[Entry]) -> None:
        if at == num_layers:
            out.append(list(prefix))
            return
        for key in by_start.get(at, ()):
            prefix.append(key)
            extend(key[1], prefix)
            prefix.pop()

    extend(0, [])
    return out


def brute_best(covs, cost, imp: dict[Entry, float], capacity: float) -> float:
    """Best importance among coverings with ``sum(cost) <= capacity`` (-inf if none)."""
    best = -math.inf
    for cov in covs:
        if sum(cost[e] for e in cov) <= capacity:
            best = max(best, sum(imp[e] for e in cov))
    return best


def layeronly_keys(keys) -> list[Entry]:
    return [e for e in keys if e[1] == e[0] + 1]


def depth_keys(keys) -> list[Entry]:
    largest: dict[tuple[int, int], int] = {}
    for i, j, k in keys:
        largest[(i, j)] = max(k, largest.get((i, j), k))
    return [(i, j, k) for (i, j), k in largest.items()]


RESTRICT = {"layermerge": list, "layeronly": layeronly_keys, "depth": depth_keys}


def assert_valid(sol: Solution, lat, imp, num_layers: int, budget: float) -> None:
    """Segments chain 0..L, reported sums match the table, latency within budget."""
    assert sol.segments[0][0] == 0 and sol.segments[-1][1] == num_layers
    for a, b in zip(sol.segments, sol.segments[1:]):
        assert a[1] == b[0]
    assert sol.latency == pytest.approx(sum(lat[e] for e in sol.segments), rel=1e-12)
    assert sol.importance == pytest.approx(sum(imp[e] for e in sol.segments), rel=1e-12)
    assert sol.latency <= budget * (1 + EPS)


# --------------------------------------------------------------------------- optimality


@pytest.mark.parametrize("method", ["layermerge", "layeronly", "depth"])
@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_within_one_unit_per_segment(method: str, seed: int) -> None:
    num_layers = 4 + seed % 5  # 4..8
    lat, imp = random_table(seed, num_layers)
    covs = coverings(RESTRICT[method](lat), num_layers)
    full_latency = [sum(lat[e] for e in cov) for cov in covs]
    rng = np.random.default_rng(100 + seed)
    checked = 0
    for _ in range(6):
        budget = float(rng.uniform(min(full_latency), max(full_latency)))
        resolution = int(rng.choice([7, 50, 300]))
        u = budget / resolution
        # Any covering with sum(T + u) <= budget survives rounding up, so the DP must match it.
        padded = {e: lat[e] + u for e in lat}
        lower = brute_best(covs, padded, imp, budget)
        try:
            sol = solve(lat, imp, num_layers, budget, method, resolution=resolution)
        except ValueError as err:  # allowed only when nothing fits with one unit of slack
            assert lower == -math.inf and "infeasible" in str(err)
            continue
        assert sol.method == method and sol.budget == budget
        assert_valid(sol, lat, imp, num_layers, budget)
        assert set(sol.segments) <= set(RESTRICT[method](lat))
        upper = brute_best(covs, lat, imp, budget)
        assert sol.importance <= upper + 1e-9
        if lower > -math.inf:
            assert sol.importance >= lower - 1e-9
            checked += 1
    assert checked >= 1


@pytest.mark.parametrize("method", ["layermerge", "layeronly", "depth"])
@pytest.mark.parametrize("seed", range(5))
def test_exact_optimum_when_latencies_are_unit_multiples(method: str, seed: int) -> None:
    num_layers = 4 + seed  # 4..8
    resolution = 40
    budget = 0.1 * resolution * (1 + seed)  # u = 0.1 * (1 + seed): not a binary fraction
    u = budget / resolution
    lat, imp = random_table(seed, num_layers, unit=u)
    units = {e: round(lat[e] / u) for e in lat}
    covs = coverings(RESTRICT[method](lat), num_layers)
    for capacity in (resolution // 4, resolution // 2, resolution):
        b = budget * capacity / resolution
        expected = brute_best(covs, units, imp, capacity)  # exact, in integer units
        if expected == -math.inf:
            with pytest.raises(ValueError, match="infeasible"):
                solve(lat, imp, num_layers, b, method, resolution=capacity)
            continue
        sol = solve(lat, imp, num_layers, b, method, resolution=capacity)
        assert_valid(sol, lat, imp, num_layers, b)
        assert sum(units[e] for e in sol.segments) <= capacity
        assert sol.importance == pytest.approx(expected, abs=1e-9)


def test_layeronly_is_a_knapsack_over_kept_or_removed_convs() -> None:
    # 3 layers; keeping a conv (k=3) costs 2 and gives 1, removing (k=1) costs 0 and gives 0.
    lat = {(l, l + 1, k): (2.0 if k == 3 else 0.0) for l in range(3) for k in (1, 3)}
    imp = {(l, l + 1, k): (float(l + 1) if k == 3 else 0.0) for l in range(3) for k in (1, 3)}
    lat[(0, 3, 7)], imp[(0, 3, 7)] = 1.0, 100.0  # a merge that layeronly must ignore
    sol = solve(lat, imp, 3, 4.0, "layeronly", resolution=4)
    assert sol.segments == [(0, 1, 1), (1, 2, 3), (2, 3, 3)]
    assert sol.importance == 5.0 and sol.latency == 4.0
    assert solve(lat, imp, 3, 4.0, "layermerge", resolution=4).segments == [(0, 3, 7)]


def test_depth_uses_all_kept_kernel_mapping() -> None:
    lat = {(0, 1, 3): 1.0, (0, 1, 1): 0.1, (1, 2, 3): 1.0, (1, 2, 1): 0.1,
           (0, 2, 5): 1.5, (0, 2, 3): 0.5}
    imp = {(0, 1, 3): 1.0, (0, 1, 1): 0.2, (1, 2, 3): 1.0, (1, 2, 1): 0.2,
           (0, 2, 5): 1.9, (0, 2, 3): 1.2}
    # Default: largest k per pair, so (0, 2, 3) and the k=1 singletons are never used.
    assert solve(lat, imp, 2, 1.6, "depth").segments == [(0, 2, 5)]
    with pytest.raises(ValueError, match="smallest achievable latency is 1.5"):
        solve(lat, imp, 2, 1.0, "depth")
    mapping = {(0, 1): 3, (1, 2): 3, (0, 2): 3}
    sol = solve(lat, imp, 2, 1.0, "depth", all_kept_kernel=mapping)
    assert sol.segments == [(0, 2, 3)] and sol.latency == 0.5
    with pytest.raises(ValueError, match=r"all_kept_kernel lacks pairs.*\(0, 2\)"):
        solve(lat, imp, 2, 1.0, "depth", all_kept_kernel={(0, 1): 3, (1, 2): 3})
    with pytest.raises(ValueError, match=r"no entry \(0, 2, 7\)"):
        solve(lat, imp, 2, 1.0, "depth", all_kept_kernel={**mapping, (0, 2): 7})


# --------------------------------------------------------------------------- rounding


def test_rounding_up_never_exceeds_budget_on_adversarial_latencies() -> None:
    # Every layer costs 0.3333 u: rounding DOWN (the paper's rule) gives 0 units, so all 30
    # layers would "fit" a 3-unit budget although they really cost 10 u. Rounding up must
    # keep at most 3 of them.
    num_layers, resolution, budget = 30, 3, 3.0
    u = budget / resolution
    lat, imp = {}, {}
    for l in range(num_layers):
        lat[(l, l + 1, 3)], imp[(l, l + 1, 3)] = 0.3333 * u, 1.0
        lat[(l, l + 1, 1)], imp[(l, l + 1, 1)] = 0.0, 0.0
    sol = solve(lat, imp, num_layers, budget, "layeronly", resolution=resolution)
    assert sol.latency <= budget
    assert sol.importance == 3.0
    assert sol.latency == pytest.approx(3 * 0.3333)


def test_rounding_absorbs_float_noise_on_exact_multiples() -> None:
    # 0.1 * 3 = 0.30000000000000004 > 0.3 = 3u; without the tolerance it would need 4 units.
    lat = {(0, 1, 3): 0.1 * 3, (1, 2, 3): 0.7, (0, 1, 1): 0.0, (1, 2, 1): 0.0}
    imp = {(0, 1, 3): 1.0, (1, 2, 3): 1.0, (0, 1, 1): 0.0, (1, 2, 1): 0.0}
    sol = solve(lat, imp, 2, 1.0, "layermerge", resolution=10)
    assert sol.segments == [(0, 1, 3), (1, 2, 3)]
    assert sol.latency == pytest.approx(1.0, rel=EPS)


def test_ties_prefer_lower_true_latency_then_table_order() -> None:
    lat = {(0, 1, 1): 0.4, (0, 1, 3): 0.2, (0, 1, 5): 0.2}
    imp = {(0, 1, 1): 1.0, (0, 1, 3): 1.0, (0, 1, 5): 1.0}
    for resolution in (1, 10, 1000):
        sol = solve(lat, imp, 1, 1.0, resolution=resolution)
        assert sol.segments == [(0, 1, 3)]


def test_minus_inf_and_nan_importance_are_never_chosen() -> None:
    lat = {(0, 1, 3): 1.0, (0, 1, 1): 1.0, (1, 2, 3): 1.0, (0, 2, 5): 1.0}
    imp = {(0, 1, 3): -math.inf, (0, 1, 1): 0.5, (1, 2, 3): 0.5, (0, 2, 5): float("nan")}
    sol = solve(lat, imp, 2, 5.0)
    assert sol.segments == [(0, 1, 1), (1, 2, 3)] and sol.importance == 1.0
    imp[(0, 1, 1)] = float("nan")
    with pytest.raises(ValueError, match="never-choose"):
        solve(lat, imp, 2, 5.0)


def test_negative_importances_are_allowed() -> None:
    lat = {(0, 1, 3): 1.0, (1, 2, 3): 1.0, (0, 2, 5): 1.0}
    imp = {(0, 1, 3): -1.0, (1, 2, 3): -1.0, (0, 2, 5): -3.0}
    assert solve(lat, imp, 2, 2.0).importance == -2.0
    assert solve(lat, imp, 2, 1.5).importance == -3.0


def test_dp_is_fast_on_mobilenet_sized_table() -> None:
    import time

    rng = np.random.default_rng(0)
    lat, imp = {}, {}
    for i in range(52):
        for j in range(i + 1, min(52, i + 6) + 1):
            for k in sorted(rng.choice([1, 3, 5, 7], size=1 + (j == i + 1), replace=False)):
                lat[(i, j, int(k))] = float(rng.uniform(0.05, 1.0))
                imp[(i, j, int(k))] = float(rng.uniform(0.5, 1.0))
    assert 300 <= len(lat) <= 500
    full = sum(max(v for (a, b, _), v in lat.items() if (a, b) == (l, l + 1)) for l in range(52))
    start = time.perf_counter()
    sol = solve(lat, imp, 52, 0.5 * full, resolution=10000)
    assert time.perf_counter() - start < 1.0
    assert sol.latency <= 0.5 * full


# --------------------------------------------------------------------------- errors


def small_table() -> tuple[dict[Entry, float], dict[Entry, float]]:
    lat = {(0, 1, 3): 1.0, (0, 1, 1): 0.25, (1, 2, 3): 1.0, (1, 2, 1): 0.5, (0, 2, 5): 1.5}
    imp = {e: 1.0 for e in lat}
    return lat, imp


@pytest.mark.parametrize("method,smallest", [("layermerge", "0.75"), ("depth", "1.5")])
def test_infeasible_budget_names_smallest_latency(method: str, smallest: str) -> None:
    lat, imp = small_table()
    with pytest.raises(ValueError, match=rf"smallest achievable latency is {smallest}; "
                                         rf"raise the budget to at least {smallest}"):
        solve(lat, imp, 2, 0.7, method)


def test_infeasible_only_after_discretisation_says_raise_resolution() -> None:
    lat, imp = small_table()  # min true latency 0.75 <= 0.8, but ceil(0.25/0.4)+ceil(0.5/0.4) = 3
    with pytest.raises(ValueError, match=r"smallest achievable latency is 0.75.*raise the resolution"):
        solve(lat, imp, 2, 0.8, resolution=2)
    assert solve(lat, imp, 2, 0.8, resolution=100).latency == 0.75


def test_gap_in_table_is_reported() -> None:
    lat = {(0, 1, 3): 1.0, (2, 3, 3): 1.0}
    imp = {(0, 1, 3): 1.0, (2, 3, 3): 1.0}
    with pytest.raises(ValueError, match=r"does not cover 0\.\.3.*boundary 2"):
        solve(lat, imp, 3, 10.0)
    lat, imp = {(0, 2, 5): 1.0}, {(0, 2, 5): 1.0}
    with pytest.raises(ValueError, match=r"does not cover 0\.\.2 for method 'layeronly'"):
        solve(lat, imp, 2, 10.0, "layeronly")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"method": "fast"}, "unknown method 'fast'; valid methods are layermerge, layeronly, depth"),
        ({"budget": 0.0}, "budget must be a finite positive number"),
        ({"budget": -1.0}, "budget must be a finite positive number"),
        ({"budget": math.inf}, "budget must be a finite positive number"),
        ({"budget": math.nan}, "budget must be a finite positive number"),
        ({"resolution": 0}, "resolution must be >= 1"),
        ({"num_layers": 0}, "num_layers must be >= 1"),
        ({"num_layers": 1}, r"outside 0 <= i < j <= num_layers=1"),
    ],
)
def test_invalid_arguments(kwargs: dict, message: str) -> None:
    lat, imp = small_table()
    args = {"num_layers": 2, "budget": 5.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        solve(lat, imp, **args)


@pytest.mark.parametrize(
    "value,message",
    [(math.nan, r"latency of \(0, 1, 3\) is NaN"), (-0.5, r"latency of \(0, 1, 3\) is negative"),
     (math.inf, "infinite")],
)
def test_invalid_latency(value: float, message: str) -> None:
    lat, imp = small_table()
    lat[(0, 1, 3)] = value
    with pytest.raises(ValueError, match=message):
        solve(lat, imp, 2, 5.0)


def test_mismatched_keys_are_named() -> None:
    lat, imp = small_table()
    del imp[(0, 2, 5)]
    imp[(1, 2, 7)] = 1.0
    with pytest.raises(ValueError, match=r"missing from importance: \(0, 2, 5\); "
                                         r"missing from latency: \(1, 2, 7\)"):
        solve(lat, imp, 2, 5.0)


def test_bad_keys() -> None:
    with pytest.raises(ValueError, match="outside 0 <= i < j"):
        solve({(1, 1, 3): 1.0}, {(1, 1, 3): 1.0}, 2, 5.0)
    with pytest.raises(TypeError, match="triples of ints"):
        solve({(0, 1): 1.0}, {(0, 1): 1.0}, 1, 5.0)
    with pytest.raises(ValueError, match="k must be >= 1"):
        solve({(0, 1, 0): 1.0}, {(0, 1, 0): 1.0}, 1, 5.0)
    with pytest.raises(ValueError, match=r"importance of \(0, 1, 3\) is \+inf"):
        solve({(0, 1, 3): 1.0}, {(0, 1, 3): math.inf}, 1, 5.0)


def test_min_latency_is_the_floor_below_which_solve_fails() -> None:
    from lightning_layermerge.planning.solve import min_latency

    latency = {(0, 1, 3): 2.0, (1, 2, 3): 2.0, (0, 2, 5): 3.0, (0, 2, 1): 1.5, (1, 2, 1): 0.5}
    importance = dict.fromkeys(latency, 1.0)
    assert min_latency(latency, 2) == 1.5  # (0, 2, 1)
    assert min_latency(latency, 2, "layeronly") == 2.5  # single layers only: (0, 1, 3) + (1, 2, 1)
    assert min_latency(latency, 2, "depth") == 3.0  # the largest kernel of each pair: (0, 2, 5)
    solve(latency, importance, 2, 1.5, resolution=64000)
    with pytest.raises(ValueError, match="smallest achievable latency is 1.5"):
        solve(latency, importance, 2, 1.49)


def test_log_objective_prefers_the_merged_segment_the_paper_sum_prefers_two() -> None:
    """Two segments of I = 0.9 against one merged segment of I = 0.95: the paper's sum of I picks
    the two (1.8 > 0.95), the sum of ln I the merged one (-0.05 > -0.21)."""
    from lightning_layermerge.planning import dp_values

    latency = {(0, 1, 3): 1.0, (1, 2, 3): 1.0, (0, 2, 5): 1.0}
    importance = {(0, 1, 3): 0.9, (1, 2, 3): 0.9, (0, 2, 5): 0.95}
    assert solve(latency, dp_values(importance, "exp"), 2, 10.0).segments == [(0, 1, 3), (1, 2, 3)]
    assert solve(latency, dp_values(importance, "log"), 2, 10.0).segments == [(0, 2, 5)]
    assert dp_values({(0, 1, 1): 0.0}, "log") == {(0, 1, 1): -math.inf}  # never chosen
    with pytest.raises(ValueError, match=r"objective must be one of \['log', 'exp'\], got 'sum'"):
        dp_values(importance, "sum")


def test_paired_values_charge_the_protocol_once_not_per_segment() -> None:
    """Keep entries at ln I = -0.01 (the short fine-tune's own cost) against a merged entry at
    -0.015: read as they are, two keeps (-0.02) lose to the merge; read relative to the keep
    entries (offset -0.01), the keeps are 0 and the merge -0.005, so the keeps win."""
    from lightning_layermerge.planning import dp_values
    from lightning_layermerge.planning.objective import protocol_offset

    latency = {(0, 1, 3): 1.0, (1, 2, 3): 1.0, (0, 2, 5): 1.0}
    importance = {(0, 1, 3): math.exp(-0.01), (1, 2, 3): math.exp(-0.01), (0, 2, 5): math.exp(-0.015)}
    trivial = {(0, 1, 3), (1, 2, 3)}
    assert protocol_offset(importance, trivial) == pytest.approx(-0.01)
    assert solve(latency, dp_values(importance, "log"), 2, 10.0).segments == [(0, 2, 5)]
    paired = dp_values(importance, "log", trivial=trivial)
    assert paired[(0, 1, 3)] == 0.0 and paired[(0, 2, 5)] == pytest.approx(-0.005)
    assert solve(latency, paired, 2, 10.0).segments == [(0, 1, 3), (1, 2, 3)]
    exp_paired = dp_values(importance, "exp", trivial=trivial)
    assert exp_paired[(1, 2, 3)] == 1.0 and exp_paired[(0, 2, 5)] == pytest.approx(math.exp(-0.005))
    # Unusable entries stay unusable; a table without finite trivial entries has no offset.
    assert dp_values({(0, 1, 3): 0.0, (0, 2, 5): 0.5}, "log", trivial={(0, 1, 3)})[(0, 1, 3)] == -math.inf
    assert protocol_offset({(0, 1, 3): -math.inf}, {(0, 1, 3)}) == 0.0


def test_trivial_keys_are_the_segments_that_leave_the_network_unchanged() -> None:
    import torch

    from lm_helpers import TinyNet

    from lightning_layermerge import Plan, prune, trace
    from lightning_layermerge.planning.objective import trivial_keys

    torch.manual_seed(0)
    model = TinyNet().eval()
    x = torch.randn(2, 1, 8, 8)
    chain = trace(model, x)
    trivial = trivial_keys(chain)
    assert trivial == {s.key for s in chain.segments if s.j - s.i == 1 and s.convs == (s.j,)}
    assert len(trivial) == chain.num_layers  # one per layer: the layer as it is
    with torch.no_grad():
        for key in trivial:
            assert torch.equal(prune(model, chain, Plan.replacing(chain, key)).eval()(x), model(x))
        others = [s.key for s in chain.segments if s.key not in trivial]
        changed = [k for k in others if not torch.allclose(prune(model, chain, Plan.replacing(chain, k)).eval()(x),
                                                             model(x))]
        assert changed == others  # every other entry changes the network
