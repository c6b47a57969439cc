"""Fix wave 9, runtime and models: block_size named when it is what cannot fit, layer tags that keep every attempt,
NaN params refused whatever their dtype, Qwen2's num_key_value_heads read as HF reads it."""

from __future__ import annotations

import json
import threading

import jax
import numpy as np
import pytest

from configs.tiny_runtime import get_config
from dualpath_jax.runtime import driver
from dualpath_jax.runtime.config import MAX_BLOCK_SIZE, ConfigError, RuntimeConfig, validate
from dualpath_jax.runtime.engines import TAG_FIELD_MAX, layer_tag, split_tag
from models.checkpoint import restore_params, save_params
from models.registry import config_from_hf, tiny_config
from models.runner import ModelRunner
from transport.base import check_notify


@pytest.fixture
def cfg():
    return RuntimeConfig.from_config_dict(get_config("test").runtime)


# ---------------------------------------------------------------- 1. block_size


def test_an_absurd_block_size_is_refused_by_name(cfg):
    """block_size=10**9 was refused only as "config.buffers.pe_buffer_bytes=... cannot hold one request's prompt KV"
    (a need of 5e11 B for a 100-token prompt), which did not say block_size was the field to change. Contract: when
    the longest prompt's KV fits an engine's share of the buffer but one Layer Block does not, the error names
    config.block_size; a prompt too long for the buffer itself still names the buffer."""
    bad = cfg.replace(block_size=10**9)
    with pytest.raises(ConfigError, match=r"^config\.block_size=1000000000 is too large for config\.buffers\.pe_buf"):
        validate(bad, 1024, 100, 2)
    # the buffer is the culprit: the prompt alone does not fit (any block size)
    small = cfg.replace(**{"buffers.pe_buffer_bytes": 1024 * 50})
    with pytest.raises(ConfigError, match=r"^config\.buffers\.pe_buffer_bytes=51200 B cannot hold"):
        validate(small, 1024, 100, 2)
    # a buffer too small for any block: the buffer is named, not a sane block_size
    with pytest.raises(ConfigError, match=r"^config\.buffers\.pe_buffer_bytes=100 B cannot hold"):
        validate(cfg.replace(**{"buffers.pe_buffer_bytes": 100}), 1024, 100, 2)
    validate(cfg.replace(block_size=64), 1024, 100, 2)  # a sane size passes


def test_a_block_size_beyond_the_block_files_header_is_refused_without_a_model(cfg):
    """Without the model's numbers validate() took any block_size >= 1, though a block file's header stores the
    tokens per block as a uint32 (a larger one cannot be written). Contract: block_size in [1, 2**32 - 1], named."""
    with pytest.raises(ConfigError, match=r"^config\.block_size must be >= 1 and <= 4294967295 .*got 4294967296"):
        validate(cfg.replace(block_size=2**32))
    with pytest.raises(ConfigError, match=r"^config\.block_size must be >= 1 .*got 0"):
        validate(cfg.replace(block_size=0))
    assert MAX_BLOCK_SIZE == 2**32 - 1
    # (with decode slots that can fill such a block: a block no slot fills is refused, tests/test_bad_config_input.py)
    validate(cfg.replace(**{"block_size": MAX_BLOCK_SIZE, "cluster.max_seq_len": MAX_BLOCK_SIZE}))


def test_prepare_names_block_size_for_the_tiny_model(cfg):
    """The driver's pre-flight (model and workload numbers) reports an absurd block_size against block_size."""
    with pytest.raises(ConfigError, match=r"^config\.block_size=1000000000 is too large"):
        driver.prepare(cfg.replace(block_size=10**9))


# ---------------------------------------------------------------- 2. layer tags


@pytest.mark.parametrize("attempt", [0, 1, 255, 256, 257, 511, TAG_FIELD_MAX])
def test_layer_tags_keep_the_attempt(attempt):
    """`layer_tag` kept the attempt's low 8 bits: attempt 256's notifications came back as attempt 0's, so the PE
    held them for attempt 0 and never gave them to the attempt it ran. Contract: request id, attempt and layer
    come back exactly, and tags of different attempts differ."""
    for rid, layer in ((0, 0), (7, 3), ((1 << 31) - 1, TAG_FIELD_MAX)):
        tag = layer_tag(rid, attempt, layer)
        assert split_tag(tag) == (rid, attempt, layer)
        assert check_notify(tag) == tag  # a signed 64-bit transport tag
    assert layer_tag(7, attempt, 3) != layer_tag(7, (attempt + 256) % (TAG_FIELD_MAX + 1), 3)


