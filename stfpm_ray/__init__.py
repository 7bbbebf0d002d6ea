"""STFPM unsupervised anomaly detection as distributed Ray jobs.

The core (model, loss, anomaly map, checkpoints, data) is plain PyTorch and runs without Ray;
``stfpm_ray.ray_train``, ``stfpm_ray.ray_score`` and ``stfpm_ray.evaluate`` are thin Ray layers over it.
"""

__version__ = "0.1.0"
