"""The verbs, one module each (score, nightly, train, benchmark): each reads top to bottom as the steps an
operator would list, calling the store, data and core layers for the work and ``stfpm_ray.ray`` for the
distributed steps. A new verb (recalibration, table maintenance, export) is a new module here and a thin
module in ``stfpm_ray.cli``."""