def test_a_layer_tag_field_that_does_not_fit_is_an_error():
    """A field past its width was masked (a wrapped tag, another attempt's or layer's). Contract: ValueError naming
    the field."""
    with pytest.raises(ValueError, match=r"attempt=65536 of request 7 is outside \[0, 65535\]"):
        layer_tag(7, TAG_FIELD_MAX + 1, 0)
    with pytest.raises(ValueError, match=r"layer=65536 of request 7"):
        layer_tag(7, 0, TAG_FIELD_MAX + 1)
    with pytest.raises(ValueError, match=r"attempt=-1"):
        layer_tag(7, -1, 0)
    with pytest.raises(ValueError, match=r"request id 2147483648 is outside"):
        layer_tag(1 << 31, 0, 0)


# ---------------------------------------------------------------- 3. NaN params in the config's dtype


def _qwen():
    cfg = tiny_config("tiny_qwen2", num_layers=1)
    return cfg, jax.tree.map(np.asarray, ModelRunner(cfg, num_slots=1, capacity=8).pure_params())


def _nan_at(pure: dict, value=np.nan) -> dict:
    out = jax.tree.map(lambda a: a.copy(), pure)
    out["layers"][0]["self_attn"]["q_proj"]["kernel"][0, 0] = value
    return out


def test_nan_params_restored_from_a_checkpoint_are_refused(tmp_path):
    """NaN weights already in the config's dtype were taken by ModelRunner as they were (only params given in
    another dtype were scanned), so NaN weights saved with save_params came back from restore_params (their
    checksums match) and gave NaN logits without an error. Contract: ModelRunner refuses non-finite params in
    any dtype, naming the param; restore_params refuses them itself (fix wave 10)."""
    cfg, pure = _qwen()
    save_params(tmp_path / "ckpt", _nan_at(pure))
    with pytest.raises(ValueError, match=r"ckpt: layers/0/self_attn/q_proj/kernel has non-finite values"):
        restore_params(tmp_path / "ckpt", cfg)  # refused there now (fix wave 10)
    with pytest.raises(ValueError, match=r"params: layers/0/self_attn/q_proj/kernel has non-finite values"):
        ModelRunner(cfg, _nan_at(pure, np.inf), num_slots=1, capacity=8)
    # the same weights in another dtype: refused the same way (as before)
    as64 = jax.tree.map(lambda a: a.astype(np.float64), _nan_at(pure))
    with pytest.raises(ValueError, match=r"params: layers/0/self_attn/q_proj/kernel has non-finite values"):
        ModelRunner(cfg, as64, num_slots=1, capacity=8)
    ModelRunner(cfg, pure, num_slots=1, capacity=8)  # finite: loads


# ---------------------------------------------------------------- 4. HF config reading

QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"],
    "vocab_size": 96,
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "intermediate_size": 64,
}


def test_qwen2_num_key_value_heads_read_as_hf_reads_it():
    """A Qwen2 config.json without num_key_value_heads got num_attention_heads (Llama's rule); HF's Qwen2Config
    (transformers 4.57.1 and 5.0.0: `num_key_value_heads=32` in __init__, `if num_key_value_heads is None:
    num_key_value_heads = num_attention_heads`) builds 32 KV heads. Contract: Qwen2 absent -> 32, null -> the
    heads (absent with heads that 32 does not divide: an error naming the field); Llama (its default is None)
    absent or null -> the heads; a given value is kept."""
    with pytest.raises(ValueError, match=r"no num_key_value_heads: HF.s Qwen2Config then has 32 KV heads"):
        config_from_hf(dict(QWEN2))  # 32 KV heads for 4 heads: HF cannot build it either
    assert config_from_hf(dict(QWEN2, num_key_value_heads=None)).num_key_value_heads == 4
    assert config_from_hf(dict(QWEN2, num_key_value_heads=2)).num_key_value_heads == 2
    llama = dict(QWEN2, architectures=["LlamaForCausalLM"])
    assert config_from_hf(llama).num_key_value_heads == 4
    assert config_from_hf(dict(llama, num_key_value_heads=None)).num_key_value_heads == 4
    # through config.json too
    d = json.loads(json.dumps(dict(QWEN2, num_attention_heads=64, hidden_size=128)))
    assert config_from_hf(d).num_key_value_heads == 32


