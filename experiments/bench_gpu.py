"""Prefill MFU of a ~1B dense model on an accelerator: the per-layer pipeline vs one jit of the whole model.

    python -m experiments.bench_gpu --peak_tflops=989          # on a GPU (H100/H200 dense bf16 peak: 989)
    python -m experiments.bench_gpu --shapes=1:64:64 --layers=2 --dtype=float32   # a smoke run on CPU

The model is Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 query / 8 KV heads of 64, MLP 8192, vocab 128,256,
tied embeddings, llama3 RoPE) with random weights (nothing is downloaded). Each shape `batch:miss:cached` is one
`models.prefill_bench.run_one`, as `experiments.bench_prefill` times its tiny models: the layerwise pipeline feeds
each layer's cached KV from host Layer Blocks and copies each layer's new KV to host (what a prefill engine does);
the whole-jit baseline runs embed + all layers + head in one jit over the same inputs (its KV copied to host too).
MFU = model FLOPs (`models.flops.prefill_flops`, attention included) / step time / `--peak_tflops`.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence

from absl import app, flags, logging

from experiments import (
    SigtermAsInterrupt,
    define_rerun_of,
    interrupted_by,
    log_start,
    parse_flags_checking_locale,
    writable_file_or_exit,
    write_rows_json,
)

_SHAPES = flags.DEFINE_list(
    "shapes", ["8:1024:1024", "4:4096:0"], "prefill shapes batch:miss_tokens:cached_tokens (cached: multiple of 64)"
)
# --layers, --repeats, --peak_tflops, --out: other benchmarks define them too, with their own defaults and help;
# allow_override lets the launchers be imported into one process (the last one imported defines them there; absl
# raised DuplicateFlagError), and a launcher that is run defines its flags last: its command line is its own
_LAYERS = flags.DEFINE_integer("layers", 16, "decoder layers (Llama-3.2-1B: 16)", lower_bound=1, allow_override=True)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "params, activations and KV")
_REPEATS = flags.DEFINE_integer(
    "repeats", 10, "timed repetitions (median reported)", lower_bound=1, allow_override=True
)
_PEAK_TFLOPS = flags.DEFINE_float(
    "peak_tflops", 0.0, "device peak TFLOP/s for MFU (0: not reported)", lower_bound=0.0, allow_override=True
)
flags.register_validator("peak_tflops", lambda v: 0 <= v < math.inf, message="--peak_tflops must be >= 0 and finite")
_OUT = flags.DEFINE_string("out", "", "write results as JSON here (default: print only)", allow_override=True)
define_rerun_of()
_DEVICE_ONLY = flags.DEFINE_bool("device_only", False, "time only the compute (whole jit, inputs and KV on device)")


def _shape(text: str) -> tuple[int, int, int]:
    try:
        batch, miss, cached = (int(x) for x in text.split(":"))
    except ValueError:
        raise app.UsageError(f"--shapes: {text!r} is not batch:miss_tokens:cached_tokens (three integers)") from None
    if batch < 1 or miss < 1 or cached < 0 or cached % 64:
        raise app.UsageError(f"--shapes: {text!r} needs batch >= 1, miss >= 1, cached >= 0 a multiple of 64")
    return batch, miss, cached


def _shapes_ok(texts: list[str]) -> bool:
    """--shapes as a flag error of one line (a bad shape printed the whole --help above its message; none ran nothing
    and printed empty tables; a shape given twice ran twice)."""
    if not texts:
        raise flags.ValidationError("--shapes is empty: give one or more batch:miss_tokens:cached_tokens")
    seen: dict = {}
    for text in texts:
        try:
            key = _shape(text)
        except app.UsageError as e:
            raise flags.ValidationError(str(e)) from None
        if key in seen:
            raise flags.ValidationError(
                f"--shapes names {seen[key]!r} twice" + (f" ({text!r})" if text != seen[key] else "")
            )
        seen[key] = text
    return True


flags.register_validator("shapes", _shapes_ok)


def llama_1b(num_layers: int = 16, dtype: str = "bfloat16"):
    """Llama-3.2-1B's shape with random weights."""
    from models.layers.rope import RopeConfig
    from models.qwen2 import tiny_llama

    return tiny_llama(
        vocab_size=128256,
        hidden_size=2048,
        num_layers=num_layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        intermediate_size=8192,
        rope=RopeConfig(
            dim=64,
            theta=500000.0,
            kind="llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        dtype=dtype,
    )


def whole_on_device(config, batch: int, miss: int, cached: int, repeats: int) -> dict:
    """The whole-model jit with its inputs already on the device and its KV left there: the compute alone (the
    pipeline timings above include the host <-> device copies of the cached and new KV)."""
    import jax
    import numpy as np

    from models.flops import prefill_flops
    from models.runner import ModelRunner, PrefillRequest

    runner = ModelRunner(config, seed=0, num_slots=1, capacity=16)
    rng = np.random.default_rng(0)
    rec = runner.layout.record_shape
    requests = [PrefillRequest(rng.integers(0, config.vocab_size, miss), cached) for _ in range(batch)]
    tokens, meta, _, c = runner._batch(requests)
    per_layer = []
    for layer in range(config.num_layers):
        kv = [(0.1 * rng.standard_normal((cached, *rec))).astype(runner.layout.np_dtype) for _ in range(batch)]
        host = (
            runner._assemble_cached(requests, layer, kv, c)
            if c
            else np.zeros((tokens.shape[0], 0, *rec), runner.layout.np_dtype)
        )
        per_layer.append(jax.device_put(host))
    args = (
        runner.embed_state,
        tuple(runner.layer_states),
        runner.final_state,
        tuple(per_layer),
        jax.device_put(tokens),
    )
    jax.block_until_ready(args)  # (the inputs' H2D is not the first call's: `compile_s` timed it too)
    t0 = time.perf_counter()
    jax.block_until_ready(runner._whole(*args, False, meta))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(runner._whole(*args, False, meta))
        times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    return {
        "step_s": step,
        "min_step_s": min(times),
        "compile_s": max(first - step, 0.0),
        "model_gflops_per_s": batch * prefill_flops(config, miss, cached) / step / 1e9,
    }


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unknown arguments: {argv[1:]}")
    shapes = [_shape(s) for s in _SHAPES.value]
    if _OUT.value:
        writable_file_or_exit(_OUT.value, "--out")
    import jax

    dev = jax.devices()[0]
    log_start("experiments.bench_gpu", devices=jax.devices())  # (its flags showed only in the table heading)
    if dev.platform == "cpu":
        logging.warning(
            "bench_gpu runs on the CPU: its timings and FLOP rates say little of a GPU's (a benchmark of the "
            "accelerator; here a check that it runs)"
        )
    config = llama_1b(_LAYERS.value, _DTYPE.value)
    results: list[dict] = []
    # Ctrl-C: the finished shapes' tables are still printed, then one line (it was a traceback); SIGTERM the same
    # (it ended the run at once, no table printed)
    with SigtermAsInterrupt() as term:
        stopped = _run_shapes(shapes, config, dev, results, term)
    _print_tables(dev, results, stopped)


def _run_shapes(shapes, config, dev, results: list[dict], term: SigtermAsInterrupt) -> str | None:
    """Each shape's results appended to `results` (and written to --out as it finishes); the line saying where
    Ctrl-C / SIGTERM stopped them, or None."""
    from models.prefill_bench import run_one

    stopped = None
    for n, (batch, miss, cached) in enumerate(shapes, 1):
        logging.info("shape %d of %d: batch=%d miss=%d cached=%d", n, len(shapes), batch, miss, cached)
        r = {"model": "llama-1b", "batch": batch, "miss_tokens": miss, "cached_tokens": cached}
        try:
            if not _DEVICE_ONLY.value:
                r = run_one("llama-1b", config, batch, miss, cached, _REPEATS.value)
            r["on_device"] = whole_on_device(config, batch, miss, cached, _REPEATS.value)
        except KeyboardInterrupt as e:
            kept = f"; the {len(results)} finished shapes are above" if results else "; none had finished"
            stopped = f"bench_gpu: interrupted ({interrupted_by(e)}) during shape {batch}:{miss}:{cached}{kept}"
            if results and _OUT.value:
                stopped += f" and in {_OUT.value}"
            break
        r["device"] = f"{dev.platform}:{getattr(dev, 'device_kind', '')}"
        r["dtype"] = _DTYPE.value
        for side in ("layerwise", "whole", "on_device"):
            if _PEAK_TFLOPS.value and side in r:
                r[side]["mfu"] = r[side]["model_gflops_per_s"] / (_PEAK_TFLOPS.value * 1e3)
        results.append(r)
        term.raising = False  # (a SIGTERM while they are written is only noted: then it stops here)
        if _OUT.value:
            what = "the shapes done so far"  # (also the last line of a whole run)
            if len(results) == len(shapes):
                what = f"all {len(shapes)} shapes" if len(shapes) > 1 else "the one shape"
            write_rows_json(_OUT.value, results, what)
        term.raising = True
        if term.got:
            kept = f" and in {_OUT.value}" if _OUT.value else ""
            stopped = f"bench_gpu: stopped by SIGTERM after shape {batch}:{miss}:{cached}; the {len(results)} finished shapes are above{kept}"
            break
    return stopped


def device_name(dev) -> str:
    """The device's platform and kind ("gpu NVIDIA H200"), the kind only where it says more ("cpu", not "cpu cpu")."""
    kind = str(getattr(dev, "device_kind", "") or "")
    return dev.platform if kind.lower() in ("", str(dev.platform).lower()) else f"{dev.platform} {kind}"


def _print_tables(dev, results: list[dict], stopped: str | None) -> None:
    if stopped and not results:
        raise SystemExit(stopped)
    print(f"\nprefill of a ~1B dense model ({_LAYERS.value} layers, {_DTYPE.value}), device {device_name(dev)}")

    def rate(side):  # TFLOP/s; below 1 TFLOP/s in GFLOP/s (a CPU's 10.2 GFLOP/s read 0.0)
        mfu = f" ({side['mfu']:.1%})" if "mfu" in side else ""
        g = side["model_gflops_per_s"]
        return f"{g / 1e3:.1f}{mfu}" if g >= 1e3 else f"{g:.3g} GFLOP/s{mfu}"

    hdr = "| batch x miss (+cached) | compute only: whole jit on device ms | TFLOP/s (MFU) |"
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for r in results:
        print(
            f"| {r['batch']} x {r['miss_tokens']} (+{r['cached_tokens']}) | {r['on_device']['step_s'] * 1e3:.1f} | {rate(r['on_device'])} |"
        )
    if _DEVICE_ONLY.value:
        if stopped:
            raise SystemExit(stopped)
        return
    print()  # (a blank line: two Markdown tables, not one with mismatched columns)
    hdr = "| batch x miss (+cached) | layerwise ms | whole-jit ms | ratio (median / min) | layerwise TFLOP/s (MFU) | whole TFLOP/s (MFU) | tok/s layerwise | compile s (layerwise / whole) | max logit diff |"
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for r in results:
        lw, wh = r["layerwise"], r["whole"]
        print(
            f"| {r['batch']} x {r['miss_tokens']} (+{r['cached_tokens']}) | {lw['step_s'] * 1e3:.1f} | "
            f"{wh['step_s'] * 1e3:.1f} | {r['ratio']:.3f} / {r['ratio_min']:.3f} | {rate(lw)} | {rate(wh)} | "
            f"{lw['tokens_per_s']:.0f} | {lw['compile_s']:.2f} / {wh['compile_s']:.2f} | {r['max_abs_logit_diff']:.1e} |"
        )
    if stopped:
        raise SystemExit(stopped)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_checking_locale)
