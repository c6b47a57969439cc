"""Fix wave 33 (bf16): the runtime end to end with bfloat16 weights and KV, asked for with `RuntimeConfig.dtype`
(session 50's dtype helper; the bf16 audit built the ops by hand before the field existed, and found no fix needed):
greedy tokens equal the reference on both read paths, both transports and both prefills, the stored blocks are
byte-identical whatever the policy, and a float32 store is never read as bfloat16 KV."""

from __future__ import annotations

import dataclasses
import glob
import os
import tempfile

import numpy as np
import pytest

from configs.tiny_runtime import get_config
from dualpath_jax.block_keys import block_keys
from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.kv_store import LocalDirStore
from dualpath_jax.runtime import driver
from dualpath_jax.runtime.config import ConfigError, RuntimeConfig
from dualpath_jax.runtime.model_ops import ModelOps
from models.registry import tiny_config


def _stored_blocks(store_dir) -> dict:
    return {
        os.path.basename(p): open(p, "rb").read() for p in glob.glob(os.path.join(store_dir, "blocks", "*", "*.kvb"))
    }


def _bf16_ops_and_reference(cfg):
    """A bfloat16 config's ops (bf16 KV layout and fingerprint, half float32's KV bytes per token), its KV bytes per
    token, trajectories and the single-process reference's greedy tokens."""
    ops = ModelOps.of_config(cfg)
    assert ops.kv_layout.kv_dtype == "bfloat16" and "/bfloat16/" in ops.fingerprint
    kv = ops.config.kv_bytes_per_token
    assert kv * 2 == dataclasses.replace(ops.config, dtype="float32").kv_bytes_per_token
    trajs = driver.make_trajectories(cfg)
    return ops, kv, trajs, driver.reference_tokens(cfg, trajs, ops)


@pytest.mark.slow  # ~18 s on the 2-core machine (the reference and the run compile their steps)
def test_a_bf16_run_reads_both_paths_over_tcp_as_the_reference(base):
    """Default numerics, bfloat16 tiny_qwen2, split over tcp: the reference's greedy tokens, the hit KV read on both
    sides at 2 bytes per value (half float32's)."""
    cfg = base.replace(dtype="bfloat16")
    ops, kv, trajs, reference = _bf16_ops_and_reference(cfg)
    # (no model_ops: the run builds its own from config.dtype)
    res = driver.run(cfg.replace(**{"scheduler.name": "split", "transport": "tcp"}), trajs)
    bad = [k for k in reference if not np.array_equal(reference[k], res.tokens.get(k))]
    assert not bad, f"turns whose tokens differ from the reference: {bad}"
    hits, s = sum(r.hit_tokens for r in res.records), res.summary
    assert hits > 0 and s["pe_read_bytes"] + s["de_read_bytes"] == hits * kv
    assert s["pe_read_bytes"] > 0 and s["de_read_bytes"] > 0


@pytest.mark.slow  # ~35 s on the 2-core machine (batch-invariant steps)
def test_bf16_runs_equal_the_reference_and_store_the_same_bytes(base):
    """Batch-invariant bfloat16 tiny_qwen2: split (both read paths) over tcp and Basic prefill (layerwise=False) give
    the reference's greedy tokens, read exactly the hit KV at 2 bytes per value, and leave byte-identical block files."""
    cfg = base.replace(batch_invariant=True, dtype="bfloat16")
    ops, kv, trajs, reference = _bf16_ops_and_reference(cfg)
    stores = []
    for variant in (
        {"scheduler.name": "split", "transport": "tcp"},
        {"scheduler.name": "basic", "cluster.layerwise": False},
    ):
        with tempfile.TemporaryDirectory(prefix="bf16.") as d:
            res = driver.run(cfg.replace(store_dir=d, **variant), trajs, model_ops=ops)
            stores.append(_stored_blocks(d))
        bad = [k for k in reference if not np.array_equal(reference[k], res.tokens.get(k))]
        assert not bad, f"{variant}: turns whose tokens differ from the reference: {bad}"
        hits = sum(r.hit_tokens for r in res.records)
        s = res.summary
        assert hits > 0 and s["pe_read_bytes"] + s["de_read_bytes"] == hits * kv, variant
        if variant["scheduler.name"] == "split":
            assert s["pe_read_bytes"] > 0 and s["de_read_bytes"] > 0
        assert res.store_stats["read_corrupt"] == 0
    assert stores[0] and stores[0] == stores[1]


def test_a_float32_store_is_never_read_as_bf16_kv(tmp_path):
    """A store written for the float32 model refuses the bfloat16 one at open, naming the dtype part; a float32 block
    under a bfloat16 layout of the same size (its STORE.json gone) is a miss by its header's fingerprint, not KV."""
    f32, b16 = tiny_config("tiny_qwen2"), tiny_config("tiny_qwen2", dtype="bfloat16")
    assert f32.fingerprint() != b16.fingerprint()

    def layout(c, bpt=None):
        return BlockLayout(c.num_layers, 16, bpt or c.kv_bytes_per_token_per_layer, c.fingerprint())

    key = block_keys(np.arange(16), 16)[0]
    lay = layout(f32)
    data = np.random.default_rng(0).integers(0, 256, lay.full_block_nbytes, dtype=np.uint8)
    with LocalDirStore(str(tmp_path), lay, 1 << 20) as store:
        assert store.write(key, data)
    with pytest.raises(ValueError, match=r"part 'float32' here, 'bfloat16' asked"):
        LocalDirStore(str(tmp_path), layout(b16), 1 << 20)
    os.remove(tmp_path / "STORE.json")
    same_size = layout(b16, f32.kv_bytes_per_token_per_layer)
    with LocalDirStore(str(tmp_path), same_size, 1 << 20) as store:
        out = np.zeros((same_size.num_layers, same_size.layer_block_nbytes), np.uint8)
        assert not store.read(key, out)
        assert store.stats().read_corrupt == 1 and store.stats().read_hits == 0


def test_the_runtime_takes_bf16_as_its_dtype_only():
    """bfloat16 is `config.dtype` (weights, activations and KV together); a separate KV dtype is no field: a
    ConfigError naming it, not a float32 run."""
    fields = get_config("test").runtime.to_dict()
    assert RuntimeConfig.from_config_dict({**fields, "dtype": "bfloat16"}).dtype == "bfloat16"
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['kv_dtype'\]"):
        RuntimeConfig.from_config_dict({**fields, "kv_dtype": "bfloat16"})
