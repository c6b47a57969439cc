"""Per-layer prefill/decode of both families: layerwise == full prefill, decode tokens, compile-once."""

from __future__ import annotations

import copy
import re

import chex
import numpy as np
import pytest

from models.deepseek import tiny_deepseek, tiny_deepseek_v2
from models.kv import full_blocks_to_request_kv, layer_block, request_kv_to_full_blocks
from models.qwen2 import tiny_llama, tiny_qwen2
from models.runner import ModelRunner, PrefillRequest

BLOCK = 16
CONFIGS = {
    "qwen2": tiny_qwen2,
    "llama": tiny_llama,
    "deepseek_v3": tiny_deepseek,
    "deepseek_v2": tiny_deepseek_v2,
}


# llama and deepseek_v2 differ from qwen2 / deepseek_v3 only in config (bias, RoPE variant, tying, routing):
# they run the multi-turn test by default and the decode test under -m slow (keeps the default run short).
_SLOW_DECODE = {"llama", "deepseek_v2"}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def runner(request):
    return ModelRunner(CONFIGS[request.param](), seed=7, num_slots=4, capacity=256)


def _generate(runner: ModelRunner, slot: int, first_token: int, n: int) -> tuple[list[int], int]:
    """Feed n tokens (their KV gets written); returns them and the next token (no KV yet)."""
    fed, tok = [], first_token
    for _ in range(n):
        fed.append(tok)
        tok = int(runner.decode_step([slot], [tok])[0])
    return fed, tok


def test_multi_turn_layerwise_equals_full_prefill(runner):
    """Turn 2 prefilled layer by layer over Full Blocks saved from turn 1 (prefill + decode) matches a full
    prefill of the whole prompt, in a batch mixing cached lengths (two different, and 0)."""
    rng = np.random.default_rng(0)
    vocab = runner.config.vocab_size
    # Turn 1 of two agents: full prefill, decode a few tokens, write back Full Blocks from the decode cache.
    turn1 = [
        rng.integers(0, vocab, 30),
        rng.integers(0, vocab, 20),
        rng.integers(0, vocab, 9),
    ]
    logits, kv = runner.full_prefill(turn1)  # the third agent is a bystander (same batch bucket as turn 2)
    stored, contexts = [], []
    for slot, (prompt, lg, k) in enumerate(zip(turn1[:2], logits, kv, strict=False)):
        runner.free_slot(slot)
        runner.load_prompt_kv(slot, k)
        fed, nxt = _generate(runner, slot, int(np.argmax(lg[-1])), 6)
        assert runner.slot_length(slot) == prompt.size + len(fed)
        n_blocks = runner.slot_length(slot) // BLOCK
        stored.append([runner.read_full_block(slot, b, BLOCK) for b in range(n_blocks)])
        contexts.append(np.concatenate([prompt, fed, [nxt]]))
    # Turn 2: append tokens; hit = whole stored blocks; a third, fresh request has no cache.
    prompts = [
        np.concatenate([contexts[0], rng.integers(0, vocab, 9)]),
        np.concatenate([contexts[1], rng.integers(0, vocab, 30)]),
        rng.integers(0, vocab, 25),
    ]
    cached_lens = [len(stored[0]) * BLOCK, len(stored[1]) * BLOCK, 0]
    assert len(set(cached_lens)) == 3 and cached_lens[0] > 0 and cached_lens[1] > 0
    blocks = stored + [[]]

    calls = []

    def provider(layer):
        calls.append(layer)
        # Layer Blocks straight out of the stored Full Blocks (views), as the store would hand them over.
        return [[layer_block(fb, layer) for fb in bl] if bl else None for bl in blocks]

    sent = {}
    res = runner.prefill_layerwise(
        [PrefillRequest(p[c:], c) for p, c in zip(prompts, cached_lens, strict=False)],
        provider,
        lambda layer, kvs: sent.__setitem__(layer, [k.copy() for k in kvs]),
        return_kv=True,
    )
    assert calls == list(range(runner.num_layers)) and sorted(sent) == calls
    ref_logits, ref_kv = runner.full_prefill(prompts)
    ref_last = np.stack([lg[-1] for lg in ref_logits])
    assert np.abs(res.last_logits - ref_last).max() <= 1e-4
    np.testing.assert_array_equal(res.next_tokens, ref_last.argmax(-1))
    for i, c in enumerate(cached_lens):
        np.testing.assert_allclose(res.miss_kv[i], ref_kv[i][:, c:], atol=1e-4)
        for layer in range(runner.num_layers):
            np.testing.assert_array_equal(sent[layer][i], res.miss_kv[i][layer])
        # Stored (decode-written) KV agrees with the full prefill's KV of the same tokens.
        if c:
            np.testing.assert_allclose(
                full_blocks_to_request_kv(runner.layout, stored[i]),
                ref_kv[i][:, :c],
                atol=1e-4,
            )


