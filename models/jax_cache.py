"""Launcher helper: JAX's persistent compilation cache (compiled executables reused across runs)."""

from __future__ import annotations

import os


def enable_persistent_compilation_cache(cache_dir: str | None = None) -> str:
    """Turn on the on-disk compilation cache (default ~/.cache/dualpath_jax/xla, or $DUALPATH_JAX_CACHE); returns its
    absolute path."""
    import jax

    cache_dir = cache_dir or os.environ.get("DUALPATH_JAX_CACHE") or "~/.cache/dualpath_jax/xla"
    # "~/x" from an env file or a Ray runtime_env (no shell expands it) made a directory named "~" in the cwd, and
    # a relative path a cache per working directory (Ray workers each run in their own): one absolute path instead
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    # Cache every executable: tiny-model steps compile in well under the default 1 s threshold.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return cache_dir
