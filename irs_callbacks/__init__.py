"""Diversity-aware training callbacks built on the Image Retrieval Score (IRS).

Importing this package is cheap: it loads nothing heavy (no torch) until a name is used, so
the ``irs`` command-line tool starts fast. Layers, each depending only on those before it:

- :mod:`irs_callbacks.stats` -- coupon-collector statistics (numpy/scipy only);
- :mod:`irs_callbacks.features`, :mod:`irs_callbacks.retrieval`, :mod:`irs_callbacks.reference`
  -- feature extractors, nearest-neighbour search and reference banks (torch, timm, faiss);
- :mod:`irs_callbacks.monitor` -- :class:`IRSMonitor`, the training-loop callback;
- :mod:`irs_callbacks.lightning` -- the Lightning integration (optional extra).
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it (resolved on first attribute access, PEP 562)
_LAZY = {
    # statistics
    "expected_irs": "stats",
    "log_stirling2": "stats",
    "log_pmf_distinct": "stats",
    "irs_infinity": "stats",
    "IRSEstimate": "stats",
    "adjusted_irs": "stats",
    "rejection_threshold": "stats",
    "SequentialRejectionTest": "stats",
    # features, retrieval, reference banks
    "get_extractor": "features",
    "list_extractors": "features",
    "register_extractor": "features",
    "extract_features": "features",
    "FeatureExtractor": "features",
    "FeatureBank": "retrieval",
    "ShardedFeatureBank": "retrieval",
    "LearnedSet": "retrieval",
    "ReferenceBank": "reference",
    "RetrievalScore": "reference",
    # monitor and what it is made of
    "IRSMonitor": "monitor",
    "MonitorOptions": "monitor",
    "ReferenceConfig": "reference_setup",
    "EvaluationEngine": "evaluation",
    "EvaluationResult": "evaluation",
    "as_sampler": "samplers",
    "Sampler": "samplers",
    "PipelineSampler": "samplers",
    "CallableSampler": "samplers",
    "CheckpointPruner": "pruning",
    "read_history": "history",
    "EvaluationRecord": "history",
    "EarlyStopping": "stopping",
    "latest_checkpoint": "checkpoints",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'irs_callbacks' has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
