"""Prefill benchmark: per-layer jitted pipeline vs one jit of the whole model, on the same batch.

    python -m experiments.bench_prefill                       # tiny dense + tiny MoE, CPU, < 1 min
    python -m experiments.bench_prefill --batch=8 --miss_tokens=128 --cached_tokens=384 --repeats=10

For each model: a batch of `batch` requests, each with `cached_tokens` of cached prefix (KV fed layer by layer
as Layer Blocks from host memory, like the runtime does) and `miss_tokens` computed. The layerwise pipeline
(`ModelRunner.prefill_layerwise`: embed step, one jitted step per layer, KV of each layer to host, head step)
is timed against `ModelRunner.prefill_whole` (one jit of embed + all layers + head over the same inputs, its KV
also copied to host). Reported: warm step time (median and min of `repeats`, the two paths interleaved so both
see the same load, after a warm-up, block_until_ready via host copies), ratio layerwise/whole (goal <= 1.15), miss tokens/s, traces (= compiles) per step and bucket,
and compile time (first call minus warm time). `--no_persistent_cache` measures cold compiles; with the cache
on, a second run shows cache-load times instead.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

from absl import app, flags, logging

from experiments import (
    define_rerun_of,
    log_start,
    parse_flags_checking_locale,
    register_distinct,
    run_parts_then_write,
    writable_file_or_exit,
    write_rows_json,
)
from models.prefill_bench import bench_configs, run_one

_BATCH = flags.DEFINE_integer("batch", 4, "requests per prefill batch", lower_bound=1)
_MISS = flags.DEFINE_integer("miss_tokens", 128, "miss (computed) tokens per request", lower_bound=1)
# (any count runs: bench_gpu's --shapes asks a multiple of 64, this benchmark feeds the rest as one block)
_CACHED = flags.DEFINE_integer(
    "cached_tokens",
    256,
    "cached prefix tokens per request (0: no cache); a multiple of 64 is fed as 64-token Layer Blocks, another count "
    "as one block of its tokens",
    lower_bound=0,
)
# --repeats, --models, --peak_tflops, --no_persistent_cache, --out: other benchmarks define them too, with their own
# defaults, help and validators; allow_override lets the launchers be imported into one process (the last one
# imported defines them there; absl raised DuplicateFlagError), and a launcher that is run defines its flags last:
# its command line is its own
_REPEATS = flags.DEFINE_integer("repeats", 7, "timed repetitions (median reported)", lower_bound=1, allow_override=True)
_MODELS = flags.DEFINE_list("models", ["dense", "moe"], "which tiny configs: dense, moe", allow_override=True)
flags.register_validator(  # (an empty --models= printed an empty table)
    "models", lambda v: bool(v) and set(v) <= {"dense", "moe"}, message="--models takes one or more of dense, moe"
)
register_distinct("models")  # (--models=dense,dense benchmarked dense twice: two rows of one model)
_MOE_DISPATCH = flags.DEFINE_enum("moe_dispatch", "dense", ["dense", "ragged"], "MoE expert dispatch")
_PEAK_TFLOPS = flags.DEFINE_float(
    "peak_tflops", 0.0, "device peak TFLOP/s for MFU (0: not reported)", lower_bound=0.0, allow_override=True
)
flags.register_validator(  # (nan passed the lower bound and printed "MFU nan%"; inf printed "MFU 0.0%")
    "peak_tflops", lambda v: 0 <= v < math.inf, message="--peak_tflops must be >= 0 and finite"
)
_NO_CACHE = flags.DEFINE_bool(
    "no_persistent_cache", False, "disable JAX's persistent compilation cache", allow_override=True
)
_OUT = flags.DEFINE_string("out", "", "write results as JSON here (default: print only)", allow_override=True)
define_rerun_of()


def _setup():
    """jax (its compilation cache on unless --no_persistent_cache, its devices logged) and the tiny configs."""
    import jax

    from models.jax_cache import enable_persistent_compilation_cache

    if not _NO_CACHE.value:
        logging.info("persistent compilation cache: %s", enable_persistent_compilation_cache())
    log_start("experiments.bench_prefill", devices=jax.devices())  # (versions, but no flags)
    return jax, bench_configs(_MOE_DISPATCH.value)


def _print_table(device: str, results: list[dict]) -> None:
    """The models' results as a markdown table, under a line naming the shapes."""
    print(
        f"\nprefill, device={device}, batch={_BATCH.value}, miss={_MISS.value}, cached={_CACHED.value}"
        + (f", moe_dispatch={_MOE_DISPATCH.value}" if "moe" in _MODELS.value else "")
    )
    hdr = "| model | layers (kinds) | layerwise ms | whole-jit ms | ratio (median / min) | layerwise tok/s | whole tok/s | traces per step (layerwise) | compile s (layerwise / whole) | layerwise GFLOP/s | max logit diff |"
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for r in results:
        lw, wh = r["layerwise"], r["whole"]
        mfu = f" (MFU {lw['model_gflops_per_s'] / (_PEAK_TFLOPS.value * 1e3):.1%})" if _PEAK_TFLOPS.value else ""
        traces = ", ".join(f"{k}:{v}" for k, v in sorted(lw["traces"].items()))
        print(
            f"| {r['model']} ({r['arch']}) | {r['layers']} ({r['layer_kinds']}) | {lw['step_s'] * 1e3:.1f} | "
            f"{wh['step_s'] * 1e3:.1f} | {r['ratio']:.3f} / {r['ratio_min']:.3f} | {lw['tokens_per_s']:.0f} | {wh['tokens_per_s']:.0f} | "
            f"{traces} | {lw['compile_s']:.2f} / {wh['compile_s']:.2f} | {lw['model_gflops_per_s']:.1f}{mfu} | "
            f"{r['max_abs_logit_diff']:.1e} |"
        )


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unknown arguments: {argv[1:]}")
    if flags.FLAGS["moe_dispatch"].present and "moe" not in _MODELS.value:  # (it was dropped without a word)
        raise SystemExit(f"bad --moe_dispatch: it applies to the moe model, not to --models={','.join(_MODELS.value)}")
    if _OUT.value:
        writable_file_or_exit(_OUT.value, "--out")  # before the benchmark, not after
    try:
        jax, configs = _setup()
    except KeyboardInterrupt:  # (a traceback: `import jax` and the backend's start take seconds)
        raise SystemExit("bench_prefill: interrupted (Ctrl-C) before any model ran; nothing written") from None
    results = []

    def run_model(name: str) -> None:
        logging.info("config %s: %s", name, configs[name])
        r = run_one(name, configs[name], _BATCH.value, _MISS.value, _CACHED.value, _REPEATS.value)
        if name == "moe":  # the dispatch measured (the JSON of a ragged run and of a dense one were alike)
            r = {**r, "moe_dispatch": _MOE_DISPATCH.value}
        results.append(r)

    def write(what: str) -> None:  # a model that fails (e.g. out of memory) keeps the others
        if _OUT.value:
            write_rows_json(_OUT.value, results, what)
        # printed too: without --out, Ctrl-C in the second model said the first was "kept" and showed it nowhere
        _print_table(jax.devices()[0].platform, results)
        sys.stdout.flush()

    run_parts_then_write("bench_prefill", "model", _MODELS.value, run_model, write, what="results")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_checking_locale)
