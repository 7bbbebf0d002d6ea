"""STFPM unsupervised anomaly detection as distributed Ray jobs.

The core (model, loss, anomaly map, checkpoints, data, metrics) is plain PyTorch/numpy and runs without
Ray; ``stfpm_ray.ray.train`` and ``stfpm_ray.ray.score`` are thin Ray layers over it, and
``stfpm_ray.evaluate.evaluation`` reads their Parquet output with pyarrow alone.
"""

__version__ = "0.1.0"
