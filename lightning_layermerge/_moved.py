"""Old module paths of this package, kept importable after the split into surgery/planning/fit.

Code and configuration outside the package name modules by their dotted path (a Lightning CLI
config's ``class_path: lightning_layermerge.callback.LayerMergeCallback``, README examples such
as ``from lightning_layermerge.tables import build_latency_table``). Each old path imports as
the very module object of its new path, so classes, functions and module state are shared:
``lightning_layermerge.callback.LayerMergeCallback is lightning_layermerge.fit.callback.LayerMergeCallback``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType

#: Old path -> new path, both below ``lightning_layermerge``.
MOVED: dict[str, str] = {
    "capture": "surgery.capture", "ops": "surgery.ops", "graph": "surgery.graph", "graphdata": "surgery.graphdata",
    "modules": "surgery.modules", "plan": "surgery.plan", "prune": "surgery.prune", "merge": "surgery.merge",
    "serialization": "surgery.serialization",
    "adapters.diffusers": "surgery.adapters.diffusers", "adapters.timm": "surgery.adapters.timm",
    "solve": "planning.solve", "report": "planning.report", "bn_recalibration": "planning.bn_recalibration",
    "tables": "planning.tables", "tables.cache": "planning.tables.cache",
    "tables.importance": "planning.tables.importance", "tables.latency": "planning.tables.latency",
    "tables.noise": "planning.tables.noise", "tables.runtime": "planning.tables.runtime",
    "callback": "fit.callback", "checks": "fit.checks", "distill": "fit.distill", "planner": "fit.planner",
    "resume": "fit.resume", "subruns": "fit.subruns", "target": "fit.target",
}
_PACKAGE = __name__.rpartition(".")[0]


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old path to the module already (or now) imported under its new path."""

    def __init__(self) -> None:
        self._real_specs: dict[str, ModuleSpec | None] = {}

    def find_spec(self, fullname: str, path=None, target=None) -> ModuleSpec | None:
        """A spec for ``fullname`` when it is an old path of this package, else ``None``."""
        prefix = _PACKAGE + "."
        if not fullname.startswith(prefix) or fullname[len(prefix):] not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=f"{prefix}{MOVED[fullname[len(prefix):]]}")

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        """The module of the new path (imported if it is not yet)."""
        module = importlib.import_module(str(spec.origin))
        self._real_specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run; undo the import system's overwrite of ``__spec__`` by the alias's spec."""
        # importlib sets __spec__ on whatever create_module returns; the module keeps its own so that
        # reload and tools that read __spec__.name see the real path.
        module.__spec__ = self._real_specs.pop(module.__name__, module.__spec__)


def install() -> None:
    """Make the old paths importable (once).

    Old paths whose module is imported already (surgery and planning, which the package face
    loads) go straight into ``sys.modules``: importing a module that is there never rebinds the
    package attribute of the same name, so ``import lightning_layermerge.prune`` leaves the
    function ``lightning_layermerge.prune`` as it is. The rest (the Lightning layer, imported
    on first use only) is resolved by a finder placed first on ``sys.meta_path``, ahead of the
    path-based finder, so that an old submodule path is never found a second time as a file.
    """
    for old, new in MOVED.items():
        module = sys.modules.get(f"{_PACKAGE}.{new}")
        if module is not None:
            sys.modules.setdefault(f"{_PACKAGE}.{old}", module)
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())


def moved_module(name: str) -> ModuleType | None:
    """The module an old top-level path ``name`` (``"tables"``, ``"callback"``) now is; ``None`` if
    ``name`` is no old path. For the package's ``__getattr__``: ``lightning_layermerge.tables``."""
    if name not in MOVED:
        return None
    return importlib.import_module(f"{_PACKAGE}.{MOVED[name]}")
