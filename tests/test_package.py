"""Package layering: surgery and planning import no Lightning, imports point only downward
(fit -> planning -> surgery), the public names exist, and old module paths still import."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_layermerge

PACKAGE = Path(lightning_layermerge.__file__).parent
LAYERS = ("surgery", "planning", "fit")


def test_surgery_and_planning_import_no_lightning() -> None:
    code = ("import lightning_layermerge.planning, lightning_layermerge.surgery, sys; "
            "assert 'lightning' not in sys.modules and 'pytorch_lightning' not in sys.modules, "
            "sorted(m for m in sys.modules if m.startswith(('lightning.', 'pytorch_lightning')))")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_package_face_imports_no_lightning() -> None:
    code = ("import sys, lightning_layermerge, lightning_layermerge.tables; "
            "print(sorted(m for m in sys.modules if m == 'lightning' or m.startswith(('lightning.', 'pytorch_lightning'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _imported_layers(path: Path) -> set[str]:
    """The layers a module of the package imports from (relative or absolute imports)."""
    here = path.relative_to(PACKAGE.parent).with_suffix("").parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(here[:-node.level]) if node.level <= len(here) else []
                target = base + (node.module.split(".") if node.module else [])
            else:
                target = (node.module or "").split(".")
            if target[:1] == ["lightning_layermerge"] and len(target) > 1 and target[1] in LAYERS:
                found.add(target[1])
    return found


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_point_only_downward(layer: str) -> None:
    below = set(LAYERS[: LAYERS.index(layer) + 1])
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        assert _imported_layers(path) <= below, (path, _imported_layers(path) - below)


def test_every_public_name_resolves() -> None:
    for name in lightning_layermerge.__all__:
        assert getattr(lightning_layermerge, name) is not None, name
    assert lightning_layermerge.LayerMergeCallback.__module__ == "lightning_layermerge.fit.callback"


@pytest.mark.parametrize("old", sorted(lightning_layermerge._moved.MOVED))
def test_old_module_path_is_the_new_module(old: str) -> None:
    # Saved files, CLI configs (class_path) and README examples name these paths.
    new = lightning_layermerge._moved.MOVED[old]
    module = importlib.import_module(f"lightning_layermerge.{old}")
    assert module is importlib.import_module(f"lightning_layermerge.{new}")
    assert module.__spec__.name == f"lightning_layermerge.{new}"


def test_saved_file_names_are_unchanged() -> None:
    """Names written into saved files resolve as they did before the package was split."""
    from lightning_layermerge.adapters.diffusers_model import LayerMergeUNet2DModel
    from lightning_layermerge.surgery import allowlists, modules

    assert LayerMergeUNet2DModel.__module__ == "lightning_layermerge.adapters.diffusers_model"
    assert allowlists.FUNCTIONS["lightning_layermerge.modules.stochastic_depth"] is modules.stochastic_depth
    assert "lightning_layermerge.adapters.diffusers._broadcast_timesteps" in allowlists.FUNCTIONS
    assert allowlists.MODULE_CLASSES["lightning_layermerge.modules.DropPath"] is modules.DropPath


def test_importing_an_old_path_keeps_the_package_function() -> None:
    """``prune``, ``merge`` and ``solve`` were modules and are package functions: importing the old
    module path must not rebind the package attribute to the module."""
    code = ("import lightning_layermerge as L, lightning_layermerge.prune, lightning_layermerge.merge, "
            "lightning_layermerge.solve, lightning_layermerge.callback; "
            "assert callable(L.prune) and callable(L.merge) and callable(L.solve), (L.prune, L.merge, L.solve); "
            "assert L.tables is L.planning.tables and L.callback is L.fit.callback")
    subprocess.run([sys.executable, "-c", code], check=True)
