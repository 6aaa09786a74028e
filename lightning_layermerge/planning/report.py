"""What a compression run did, in numbers and one picture (torch + matplotlib, no Lightning).

:class:`LayerMergeReport` is produced by ``LayerMergeCallback`` at the end of a fit and can
be built by hand from the functional API. Every speed-up in it is relative to the original
network *with BatchNorm folded* (``merge`` of the keep-all plan): folding BatchNorm alone is
not compression (any deployment folds it). Measured latencies come from
:func:`~lightning_layermerge.planning.side_by_side.side_by_side`: both networks timed on the
same device, batch, dtype and thread count, interleaved forward by forward, median.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .side_by_side import SideBySide, measure_side_by_side, side_by_side  # re-exported: their former home
from .tables.allocator import allocator_regime
from .tables.latency import LatencySettings

__all__ = ["LayerMergeReport", "SideBySide", "count_parameters", "measure_side_by_side", "side_by_side"]


@dataclass
class LayerMergeReport:
    """Outcome of compressing one network to a latency budget.

    Attributes:
        budget: Target latency as a fraction of the original (BN-folded) latency.
        method: ``"layermerge"``, ``"layeronly"`` or ``"depth"``.
        target: Attribute path of the compressed submodule.
        num_layers: L, convolutions on the chain.
        layer_names: Module name of each chain conv (1..L).
        segments: The plan as ``(i, j, k)`` triples covering 0..L.
        kept_activations: Positions (1..L-1) whose activation is kept.
        kept_convs: Chain convs (1..L) that are kept.
        irreducible: Convs that can never be removed (input/output shapes differ).
        latency_settings: How latency was measured (device, batch size, dtype, threads, ...).
        table_original_ms: Whole original network, BN folded, from the latency table.
        predicted_ms: The plan's latency predicted by the table (outside-chain part included).
        measured_original_ms: Original network, BN folded, measured at the end of the run.
        measured_ms: The compressed network, measured side by side with the original.
        params_before: Parameters of the original target.
        params_after: Parameters of the compressed (merged, if merging succeeded) target.
        monitor: Name of the metric used as Perf (importance and before/after comparison).
        mode: ``"min"`` or ``"max"``: which direction of ``monitor`` is better.
        metric_before: ``monitor`` of the original network on the held-out subset.
        metric_after: ``monitor`` of the compressed network on the same subset.
        merged: Whether the final network is the merged one (False: merge check failed and
            the pruned network was kept).
        merge_max_error: Max relative difference between merged and pruned outputs on the
            example input.
        calibration: The candidates timed side by side before fine-tuning (``"measured"``
            and ``"predicted"`` ratio each, and the measured ``"spread"``); the plan is the
            best one that fit the budget.
        measured_spread: Spread of the measured ratio (:func:`side_by_side`): how far the
            ratios of :data:`~lightning_layermerge.tables.latency.SPREAD_BLOCKS` consecutive
            blocks of pass pairs disagree, relative to the median (0.02: within 2 %).
        table_build_s: Seconds spent measuring the latency table (0 when it came from the cache).
        table_max_spread: Largest spread of any latency-table timing.
        table_unreliable: How many latency-table timings stayed above the settings' ``max_spread``
            after re-measuring (the build warned of them); ``None``: not known (a table from an
            older checkpoint). Above 0, the table's prices may be off by more than its spread
            limit, and the measured ratio is the number to trust.
        load_note: What a busy machine made the measurements do (``""``: nothing).
        importance: How far the importance table can be trusted
            (``tables.noise.NoiseLevel.as_dict()``): ``sigma`` of Perf of the unmodified
            network over repeats, ``entries``, ``distinguishable`` (entries beyond 2 sigma),
            ``steps_per_entry``, ``score_samples``, ``build_seconds``. Empty if not built.
    """

    budget: float
    method: str
    target: str
    num_layers: int
    layer_names: list[str]
    segments: list[tuple[int, int, int]]
    kept_activations: list[int]
    kept_convs: list[int]
    irreducible: list[int]
    latency_settings: dict[str, Any] = field(default_factory=dict)
    table_original_ms: float | None = None
    predicted_ms: float | None = None
    measured_original_ms: float | None = None
    measured_ms: float | None = None
    params_before: int | None = None
    params_after: int | None = None
    monitor: str | None = None
    mode: str = "min"
    metric_before: float | None = None
    metric_after: float | None = None
    merged: bool = False
    merge_max_error: float | None = None
    calibration: list[dict[str, Any]] = field(default_factory=list)
    importance: dict[str, Any] = field(default_factory=dict)
    measured_spread: float | None = None
    table_build_s: float | None = None
    table_max_spread: float | None = None
    table_unreliable: int | None = None
    load_note: str = ""

    # ------------------------------------------------------------------ derived numbers

    @property
    def predicted_ratio(self) -> float | None:
        """Predicted latency / original (table), e.g. 0.58."""
        return _ratio(self.predicted_ms, self.table_original_ms)

    @property
    def measured_ratio(self) -> float | None:
        """Measured latency / measured original, e.g. 0.57."""
        return _ratio(self.measured_ms, self.measured_original_ms)

    @property
    def predicted_speedup(self) -> float | None:
        """Original / predicted latency."""
        return _ratio(self.table_original_ms, self.predicted_ms)

    @property
    def measured_speedup(self) -> float | None:
        """Measured original / measured compressed latency."""
        return _ratio(self.measured_original_ms, self.measured_ms)

    @property
    def within_budget(self) -> bool | None:
        """Whether the measured ratio is at most the budget plus 5 % timing tolerance."""
        ratio = self.measured_ratio
        return None if ratio is None else ratio <= self.budget * 1.05

    # ------------------------------------------------------------------ exports

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field and derived number."""
        data = asdict(self)
        data["segments"] = [list(s) for s in self.segments]
        for name in ("predicted_ratio", "measured_ratio", "predicted_speedup", "measured_speedup", "within_budget"):
            data[name] = getattr(self, name)
        return data

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON to ``path``; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def metrics(self, prefix: str = "layermerge/") -> dict[str, float]:
        """The scalar numbers, for ``logger.log_metrics`` (None values left out)."""
        values = {
            "budget": self.budget,
            "table_original_ms": self.table_original_ms,
            "predicted_ms": self.predicted_ms,
            "predicted_speedup": self.predicted_speedup,
            "measured_original_ms": self.measured_original_ms,
            "measured_ms": self.measured_ms,
            "measured_speedup": self.measured_speedup,
            "measured_ratio": self.measured_ratio,
            "kept_activations": len(self.kept_activations),
            "kept_convs": len(self.kept_convs),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "metric_before": self.metric_before,
            "metric_after": self.metric_after,
            "merged": float(self.merged),
            "importance_sigma": self.importance.get("sigma"),
            "importance_entries": self.importance.get("entries"),
            "importance_distinguishable": self.importance.get("distinguishable"),
            "importance_steps_per_entry": self.importance.get("steps_per_entry"),
            "importance_build_seconds": self.importance.get("build_seconds"),
            "measured_spread": self.measured_spread,
            "table_build_s": self.table_build_s,
            "table_max_spread": self.table_max_spread,
            "table_unreliable": self.table_unreliable,
        }
        return {prefix + k: float(v) for k, v in values.items() if v is not None and not _nan(v)}

    def __str__(self) -> str:
        return self.to_text()

    def to_text(self) -> str:
        """A readable multi-line summary."""
        ls = self.latency_settings
        where = ", ".join(f"{k}={ls[k]}" for k in ("runtime", "memory_format", "device", "batch_size", "dtype",
                                                   "threads", "clock", "allocator", "precision") if k in ls)
        lines = [
            f"LayerMerge report ({self.method}, target '{self.target}', budget {self.budget:g})",
            f"  plan             : {len(self.segments)} merged layers; kept {len(self.kept_convs)}/{self.num_layers} convs, "
            f"{len(self.kept_activations)}/{max(self.num_layers - 1, 0)} activations",
            f"  segments (i,j,k) : {' '.join(f'({i},{j},{k})' for i, j, k in self.segments)}",
            f"  latency          : {where}",
            f"    repeatability        : measured ratio spread {_pct(self.measured_spread)}, table max spread "
            f"{_pct(self.table_max_spread)}{self._unreliable_text()}, table measured in {_sec(self.table_build_s)}"
            + (f"\n    load                 : {self.load_note}" if self.load_note else ""),
            f"    original (BN folded) : table {_ms(self.table_original_ms)}, measured {_ms(self.measured_original_ms)}",
            f"    compressed           : predicted {_ms(self.predicted_ms)} ({_x(self.predicted_ratio)} of original, "
            f"speed-up {_s(self.predicted_speedup)})",
            f"                           measured {_ms(self.measured_ms)} ({_x(self.measured_ratio)} of original, "
            f"speed-up {_s(self.measured_speedup)})",
            f"  parameters       : {_n(self.params_before)} -> {_n(self.params_after)}{self._growth_text()}",
            f"  {self.monitor or 'metric'} ({self.mode}) : {_f(self.metric_before)} -> {_f(self.metric_after)}",
            f"  importance table : {self._importance_text()}",
            f"  calibration      : {self._calibration_text()}",
            f"  merged           : {'yes' if self.merged else 'no (pruned network kept)'}"
            + (f", max rel. error vs pruned {self.merge_max_error:.2e}" if self.merge_max_error is not None else ""),
        ]
        return "\n".join(lines)

    def _unreliable_text(self) -> str:
        """Says so when the table's build left timings above the spread limit (it warned then, too)."""
        if not self.table_unreliable:
            return ""
        limit = self.latency_settings.get("max_spread")
        limit_text = f" above the {limit:.0%} limit" if isinstance(limit, (int, float)) else " unrepeatable"
        return (f" ({self.table_unreliable} timing(s){limit_text}: prices may be off by more, "
                "trust the measured ratio)")

    def _growth_text(self) -> str:
        """Why a faster network can have more parameters."""
        if self.params_before is None or self.params_after is None or self.params_after <= self.params_before:
            return ""
        return ("\n                     (more parameters, yet faster: merging a depthwise conv with a dense one, or "
                "several convs into one larger kernel, makes a dense conv that replaces several layers and their "
                "memory traffic; latency, not parameter count, is what the budget measures)")

    def _importance_text(self) -> str:
        imp = self.importance
        if not imp:
            return "not built here (plan given or restored)"
        how = ("head probe (no training step)" if imp.get("method") == "probe" else
               f"{imp.get('steps_per_entry')} steps each")
        text = f"{imp.get('entries')} entries, {how}, scored on {imp.get('score_samples')} samples"
        if imp.get("build_seconds") is not None:
            text += f", built in {imp['build_seconds']:.0f} s"
        if imp.get("perfs"):
            text += f"; noise sigma {imp['sigma']:.3g} of Perf ({len(imp['perfs'])} repeats"
            if imp.get("sigma_entries") is not None:
                text += (f"; unmodified {imp['sigma_original']:.3g}, "
                         f"{len(imp['entry_perfs'])} entries {imp['sigma_entries']:.3g}")
            text += f"), {imp.get('distinguishable')} entries beyond 2 sigma"
        if imp.get("paired_offset") is not None:
            text += (f"; read relative to the unmodified network through the same protocol (ln I offset "
                     f"{imp['paired_offset']:+.4f})")
        return text

    def _calibration_text(self) -> str:
        if not self.calibration:
            return "none (plan given, or calibrate=False)"
        rounds = ", ".join(f"{c['predicted']:.3f}->{c['measured']:.3f}"
                           + (f" (±{c['spread']:.1%})" if c.get("spread") is not None and not _nan(c["spread"]) else "")
                           for c in self.calibration)
        return f"{len(self.calibration)} candidate(s) timed before fine-tuning (predicted->measured: {rounds})"

    def plot(self, path: str | Path) -> Path:
        """Draw the plan over the layer chain and predicted vs measured latency as a PNG.

        Top: one column per chain conv (filled: kept, hollow: removed, hatched: irreducible),
        a marker at each kept activation, and a bracket per merged layer labelled with its
        kernel size. Bottom: latency of the compressed network relative to the original,
        predicted by the table and measured side by side, against the budget.

        Returns:
            The written path.
        """
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.45 * self.num_layers + 2), 6.2),
                                          gridspec_kw={"height_ratios": [1.2, 1]})
        try:
            self._draw_plan(top)
            self._draw_latency(bottom)
            fig.suptitle(f"LayerMerge: {self.target}, budget {self.budget:g} ({self.method})")
            fig.tight_layout()
            fig.savefig(path, dpi=110)
        finally:
            plt.close(fig)
        return path

    def _draw_plan(self, ax: Any) -> None:
        kept, irr = set(self.kept_convs), set(self.irreducible)
        for layer in range(1, self.num_layers + 1):
            ax.add_patch(_box(layer, kept=layer in kept, irreducible=layer in irr))
        for a in self.kept_activations:
            ax.plot(a + 0.5, 0.5, marker="^", color="tab:red", markersize=8)
        for n, (i, j, k) in enumerate(self.segments):
            y = -0.25 - 0.25 * (n % 2)
            ax.plot([i + 0.6, j + 0.4], [y, y], color="tab:blue", linewidth=2)
            ax.text((i + j) / 2 + 0.5, y - 0.22, f"k{k}", ha="center", va="top", fontsize=8, color="tab:blue")
        ax.set_xlim(0.3, self.num_layers + 0.7)
        ax.set_ylim(-1.1, 1.3)
        ax.set_yticks([])
        ax.set_xticks(range(1, self.num_layers + 1))
        if self.num_layers <= 24:
            ax.set_xticklabels([f"{l}\n{_short(n)}" for l, n in enumerate(self.layer_names, 1)], fontsize=6)
        ax.set_title(f"plan: {len(self.kept_convs)}/{self.num_layers} convs kept (filled), "
                     f"{len(self.kept_activations)} activations kept (▲), merged layers (blue, kernel)", fontsize=9)

    def _draw_latency(self, ax: Any) -> None:
        """Latency relative to the original (each source against its own original), ms on the bars."""
        groups = [("predicted (table)", self.table_original_ms, self.predicted_ms, "tab:gray"),
                  ("measured (side by side)", self.measured_original_ms, self.measured_ms, "tab:green")]
        for offset, (label, original, compressed, color) in zip((-0.18, 0.18), groups):
            for x, ms in ((0, original), (1, compressed)):
                ratio = _ratio(ms, original)
                ax.bar(x + offset, ratio or 0.0, width=0.36, color=color, label=label if x == 0 else None)
                if ms is not None:
                    ax.text(x + offset, (ratio or 0.0) + 0.02, f"{ms:.2f} ms", ha="center", fontsize=7)
        ax.axhline(self.budget, color="tab:red", linestyle="--", linewidth=1, label=f"budget {self.budget:g}")
        ax.set_xticks([0, 1])
        ax.set_xticklabels(["original (BN folded)", "compressed"])
        ax.set_ylabel("latency / original")
        ax.set_ylim(0, 1.25)
        ls = self.latency_settings
        ax.set_title(f"{ls.get('runtime', 'eager')}, {ls.get('device', '?')}, batch {ls.get('batch_size', '?')}, "
                     f"{ls.get('dtype', '?')}, threads {ls.get('threads', '?')}; measured speed-up "
                     f"{_s(self.measured_speedup)} (spread {_pct(self.measured_spread)})", fontsize=9)
        ax.legend(fontsize=8, loc="upper right")


def _box(layer: int, *, kept: bool, irreducible: bool) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((layer - 0.35, 0.1), 0.7, 0.8, facecolor="tab:blue" if kept else "white",
                     edgecolor="black", hatch="//" if irreducible else None, alpha=0.8 if kept else 1.0)


def _short(name: str, width: int = 10) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def _nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _pct(v: float | None) -> str:
    return "n/a" if v is None or _nan(v) else f"{v:.1%}"


def _sec(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f} s"


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f} ms"


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}x"


def _s(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _n(v: int | None) -> str:
    return "n/a" if v is None else f"{v:,}"


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements of ``module``."""
    return sum(p.numel() for p in module.parameters())


def settings_dict(settings: LatencySettings) -> dict[str, Any]:
    """The latency settings as a dict, with the thread count, clock and allocator regime actually used filled in."""
    data = asdict(settings)
    data["threads"] = settings.threads_used
    data["clock"] = settings.clock_used
    data["allocator"] = allocator_regime(settings.allocator)
    return data
