"""Model demo: agents through a multi-turn conversation with layerwise prefill from cached KV.

    python -m experiments.demo
    python -m experiments.demo --model=deepseek --agents=4 --turns=5 --append_tokens=64 --gen_tokens=24

Each turn of each agent appends `append_tokens` (random ids: a stand-in for tool output) and generates
`gen_tokens` greedily. The KV of earlier turns is kept as Full Block bytes in an in-memory dict (the
role of the KV store); turn i's prefill loads the hit blocks layer by layer as Layer Blocks while the
layer steps run (`ModelRunner.prefill_layerwise`), computes only the miss tokens, hands each layer's
miss KV back (the DE side), which loads hit + miss KV into a decode slot, decodes, and writes each newly
filled block back as a Full Block. With --check (default) every turn is compared with a full prefill of
the whole prompt (max |logit diff|, same first token).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from absl import app, flags, logging

from experiments import log_start, parse_flags_checking_locale

_MODEL = flags.DEFINE_enum("model", "qwen2", ["qwen2", "llama", "deepseek", "deepseek_v2"], "tiny model family")
# --agents, --block_size, --seed, --no_persistent_cache: other launchers define them too, with their own defaults and
# help; allow_override lets the launchers be imported into one process (the last one imported defines them there;
# absl raised DuplicateFlagError), and a launcher that is run defines its flags last: its command line is its own
_AGENTS = flags.DEFINE_integer(
    "agents", 3, "conversations run side by side (batched prefill and decode)", lower_bound=1, allow_override=True
)
_TURNS = flags.DEFINE_integer("turns", 4, "turns per conversation", lower_bound=1)
_APPEND = flags.DEFINE_integer("append_tokens", 48, "tokens appended per turn", lower_bound=1)
_GEN = flags.DEFINE_integer("gen_tokens", 16, "tokens generated per turn", lower_bound=1)
_BLOCK = flags.DEFINE_integer("block_size", 16, "tokens per KV block", lower_bound=1, allow_override=True)
# (--seed=-1: a numpy traceback)
_SEED = flags.DEFINE_integer("seed", 0, "weights and token seed", lower_bound=0, allow_override=True)
_WARMUP = flags.DEFINE_bool("warmup", True, "run one unmeasured conversation first (compiles all buckets)")
_CHECK = flags.DEFINE_bool("check", True, "compare each turn with a full prefill of the whole prompt")
_NO_CACHE = flags.DEFINE_bool(
    "no_persistent_cache", False, "disable JAX's persistent compilation cache", allow_override=True
)


def make_config(name: str):
    from models.deepseek import tiny_deepseek, tiny_deepseek_v2
    from models.qwen2 import tiny_llama, tiny_qwen2

    return {
        "qwen2": tiny_qwen2,
        "llama": tiny_llama,
        "deepseek": tiny_deepseek,
        "deepseek_v2": tiny_deepseek_v2,
    }[name]()


def _cell(value: float | None, spec: str) -> str:
    """A table figure, or "-" for one not measured (no decode step, --nocheck)."""
    return "-" if value is None else format(value, spec)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unknown arguments: {argv[1:]}")
    try:
        _demo()
    # one line (it was a traceback, also in the seconds of `import jax` and the model's setup); the turns printed so
    # far are what finished
    except KeyboardInterrupt:
        raise SystemExit("demo: interrupted (Ctrl-C) before the conversation finished") from None


def _demo() -> None:
    import jax
    import numpy as np

    from models.jax_cache import enable_persistent_compilation_cache
    from models.kv import full_blocks_to_request_kv, layer_block
    from models.runner import ModelRunner, PrefillRequest, bucket

    if not _NO_CACHE.value:
        enable_persistent_compilation_cache()
    log_start("experiments.demo", devices=jax.devices())  # (versions, but no flags)
    config = make_config(_MODEL.value)
    agents, block = _AGENTS.value, _BLOCK.value
    total = _TURNS.value * (_APPEND.value + _GEN.value)
    runner = ModelRunner(config, seed=_SEED.value, num_slots=agents, capacity=bucket(total + 1, 64))
    logging.info("config: %s", config)
    print(
        f"model {config.architecture} ({config.num_layers} layers, {config.kv_bytes_per_token_per_layer} KV bytes/token/layer), "
        f"fingerprint {runner.fingerprint()}"
    )

    def conversation(seed: int, verbose: bool) -> tuple[list[tuple], list[list[np.ndarray]]]:
        """Run every agent through all turns; returns the table rows and the final store."""
        rng = np.random.default_rng(seed)
        layout = runner.layout

        store: list[list[np.ndarray]] = [[] for _ in range(agents)]  # per agent: Full Blocks (uint8 [L, block, bpt])
        context: list[list[int]] = [[] for _ in range(agents)]  # all tokens so far (appends + generations)
        rows = []
        for turn in range(_TURNS.value):
            appends = [rng.integers(0, config.vocab_size, _APPEND.value).tolist() for _ in range(agents)]
            prompts = [context[a] + appends[a] for a in range(agents)]
            cached = [len(store[a]) * block for a in range(agents)]
            requests = [PrefillRequest(np.asarray(prompts[a][cached[a] :], np.int32), cached[a]) for a in range(agents)]
            miss_kv: list[list[np.ndarray]] = [[] for _ in range(agents)]

            def provider(layer, store=store):  # Layer Blocks straight out of the stored Full Blocks (views)
                return [[layer_block(fb, layer) for fb in store[a]] or None for a in range(agents)]

            def on_layer_kv(layer, kvs, miss_kv=miss_kv):  # the DE receives each layer's miss KV
                for a, kv in enumerate(kvs):
                    miss_kv[a].append(kv.copy())

            traces_before = sum(runner.trace_counts.values())
            t0 = time.perf_counter()
            res = runner.prefill_layerwise(requests, provider if any(cached) else None, on_layer_kv)
            t_prefill = time.perf_counter() - t0

            # DE: hit + miss KV of the whole prompt into a decode slot.
            for a in range(agents):
                hit = full_blocks_to_request_kv(layout, store[a])  # [L, cached, *record]
                runner.free_slot(a)
                runner.load_prompt_kv(a, np.concatenate([hit, np.stack(miss_kv[a])], axis=1))
            generated = [[int(t)] for t in res.next_tokens]
            t0 = time.perf_counter()
            for _ in range(_GEN.value - 1):
                nxt = runner.decode_step(list(range(agents)), [g[-1] for g in generated])
                for a in range(agents):
                    generated[a].append(int(nxt[a]))
            t_decode = time.perf_counter() - t0
            compiles = sum(runner.trace_counts.values()) - traces_before

            diff = None  # (--nocheck: "nan" in the table, read as NaN logits)
            if _CHECK.value:
                ref_logits, _ = runner.full_prefill([np.asarray(p, np.int32) for p in prompts])
                ref_last = np.stack([lg[-1] for lg in ref_logits])
                diff = float(np.abs(ref_last - res.last_logits).max())
                # (`diff > 1e-4` passed NaN logits of both paths: argmax agrees on the first NaN, "nan" was printed)
                if not np.array_equal(ref_last.argmax(-1), res.next_tokens) or not diff <= 1e-4:
                    raise RuntimeError(
                        f"turn {turn}: layerwise prefill differs from full prefill (max diff {diff:.2e})"
                    )

            # Write back every block the decode cache has filled and the store lacks.
            for a in range(agents):
                context[a] = prompts[a] + generated[a]
                for b in range(len(store[a]), runner.slot_length(a) // block):
                    store[a].append(runner.read_full_block(a, b, block))
            miss_tokens = sum(len(r.miss_token_ids) for r in requests)
            # --gen_tokens=1 runs no decode step: no rate (it was "0 tok/s", as if measured)
            decode_rate = agents * (_GEN.value - 1) / max(t_decode, 1e-9) if _GEN.value > 1 else None
            rows.append(
                (
                    turn,
                    sum(len(p) for p in prompts),
                    sum(cached),
                    miss_tokens,
                    t_prefill * 1e3,
                    miss_tokens / t_prefill,
                    decode_rate,
                    diff,
                    compiles,
                    " ".join(str(g[0]) for g in generated),
                )
            )
            if verbose:
                print(
                    f"turn {turn}: prefill {miss_tokens / t_prefill:,.0f} tok/s, decode {_cell(decode_rate, ',.0f')} tok/s"
                )

        return rows, store

    if _WARMUP.value:
        # A first conversation with other tokens compiles every bucket the measured one will use.
        print("warm-up conversation (not measured: it compiles every bucket) ...", flush=True)
        conversation(_SEED.value + 1, verbose=False)
    rows, store = conversation(_SEED.value, verbose=True)
    warm = "after a warm-up conversation" if _WARMUP.value else "no warm-up (--nowarmup): compiles are timed too"
    print(
        f"\n{agents} agents x {_TURNS.value} turns, append {_APPEND.value}, gen {_GEN.value}, block {block} "
        f"({warm}; new traces = compiles during this one)"
    )
    print(
        "| turn | prompt tok | hit tok | miss tok | prefill ms | prefill tok/s | decode tok/s | max diff vs full | new traces | first tokens |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.1f} | {r[5]:,.0f} | {_cell(r[6], ',.0f')} | {_cell(r[7], '.1e')} | "
            f"{r[8]} | {r[9]} |"
        )
    stored = sum(len(s) for s in store)
    print(f"store: {stored} Full Blocks, {stored * block * config.kv_bytes_per_token:,} bytes")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_checking_locale)
