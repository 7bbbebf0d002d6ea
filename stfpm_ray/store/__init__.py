"""Bytes in and out: the one storage layer (local paths and URIs), the scores table and how a run publishes
into it, the writer's lease, map encoding and the training output folder."""
