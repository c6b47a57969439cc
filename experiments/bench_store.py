"""KV store benchmark: store reads/writes vs raw os.preadv/os.write of the same bytes in the same files.

    python -m experiments.bench_store                      # DeepSeek-V3-like and Qwen2.5-32B-like layouts
    python -m experiments.bench_store --total_mb=512 --repeats=5 --root=/mnt/3fs/bench --out=/tmp/store.json

Measures, per layout, with a warm page cache unless said (the store's own overhead, not the disk's speed):
- Full Block reads, one thread: LocalDirStore.read with the defaults (xxh3, read_method="mmap": with the compiled
  loops each Layer Block hashed through a mapping of the file, then copied with non-temporal stores), with
  read_method="preadv" (each 256 KiB chunk preadv'ed, then hashed), the same two with the Python loops
  (native_verify=False: the previous code), verify=False (header checks only), the old default (wsum64,
  read-all-then-check) and crc32, and with --compare_tree another source tree's store (e.g. the last commit's),
  all vs raw `open + os.preadv + close` of the same payload bytes (goal >= 0.9x); also a sweep of
  read_chunk_bytes of the Python loops' mmap reads;
- the first read of a freshly opened file: each store with fd_cache=0 streaming over all blocks beside raw preadv,
  one pair at a time ("in pairs": no kept mapping, no third variant's reads in between);
- with --cold_blocks, reads from the disk (pages dropped first; every store's open files closed, since mapped pages
  are not dropped) and re-reads of the blocks after each variant's own cold read (through fresh mappings, vs raw
  preadv of the same cached pages): how a cold read brings pages in decides what later mappings cost (the preadv
  store with and without `populate_cold`, which brings a cold block in through a huge-page-advised mapping);
- the same with the store's I/O pool (`read_many`, --threads) vs raw preadv from a pool of as many threads;
- Layer-Block reads (each layer of each block read on its own, the layerwise pattern) vs Full-Block reads, with
  both read methods and with every verified read mapped (mmap_min_bytes=0), which sets where mapping starts;
- writes (atomic: temp file + rename, not durable) vs raw `open + writev + close` of the same bytes;
- the checksum algorithms alone.
The "1 thread" rows read each block by every variant back to back, each into a reused buffer of its own (paired
in time, but the block's bytes are then cache-resident for all but the first variant: the cost of the checksum
pass shows fully); the "streaming" rows read into one buffer per block with the variants interleaved on blocks far apart
(the pool rows: on batches of blocks), so source and destination come from DRAM as in serving. Times are sums
over blocks (batches) of each one's best of --repeats (after one untimed pass of every variant: first opens,
mappings, page faults), which keeps a shared machine's load spikes out; the "ratio of means" column counts every
repeat (raw preadv's own speed varies ~2x between processes here, so read both).
Each row also gives the process CPU time (all threads) per GB, next to the baseline's, and the load average.
`run_store_bench(...)` returns the rows (list of dicts) for experiments/bench_io.py to include.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import tempfile
import time
import types
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dualpath_jax.block_keys import keys_from_hash_ids, root_key
from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.store import LocalDirStore, block_file, local_dir
from experiments import (
    define_rerun_of,
    parse_flags_checking_rerun,
    register_distinct,
    run_parts_then_write,
    writable_dir_or_exit,
    writable_file_or_exit,
    write_rows_json,
)

# DeepSeek-V3 MLA cache in FP8 (PAPER.md: ~656 B/token/layer, 61 layers): 2.4 MiB Full Blocks, 41 KiB Layer
# Blocks. Qwen2.5-32B fp16 (64 layers x 8 kv heads x 128 x 2 x 2 B = 4 KiB/token/layer): 16 MiB Full Blocks.
LAYOUTS = {
    "deepseek_v3_fp8": BlockLayout(61, 64, 656, "bench/deepseek-v3-fp8"),
    "qwen2.5_32b_fp16": BlockLayout(64, 64, 4096, "bench/qwen2.5-32b-fp16"),
}


def _best(fn, repeats: int) -> float:
    """Best-of-`repeats` seconds of fn() (noise on a shared machine only ever adds time)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


class Timings(dict):
    """Seconds per variant (a dict: sums over items of each one's best time), `mean[name]`: the same work's mean
    seconds per pass (every repeat counted), and `cpu[name]`: its process CPU seconds (all threads), averaged
    over the repeats (how many cores' worth the variant used: cpu / seconds)."""

    def __init__(self, seconds: dict, cpu: dict, mean: dict):
        super().__init__(seconds)
        self.cpu = cpu
        self.mean = mean


def _paired(variants: dict, n_items: int, repeats: int, warm: bool = True) -> Timings:
    """Seconds per variant: each item i is run by every variant back to back (order rotating), and a variant's
    time is the sum over items of its best time on that item. Pairing in time keeps a shared machine's load
    spikes from landing on one side of a comparison only. `warm`: see _interleaved."""
    return _interleaved(variants, n_items, repeats, spread=0, warm=warm)