def test_deepseek_v3_score_bias_stays_float32_in_a_bf16_model():
    """Guard (not a change): e_score_correction_bias is a float32 param in a bfloat16 DeepSeek-V3, as in HF 5.0.0
    (`_keep_in_fp32_modules_strict = ["e_score_correction_bias"]`) and DeepSeek's reference; a bias value that
    bfloat16 cannot hold is kept exactly."""
    cfg32 = tiny_config("tiny_deepseek")
    pure = jax.tree.map(np.asarray, ModelRunner(cfg32, num_slots=1, capacity=8).pure_params())
    value = np.float32(1 + 2**-12)  # rounds to 1.0 in bfloat16
    pure["layers"][1]["mlp"]["e_score_correction_bias"] = np.full_like(
        pure["layers"][1]["mlp"]["e_score_correction_bias"], value
    )
    r = ModelRunner(tiny_config("tiny_deepseek", dtype="bfloat16"), pure, num_slots=1, capacity=8)
    bias = np.asarray(r.pure_params()["layers"][1]["mlp"]["e_score_correction_bias"])
    assert bias.dtype == np.float32 and (bias == value).all()


# ---------------------------------------------------------------- 5. a node process whose run raised


def test_a_node_process_whose_run_raised_is_an_error_not_a_dead_node(monkeypatch):
    """The local (process) launcher kept no node error: a node whose run raised exited (code 1, its traceback on
    stderr) and was only declared dead, its requests re-run on the others, so a defect in a node's code showed as
    re-runs. Now exit code 1 of a process serving this run is the launcher's error and the driver fails the run
    naming the node, as for an in-process node; a signal (SIGKILL: a fault, the OOM killer) or Ctrl-C (130) is
    still only a dead node, and so is a session process that died in an earlier run (it serves no run)."""
    import types

    from dualpath_jax.runtime.launcher import LocalProcessLauncher
    from dualpath_jax.runtime.scheduler_service import RunFailed

    launcher = LocalProcessLauncher.__new__(LocalProcessLauncher)  # (no processes spawned: stand-ins)
    launcher.procs = {
        n: types.SimpleNamespace(name=f"node{n}", exitcode=code, is_alive=lambda: False)
        for n, code in [(0, None), (1, -9), (2, 130), (3, 0), (4, 1), (5, 1)]
    }
    launcher.procs[0].is_alive = lambda: True
    launcher._running = {0, 1, 2, 3, 4}  # node 5 died in an earlier run of the session
    launcher.session, launcher._reports, launcher._whys = None, {}, {}  # (no session, no error reported)
    launcher._recv_lock = threading.Lock()
    assert list(launcher.errors) == [4] and "node4 exited with code 1" in str(launcher.errors[4])
    service = types.SimpleNamespace(dead_nodes=set(), book=types.SimpleNamespace(done=False))
    with pytest.raises(RunFailed, match=r"node 4 failed: .*exited with code 1: its run raised"):
        driver._check_launcher(service, launcher, [])


def test_a_local_run_whose_node_processes_cannot_load_the_model_names_the_failure(tmp_path):
    """The real processes: the parent loaded the checkpoint, then it was damaged before the nodes loaded it (a
    shared directory changed under a run): every node's run raises. The run fails naming a node and its exit code
    1, not as nodes that died before registering."""
    pytest.importorskip("safetensors", reason="HF import needs the 'hf' extra (safetensors)")
    from test_models_checkpoint import QWEN2_HF, hf_tensors, write_hf_checkpoint

    from dualpath_jax.runtime.scheduler_service import RunFailed

    ckpt = tmp_path / "tiny-qwen2-hf"
    direct = ModelRunner(config_from_hf(QWEN2_HF), seed=7, num_slots=1, capacity=16)
    write_hf_checkpoint(ckpt, QWEN2_HF, hf_tensors(QWEN2_HF, direct.pure_params()))
    base = RuntimeConfig.from_config_dict(get_config("test").runtime)
    run_cfg = base.replace(model=str(ckpt), launcher="local", transport="tcp", run_timeout_s=120.0)
    trajs, ops = driver.prepare(run_cfg)
    for f in ckpt.glob("*.safetensors"):  # (the parent checks config.json again: the weights only the nodes load)
        f.write_bytes(b"")
    with pytest.raises(RunFailed, match=r"node \d+ failed: .*exited with code 1: its run raised"):
        driver.run(run_cfg, trajs, model_ops=ops)
