"""Readers that turn public spatial-transcriptomics releases and H&E image folders into tile stores.

Entry point: `python -m histospace_jax.prepare` (see `histospace_jax/prepare.py`); the job itself is
`histospace_jax.ingest.build.prepare(PrepareOptions(...))`.
"""

from histospace_jax.ingest.common import IngestError

__all__ = ["IngestError"]
