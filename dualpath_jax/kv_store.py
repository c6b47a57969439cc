"""Short import path for the KV store: `from dualpath_jax.kv_store import LocalDirStore, make_store`."""

from dualpath_jax.store import (
    STORES,
    BlockFormatError,
    KVStore,
    LocalDirStore,
    LocalDirStoreConfig,
    StoreStats,
    make_store,
)

__all__ = ["STORES", "BlockFormatError", "KVStore", "LocalDirStore", "LocalDirStoreConfig", "StoreStats", "make_store"]
