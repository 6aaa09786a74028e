"""Library-facing model types whose import path is written into saved files.

diffusers records a pipeline component by its class's module, so
:class:`~lightning_layermerge.adapters.diffusers_model.LayerMergeUNet2DModel` is saved as
``["lightning_layermerge.adapters.diffusers_model", "LayerMergeUNet2DModel"]`` and must keep that
module path. The model-family registry itself (leaves, decompositions, forwards, portable
stand-ins, wrappers) lives in :mod:`lightning_layermerge.surgery.adapters`; its registration
functions are re-exported here so that code written against this older path keeps working.
"""

from ..surgery.adapters import (
    install_forwards,
    is_leaf,
    normalise,
    portable,
    register_activation,
    register_decomposition,
    register_forward,
    register_identity,
    register_leaf,
    register_portable,
    register_wrapper,
    unwrap_compressed,
    wrap_compressed,
)

__all__ = [
    "install_forwards", "is_leaf", "normalise", "portable", "register_activation", "register_decomposition",
    "register_forward", "register_identity", "register_leaf", "register_portable", "register_wrapper",
    "unwrap_compressed", "wrap_compressed",
]
