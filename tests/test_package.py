"""Package layering: the surgery and planning layers import no Lightning; the public names exist."""

from __future__ import annotations

import subprocess
import sys

import lightning_layermerge


def test_surgery_and_planning_import_no_lightning() -> None:
    code = ("import sys, lightning_layermerge, lightning_layermerge.tables, lightning_layermerge.solve;"
            "print(sorted(m for m in sys.modules if m == 'lightning' or m.startswith(('lightning.', 'pytorch_lightning'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_public_name_resolves() -> None:
    for name in lightning_layermerge.__all__:
        assert getattr(lightning_layermerge, name) is not None, name
    assert lightning_layermerge.LayerMergeCallback.__module__ == "lightning_layermerge.callback"
