"""What batch-invariant execution costs (models/layers/invariant.py): default vs invariant steps, same run.

  python -m experiments.bench_invariant                 # tiny runtime model + the prefill-bench models
  python -m experiments.bench_invariant --repeats=7 --prompt=1024

Cases (one request unless said): a whole-prompt prefill (layerwise), a 64-token append prefilled over a
cached prefix (the agentic turn), and one decode step of `--slots` slots at the prompt's context. Repeats
alternate the two modes, so both see the same machine load; medians are reported with their ratio. Also checks
what the mode is for: the invariant runner's KV of a chunked prefill equals its whole prefill bit for bit.
`--out=FILE` writes the rows as JSON (a model that fails keeps the finished models' rows, and their table).
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time

import numpy as np
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

# --models, --repeats, --out: other benchmarks define them too, with their own defaults, help and validators;
# allow_override lets the launchers be imported into one process (the last one imported defines them there; absl
# raised DuplicateFlagError), and a launcher that is run defines its flags last: its command line is its own
_MODELS = flags.DEFINE_list(
    "models",
    ["tiny_qwen2", "tiny_deepseek", "dense", "moe"],
    "tiny names, or dense / moe (experiments.bench_prefill)",
    allow_override=True,
)
_PROMPT = flags.DEFINE_integer("prompt", 512, "prompt tokens (the cached prefix of the append case)", lower_bound=64)
_APPEND = flags.DEFINE_integer("append", 64, "tokens of the append case", lower_bound=1)
_SLOTS = flags.DEFINE_integer("slots", 8, "decode slots", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 5, "interleaved repeats per case", lower_bound=1, allow_override=True)
_OUT = flags.DEFINE_string("out", "", "write the rows as JSON here (default: print only)", allow_override=True)
define_rerun_of()


def _known_models(names) -> bool:
    from models.registry import TINY_CONFIGS

    return all(n in ("dense", "moe") or n in TINY_CONFIGS for n in names)


# (an empty --models= printed an empty table; an unknown model was a KeyError after the others had run)
flags.register_validator(
    "models",
    lambda v: bool(v) and _known_models(v),
    message="--models takes one or more of tiny_qwen2, tiny_llama, tiny_deepseek, tiny_deepseek_v2, dense, moe",
)
register_distinct("models")  # (a model given twice was benchmarked twice)


def _config(name: str):
    from models.prefill_bench import bench_configs
    from models.registry import tiny_config

    if name in ("dense", "moe"):
        return bench_configs()[name]
    return tiny_config(name)


def _cases(runner, prompt: int, append: int, slots: int, rng):
    """name -> zero-argument callable that runs the case once and waits for it."""
    from models.runner import PrefillRequest

    vocab = runner.config.vocab_size
    seq = rng.integers(0, vocab, prompt + append).astype(np.int32)
    _, kv = runner.full_prefill([seq[:prompt]])
    cached = kv[0]
    capacity = prompt + 2 * append
    runner.init_decode(slots, capacity)
    for s in range(slots):
        runner.load_prompt_kv(s, cached)

    def whole():
        runner.prefill_layerwise([PrefillRequest(seq[:prompt], 0)])

    def appended():
        runner.prefill_layerwise([PrefillRequest(seq[prompt:], prompt)], lambda layer: [cached[layer]])

    def decode():
        if runner.slot_length(0) >= capacity - 1:
            for s in range(slots):
                runner.free_slot(s)
                runner.load_prompt_kv(s, cached)
        # one last token per slot (seq[:slots] was short of --slots > prompt + append: "70 slots but 65 last tokens")
        runner.decode_step(np.arange(slots), np.resize(seq, slots))

    return {f"prefill {prompt}": whole, f"append {append} over {prompt}": appended, f"decode x{slots}": decode}


def _chunked_equals_whole(runner, rng) -> bool:
    from models.runner import PrefillRequest

    seq = rng.integers(0, runner.config.vocab_size, 100).astype(np.int32)
    whole = runner.prefill_layerwise([PrefillRequest(seq, 0)], return_kv=True).miss_kv[0]
    first = runner.prefill_layerwise([PrefillRequest(seq[:37], 0)], return_kv=True).miss_kv[0]
    rest = runner.prefill_layerwise([PrefillRequest(seq[37:], 37)], lambda layer: [first[layer]], return_kv=True)
    return bool(np.array_equal(np.concatenate([first, rest.miss_kv[0]], axis=1), whole))


def _print_table(rows: list[dict]) -> None:
    print(f"\n## Batch-invariant execution vs default ({_REPEATS.value} interleaved repeats, medians)\n")
    print("| model | case | default | invariant | invariant / default |")
    print("| --- | --- | ---: | ---: | ---: |")
    for r in rows:
        if "ratio" not in r:
            print(
                f"| {r['model']} | {r['case']} | {'yes' if r['default'] else 'no'} | {'yes' if r['invariant'] else 'no'} | |"
            )
        else:
            print(
                f"| {r['model']} | {r['case']} | {r['default_ms']:.1f} ms | {r['invariant_ms']:.1f} ms | "
                f"{r['ratio']:.2f}x |"
            )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unknown arguments: {argv[1:]}")
    if _OUT.value:
        writable_file_or_exit(_OUT.value, "--out")  # before the benchmark, not after
    log_start("experiments.bench_invariant")  # (it logged nothing before its first model was done)
    try:
        from models.runner import ModelRunner
    except KeyboardInterrupt:  # (a traceback: the import brings jax and flax, seconds)
        raise SystemExit("bench_invariant: interrupted (Ctrl-C) before any model ran; nothing written") from None

    rows: list[dict] = []

    def run_model(name: str) -> None:
        cfg = _config(name)
        runners = {
            mode: ModelRunner(dataclasses.replace(cfg, batch_invariant=mode == "invariant"), seed=0)
            for mode in ("default", "invariant")
        }
        cases = {
            mode: _cases(r, _PROMPT.value, _APPEND.value, _SLOTS.value, np.random.default_rng(0))
            for mode, r in runners.items()
        }
        times = {(mode, case): [] for mode in runners for case in cases[mode]}
        for n, case in enumerate(cases["default"], 1):
            logging.info("%s: case %d of %d, %s (%d repeats)", name, n, len(cases["default"]), case, _REPEATS.value)
            for mode in runners:  # compile + warm
                cases[mode][case]()
            for _ in range(_REPEATS.value):
                for mode in runners:
                    t0 = time.perf_counter()
                    cases[mode][case]()
                    times[(mode, case)].append(time.perf_counter() - t0)
        exact = {mode: _chunked_equals_whole(r, np.random.default_rng(1)) for mode, r in runners.items()}
        for case in cases["default"]:
            d = statistics.median(times[("default", case)]) * 1e3
            i = statistics.median(times[("invariant", case)]) * 1e3
            rows.append({"model": name, "case": case, "default_ms": d, "invariant_ms": i, "ratio": i / d})
        rows.append(
            {
                "model": name,
                "case": "chunked KV == whole KV",
                "default": exact["default"],
                "invariant": exact["invariant"],
            }
        )
        logging.info("%s done", name)

    def write(what: str) -> None:  # a model that fails keeps the finished models' rows
        _print_table(rows)
        sys.stdout.flush()  # (a file's stdout showed nothing until the exit)
        if _OUT.value:
            write_rows_json(_OUT.value, rows, what)

    run_parts_then_write("bench_invariant", "model", _MODELS.value, run_model, write)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_checking_locale)