def _paired_streaming(variants: dict, n_items: int, repeats: int) -> Timings:
    """Like _paired, but at each step the variants read different items, spread over the pass (variant k reads
    item (i + k * n_items // len(variants)) % n_items), so no variant finds bytes another one just touched: each
    read's source and destination come from DRAM, as in serving. A variant's time is the sum over items of its
    best time on that item, so one variant's unlucky moment on a shared machine does not land in its total."""
    return _interleaved(variants, n_items, repeats, spread=max(1, n_items // len(variants)))


def _interleaved(variants: dict, n_items: int, repeats: int, spread: int, warm: bool = True) -> Timings:
    """The timing loop of _paired (spread 0: all variants on item i, order rotating with i) and
    _paired_streaming (variant k on item i + k * spread). `warm`: one untimed pass first, so that no variant's
    repeat 0 pays what the others do not (a fresh store's first open and mapping of each block, a buffer's
    first-touch page faults: on 10 blocks the staging baseline's mean was up to 3x its best, its 1-repeat time too)."""
    best = {name: [float("inf")] * n_items for name in variants}
    cpu = dict.fromkeys(variants, 0.0)
    total = dict.fromkeys(variants, 0.0)
    names = list(variants)
    for r in range(-1 if warm else 0, repeats):
        for i in range(n_items):
            for k in range(len(names)):
                name = names[(k + r + (0 if spread else i)) % len(names)]
                item = (i + k * spread) % n_items
                c0 = time.process_time()
                t0 = time.perf_counter()
                variants[name](item)
                dt = time.perf_counter() - t0
                if r < 0:  # the untimed pass
                    continue
                cpu[name] += time.process_time() - c0
                total[name] += dt
                best[name][item] = min(best[name][item], dt)
    return Timings(
        {name: sum(v) for name, v in best.items()},
        {n: c / repeats for n, c in cpu.items()},
        {n: t / repeats for n, t in total.items()},
    )


def load_store_package(tree: str):
    """The `dualpath_jax/store` package of another source tree (e.g. `git archive HEAD` unpacked), imported under
    another name beside this tree's, so old and new store code run in one process on the same files."""
    d = os.path.join(os.path.abspath(tree), "dualpath_jax", "store")
    if not os.path.isfile(os.path.join(d, "local_dir.py")):
        raise FileNotFoundError(f"{tree} has no dualpath_jax/store/local_dir.py (pass the root of a source tree)")
    alias = "_store_of_tree_" + hashlib.blake2b(d.encode(), digest_size=6).hexdigest()
    if alias in sys.modules:
        return sys.modules[alias]
    pkg = types.ModuleType(alias)
    pkg.__path__ = [d]
    sys.modules[alias] = pkg
    # Its intra-store imports point at the alias; everything else (kv_layout, registry) is this tree's.
    order = ["api", "block_file", "verify", "local_dir"]
    for name in order:
        path = os.path.join(d, f"{name}.py")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            src = (
                f.read()
                .replace("dualpath_jax.store.", f"{alias}.")
                .replace("from dualpath_jax.store import", f"from {alias} import")
            )
        mod = types.ModuleType(f"{alias}.{name}")
        mod.__file__ = path
        sys.modules[mod.__name__] = mod
        setattr(pkg, name, mod)
        exec(compile(src, path, "exec"), mod.__dict__)
    return pkg


def _row(layout_name, op, variant, nbytes, seconds, baseline_s=None, baseline=None, **extra) -> dict:
    row = {
        "layout": layout_name,
        "op": op,
        "variant": variant,
        "bytes": nbytes,
        "seconds": seconds,
        "gbps": nbytes / seconds / 1e9,
        "load_avg_1min": os.getloadavg()[0],
    }
    if baseline_s is not None:
        row["baseline"] = baseline
        row["baseline_gbps"] = nbytes / baseline_s / 1e9
        row["ratio"] = baseline_s / seconds  # >1: faster than the baseline
    row.update(extra)
    return row


def _close_files(store) -> None:
    """A store's open (and mapped) block files closed; a store of an older tree without `close_files` too."""
    if hasattr(store, "close_files"):
        store.close_files()
    else:
        with store._lock:
            for key in list(store._fds):
                store._forget_fd_locked(key)


def _raw_read(path: str, buf: np.ndarray | list, offset: int) -> None:
    """Open, one preadv into `buf` (or a list of buffers) at `offset`, close."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.preadv(fd, buf if isinstance(buf, list) else [buf], offset)
    finally:
        os.close(fd)


def bench_layout(
    layout_name: str,
    layout: BlockLayout,
    root: str,
    total_mb: int,
    repeats: int,
    threads: int,
    cold_blocks: int = 0,
    compare_tree: str | None = None,
) -> list[dict]:
    n_blocks = max(2, (total_mb << 20) // layout.full_block_nbytes)
    fb, lbn, L = layout.full_block_nbytes, layout.layer_block_nbytes, layout.num_layers
    total = n_blocks * fb
    rows: list[dict] = []
    src = np.random.default_rng(0).integers(0, 256, size=fb, dtype=np.uint8)
    keys = keys_from_hash_ids(range(n_blocks), parent=root_key(layout.fingerprint))
    store_dir = os.path.join(root, layout_name)
    for suffix in ("", "-crc32", "-wsum64"):
        shutil.rmtree(store_dir + suffix, ignore_errors=True)
    store = LocalDirStore(store_dir, layout, io_threads=threads)  # defaults: xxh3, verified, chunked
    crc_store = LocalDirStore(store_dir + "-crc32", layout, checksum="crc32")
    # The old default: wsum64, the whole block read then checked.
    wsum_store = LocalDirStore(store_dir + "-wsum64", layout, checksum="wsum64", read_chunk_bytes=0, io_threads=threads)
    hdr = store.header_nbytes
    algo = store.checksum
    chunk_kib = store.read_chunk_bytes >> 10

    # ---- writes: store (atomic: temp file + rename) vs raw writev of the same bytes into same-size files --
    raw_dir = os.path.join(root, layout_name + "-raw")
    os.makedirs(raw_dir, exist_ok=True)
    header = bytes(hdr)

    def raw_write(i, durable=False):
        fd = os.open(os.path.join(raw_dir, f"{i}.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.writev(fd, [header, src])
        if durable:
            os.fsync(fd)
        os.close(fd)

    w = _paired(
        {
            "raw": raw_write,
            "store": lambda i: store.write(keys[i], src, overwrite=True),
            "crc32": lambda i: crc_store.write(keys[i], src, overwrite=True),
            "wsum64": lambda i: wsum_store.write(keys[i], src, overwrite=True),
        },
        n_blocks,
        repeats,
    )
    rows.append(_row(layout_name, "write", f"store atomic, {algo}", total, w["store"], w["raw"], "raw writev"))
    rows.append(_row(layout_name, "write", "store atomic, wsum64", total, w["wsum64"], w["raw"], "raw writev"))
    rows.append(_row(layout_name, "write", "store atomic, crc32", total, w["crc32"], w["raw"], "raw writev"))
    n_dur = min(n_blocks, 8)  # fsync of block and directory: the disk's speed, a few blocks suffice
    d = _paired(
        {
            "raw": lambda i: raw_write(i, durable=True),
            "store": lambda i: store.write(keys[i], src, durable=True, overwrite=True),
        },
        n_dur,
        1,
    )
    rows.append(
        _row(layout_name, "write", "store atomic + durable", n_dur * fb, d["store"], d["raw"], "raw writev + fsync")
    )
    shutil.rmtree(raw_dir, ignore_errors=True)

    paths = [store.path_of(k) for k in keys]
    buf = np.empty(fb, np.uint8)
    for k in keys:  # warm the page cache and check the data
        assert store.read(k, buf) and (buf == src).all() and crc_store.read(k, buf) and wsum_store.read(k, buf)
    # Other views of the default store's directory: read_method="preadv", the chunk sizes of the sweep (mmap), and
    # (compare_tree) the same store of another source tree.
    pre = LocalDirStore(store_dir, layout, read_method="preadv", io_threads=threads)
    chunk_sizes = [0, 256 << 10, 1 << 20]  # (and the default's 4 MiB); 0: check all, then copy
    # (every file kept open and mapped, like `kept` below, so that the sweep measures mapped reads; the Python
    # loops: the compiled ones copy each Layer Block right after its hash, whatever the chunk size)
    sweep = {
        c: LocalDirStore(store_dir, layout, read_chunk_bytes=c, fd_cache=n_blocks + 1, native_verify=False)
        for c in chunk_sizes
    }
    base = None
    if compare_tree:
        base = load_store_package(compare_tree).local_dir.LocalDirStore(store_dir, layout, io_threads=threads)
    # The default store keeps fd_cache (64) files open and mapped; with more blocks than that, a pass over all of
    # them opens and maps each file anew. `kept` keeps every block's file open and mapped (re-reads of hot blocks).
    kept = LocalDirStore(store_dir, layout, fd_cache=n_blocks + 1, io_threads=threads)
    # `second` maps a file from its second read (mmap_after_reads=1: the default with the Python loops).
    second = LocalDirStore(store_dir, layout, mmap_after_reads=1, io_threads=threads)
    # The Python loops (native_verify=False: as before the compiled loops), both read methods, their defaults.
    py = LocalDirStore(store_dir, layout, native_verify=False, io_threads=threads)
    py_pre = LocalDirStore(store_dir, layout, read_method="preadv", native_verify=False, io_threads=threads)
    views = [pre, kept, second, py, py_pre, *sweep.values()] + ([base] if base else [])
    loops = "C loops" if store.native_verify and local_dir.native_verify_available() else "Python loops"
    kept_label = f"store, verify {algo}, mmap, every file kept open and mapped (fd_cache={n_blocks + 1})"
    second_label = f"store, verify {algo}, mmap from the 2nd read of an open file (mmap_after_reads=1)"
    py_label = (
        f"store, verify {algo}, Python loops (native_verify=False; mmap from the 2nd read, {chunk_kib} KiB chunks)"
    )
    py_pre_label = (
        f"store, verify {algo}, Python loops, read_method=preadv ({py_pre.read_chunk_bytes >> 10} KiB chunks)"
    )
    base_label = f"{os.path.basename(os.path.normpath(compare_tree or ''))} tree (before), verify {algo} (its default)"
    nth = "first" if store.mmap_after_reads == 0 else f"read {store.mmap_after_reads + 1}"
    default = f"default: {store.read_method} from the {nth} read of an open file, {loops}"
    pre_label = f"store, verify {algo}, read_method=preadv ({pre.read_chunk_bytes >> 10} KiB chunks: preadv, then hash)"

    def must(ok: bool) -> None:
        if not ok:
            raise RuntimeError("bench read missed")

    def add(op, labels, t, nbytes, base_name, base_label_):
        for name, label in labels:
            if name in t:
                rows.append(
                    _row(layout_name, op, label, nbytes, t[name], t[base_name], base_label_, cpu_s=t.cpu[name],
                         baseline_cpu_s=t.cpu[base_name], mean_ratio=t.mean[base_name] / t.mean[name])
                )  # fmt: skip

    # ---- Full Block reads, one thread -----------------------------------------------------------------
    # Every variant of the read groups below, as fn(block index, destination buffer).
    reads = {
        "raw": lambda i, b: _raw_read(paths[i], b, hdr),
        "verify": lambda i, b: must(store.read(keys[i], b)),
        "preadv": lambda i, b: must(pre.read(keys[i], b)),
        "kept": lambda i, b: must(kept.read(keys[i], b)),
        "second": lambda i, b: must(second.read(keys[i], b)),
        "py": lambda i, b: must(py.read(keys[i], b)),
        "py_pre": lambda i, b: must(py_pre.read(keys[i], b)),
        "noverify": lambda i, b: must(store.read(keys[i], b, verify=False)),
        "wsum64": lambda i, b: must(wsum_store.read(keys[i], b)),
        "crc32": lambda i, b: must(crc_store.read(keys[i], b)),
    } | {c: lambda i, b, s=s: must(s.read(keys[i], b)) for c, s in sweep.items()}
    if base:
        reads["base"] = lambda i, b: must(base.read(keys[i], b))
    # Each variant reads into a buffer of its own, reused: the default's non-temporal stores leave its buffer out
    # of the cache, which must not slow the variant that runs next into a shared one.
    paired = [
        n for n in ("raw", "verify", "preadv", "py", "py_pre", "noverify", "wsum64", "crc32", "base") if n in reads
    ]
    own = {name: np.ones(fb, np.uint8) for name in paired}  # (prefaulted)
    variants = {name: (lambda i, f=reads[name], b=own[name]: f(i, b)) for name in paired}
    r = _paired(variants, n_blocks, repeats)
    add(
        "full read 1 thread",
        [("verify", f"store, verify {algo} ({default})"),
         ("preadv", pre_label),
         ("py", py_label),
         ("py_pre", py_pre_label),
         ("base", base_label),
         ("noverify", "store, verify=False (header checks, preadv)"),
         ("wsum64", "store, verify wsum64, read all then check (old default)"),
         ("crc32", "store, verify crc32")],
        r, total, "raw", "raw preadv",
    )  # fmt: skip

    # ---- Full Block reads, one thread, streaming: one destination buffer per block (like host-buffer slots), and
    # the variants interleaved block by block on blocks far apart, so neither the page-cache source nor the
    # destination is cache-resident when read.
    pool_bufs = [np.empty(fb, np.uint8) for _ in range(n_blocks)]
    for b in pool_bufs:
        b.fill(1)  # prefault

    streaming = {name: (lambda i, f=f: f(i, pool_bufs[i])) for name, f in reads.items() if name != "crc32"}
    t_st = _paired_streaming(streaming, n_blocks, repeats)
    sweep_labels = [
        (
            c,
            f"store, verify {algo}, Python loops, mmap, kept, "
            + (f"{c >> 10} KiB chunks" if c else "check all, then copy"),
        )
        for c in chunk_sizes
    ]
    add(
        "full read 1 thread, streaming",
        [("verify", f"store, verify {algo} ({default})"),
         ("preadv", pre_label),
         ("kept", kept_label),
         ("second", second_label),
         ("py", py_label),
         ("py_pre", py_pre_label),
         *sweep_labels,
         ("base", base_label),
         ("noverify", "store, verify=False (header checks, preadv)"),
         ("wsum64", "store, verify wsum64, read all then check (old default)")],
        t_st, total, "raw", "raw preadv",
    )  # fmt: skip

    # ---- The first read of a freshly opened file, each variant alone beside raw preadv: stores that keep no file
    # open (fd_cache=0, so no read finds a kept mapping, which the fd cache's LRU otherwise gives some reads of the
    # rows above when passes start at different blocks), streaming over all blocks, one pair at a time (no third
    # variant's reads in between).
    alone = {  # (label, store)
        "verify": (f"store, verify {algo} ({default}), fd_cache=0", LocalDirStore(store_dir, layout, fd_cache=0)),
        "preadv": (pre_label + ", fd_cache=0", LocalDirStore(store_dir, layout, read_method="preadv", fd_cache=0)),
        "noverify": ("store, verify=False, fd_cache=0", LocalDirStore(store_dir, layout, verify=False, fd_cache=0)),
    }
    if compare_tree:
        old = load_store_package(compare_tree).local_dir.LocalDirStore(store_dir, layout, fd_cache=0)
        alone["base"] = (base_label + ", fd_cache=0", old)

    def beside_raw(s, n: int) -> Timings:
        """`s` reading blocks 0..n-1 streaming beside raw preadv alone (n / 2 blocks apart, each into its own
        buffer)."""
        return _paired_streaming(
            {
                "raw": lambda i: _raw_read(paths[i], pool_bufs[i], hdr),
                "store": lambda i: must(s.read(keys[i], pool_bufs[i])),
            },
            n,
            repeats,
        )

    for label, s in alone.values():
        views.append(s)
        add("full read 1 thread, fresh open per read, in pairs", [("store", label)], beside_raw(s, n_blocks), total,
            "raw", "raw preadv (the pair's own)")  # fmt: skip

    # ---- Full Block reads from the disk: each file's pages dropped from the page cache before its read -------
    if cold_blocks and hasattr(os, "posix_fadvise"):
        n_cold = min(n_blocks, cold_blocks)
        # The page cache keeps pages that a mapping holds: every store's open (mapped) files are closed first, and
        # the stores read here keep no file open (fd_cache=0: otherwise a block mapped by its first cold read would
        # stay in the cache through the next drop).
        for s in (store, crc_store, wsum_store, *views):
            _close_files(s)
        fresh = {name: alone[name][1] for name in ("verify", "preadv", "base") if name in alone}  # (fd_cache=0)
        # the preadv store as it read cold blocks before populate_cold: the kernel's readahead, 4 KiB folios
        fresh["preadv_ra"] = LocalDirStore(store_dir, layout, read_method="preadv", fd_cache=0, populate_cold=False)
        views.append(fresh["preadv_ra"])
        ra_label = "store, read_method=preadv, populate_cold=False (readahead)"

        def drop(i):
            fd = os.open(paths[i], os.O_RDONLY)
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)

        def cold(fn):
            def run(i):  # the drop is inside the timed call for both sides; it is ~µs next to a disk read
                drop(i)
                fn(i)

            return run

        c = _paired(
            {
                "raw": cold(lambda i: _raw_read(paths[i], buf, hdr)),
                "verify": cold(lambda i: must(fresh["verify"].read(keys[i], buf))),
                "preadv": cold(lambda i: must(fresh["preadv"].read(keys[i], buf))),
                "preadv_ra": cold(lambda i: must(fresh["preadv_ra"].read(keys[i], buf))),
                "noverify": cold(lambda i: must(fresh["verify"].read(keys[i], buf, verify=False))),
            }
            | ({"base": cold(lambda i: must(fresh["base"].read(keys[i], buf)))} if "base" in fresh else {}),
            n_cold,
            max(1, repeats // 2),
            warm=False,  # (every read drops its pages first: an untimed pass would only double the disk reads)
        )
        add(
            "full read 1 thread, cold cache",
            [("verify", f"store, verify {algo} ({default})"), ("preadv", pre_label), ("preadv_ra", ra_label),
             ("base", base_label), ("noverify", "store, verify=False (preadv)")],
            c, n_cold * fb, "raw", "raw preadv, cold cache",
        )  # fmt: skip

        # ---- Re-reads of blocks whose pages came back from the disk: how a cold read brings the pages into the
        # page cache (2 MiB folios through an advised mapping, 4 KiB ones through read/preadv) decides what a later
        # fresh mapping of them costs. Each case drops the blocks' pages, reads them back once its own way (timed:
        # "its cold pass"), then re-reads them with fresh opens (fd_cache=0: a working set larger than the fd
        # cache), streaming beside a raw preadv of the same, now cached, pages.
        cases = [  # (label, who reads the pages back from the disk, who re-reads them)
            (f"default store ({default}), pages read back by its own mapped read", "verify", "verify"),
            ("store, read_method=preadv, pages read back by its own preadv", "preadv", "preadv"),
            (f"{ra_label}, pages read back by its own preadv", "preadv_ra", "preadv_ra"),
            (f"{base_label}, pages read back by its own read", "base", "base"),
            (f"default store ({default}), pages read back by a raw preadv (4 KiB folios)", "raw", "verify"),
            (f"default store ({default}), pages read back by the preadv store", "preadv", "verify"),
            (
                f"default store ({default}), pages read back by the preadv store, populate_cold=False",
                "preadv_ra",
                "verify",
            ),
        ]
        for label, cold_by, reader in cases:
            if reader not in fresh:
                continue
            for i in range(n_cold):
                drop(i)
            t0 = time.perf_counter()
            for i in range(n_cold):
                if cold_by == "raw":
                    _raw_read(paths[i], buf, hdr)
                else:
                    must(fresh[cold_by].read(keys[i], buf))
            cold_s = time.perf_counter() - t0
            add("full read 1 thread, re-read after a cold read", [("store", label)], beside_raw(fresh[reader], n_cold),
                n_cold * fb, "raw", "raw preadv of the same cached pages")  # fmt: skip
            rows[-1]["cold_gbps"] = n_cold * fb / cold_s / 1e9

    # ---- Full Block reads, thread pools: batches of 2 x `threads` blocks read in parallel, the variants interleaved
    # batch by batch as in the streaming rows. The store's read_many uses its `threads` I/O threads; raw preadv
    # runs on as many.
    raw_pools = {threads: ThreadPoolExecutor(threads)}
    batch = 2 * threads
    n_batches = max(1, n_blocks // batch)
    batches = [range(b * batch, min(n_blocks, (b + 1) * batch)) for b in range(n_batches)]
    batch_keys = [[keys[i] for i in r] for r in batches]
    batch_bufs = [[pool_bufs[i] for i in r] for r in batches]

    def raw_parallel(pool):
        return lambda b: list(pool.map(lambda i: _raw_read(paths[i], pool_bufs[i], hdr), batches[b]))

    def store_parallel(s):
        return lambda b: must(all(s.read_many(batch_keys[b], batch_bufs[b])))

    noverify_store = LocalDirStore(store_dir, layout, verify=False, io_threads=threads)
    parallel = {f"raw{n}": raw_parallel(p) for n, p in raw_pools.items()} | {
        "verify": store_parallel(store),
        "preadv": store_parallel(pre),
        "kept": store_parallel(kept),
        "second": store_parallel(second),
        "py": store_parallel(py),
        "py_pre": store_parallel(py_pre),
        "noverify": store_parallel(noverify_store),
        "wsum64": store_parallel(wsum_store),
    }
    if base:
        parallel["base"] = store_parallel(base)
    t_par = _paired_streaming(parallel, n_batches, repeats)
    par_bytes = sum(len(r) for r in batches) * fb
    for n in raw_pools:
        add(
            f"full read {threads} threads",
            [("verify", f"store read_many, verify {algo} ({default})"),
             ("preadv", f"store read_many, verify {algo}, read_method=preadv"),
             ("kept", "read_many, " + kept_label[7:]),
             ("second", "read_many, " + second_label[7:]),
             ("py", "read_many, " + py_label[7:]),
             ("py_pre", "read_many, " + py_pre_label[7:]),
             ("base", "read_many, " + base_label),
             ("noverify", "store read_many, verify=False (header checks)"),
             ("wsum64", "store read_many, verify wsum64, read all then check (old default)")],
            t_par, par_bytes, f"raw{n}", f"raw preadv x{n} threads",
        )  # fmt: skip
    for p in raw_pools.values():
        p.shutdown()
    noverify_store.close()

    # ---- Layer-Block reads (each layer of a block read on its own) vs one Full-Block read of it ----------
    lb_out = np.empty(lbn, np.uint8)
    n_lb = max(1, n_blocks // 4)  # fewer blocks: L reads each

    mapped = LocalDirStore(store_dir, layout, mmap_min_bytes=0)  # every verified read mapped, however small
    views.append(mapped)

    def layers(i, verify, s=store):
        for layer in range(L):
            must(s.read(keys[i], lb_out, layers=[layer], verify=verify))

    def raw_layers(i):
        for layer in range(L):
            _raw_read(paths[i], lb_out, hdr + layer * lbn)

    lr = _paired(
        {
            "full": lambda i: must(store.read(keys[i], buf)),
            "verify": lambda i: layers(i, True),
            "noverify": lambda i: layers(i, False),
            "preadv": lambda i: layers(i, True, pre),
            "mapped": lambda i: layers(i, True, mapped),
            "raw": raw_layers,
        },
        n_lb,
        repeats,
    )
    below = f"{store.mmap_min_bytes >> 10} KiB"
    for name, label in (("verify", f"store, verify {algo} ({default}: preadv below {below})"),
                        ("preadv", f"store, verify {algo}, read_method=preadv"),
                        ("mapped", f"store, verify {algo}, mmap also below {below} (mmap_min_bytes=0)"),
                        ("noverify", "store, verify=False"), ("raw", "raw preadv per Layer Block")):  # fmt: skip
        rows.append(
            _row(layout_name, "layer-block reads 1 thread", label, n_lb * fb, lr[name], lr["full"],
                 f"store full-block reads, verify {algo}", reads_per_s=n_lb * L / lr[name])
        )  # fmt: skip

    # ---- the runtime storage NIC: a request's blocks into its layer-major area [L, tokens, bpt] ------------
    # (runtime/storage_nic.py) Each Full Block read into one staging buffer and copied into its rows of the area
    # (the runtime before row-strided reads, and still the path of a store without them), vs read straight into
    # its rows (`out` = area[:, t0 : t0 + block_tokens]).
    bs, bpt = layout.block_tokens, layout.bytes_per_token_per_layer
    area = np.empty((L, n_blocks * bs, bpt), np.uint8)
    area.fill(1)  # its pages exist before the timing
    staging = np.zeros(layout.full_block_shape, np.uint8)
    cached_copy = LocalDirStore(store_dir, layout, nontemporal_min_bytes=None)  # memcpy, as the old runtime's
    views.append(cached_copy)

    def rows_of(i):
        return area[:, i * bs : (i + 1) * bs]

    def staged(i):
        must(cached_copy.read(keys[i], staging))
        rows_of(i)[...] = staging

    header_buf = np.empty(hdr, np.uint8)

    def raw_rows(i):  # unverified: one preadv of the header and the block's L rows
        _raw_read(paths[i], [header_buf, *rows_of(i)], 0)

    ar = _paired_streaming(
        {
            "staged": staged,
            "inplace": lambda i: must(store.read(keys[i], rows_of(i))),
            "inplace_memcpy": lambda i: must(cached_copy.read(keys[i], rows_of(i))),
            "inplace_preadv": lambda i: must(pre.read(keys[i], rows_of(i))),
            "raw": raw_rows,
        },
        n_blocks,
        repeats,
    )
    add(
        "storage NIC into a layer-major area",
        [("inplace", f"in place: out = the block's rows ({default})"),
         ("inplace_memcpy", "in place, nontemporal_min_bytes=None"),
         ("inplace_preadv", "in place, read_method=preadv (one iovec a row)"),
         ("raw", "raw preadv of the header and the rows, unverified")],
        ar, total, "staged", "staging buffer + copy into the rows (nontemporal_min_bytes=None)",
    )  # fmt: skip

    # ---- checksums alone ---------------------------------------------------------------------------------
    blocks2d = src.reshape(L, lbn)
    for name in ("xxh3", "wsum64", "crc32"):
        t = _best(lambda name=name: block_file.layer_checksums(blocks2d, name), max(5, repeats))
        rows.append(_row(layout_name, "checksum", f"{name} of {L} Layer Blocks", fb, t))
    t = _best(lambda: np.copyto(buf, src), max(5, repeats))
    rows.append(_row(layout_name, "memcpy", "np.copyto of one Full Block", fb, t))

    for s in (store, crc_store, wsum_store, *views):
        s.close()
    for suffix in ("", "-crc32", "-wsum64"):
        shutil.rmtree(store_dir + suffix, ignore_errors=True)
    return rows


def run_store_bench(
    layouts: Sequence[str] = tuple(LAYOUTS),
    root: str | None = None,
    total_mb: int = 256,
    repeats: int = 3,
    threads: int = 4,
    cold_blocks: int = 16,
    compare_tree: str | None = None,
) -> list[dict]:
    """Run the store benchmark for the named layouts (keys of LAYOUTS) in a directory of its own made in `root` (the
    temp directory by default; a mount point to measure it) and removed at the end: the stores' directories were
    `root`/<layout name>, removed first, so two runs with one --root deleted each other's stores mid-benchmark, and
    a directory of a user's of that name was lost.

    `cold_blocks` blocks are also read with their pages dropped from the page cache first (disk reads).
    `compare_tree`: the root of another source tree (e.g. `git archive HEAD` unpacked); its store's default
    verified reads are measured beside this tree's in the same process, on the same files.
    """
    unknown = [n for n in layouts if n not in LAYOUTS]
    if unknown:
        raise ValueError(f"unknown layout(s) {unknown}; known: {sorted(LAYOUTS)}")
    if compare_tree:
        load_store_package(compare_tree)  # a bad tree fails here, before any block is written
    if root is not None:
        os.makedirs(root, exist_ok=True)
    own = tempfile.mkdtemp(prefix="bench_store-", dir=root)  # (on `root`'s file system: the same figures)
    try:
        rows = []
        for name in layouts:
            rows += bench_layout(name, LAYOUTS[name], own, total_mb, repeats, threads, cold_blocks, compare_tree)
        return rows
    finally:
        shutil.rmtree(own, ignore_errors=True)


def format_rows(rows: list[dict]) -> str:
    """A markdown table; "CPU s/GB" is process CPU time (all threads) per GB read, variant / baseline."""
    lines = [
        "| layout | op | variant | GB/s | baseline | baseline GB/s | ratio | ratio of means | CPU s/GB (this / baseline) | load |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        base = (
            (r.get("baseline", ""), f"{r['baseline_gbps']:.2f}", f"{r['ratio']:.2f}x") if "ratio" in r else ("", "", "")
        )
        extra = f" ({r['reads_per_s']:.0f} reads/s)" if "reads_per_s" in r else ""
        if "cold_gbps" in r:
            extra += f" (its cold pass {r['cold_gbps']:.2f} GB/s)"
        mean = f"{r['mean_ratio']:.2f}x" if "mean_ratio" in r else ""
        cpu = ""
        if "cpu_s" in r:
            cpu = f"{r['cpu_s'] / r['bytes'] * 1e9:.3f} / {r['baseline_cpu_s'] / r['bytes'] * 1e9:.3f}"
        cells = [
            r["layout"],
            r["op"],
            r["variant"] + extra,
            f"{r['gbps']:.2f}",
            *base,
            mean,
            cpu,
            f"{r['load_avg_1min']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def file_system_of(path: str) -> tuple[str, str]:
    """The mount point and file system type (/proc/mounts; "unknown" elsewhere) that `path` (which exists) is on."""
    mount = os.path.realpath(path)
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    fstype = "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:  # the last entry of a mount point is the one in effect
                fields = line.split()
                if len(fields) >= 3 and fields[1].replace("\\040", " ") == mount:
                    fstype = fields[2]
    except OSError:
        pass
    return mount, fstype


def main(argv: Sequence[str]) -> None:
    from absl import app, logging

    if len(argv) > 1:
        raise app.UsageError(f"unknown arguments: {argv[1:]}")
    if FLAGS.out:
        writable_file_or_exit(FLAGS.out, "--out")  # before the benchmarks, not after
    if FLAGS.root:
        made = not os.path.exists(FLAGS.root)
        writable_dir_or_exit(FLAGS.root, "--root")  # the store's directory: one line, not a traceback
        mount, fstype = file_system_of(FLAGS.root)
        # (`--root=/mnt/3fs/x` on a host without that mount measured the local disk it made, without a word)
        (logging.warning if made else logging.info)(
            "--root=%s%s is on the file system mounted at %s (%s): the benchmark measures that",
            FLAGS.root,
            " did not exist: made it; it" if made else "",
            mount,
            fstype,
        )
    logging.info(
        "numpy %s, python %s, %s, %d CPUs",
        np.__version__,
        platform.python_version(),
        platform.platform(),
        os.cpu_count(),
    )
    logging.info(
        "flags: %s",
        {
            k: getattr(FLAGS, k)
            for k in ("layouts", "root", "total_mb", "repeats", "threads", "cold_blocks", "compare_tree")
        },
    )
    rows: list[dict] = []

    def run_layout(name: str) -> None:
        root = FLAGS.root or None  # (an empty --root: the default temp dir; it was os.makedirs('')'s traceback)
        rows.extend(
            run_store_bench(
                [name], root, FLAGS.total_mb, FLAGS.repeats, FLAGS.threads, FLAGS.cold_blocks, FLAGS.compare_tree
            )
        )

    def write(what: str) -> None:  # a layout that fails (e.g. the disk fills) keeps the others
        print(format_rows(rows))
        if FLAGS.out:
            write_rows_json(FLAGS.out, rows, what)

    run_parts_then_write("bench_store", "layout", FLAGS.layouts, run_layout, write)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_list("layouts", list(LAYOUTS), f"layouts to run, of {sorted(LAYOUTS)}")
    flags.register_validator(
        "layouts", lambda v: bool(v) and set(v) <= set(LAYOUTS), message=f"--layouts takes names of {sorted(LAYOUTS)}"
    )
    register_distinct("layouts")  # (a layout given twice was benchmarked twice)
    flags.DEFINE_string(
        "root",
        None,
        "where the stores go, in a directory of their own (the temp dir by default; a mount point to test it)",
    )
    flags.DEFINE_integer("total_mb", 256, "MB of blocks per layout", lower_bound=1)
    # --repeats, --out: other benchmarks define them too (allow_override: run after others were imported into one
    # process, this module defines them last, with its own defaults and help; absl raised DuplicateFlagError)
    flags.DEFINE_integer(
        "repeats", 3, "interleaved repeats; the best of each is reported", lower_bound=1, allow_override=True
    )
    flags.DEFINE_integer("threads", 4, "threads for the parallel-read rows", lower_bound=1)
    flags.DEFINE_integer(
        "cold_blocks", 16, "blocks read with a cold page cache (posix_fadvise DONTNEED); 0: none", lower_bound=0
    )
    flags.DEFINE_string("out", None, "also write the rows as JSON here", allow_override=True)
    flags.DEFINE_string(
        "compare_tree", None, "root of another source tree (e.g. `git archive HEAD` unpacked): its store's verified "
        "reads run beside this tree's in the same process"
    )  # fmt: skip
    flags.register_validator(
        "compare_tree",
        lambda v: v is None or os.path.isfile(os.path.join(v, "dualpath_jax", "store", "local_dir.py")),
        message="--compare_tree must be the root of a source tree (it has no dualpath_jax/store/local_dir.py)",
    )
    define_rerun_of()
    FLAGS = flags.FLAGS
    app.run(main, flags_parser=parse_flags_checking_rerun)
