"""Data: the tile store every dataset is converted into, Grain input pipelines over it, and the demo data."""

from histospace_jax.data.store import StoreError, StoreWriter, TileStore, open_store, write_store

__all__ = ["StoreError", "StoreWriter", "TileStore", "open_store", "write_store"]
