"""Lightning glue: the :class:`LayerMergeCallback` that plans, prunes, fine-tunes and merges
inside ``trainer.fit``, with its sub-runs, distillation and checkpoint resume.

Only this layer imports Lightning; it builds on :mod:`lightning_layermerge.planning` and
:mod:`lightning_layermerge.surgery`. Import the names from ``lightning_layermerge`` (which
loads this layer on first use) or from the modules here.
"""
