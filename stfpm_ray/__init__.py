"""STFPM unsupervised anomaly detection as distributed Ray jobs.

The layout follows the pipeline (README: Architecture): ``core`` (the method), ``data``, ``store``,
``evaluate``, then ``ray`` (the only package that imports Ray) and ``cli``.
"""

__version__ = "0.1.0"
