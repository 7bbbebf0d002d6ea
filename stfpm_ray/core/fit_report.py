"""What a training run tells the person running it: one line per category and epoch, one result per category.

Whichever runner drives :func:`~stfpm_ray.core.fit.fit_category` (Ray Train, a benchmark script) prints the
same lines and returns the same :class:`CategoryResult`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from stfpm_ray.core.checkpoint import META_FILE, read_meta
from stfpm_ray.progress import fixed_width_table
from stfpm_ray.store.fs import is_file, resolve


@dataclass
class CategoryResult:
    """Outcome of one category; ``status`` is ``trained``, ``complete`` (kept from before) or ``failed``.

    ``started_at``/``finished_at`` (Unix time, NaN when unknown) bound the worker's training loop, first
    attempt to final checkpoint; ``seconds`` is the category's wall time on the driver, start-up included;
    ``images_per_s`` is the mean training rate of the epochs this run trained.
    """

    category: str
    ok: bool
    error: str | None
    epochs: int
    best_epoch: int
    best_val_loss: float
    threshold: float
    seconds: float
    images_per_s: float
    checkpoint_dir: str | None
    started_at: float
    finished_at: float
    status: str = "trained"

    @classmethod
    def complete(cls, category: str, folder: str) -> CategoryResult | None:
        """The result of ``category`` when its checkpoint is already complete in ``folder``, else None."""
        if not is_file(resolve(folder).join(META_FILE)):
            return None
        meta = read_meta(folder)
        training = meta.training
        return cls(
            category=category,
            ok=True,
            error=None,
            epochs=int(training.get("epochs", 0)),
            best_epoch=int(training.get("best_epoch", -1)),
            best_val_loss=float(training.get("best_val_loss", math.nan)),
            threshold=meta.threshold,
            seconds=float(training.get("seconds", math.nan)),
            images_per_s=math.nan,
            checkpoint_dir=folder,
            started_at=math.nan,
            finished_at=math.nan,
            status="complete",
        )


def format_epoch(category: str, metrics: dict[str, Any], eta_s: float | None = None) -> str:
    """One progress line per category and epoch; ``eta_s``: the category's remaining time."""
    eta = "" if eta_s is None else f", ETA {eta_s // 60:.0f}m{eta_s % 60:02.0f}s"
    return (
        f"[{category}] epoch {metrics['epoch']}/{metrics['epochs']} train_loss={metrics['train_loss']:.5f} "
        f"val_loss={metrics['val_loss']:.5f} best={metrics['best_val_loss']:.5f}@{metrics['best_epoch']} "
        f"{metrics['images_per_s']:.1f} img/s{eta}"
    )


def format_summary(results: list[CategoryResult]) -> str:
    """A fixed-width table a person reads at the end of a run."""
    rows = [
        (
            r.category,
            r.epochs,
            f"{r.best_val_loss:.5f}",
            f"{r.threshold:.5f}",
            f"{r.seconds:.1f}",
            r.status if r.ok else f"failed: {r.error}",
        )
        for r in results
    ]
    return fixed_width_table(("category", "epochs", "best val loss", "threshold", "wall s", "status"), rows, rule=True)
