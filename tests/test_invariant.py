"""Batch-invariant execution (models/layers/invariant.py, `ModelConfig.batch_invariant`): a token's KV and
logits are the same bits however its prompt is chunked, padded or batched, and whether it is prefilled or
decoded; so the runtime's greedy tokens equal a full recompute's whatever the policy."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualpath_jax.runtime import driver
from dualpath_jax.runtime.config import ConfigError, RuntimeConfig
from dualpath_jax.runtime.lifecycle import ConversationBook
from dualpath_jax.runtime.model_ops import ModelOps, reference_conversations
from models import decode_cache
from models.layers import invariant
from models.registry import tiny_config
from models.runner import ModelRunner, PrefillRequest

# The default run covers GQA (Qwen2: qkv bias) and MLA + V3 sigmoid group routing; Llama (no bias, llama3 RoPE)
# and DeepSeek-V2 (no q_lora, softmax routing) run the same invariant code with -m slow.
MODELS = [
    "tiny_qwen2",
    pytest.param("tiny_llama", marks=pytest.mark.slow),
    "tiny_deepseek",
    pytest.param("tiny_deepseek_v2", marks=pytest.mark.slow),
]


def test_row_blocked_is_the_function_on_every_row():
    with jax.default_matmul_precision("float32"):  # XLA:GPU would run float32 dots in TF32 (the runner asks too)
        _check_row_blocked()


def _check_row_blocked():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((37, 5)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((5, 3)), jnp.float32)
    for m in (1, 15, 16, 17, 37):
        a, b = invariant.row_blocked(lambda r: (r @ w, r.sum(-1)), x[:m])
        assert a.shape == (m, 3) and b.shape == (m,)
        np.testing.assert_allclose(a, x[:m] @ w, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(b, x[:m].sum(-1), rtol=1e-6, atol=1e-6)


def test_blocked_attention_is_causal_softmax_attention_and_decode_gives_its_bits():
    with jax.default_matmul_precision("float32"):  # against float64 NumPy: no TF32 dots on a GPU
        _check_blocked_attention()


def _check_blocked_attention():
    rng = np.random.default_rng(2)
    b, t, s, d = 2, 21, 128, 8
    q = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    keys = jnp.asarray(rng.standard_normal((b, s + 64, d)), jnp.float32)
    vals = jnp.asarray(rng.standard_normal((b, s + 64, d)), jnp.float32)
    pos = jnp.asarray([[40 + i for i in range(t)], [100 + i for i in range(t)]], jnp.int32)

    def score_fn(qr, kv):  # qr [RB, d], kv tiles [RB, 64, d]
        return jnp.einsum("rd,rsd->rs", qr, kv[0])

    def value_fn(p, kv):
        return jnp.einsum("rs,rsd->rd", p, kv[1])

    def prefill(n_keys):
        kv = (keys[:, :n_keys], vals[:, :n_keys])
        tile = lambda kv, k0: (invariant.key_tile(kv[0], k0, 0), invariant.key_tile(kv[1], k0, 0))  # noqa: E731
        return np.asarray(invariant.prefill_attention(q, kv, pos, tile, score_fn, value_fn))

    out = prefill(s)
    scores = np.einsum("btd,bsd->bts", np.asarray(q, np.float64), np.asarray(keys[:, :s], np.float64))
    scores = np.where(np.arange(s)[None, None, :] <= np.asarray(pos)[:, :, None], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    want = (p / p.sum(-1, keepdims=True)) @ np.asarray(vals[:, :s], np.float64)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    # One more (unattended) tile of keys changes no bit.
    np.testing.assert_array_equal(prefill(s + 64), out)
    # Decode: each request a slot, one query each; the bits of the same query in prefill.
    tile = lambda kv, k0: (invariant.key_tile(kv[0], k0, 1), invariant.key_tile(kv[1], k0, 1))  # noqa: E731
    for i in (0, 7, 20):
        dec = invariant.decode_attention(q[:, i], (keys, vals), pos[:, i], tile, score_fn, value_fn)
        np.testing.assert_array_equal(np.asarray(dec), out[:, i])


@pytest.fixture(scope="module", params=MODELS)
def runner(request):
    cfg = tiny_config(request.param, batch_invariant=True)
    return ModelRunner(cfg, seed=3, num_slots=3, capacity=200)


def _prefill(r, seq, other, chunks, pack):
    """KV [L, n, *record] and the last logits of `seq` prefilled in `chunks` (packed beside `other` or alone)."""
    kv, pos = None, 0
    for n in chunks:
        reqs = ([PrefillRequest(other[: 1 + (pos * 7) % 40], 0)] if pack else []) + [
            PrefillRequest(seq[pos : pos + n], pos)
        ]

        def provider(layer, kv=kv):
            return ([None] if pack else []) + [kv[layer]]

        res = r.prefill_layerwise(reqs, provider if pos else None, return_kv=True)
        kv = res.miss_kv[-1] if kv is None else np.concatenate([kv, res.miss_kv[-1]], axis=1)
        pos += n
    return kv, res.last_logits[-1]


def test_prefill_bits_do_not_depend_on_chunks_or_batch(runner):
    rng = np.random.default_rng(1)
    n = 80  # chunks of 16 / 5 + 16s + 11 / 79 + 1 pad to other buckets (T 16..128, C 0..128) and attend across tiles
    seq = rng.integers(0, runner.config.vocab_size, n).astype(np.int32)
    other = rng.integers(0, runner.config.vocab_size, 50).astype(np.int32)
    kv0, logits0 = _prefill(runner, seq, other, [n], pack=False)
    cases = [([n], True), ([16] * 5, False), ([5] + [16] * 4 + [11], True), ([79, 1], False)]
    if runner.layout.kind == "mla":  # (MLA + MoE): ~5 s of compiles per new (T, C) bucket, ~45 s with every case
        cases = [([n], True), ([5, 64, 11], True), ([79, 1], False)]  # packed, chunked across tiles, one token
    for chunks, pack in cases:
        kv, logits = _prefill(runner, seq, other, chunks, pack)
        np.testing.assert_array_equal(kv, kv0, err_msg=f"KV, chunks {chunks}, packed {pack}")
        np.testing.assert_array_equal(logits, logits0, err_msg=f"logits, chunks {chunks}, packed {pack}")


def test_decode_gives_the_bits_of_prefill(runner):
    """Tokens decoded in slot 1 (other prompts in slots 0 and 2) have the KV and the greedy tokens of a full
    prefill of the whole sequence."""
    r = runner
    rng = np.random.default_rng(4)
    seq = rng.integers(0, r.config.vocab_size, 120).astype(np.int32)
    logits, kv = r.full_prefill([seq])
    for s in range(3):
        r.free_slot(s)
    r.load_prompt_kv(1, r.full_prefill([seq[:70]])[1][0])
    r.load_prompt_kv(0, r.full_prefill([seq[5:30]])[1][0])
    r.load_prompt_kv(2, r.full_prefill([seq[:3]])[1][0])
    for i in range(70, 119):
        toks = r.decode_step([0, 1, 2], [5, int(seq[i]), 7])
        assert toks[1] == int(np.argmax(logits[0][i])), i
    recs = np.stack(
        [
            np.asarray(decode_cache.read_records(r.layout, r.decode_caches[layer], jnp.int32(1), jnp.int32(0), 119))
            for layer in range(r.num_layers)
        ]
    )
    rows = r.decode_caches[0][0].shape[2] if r.layout.kind == "gqa" else r.decode_caches[0].shape[1]
    assert rows == 256  # capacity 200 in whole key tiles
    want = kv[0][:, :119]
    if jax.default_backend() != "cpu" and not np.array_equal(recs, want):
        # Measured on an H200 (jax 0.11.2, 2026-12-04): decode KV differs from prefill KV in its last bits (at most
        # 2.5e-6) at 8 of 49 layer-0 positions, the same with --xla_gpu_deterministic_ops, autotune level 0 or no
        # Triton GEMMs; the greedy tokens above still agree. The bit-identity is made and checked on XLA:CPU only.
        d = np.abs(recs - want).max()
        pytest.xfail(f"decode KV is not prefill's bits on {jax.default_backend()} (max diff {d:.1e}): README")
    np.testing.assert_array_equal(recs, want)


def test_batch_invariant_needs_dense_moe_and_absorbed_mla():
    with pytest.raises(ValueError, match="moe_dispatch='dense'"):
        tiny_config("tiny_deepseek", batch_invariant=True, moe_dispatch="ragged")
    with pytest.raises(ValueError, match="mla_prefill"):
        tiny_config("tiny_deepseek", batch_invariant=True, mla_prefill="expanded")
    a = ModelRunner(tiny_config("tiny_qwen2"), seed=0, num_slots=1, capacity=16)
    b = ModelRunner(tiny_config("tiny_qwen2", batch_invariant=True), seed=0, num_slots=1, capacity=16)
    assert a.fingerprint() == b.fingerprint()  # the same model and KV format; only the rounding differs


# A randomized runtime run (2026-12-03) whose tokens depended on the policy with the default numerics: with
# 16-token prefill chunks `random` gave token 71 where the reference and the other policies gave 61, at a
# near-tie in tiny_deepseek's expert routing (README "Known limits").
NEAR_TIE = {
    "model": "tiny_deepseek",
    "block_size": 8,
    "launcher": "inprocess",
    "cluster.engines_per_node": 2,
    "cluster.decode_slots": 2,
    "cluster.max_seq_len": 337,
    "cluster.prefill_token_budget": 16,
    "nics.snic_bytes_per_s": 8e6,
    "nics.cnic_bytes_per_s": 4e6,
    "buffers.pe_buffer_bytes": 302080,
    "buffers.de_buffer_bytes": 302080,
    "scheduler.fetch_interval_s": 0.03,
    "workload.agents": 5,
    "workload.append_tokens": 4,
    "workload.gen_tokens": 40,
    "workload.first_append_tokens": 96,
    "workload.arrival": "online",
    "workload.aps": 50.0,
    "workload.seed": 5,
    "run_timeout_s": 100.0,
    "batch_invariant": True,
}


@pytest.fixture(scope="module")
def near_tie():
    """The NEAR_TIE config, its trajectories, batch-invariant ops and the reference tokens."""
    cfg = RuntimeConfig().replace(**NEAR_TIE)
    trajs = driver.make_trajectories(cfg)
    ops = ModelOps.of_config(cfg)
    # Decode slots 1: the reference's batch shape no longer matters either.
    ref = reference_conversations(
        ops, lambda: ConversationBook(trajs, ops.vocab_size, seed=cfg.workload.seed), cfg.cluster.max_seq_len, 1
    )
    return cfg, trajs, ops, ref


# random: the policy the near-tie moved on 2026-12-03; dualpath, both read paths. Both -m slow (~20 s of CI each): by
# default dualpath runs this config batch-invariant in the test below, its blocks recomputed, and test_runtime's
# default-numerics runs read both paths. Re-checked 2026-12-06: with the default numerics `random` (seed 4) now gives
# the reference's tokens on this config (the code around the tie changed), so the slow case is an invariance check, not
# the known counterexample.
@pytest.mark.slow
@pytest.mark.parametrize("policy, kwargs", [("random", {"seed": 4}), ("dualpath", {})])
def test_runtime_tokens_equal_a_full_recompute_whatever_the_policy(near_tie, policy, kwargs):
    cfg, trajs, ops, ref = near_tie
    res = driver.run(cfg.replace(**{"scheduler.name": policy, "scheduler.policy_kwargs": kwargs}), trajs, model_ops=ops)
    bad = [k for k in ref if not np.array_equal(ref[k], res.tokens[k])]
    assert not bad, (policy, bad)


def test_recomputed_kv_gives_the_tokens_of_reused_kv(near_tie, tmp_path, block_corrupter):
    """Every stored block corrupted after the first turns: the PE recomputes by prefill the KV that decode had
    produced, and with batch-invariant numerics that changes no bit, so no token (with the default numerics only
    the absence of a near-tie keeps them equal)."""
    cfg, trajs, ops, ref = near_tie
    store = tmp_path / "store"
    cfg = cfg.replace(**{"scheduler.name": "dualpath", "store_dir": str(store)})
    fault, corrupted = block_corrupter(store, len(trajs))
    res = driver.run(cfg, trajs, model_ops=ops, fault=fault)
    assert corrupted and sum(s.get("failed_reads", 0) for s in res.node_stats.values()) > 0
    bad = [k for k in ref if not np.array_equal(ref[k], res.tokens[k])]
    assert not bad, bad


def test_a_node_session_rebuilds_its_model_for_other_numerics():
    """A node process serving several runs (experiments.run's session) kept its ModelOps when model and seed
    matched: a run with batch_invariant=True after one without ran the default numerics."""
    cfg = RuntimeConfig()
    ops = ModelOps.of_config(cfg)
    assert ops.serves(cfg)
    assert not ops.serves(cfg.replace(batch_invariant=True))
    assert not ops.serves(cfg.replace(model_seed=1)) and not ops.serves(cfg.replace(model="tiny_llama"))


def test_model_ops_must_match_the_configs_numerics():
    cfg = RuntimeConfig().replace(**{"batch_invariant": True, "workload.agents": 1, "workload.turns": 1})
    with pytest.raises(ConfigError, match="batch_invariant"):
        driver.run(cfg, driver.make_trajectories(cfg), model_ops=ModelOps(cfg.model, cfg.model_seed))


def test_bench_invariant_runs_small():
    """experiments.bench_invariant end to end (no timing assertions): its table, and the invariant runner's
    chunked prefill KV equal to its whole prefill's."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "experiments.bench_invariant", "--models=tiny_qwen2", "--repeats=1", "--prompt=64"]
        + ["--append=8", "--slots=2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| tiny_qwen2 | decode x2 |" in out.stdout
    assert re.search(r"\| tiny_qwen2 \| chunked KV == whole KV \| (yes|no) \| yes \|", out.stdout), out.stdout


def test_main_job_reports_whether_the_policies_tokens_agree():
    from types import SimpleNamespace

    from experiments import token_agreement

    a = {(0, 0): np.array([1, 2]), (0, 1): np.array([3])}
    same = {"basic": SimpleNamespace(tokens=a), "dualpath": SimpleNamespace(tokens=dict(a))}
    line, info = token_agreement(same, batch_invariant=False)
    assert line == "greedy tokens: identical under basic / dualpath for all 2 turns" and info["turns_differing"] == 0
    other = {"basic": SimpleNamespace(tokens=a), "dualpath": SimpleNamespace(tokens={**a, (0, 1): np.array([4])})}
    line, info = token_agreement(other, batch_invariant=False)
    assert "1 of 2 turns differ between basic / dualpath (first: (0, 1))" in line and "batch_invariant=True" in line
    assert info["first_differing"] == [(0, 1)]
    line, _ = token_agreement(other, batch_invariant=True)
    assert "batch_invariant=True" not in line
    # a turn only a later policy has is a difference (the turns were those of the first policy alone)
    more = {"basic": SimpleNamespace(tokens=a), "dualpath": SimpleNamespace(tokens={**a, (1, 0): np.array([5])})}
    line, info = token_agreement(more, batch_invariant=True)
    assert line == "greedy tokens: 1 of 3 turns differ between basic / dualpath (first: (1, 0))", line
    assert info == {"turns": 3, "turns_differing": 1, "first_differing": [(1, 0)]}
