"""Exported graphs kept beside a scores table, so that a nightly run with ``--runtime onnxruntime|openvino``
exports a category's model once, not every night.

Exporting costs seconds per category on the driver before any actor starts (about 6 s at 256 px on the 2-core
machine), while checkpoints change rarely. A graph is kept as ``OUT_DIR/_stfpm/graphs/<category>/<key>.onnx``
(:func:`stfpm_ray.core.export.graph_key`: the model id and what built the graph), one per category: keeping a
new one deletes the category's older ones. A kept graph is only a shortcut: every run still checks it against
PyTorch (:func:`stfpm_ray.core.exported.check_parity`) and exports again when it fails or cannot be read."""

from __future__ import annotations

from stfpm_ray.store.fs import Location, list_dir, read_bytes, write_bytes_atomic
from stfpm_ray.store.lease import STATE

GRAPHS = f"{STATE}/graphs"


class GraphCache:
    """The graphs kept in one table folder (``location``), by category and key."""

    def __init__(self, location: Location) -> None:
        self.folder = location.join(GRAPHS)

    def _file(self, category: str, key: str) -> Location:
        return self.folder.join(category, f"{key}.onnx")

    def get(self, category: str, key: str) -> bytes | None:
        """The kept graph, or None when there is none (or it cannot be read: the caller exports again)."""
        try:
            return read_bytes(self._file(category, key))
        except OSError:  # missing (InputNotFoundError is one) or unreadable
            return None

    def put(self, category: str, key: str, graph: bytes) -> None:
        """Keep ``graph`` as the category's one graph."""
        kept = self._file(category, key)
        write_bytes_atomic(kept, graph)
        for entry in list_dir(self.folder.join(category)):
            if entry.path != kept.path:
                kept.filesystem.delete_file(entry.path)
