"""CompressionState: the versioned plan state checkpoints store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_layermerge.fit.state import STATE_VERSION, CompressionState

OLD_CHECKPOINT = Path(__file__).parent / "fixtures" / "callback_v1_8bead90.pt"


@pytest.fixture(scope="module")
def old_state() -> dict:
    """The state the first callback version wrote (no merged/original_weights/table facts)."""
    return torch.load(OLD_CHECKPOINT, weights_only=True)["layermerge"]


def test_state_of_the_first_callback_version_loads(old_state: dict) -> None:
    state = CompressionState.from_dict(old_state)
    assert state.version == STATE_VERSION == 1
    assert state.target == "model" and state.budget == 0.7 and state.method == "layermerge"
    assert state.plan == old_state["plan"] and state.inputs == old_state["inputs"]
    assert state.monitor == "layermerge/train_loss" and state.training_loss is True
    # Keys it did not write read as unknown.
    assert state.merged is False and state.original_weights is None and state.latency_settings is None
    assert state.table_max_spread is None and state.table_unreliable is None
    stored = state.to_dict()
    assert {k: stored[k] for k in old_state} == old_state  # nothing it wrote is lost or changed


def test_unknown_keys_survive_a_round_trip(old_state: dict) -> None:
    state = CompressionState.from_dict({**old_state, "written_by_a_later_minor": [1, 2]})
    assert state.extra == {"written_by_a_later_minor": [1, 2]}
    assert state.to_dict()["written_by_a_later_minor"] == [1, 2]
    assert CompressionState.from_dict(state.to_dict()) == state


def test_a_newer_version_or_a_state_without_plan_is_refused(old_state: dict) -> None:
    with pytest.raises(ValueError, match="newer than this lightning_layermerge reads"):
        CompressionState.from_dict({**old_state, "version": STATE_VERSION + 1})
    with pytest.raises(ValueError, match="no plan"):
        CompressionState.from_dict({"target": "model"})


def test_a_bare_plan_is_a_state_and_updated_merges(old_state: dict) -> None:
    bare = CompressionState.from_dict({"plan": old_state["plan"]})
    assert bare.target is None and bare.calibration == [] and bare.load_note == ""
    merged = bare.updated({"target": "net", "merged": True})
    assert (merged.target, merged.merged, merged.plan) == ("net", True, old_state["plan"])
    assert bare.target is None  # updated returns a new state
