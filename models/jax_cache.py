"""Launcher helper: JAX's persistent compilation cache (compiled executables reused across runs)."""

from __future__ import annotations

import importlib.util
import logging
import os

DEFAULT_MAX_BYTES = 4 << 30  # the cache's size bound: jax deletes the least recently used entries past it


def cache_max_bytes() -> int:
    """$DUALPATH_JAX_CACHE_MAX_BYTES (bytes; -1: no bound), else DEFAULT_MAX_BYTES. Every new model, shape or bucket
    set adds entries, and nothing removed them (the soak audit, 2026-12-06: 1,078 entries, 24 MB in two days of tiny
    models here; a real model's executables are far larger)."""
    raw = os.environ.get("DUALPATH_JAX_CACHE_MAX_BYTES", "").strip()
    if not raw:
        return DEFAULT_MAX_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or (value < 1 and value != -1):
        raise ValueError(
            f"DUALPATH_JAX_CACHE_MAX_BYTES={raw!r}: give the compilation cache's bound in bytes, a whole number >= 1, "
            "or -1 for no bound"
        )
    return value


def default_cache_dir() -> str:
    """$XDG_CACHE_HOME/dualpath_jax/xla, or ~/.cache/dualpath_jax/xla where it is unset or not an absolute path (the
    XDG base directory rule; an XDG_CACHE_HOME set elsewhere was ignored)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return os.path.join(xdg if os.path.isabs(xdg) else "~/.cache", "dualpath_jax", "xla")


def _unusable(cache_dir: str) -> str | None:
    """Why this process cannot use the cache directory `cache_dir` (made where missing), or None. jax reads and writes
    every entry under the lock file `.lockfile` in it: a directory or lock file of another user's (a cache root made)
    failed every read and write, a warning per compile."""
    try:
        os.makedirs(cache_dir, exist_ok=True)
        os.close(os.open(os.path.join(cache_dir, ".lockfile"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666))
    except OSError as e:
        return f"{e.strerror or e}: {e.filename}" if e.filename else str(e.strerror or e)
    if not os.access(cache_dir, os.W_OK):
        return "not writable by this user"
    return None


def enable_persistent_compilation_cache(cache_dir: str | None = None) -> str | None:
    """Turn on the on-disk compilation cache (`default_cache_dir()`, or $DUALPATH_JAX_CACHE), bounded by
    `cache_max_bytes()` (4 GiB unless $DUALPATH_JAX_CACHE_MAX_BYTES says otherwise); returns its absolute path, or
    None (warned) where this process cannot write there (a read-only HOME, another user's cache): it runs without."""
    import jax

    max_bytes = cache_max_bytes()  # (checked first: a bad value fails before anything is turned on)

    cache_dir = cache_dir or os.environ.get("DUALPATH_JAX_CACHE") or default_cache_dir()
    # "~/x" from an env file or a Ray runtime_env (no shell expands it) made a directory named "~" in the cwd, and
    # a relative path a cache per working directory (Ray workers each run in their own): one absolute path instead
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    why = _unusable(cache_dir)
    if why is not None:  # (a read-only HOME raised PermissionError here, before anything ran)
        logging.getLogger(__name__).warning(
            "compilation cache %s cannot be used (%s): every program compiles in every process; set "
            "$DUALPATH_JAX_CACHE to a directory of your own",
            cache_dir,
            why,
        )
        return None
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    # Cache every executable: tiny-model steps compile in well under the default 1 s threshold.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if max_bytes != -1 and importlib.util.find_spec("filelock") is None:
        # (jax enforces a bound with filelock only: without it, it warned once and cached nothing at all)
        logging.getLogger(__name__).warning(
            "the compilation cache is not bounded: jax needs the 'filelock' package for a bound (pip install filelock)"
        )
        max_bytes = -1
    jax.config.update("jax_compilation_cache_max_size", max_bytes)
    if max_bytes != -1:
        remove_orphaned_entries(cache_dir)
    return cache_dir


def remove_orphaned_entries(cache_dir: str) -> list[str]:
    """Remove the entries of the bounded cache `cache_dir` that have no `-atime` file, or one this user cannot
    update, under jax's own lock (so no write is in flight): a job killed between jax's write of KEY-cache and of
    KEY-atime (torn, often) or one run with $DUALPATH_JAX_CACHE_MAX_BYTES=-1 (no -atime at all) left one, and jax's
    eviction then failed every later write (FileNotFoundError, a warning per compile: jax-ml/jax#39880, fixed upstream
    after jax 0.10.2); a run as root with this HOME (`sudo -E`, a netns run) left entries whose -atime this user's
    every read of them failed to update (PermissionError, a warning per program, compiled again each run). Returns
    the -cache files removed."""
    import filelock

    removed, others = [], 0
    try:
        lock = filelock.FileLock(os.path.join(cache_dir, ".lockfile"), timeout=30)
        lock.acquire()
    except (filelock.Timeout, OSError) as e:  # (a cache another job holds that long, or one not writable: left as is)
        logging.getLogger(__name__).warning("compilation cache %s: not checked for orphaned entries (%s)", cache_dir, e)
        return removed
    try:  # (released here: a `with lock:` after `acquire()` counted twice, and only the object's collection at
        # return released the file, which jax's own lock instance waits on)
        for name in os.listdir(cache_dir):
            if not name.endswith("-cache"):
                continue
            atime = os.path.join(cache_dir, name[: -len("-cache")] + "-atime")
            if os.path.exists(atime):
                if os.access(atime, os.W_OK):
                    continue
                try:  # (another user's entry: the directory is this user's, so it may go)
                    os.unlink(atime)
                except OSError:
                    continue
                others += 1
            try:
                os.unlink(os.path.join(cache_dir, name))
            except OSError:
                continue
            removed.append(name)
    finally:
        lock.release()
    if removed:
        logging.getLogger(__name__).warning(
            "compilation cache %s: removed %d entries without their -atime file (a job killed while writing one, or "
            "one unbounded) or with another user's (%d; a run as root with this HOME): their executables compile "
            "again",
            cache_dir,
            len(removed),
            others,
        )
    return removed
