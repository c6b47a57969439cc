"""KV store of Full Blocks (DESIGN.md "Contracts: Store"): the interface, its registry and the backends.

    from dualpath_jax.store import make_store
    store = make_store({"name": "local_dir", "root": "/tmp/kv", "capacity_bytes": 8 << 30}, layout)

Backends are imported here explicitly (no directory scanning) so that they register in STORES. A store of one's own
registers in its own module (`KVStore`'s docstring; the runtime's `config.store` takes its name).
"""

from dualpath_jax.store.api import STORES, KVStore, StoreStats, make_store, store_options_fit
from dualpath_jax.store.block_file import BlockFormatError
from dualpath_jax.store.local_dir import LocalDirStore, LocalDirStoreConfig

__all__ = [
    "STORES",
    "BlockFormatError",
    "KVStore",
    "LocalDirStore",
    "LocalDirStoreConfig",
    "StoreStats",
    "make_store",
    "store_options_fit",
]