@pytest.mark.parametrize(
    "runner",
    [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_DECODE else n for n in sorted(CONFIGS)],
    indirect=True,
)
def test_decode_after_layerwise_equals_decode_after_full(runner):
    """Greedy decode from (cached + miss) KV assembled by the DE matches decode from full-prefill KV, and a
    recomputation by full prefill at every step; slots join and leave (continuous batching)."""
    rng = np.random.default_rng(1)
    vocab = runner.config.vocab_size
    prompts = [
        rng.integers(0, vocab, 45),
        rng.integers(0, vocab, 18),
        rng.integers(0, vocab, 5),
    ]
    cached = [32, 0, 0]
    logits, kv = runner.full_prefill(prompts)
    res = runner.prefill_layerwise(
        [PrefillRequest(p[c:], c) for p, c in zip(prompts, cached, strict=False)],
        lambda layer: [kv[0][layer, :32], None, None],
        return_kv=True,
    )
    # DE side: slots 0,1 get layerwise KV (cached part + returned miss part), slots 2,3 the full-prefill KV.
    for i in range(2):
        runner.free_slot(i)
        runner.load_prompt_kv(i, np.concatenate([kv[i][:, : cached[i]], res.miss_kv[i]], axis=1))
        runner.free_slot(2 + i)
        blocks = request_kv_to_full_blocks(runner.layout, kv[i], BLOCK, include_partial=True)
        runner.load_prompt_kv(2 + i, blocks)
        # Full Blocks -> decode cache (head-major for GQA) -> Full Blocks is bit-exact.
        for b, fb in enumerate(blocks[: len(prompts[i]) // BLOCK]):
            assert runner.read_full_block(2 + i, b, BLOCK).tobytes() == fb.tobytes()
    first = [int(np.argmax(lg[-1])) for lg in logits]
    np.testing.assert_array_equal(res.next_tokens[:2], first[:2])
    seqs = [list(p) + [t] for p, t in zip(prompts, first, strict=False)]
    last = {0: first[0], 1: first[1], 2: first[0], 3: first[1]}
    gen = {s: [] for s in last}
    active = [0, 2, 3]  # slot 1 joins later, slot 3 leaves early
    for step in range(6):
        if step == 2:
            active.append(1)
        if step == 4:
            active.remove(3)
        nxt = runner.decode_step(active, [last[s] for s in active])
        for s, t in zip(active, nxt, strict=False):
            last[s] = int(t)
            gen[s].append(int(t))
        if step < 3:  # ground truth: recompute the whole sequence with a full prefill
            seqs[0].append(last[0])
            ref_logits, _ = runner.full_prefill([np.array(seqs[0][:-1])] + prompts[1:])  # same bucket
            assert int(np.argmax(ref_logits[0][-1])) == last[0]
    assert gen[0] == gen[2] and len(gen[0]) == 6
    n = min(len(gen[1]), len(gen[3]))
    assert n >= 2 and gen[1][:n] == gen[3][:n]


def test_identical_layers_compile_once_per_bucket():
    """N identical layers share one executable: each step traces once per bucket (chex.assert_max_traces)."""
    chex.clear_trace_counter()
    runner = ModelRunner(tiny_qwen2(num_layers=6), seed=0, num_slots=4, capacity=128, max_traces=1)
    assert runner.num_layer_kinds == 1
    rng = np.random.default_rng(2)

    def prov(layer):
        return [
            rng.standard_normal((c, *runner.layout.record_shape)).astype(np.float32) if c else None for c in (20, 0, 9)
        ]

    for lens in ((5, 11, 16), (1, 7, 3)):  # same buckets: B 4, T 16, C 32
        runner.prefill_layerwise(
            [PrefillRequest(rng.integers(0, 128, n), c) for n, c in zip(lens, (20, 0, 9), strict=False)],
            prov,
        )
    assert runner.trace_counts["prefill_layer0"] == 1 and runner.trace_counts["embed"] == 1
    runner.load_prompt_kv(0, np.zeros((6, 10, *runner.layout.record_shape), np.float32))
    runner.load_prompt_kv(1, np.zeros((6, 3, *runner.layout.record_shape), np.float32))
    for slots in ([0], [0, 1], [1]):
        runner.decode_step(slots, [1] * len(slots))
    assert runner.trace_counts["decode_layer0"] == 1
    # A new bucket compiles once more; with max_traces=1 chex refuses it.
    with pytest.raises(AssertionError, match="traced > 1"):
        runner.prefill_layerwise([PrefillRequest(rng.integers(0, 128, 40), 0)])


def test_moe_layer_kinds_compile_once_each():
    chex.clear_trace_counter()
    cfg = tiny_deepseek(num_layers=4)
    runner = ModelRunner(cfg, seed=0, num_slots=2, capacity=64, max_traces=1)
    assert runner.num_layer_kinds == 2  # first_k_dense layer + MoE layers
    rng = np.random.default_rng(3)
    for n in (3, 12):
        runner.prefill_layerwise([PrefillRequest(rng.integers(0, 128, n), 0)])
    assert runner.trace_counts["prefill_layer0"] == 1 and runner.trace_counts["prefill_layer1"] == 1


def test_bad_prefill_inputs():
    runner = ModelRunner(tiny_qwen2(num_layers=1), seed=0, num_slots=2, capacity=32)
    rec = runner.layout.record_shape
    with pytest.raises(ValueError, match="no miss tokens"):
        runner.prefill_layerwise([PrefillRequest(np.zeros(0, np.int32), 0)])
    with pytest.raises(ValueError, match="no cached_kv_provider"):
        runner.prefill_layerwise([PrefillRequest(np.ones(3, np.int32), 4)])
    with pytest.raises(ValueError, match="request 0: provider gave KV of 3 tokens, cached_len=4"):
        runner.prefill_layerwise(
            [PrefillRequest(np.ones(3, np.int32), 4)],
            lambda layer: [np.zeros((3, *rec), np.float32)],
        )
    bpt = runner.layout.bytes_per_token_per_layer
    with pytest.raises(ValueError, match="request 0: provider gave KV of 6 tokens, cached_len=4"):  # Layer Blocks
        runner.prefill_layerwise(
            [PrefillRequest(np.ones(3, np.int32), 4)], lambda layer: [[np.zeros((1, 3, bpt), np.uint8)] * 2]
        )
    with pytest.raises(ValueError, match="KV bytes must be uint8"):
        runner.prefill_layerwise([PrefillRequest(np.ones(3, np.int32), 4)], lambda layer: [np.zeros((4, 7), np.uint8)])
    with pytest.raises(ValueError, match="token id out of range"):
        runner.prefill_layerwise([PrefillRequest(np.array([999]), 0)])
    with pytest.raises(ValueError, match="exceeds decode capacity"):
        runner.load_prompt_kv(0, np.zeros((1, 40, *rec), np.float32))
    runner.load_prompt_kv(0, np.zeros((1, 32, *rec), np.float32))
    with pytest.raises(ValueError, match="slot 0 is full"):
        runner.decode_step([0], [1])
    with pytest.raises(ValueError, match="slot 1 holds no sequence"):
        runner.read_kv(1, 0, 4)


def test_bad_kv_and_token_inputs_are_named_not_reinterpreted():
    """Caller mistakes that used to pass silently (a token id clamped or NaN-embedded on device, KV reshaped into
    other layers/tokens/heads, KV ignored) raise an error naming the slot / layer / request, before any step."""
    runner = ModelRunner(tiny_qwen2(num_layers=2), seed=0, num_slots=2, capacity=32)
    rec, bpt, vocab = runner.layout.record_shape, runner.layout.bytes_per_token_per_layer, runner.config.vocab_size
    one = [PrefillRequest(np.ones(3, np.int32), 4)]
    # Prefill: float token ids; KV for a request with cached_len 0; records of another shape or dtype; no layer axis.
    with pytest.raises(ValueError, match="request 0: token ids must be integers"):
        runner.prefill_layerwise([PrefillRequest(np.array([1.7, 2.0]), 0)])
    with pytest.raises(ValueError, match="layer 0, request 0: provider gave KV of 4 tokens, cached_len=0"):
        runner.prefill_layerwise(
            [PrefillRequest(np.ones(3, np.int32), 0)] + one, lambda layer: [np.zeros((4, *rec), np.float32)] * 2
        )
    with pytest.raises(ValueError, match=r"layer 0, request 0: KV records have shape \(4, 2, 16, 2\)"):
        runner.prefill_layerwise(one, lambda layer: [np.zeros((4, rec[0], rec[2], rec[1]), np.float32)])
    with pytest.raises(ValueError, match="layer 0, request 0: KV dtype float64"):
        runner.prefill_layerwise(one, lambda layer: [np.zeros((4, *rec), np.float64)])
    with pytest.raises(ValueError, match=r"request 0: cached_kv has shape \(4, 2, 2, 16\), expected \[2, tokens"):
        runner.prefill_whole(one, [np.zeros((4, *rec), np.float32)])  # one layer's records, not [L, c, ...]
    with pytest.raises(ValueError, match=r"request 0: token ids of shape \(\); full_prefill takes a batch"):
        runner.full_prefill(np.arange(5))  # one prompt, not a batch: was 5 requests of one token each
    with pytest.raises(ValueError, match="request 0: cached_kv of 4 tokens given, cached_len=0"):  # was ignored
        runner.prefill_whole([PrefillRequest(np.ones(3, np.int32), 0)], [np.zeros((2, 4, *rec), np.float32)])
    # Decode cache: KV of the wrong layer count or record shape is not reshaped into [L, P, *record].
    for bad in (
        np.zeros((4, *rec), np.float32),  # one layer: was read as 2 layers of 2 tokens
        np.zeros((4, 4, bpt), np.uint8),  # bytes of 4 layers: was read as 2 layers of 8 tokens
        [np.zeros((1, 4, bpt), np.uint8)] * 2,  # Layer Blocks instead of Full Blocks
        np.zeros((2, 4, rec[0], rec[2], rec[1]), np.float32),
    ):
        with pytest.raises(ValueError, match="slot 1: "):
            runner.load_prompt_kv(1, bad)
        assert runner.slot_length(1) == 0
    with pytest.raises(ValueError, match="slot 0.5 out of range"):
        runner.load_prompt_kv(0.5, np.zeros((2, 4, *rec), np.float32))
    runner.load_prompt_kv(0, np.zeros((2, 4, *rec), np.float32))
    # Decode: a token id outside the vocabulary (NaN or wrapped on device, written into the slot's KV); floats.
    for tok in (-1, vocab, 2**40):
        with pytest.raises(ValueError, match=f"slot 0: last token {tok} out of range \\[0, {vocab}\\)"):
            runner.decode_step([0], [tok])
    with pytest.raises(ValueError, match="must be integers"):
        runner.decode_step([0], [1.7])
    with pytest.raises(ValueError, match="must be integers"):
        runner.decode_step([0.5], [1])
    assert runner.slot_length(0) == 4  # nothing was written
    with pytest.raises(ValueError, match="must be integers"):  # block 0.5 read tokens [1, 3), not a block
        runner.read_full_block(0, 0.5, 2)
    with pytest.raises(ValueError, match="num_slots=-1"):
        runner.init_decode(-1, 16)


def test_decode_slot_lifecycle_is_checked():
    """A slot holds a sequence from load_prompt_kv until free_slot. Decoding an empty slot (never loaded, or
    freed) used to run as a fresh sequence: a token out of no context, KV written at position 0 of a slot
    nobody holds, the length counted up. Now every misuse is a ValueError naming the slot, before any step;
    a load over a live slot is refused (free it first) and freeing twice is a no-op."""
    runner = ModelRunner(tiny_qwen2(num_layers=1), seed=0, num_slots=3, capacity=32)
    rec = runner.layout.record_shape
    kv = np.random.default_rng(0).standard_normal((1, 5, *rec)).astype(np.float32)
    with pytest.raises(ValueError, match="slot 1 holds no sequence"):  # never loaded
        runner.decode_step([1], [3])
    assert runner.slot_length(1) == 0 and not runner.slot_in_use(1)
    runner.load_prompt_kv(0, kv)
    runner.load_prompt_kv(1, kv)
    with pytest.raises(ValueError, match="slot 2 holds no sequence"):  # one empty slot in a batch: nothing runs
        runner.decode_step([0, 2], [3, 3])
    with pytest.raises(ValueError, match=r"duplicate slots in decode batch: \[0, 0\]"):
        runner.decode_step([0, 0], [3, 3])
    for bad in (3, -1):
        with pytest.raises(ValueError, match=f"slot {bad} out of range"):
            runner.decode_step([bad], [3])
    with pytest.raises(ValueError, match="slot True out of range"):  # was slot 1
        runner.load_prompt_kv(True, kv)
    assert [runner.slot_length(s) for s in range(3)] == [5, 5, 0]
    (t0,) = runner.decode_step([0], [3])
    runner.free_slot(0)
    runner.free_slot(0)  # freeing an empty slot: a no-op
    assert runner.slot_length(0) == 0 and not runner.slot_in_use(0)
    with pytest.raises(ValueError, match="slot 0 holds no sequence"):  # freed
        runner.decode_step([0], [int(t0)])
    with pytest.raises(ValueError, match="slot 0 holds no sequence"):
        runner.read_full_block(0, 0, 4)
    # Loading over a live slot is refused (it silently replaced another request's sequence); freed, slot 1
    # (decoded once) reloaded decodes like slot 0 did.
    runner.decode_step([1], [7])
    with pytest.raises(ValueError, match=r"slot 1 holds a sequence of 6 tokens; free_slot\(1\) before loading"):
        runner.load_prompt_kv(1, kv)
    assert runner.slot_length(1) == 6  # untouched
    runner.free_slot(1)
    runner.load_prompt_kv(1, kv)
    assert runner.slot_length(1) == 5 and runner.slot_in_use(1)
    assert runner.decode_step([1], [3])[0] == t0
    # A loaded prompt of 0 tokens is a sequence (the first token decoded from no context), not an empty slot.
    runner.load_prompt_kv(2, np.zeros((1, 0, *rec), np.float32))
    assert runner.slot_in_use(2) and runner.decode_step([2], [3]).shape == (1,) and runner.slot_length(2) == 1
    # The decode cache of a copy (the runtime's DecodeBatch) starts empty.
    other = copy.copy(runner)
    other.init_decode(2, 16)
    assert not other.slot_in_use(1) and runner.slot_in_use(1)


def test_integer_arguments_are_not_truncated():
    """cached_len 2.5 and num_slots 2.5 were truncated (int()) instead of refused."""
    runner = ModelRunner(tiny_qwen2(num_layers=1), seed=0, num_slots=2, capacity=32)
    rec = runner.layout.record_shape
    with pytest.raises(ValueError, match=r"request 0: cached_len=2.5 must be an integer"):
        runner.prefill_layerwise(
            [PrefillRequest(np.ones(3, np.int32), 2.5)], lambda layer: [np.zeros((2, *rec), np.float32)]
        )
    with pytest.raises(ValueError, match=r"num_slots=2.5, capacity=16: both must be integers"):
        runner.init_decode(2.5, 16)
    assert runner.num_slots == 2


def test_runner_refuses_params_of_another_structure():
    """Params with keys the config's model lacks (a deeper model, an lm_head for a tied config) are named."""
    big = ModelRunner(tiny_qwen2(num_layers=2), seed=1, num_slots=1, capacity=16).pure_params()
    with pytest.raises(ValueError, match=r"params: layers/1 is not a param of this config's model"):
        ModelRunner(tiny_qwen2(num_layers=1), big, num_slots=1, capacity=16)
    with pytest.raises(ValueError, match=r"params: final/lm_head is not a param"):
        ModelRunner(tiny_qwen2(num_layers=2, tie_word_embeddings=True), big, num_slots=1, capacity=16)


@pytest.mark.parametrize("name", ["tiny_qwen2", "tiny_deepseek"])
def test_bench_paths_agree(name):
    """The benchmark's two paths (layerwise with Layer Blocks, one whole-model jit with cached KV) agree."""
    from models.prefill_bench import run_one
    from models.registry import tiny_config

    out = run_one(name, tiny_config(name), batch=2, miss=20, cached=32, repeats=1)
    assert out["max_abs_logit_diff"] <= 1e-4
    lw = out["layerwise"]["traces"]
    assert all(v == 1 for v in lw.values()) and sum(k.startswith("prefill_layer") for k in lw) == out["layer_kinds"]
    assert out["whole"]["traces"] == {"whole_prefill": 1}


def test_tiny_config_registry():
    from models.registry import tiny_config

    assert tiny_config("tiny_llama", dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(KeyError, match="known: tiny_deepseek, tiny_deepseek_v2, tiny_llama, tiny_qwen2"):
        tiny_config("tiny_mistral")


def test_mla_short_append_uses_absorbed_prefill_and_matches_full():
    """Agentic short append over a long cached prefix: MLA prefill takes the absorbed form (auto) and still
    equals a full prefill (which takes the expanded form)."""
    runner = ModelRunner(tiny_deepseek(), seed=5, num_slots=1, capacity=16)
    attn = runner.model.layers[0].self_attn
    assert attn.absorb_pays(16, 16 + 128) and not attn.absorb_pays(256, 256)
    prompt = np.random.default_rng(4).integers(0, 128, 132)
    logits, kv = runner.full_prefill([prompt])
    res = runner.prefill_layerwise([PrefillRequest(prompt[128:], 128)], lambda layer: [kv[0][layer, :128]])
    assert np.abs(res.last_logits[0] - logits[0][-1]).max() <= 1e-4


# The launcher's code is the same for every family (--model picks the config); DeepSeek's layerwise prefill from stored
# blocks against a full prefill is test_multi_turn_layerwise_equals_full_prefill[deepseek_v3]: its demo run, -m slow.
@pytest.mark.parametrize("model", ["qwen2", pytest.param("deepseek", marks=pytest.mark.slow)])
def test_demo_launcher_runs_and_matches_full_prefill(model):
    """experiments.demo end to end (tiny, no warm-up): every turn's layerwise prefill from stored Full Blocks agrees
    with a full prefill of the whole prompt (its --check column), and the later turns hit the stored blocks."""
    import subprocess
    import sys

    cmd = [
        sys.executable, "-m", "experiments.demo", f"--model={model}", "--agents=2", "--turns=2",
        "--append_tokens=16", "--gen_tokens=4", "--nowarmup", "--no_persistent_cache",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "no warm-up (--nowarmup)" in out.stdout
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [int(r[0]) for r in rows] == [0, 1]
    hits = [int(r[2]) for r in rows]
    assert hits[0] == 0 and hits[1] > 0
    assert all(float(r[7]) < 1e-3 for r in rows), rows  # max |logit diff| vs a full prefill
    assert re.search(r"store: [1-9]\d* Full Blocks", out.stdout)


def test_bench_prefill_launcher_runs_small(tmp_path):
    """experiments.bench_prefill end to end (tiny dense model, one repeat): its table and JSON, with the layerwise
    pipeline's logits equal to one jit of the whole model and each identical layer traced once."""
    import json
    import subprocess
    import sys

    out_json = tmp_path / "prefill.json"
    cmd = [
        sys.executable, "-m", "experiments.bench_prefill", "--batch=1", "--miss_tokens=8", "--cached_tokens=16",
        "--repeats=1", "--models=dense", "--no_persistent_cache", f"--out={out_json}",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| dense (" in out.stdout
    (res,) = json.loads(out_json.read_text())
    assert res["model"] == "dense" and res["max_abs_logit_diff"] < 1e-4 and res["ratio"] > 0
    assert "prefill_layer0:1" in out.stdout  # one trace for all identical layers
