"""Submodules by dotted attribute path (``"model"``, ``"net.backbone"``): how the callback finds
and replaces the network it compresses inside a LightningModule."""

from __future__ import annotations

from torch import nn

__all__ = ["get_path", "set_path"]


def get_path(root: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path`` (``AttributeError`` naming the missing part)."""
    return root.get_submodule(path)


def set_path(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` by ``module``."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)
