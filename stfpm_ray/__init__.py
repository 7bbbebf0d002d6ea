"""STFPM unsupervised anomaly detection as distributed Ray jobs.

The layout follows the pipeline (README: Architecture), bottom to top: ``store`` (storage and the scores
table), ``data`` (images in), ``core`` (the method in PyTorch), ``evaluate``, ``ray`` (the only package that
imports Ray), ``workflows`` (the verbs' steps) and ``cli``.
"""

__version__ = "0.1.0"
