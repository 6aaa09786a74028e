"""Rebuilding networks from a chain and a plan: the BN-folded original, and a compressed network
from a stored plan (what a checkpoint, a saved file or a diffusers config records).

Both are compositions of :func:`prune` and :func:`merge`, written once here so that every
place that needs them (latency tables, calibration, reports, checkpoint resume, loading) builds
exactly the same network.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import fx, nn

from .capture import ExampleInput
from .graph import Chain, trace
from .merge import merge
from .meta import attach_input_spec
from .plan import Plan
from .prune import prune

__all__ = ["fold_batchnorm", "rebuild_compressed"]


def fold_batchnorm(model: nn.Module, chain: Chain, *, share: bool = False) -> fx.GraphModule:
    """``model`` with nothing removed and every BatchNorm folded into its conv: the reference a
    compressed network's latency is compared with (``merge(prune(model, chain, Plan.keep_all(chain)))``).

    Args:
        model: The network ``chain`` was traced from (left untouched).
        chain: From :func:`trace`.
        share: Passed to :func:`merge`: share the layers outside the chain with the pruned copy
            instead of copying them (for measuring, not for training).
    """
    return merge(prune(model, chain, Plan.keep_all(chain)), share=share)


def rebuild_compressed(original: nn.Module, plan: Mapping[str, Any], example_input: ExampleInput, *,
                       merged: bool) -> fx.GraphModule:
    """The architecture a stored plan describes, built from the uncompressed ``original``.

    Args:
        original: The uncompressed network (any weights; it is not modified).
        plan: ``Plan.to_dict()`` of the stored plan.
        example_input: The input the plan was traced with (e.g. ``example_from_spec(spec)``).
        merged: Also merge (the stored weights are those of the merged network).

    Returns:
        ``prune(original, plan)`` (merged when asked), with the example-input shapes recorded.

    Raises:
        ValueError: The plan was made for another chain than ``original``'s.
    """
    chain = trace(original, example_input)
    net = prune(original, chain, Plan.from_dict(chain, plan))
    if merged:
        net = merge(net)
    attach_input_spec(net, example_input)
    return net
