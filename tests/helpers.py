"""Shared test helpers: random plans, recipe scripts; BatchNorm statistics and error measures come from
:mod:`lightning_layermerge.surgery.testing` (shared with the benchmark recipes)."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType

from lightning_layermerge import Chain, Plan
from lightning_layermerge.surgery.testing import calibrate_batchnorm, float_sensitivity, randomize_batchnorm, rel_err

__all__ = ["calibrate_batchnorm", "float_sensitivity", "load_recipe", "randomize_batchnorm", "random_plan", "rel_err"]


def random_plan(chain: Chain, rng: random.Random) -> Plan:
    """``Plan.random``: a uniformly random walk over legal segments from position 0 to L."""
    return Plan.random(chain, rng)


def load_recipe(path: Path) -> ModuleType:
    """Import a recipe script under a name unique to its folder.

    Several recipes have a ``main.py``; importing them all as ``main`` in one pytest session
    would return whichever came first. The script's folder goes on ``sys.path`` for its
    sibling imports (``from classifier import ...``).
    """
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = f"recipe_{path.parent.name}_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
