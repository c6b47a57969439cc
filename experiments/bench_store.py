"""KV store benchmark: store reads/writes vs raw os.preadv/os.write of the same bytes in the same files.

    python -m experiments.bench_store                      # DeepSeek-V3-like and Qwen2.5-32B-like layouts
    python -m experiments.bench_store --total_mb=512 --repeats=5 --root=/mnt/3fs/bench --out=/tmp/store.json

Measures, per layout, with a warm page cache (the store's own overhead, not the disk's speed):
- Full Block reads, one thread: LocalDirStore.read with the default checksum (xxh3) verified in chunks of
  `read_chunk_bytes`, the same read-all-then-check (read_chunk_bytes=0), verify=False (header checks only), and
  the old default (wsum64, read-all-then-check) and crc32 as same-run references, vs raw
  `open + os.preadv + close` of the same payload bytes (goal >= 0.9x); also a sweep of read_chunk_bytes;
- the same with the store's I/O pool (`read_many`, --threads) vs raw preadv from a pool of as many threads;
- Layer-Block reads (each layer of each block read on its own, the layerwise pattern) vs Full-Block reads;
- writes (atomic: temp file + rename, not durable) vs raw `open + writev + close` of the same bytes;
- the checksum algorithms alone.
The "1 thread" rows read each block by every variant back to back into one reused buffer (paired in time, but
the block's bytes are then cache-resident for all but the first variant: the cost of the checksum pass shows
fully); the "streaming" rows (and the pool rows) time whole passes over all blocks into one buffer per block,
so source and destination come from DRAM as in serving (the regime the chunked checks are for).
`run_store_bench(...)` returns the rows (list of dicts) for experiments/bench_io.py to include.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dualpath_jax.block_keys import keys_from_hash_ids, root_key
from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.store import LocalDirStore, block_file

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


def _paired(variants: dict, n_items: int, repeats: int) -> dict[str, float]:
    """Seconds per variant: each item i is run by every variant back to back (order rotating), and a variant's
    time is the sum over items of its best time on that item. Pairing in time keeps a shared machine's load
    spikes from landing on one side of a comparison only."""
    best = {name: [float("inf")] * n_items for name in variants}
    names = list(variants)
    for r in range(repeats):
        for i in range(n_items):
            for k in range(len(names)):
                name = names[(k + r + i) % len(names)]
                t0 = time.perf_counter()
                variants[name](i)
                dt = time.perf_counter() - t0
                best[name][i] = min(best[name][i], dt)
    return {name: sum(v) for name, v in best.items()}


def _passes(variants: dict, repeats: int) -> dict:
    """Best-of-`repeats` seconds of each variant's fn(), the variants' order rotating between repeats."""
    best = {name: float("inf") for name in variants}
    names = list(variants)
    for r in range(repeats):
        for k in range(len(names)):
            name = names[(k + r) % len(names)]
            best[name] = min(best[name], _best(variants[name], 1))
    return best


def _row(layout_name, op, variant, nbytes, seconds, baseline_s=None, baseline=None, **extra) -> dict:
    row = {
        "layout": layout_name,
        "op": op,
        "variant": variant,
        "bytes": nbytes,
        "seconds": seconds,
        "gbps": nbytes / seconds / 1e9,
    }
    if baseline_s is not None:
        row["baseline"] = baseline
        row["baseline_gbps"] = nbytes / baseline_s / 1e9
        row["ratio"] = baseline_s / seconds  # >1: faster than the baseline
    row.update(extra)
    return row


def _raw_read(path: str, buf: np.ndarray, offset: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.preadv(fd, [buf], offset)
    finally:
        os.close(fd)


def bench_layout(
    layout_name: str, layout: BlockLayout, root: str, total_mb: int, repeats: int, threads: int, cold_blocks: int = 0
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
    # Other views of the default store's directory: read-all-then-check, and the chunk sizes of the sweep.
    whole = LocalDirStore(store_dir, layout, read_chunk_bytes=0)
    chunk_sizes = [0, 256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20]
    sweep = {c: LocalDirStore(store_dir, layout, read_chunk_bytes=c) for c in chunk_sizes}

    def must(ok: bool) -> None:
        if not ok:
            raise RuntimeError("bench read missed")

    # ---- Full Block reads, one thread -----------------------------------------------------------------
    r = _paired(
        {
            "raw": lambda i: _raw_read(paths[i], buf, hdr),
            "verify": lambda i: must(store.read(keys[i], buf)),
            "whole": lambda i: must(whole.read(keys[i], buf)),
            "noverify": lambda i: must(store.read(keys[i], buf, verify=False)),
            "wsum64": lambda i: must(wsum_store.read(keys[i], buf)),
            "crc32": lambda i: must(crc_store.read(keys[i], buf)),
        },
        n_blocks,
        repeats,
    )
    for name, label in (("verify", f"store, verify {algo} (default, {chunk_kib} KiB chunks)"),
                        ("whole", f"store, verify {algo}, read all then check"),
                        ("noverify", "store, verify=False (header checks)"),
                        ("wsum64", "store, verify wsum64, read all then check (old default)"),
                        ("crc32", "store, verify crc32")):  # fmt: skip
        rows.append(_row(layout_name, "full read 1 thread", label, total, r[name], r["raw"], "raw preadv"))

    # ---- Full Block reads, one thread, streaming: whole passes over all blocks, one destination buffer per block
    # (like host-buffer slots), so neither the page-cache source nor the destination is cache-resident when read.
    pool_bufs = [np.empty(fb, np.uint8) for _ in range(n_blocks)]
    for b in pool_bufs:
        b.fill(1)  # prefault

    def stream(read):
        return lambda: [read(i) for i in range(n_blocks)]

    streaming = {
        "raw": stream(lambda i: _raw_read(paths[i], pool_bufs[i], hdr)),
        "noverify": stream(lambda i: must(store.read(keys[i], pool_bufs[i], verify=False))),
        "wsum64": stream(lambda i: must(wsum_store.read(keys[i], pool_bufs[i]))),
    } | {c: stream(lambda i, s=s: must(s.read(keys[i], pool_bufs[i]))) for c, s in sweep.items()}
    t_st = _passes(streaming, repeats)
    for c in chunk_sizes:
        label = f"store, verify {algo}, " + (f"{c >> 10} KiB chunks" if c else "read all then check")
        label += " (default)" if c == store.read_chunk_bytes else ""
        rows.append(
            _row(layout_name, "full read 1 thread, streaming", label, total, t_st[c], t_st["raw"], "raw preadv",
                 read_chunk_bytes=c)
        )  # fmt: skip
    for name, label in (("noverify", "store, verify=False (header checks)"),
                        ("wsum64", "store, verify wsum64, read all then check (old default)")):  # fmt: skip
        rows.append(_row(layout_name, "full read 1 thread, streaming", label, total, t_st[name], t_st["raw"],
                         "raw preadv"))  # fmt: skip

    # ---- Full Block reads from the disk: each file's pages dropped from the page cache before its read -------
    if cold_blocks and hasattr(os, "posix_fadvise"):
        n_cold = min(n_blocks, cold_blocks)

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
                "verify": cold(lambda i: must(store.read(keys[i], buf))),
                "noverify": cold(lambda i: must(store.read(keys[i], buf, verify=False))),
            },
            n_cold,
            max(1, repeats // 2),
        )
        for name, label in (("verify", f"store, verify {algo}"), ("noverify", "store, verify=False")):
            rows.append(
                _row(layout_name, "full read 1 thread, cold cache", label, n_cold * fb, c[name], c["raw"],
                     "raw preadv, cold cache")
            )  # fmt: skip

    # ---- Full Block reads, thread pool (whole batches, interleaved) -------------------------------------
    raw_pool = ThreadPoolExecutor(threads)

    def raw_parallel():
        list(raw_pool.map(lambda i: _raw_read(paths[i], pool_bufs[i], hdr), range(n_blocks)))

    noverify_store = LocalDirStore(store_dir, layout, verify=False, io_threads=threads)
    parallel = {
        "raw": raw_parallel,
        "verify": lambda: must(all(store.read_many(keys, pool_bufs))),
        "noverify": lambda: must(all(noverify_store.read_many(keys, pool_bufs))),
        "wsum64": lambda: must(all(wsum_store.read_many(keys, pool_bufs))),
    }
    t_par = _passes(parallel, repeats)
    for name, label in (("verify", f"store read_many, verify {algo} (default, {chunk_kib} KiB chunks)"),
                        ("noverify", "store read_many, verify=False (header checks)"),
                        ("wsum64", "store read_many, verify wsum64, read all then check (old default)")):  # fmt: skip
        rows.append(
            _row(layout_name, f"full read {threads} threads", label, total, t_par[name], t_par["raw"],
                 f"raw preadv x{threads} threads")
        )  # fmt: skip
    raw_pool.shutdown()
    noverify_store.close()

    # ---- Layer-Block reads (each layer of a block read on its own) vs one Full-Block read of it ----------
    lb_out = np.empty(lbn, np.uint8)
    n_lb = max(1, n_blocks // 4)  # fewer blocks: L reads each

    def layers(i, verify):
        for layer in range(L):
            must(store.read(keys[i], lb_out, layers=[layer], verify=verify))

    def raw_layers(i):
        for layer in range(L):
            _raw_read(paths[i], lb_out, hdr + layer * lbn)

    lr = _paired(
        {
            "full": lambda i: must(store.read(keys[i], buf)),
            "verify": lambda i: layers(i, True),
            "noverify": lambda i: layers(i, False),
            "raw": raw_layers,
        },
        n_lb,
        repeats,
    )
    for name, label in (("verify", f"store, verify {algo}"), ("noverify", "store, verify=False"),
                        ("raw", "raw preadv per Layer Block")):  # fmt: skip
        rows.append(
            _row(layout_name, "layer-block reads 1 thread", label, n_lb * fb, lr[name], lr["full"],
                 f"store full-block reads, verify {algo}", reads_per_s=n_lb * L / lr[name])
        )  # fmt: skip

    # ---- checksums alone ---------------------------------------------------------------------------------
    blocks2d = src.reshape(L, lbn)
    for name in ("xxh3", "wsum64", "crc32"):
        t = _best(lambda name=name: block_file.layer_checksums(blocks2d, name), max(5, repeats))
        rows.append(_row(layout_name, "checksum", f"{name} of {L} Layer Blocks", fb, t))
    t = _best(lambda: np.copyto(buf, src), max(5, repeats))
    rows.append(_row(layout_name, "memcpy", "np.copyto of one Full Block", fb, t))

    for s in (store, crc_store, wsum_store, whole, *sweep.values()):
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
) -> list[dict]:
    """Run the store benchmark for the named layouts (keys of LAYOUTS) in `root` (a temp dir by default).

    `cold_blocks` blocks are also read with their pages dropped from the page cache first (disk reads).
    """
    unknown = [n for n in layouts if n not in LAYOUTS]
    if unknown:
        raise ValueError(f"unknown layout(s) {unknown}; known: {sorted(LAYOUTS)}")
    own_root = root is None
    root = tempfile.mkdtemp(prefix="bench_store-") if own_root else root
    os.makedirs(root, exist_ok=True)
    try:
        rows = []
        for name in layouts:
            rows += bench_layout(name, LAYOUTS[name], root, total_mb, repeats, threads, cold_blocks)
        return rows
    finally:
        if own_root:
            shutil.rmtree(root, ignore_errors=True)


def format_rows(rows: list[dict]) -> str:
    lines = [
        "| layout | op | variant | GB/s | baseline | baseline GB/s | ratio |",
        "| --- | --- | --- | ---: | --- | ---: | ---: |",
    ]
    for r in rows:
        base = (
            (r.get("baseline", ""), f"{r['baseline_gbps']:.2f}", f"{r['ratio']:.2f}x") if "ratio" in r else ("", "", "")
        )
        extra = f" ({r['reads_per_s']:.0f} reads/s)" if "reads_per_s" in r else ""
        cells = [r["layout"], r["op"], r["variant"] + extra, f"{r['gbps']:.2f}", *base]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    from absl import app, logging

    if len(argv) > 1:
        raise app.UsageError(f"unknown arguments: {argv[1:]}")
    logging.info(
        "numpy %s, python %s, %s, %d CPUs",
        np.__version__,
        platform.python_version(),
        platform.platform(),
        os.cpu_count(),
    )
    logging.info(
        "flags: %s",
        {k: getattr(FLAGS, k) for k in ("layouts", "root", "total_mb", "repeats", "threads", "cold_blocks")},
    )
    rows = run_store_bench(FLAGS.layouts, FLAGS.root, FLAGS.total_mb, FLAGS.repeats, FLAGS.threads, FLAGS.cold_blocks)
    print(format_rows(rows))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(rows, f, indent=1)
        logging.info("wrote %s", FLAGS.out)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_list("layouts", list(LAYOUTS), f"layouts to run, of {sorted(LAYOUTS)}")
    flags.DEFINE_string("root", None, "directory for the store (a temp dir by default; a mount point to test it)")
    flags.DEFINE_integer("total_mb", 256, "MB of blocks per layout")
    flags.DEFINE_integer("repeats", 3, "interleaved repeats; the best of each is reported")
    flags.DEFINE_integer("threads", 4, "threads for the parallel-read rows")
    flags.DEFINE_integer("cold_blocks", 16, "blocks read with a cold page cache (posix_fadvise DONTNEED); 0: none")
    flags.DEFINE_string("out", None, "also write the rows as JSON here")
    FLAGS = flags.FLAGS
    app.run(main)
