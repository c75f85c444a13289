"""MultiMix on Ray: semi-supervised multi-task chest X-ray classification + lung segmentation.

Pure-torch core (no Ray): :mod:`multimix.model`, :mod:`multimix.objective`,
:mod:`multimix.engine`, :mod:`multimix.metrics`, :mod:`multimix.data.augment`.
Ray layer (orchestration only): :mod:`multimix.data.pipeline`, :mod:`multimix.train`,
:mod:`multimix.evaluate`, ``ray_jobs/``.
"""

__version__ = "0.1.0"
