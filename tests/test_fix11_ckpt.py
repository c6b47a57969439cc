"""Fix wave 11, journey "ckpt": a researcher's own HF checkpoint directory through models/checkpoint.py.

Tiny checkpoints written by the tests (safetensors + config.json as HF writes them); nothing downloads."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("safetensors")
from safetensors.numpy import save_file  # noqa: E402
from test_models_checkpoint import QWEN2_HF, hf_tensors  # noqa: E402

from models.checkpoint import load_hf_checkpoint  # noqa: E402
from models.registry import config_from_hf  # noqa: E402
from models.runner import ModelRunner  # noqa: E402


def _sharded(path, weight_map_of=None, extra_a: dict | None = None):
    """config.json + a.safetensors / b.safetensors + an index; returns the tensors written."""
    cfg = config_from_hf(QWEN2_HF)
    tensors = hf_tensors(QWEN2_HF, ModelRunner(cfg, seed=5, num_slots=1, capacity=16).pure_params())
    names = sorted(tensors)
    a, b = names[: len(names) // 2], names[len(names) // 2 :]
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(QWEN2_HF))
    save_file({n: tensors[n] for n in a} | (extra_a or {}), str(path / "a.safetensors"))
    save_file({n: tensors[n] for n in b}, str(path / "b.safetensors"))
    weight_map = {n: "a.safetensors" for n in a} | {n: "b.safetensors" for n in b}
    if weight_map_of is not None:
        weight_map = weight_map_of(weight_map)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tensors


def test_index_with_an_empty_weight_map_is_named(tmp_path):
    """A model.safetensors.index.json whose weight_map is {} said "<dir>: no *.safetensors files", beside two
    shards: the error named neither the index nor what is wrong with it. Contract: the index and its empty
    weight_map are named."""
    _sharded(tmp_path, weight_map_of=lambda wm: {})
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: its weight_map is empty"):
        load_hf_checkpoint(tmp_path)


def test_a_tensor_in_two_shards_names_both_files_and_the_directory(tmp_path):
    """A tensor stored in two shards (a stale shard of another split) was "b.safetensors: tensor X appears in more
    than one shard": one of the two files, and no directory. Contract: the directory, the tensor and both shards."""
    tensors = _sharded(tmp_path)
    dup = sorted(tensors)[-1]  # a tensor of b.safetensors, also written into a.safetensors
    _sharded(tmp_path, extra_a={dup: tensors[dup]})
    with pytest.raises(ValueError) as e:
        load_hf_checkpoint(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and repr(dup) in msg and "a.safetensors" in msg and "b.safetensors" in msg, msg


def test_one_shard_named_two_ways_in_the_index_is_read_once(tmp_path):
    """An index naming one shard as "a.safetensors" for some tensors and "./a.safetensors" for others (both the same
    file, as HF reads it) failed with "tensor ... appears in more than one shard": the file was read twice.
    Contract: each file is read once; the weights load bit-exact."""

    def two_spellings(wm):
        return {n: ("./" + f if i % 2 else f) for i, (n, f) in enumerate(wm.items())}

    tensors = _sharded(tmp_path, weight_map_of=two_spellings)
    _, params = load_hf_checkpoint(tmp_path)
    np.testing.assert_array_equal(params["embed_tokens"]["embedding"], tensors["model.embed_tokens.weight"])
    np.testing.assert_array_equal(params["final"]["lm_head"]["kernel"], tensors["lm_head.weight"].T)
    np.testing.assert_array_equal(
        params["layers"][1]["self_attn"]["q_proj"]["kernel"], tensors["model.layers.1.self_attn.q_proj.weight"].T
    )


def test_journey_mixed_dtype_tied_checkpoint_loads_bit_exact_and_round_trips(tmp_path):
    """The journey's valid path, walked end to end (no defect found here; kept as its record): a tied Qwen2 in two
    shards of bf16 / fp16 / fp32 tensors plus rotary inv_freq buffers loads through ModelRunner.from_hf with the
    same logits as the same weights built in-process, and save_params / restore_params give them back bit-exact;
    a save to an existing directory is refused and leaves it as it was."""
    import ml_dtypes

    from models.checkpoint import restore_params, save_params

    hf = {**QWEN2_HF, "tie_word_embeddings": True, "dtype": "bfloat16"}
    hf.pop("torch_dtype")
    cfg = config_from_hf(hf)
    tensors = hf_tensors(hf, ModelRunner(cfg, seed=9, num_slots=1, capacity=16).pure_params())
    casts = (ml_dtypes.bfloat16, np.float16, np.float32)
    tensors = {n: a.astype(casts[i % 3]) for i, (n, a) in enumerate(sorted(tensors.items()))}
    names = sorted(tensors)
    tmp_path.joinpath("ck").mkdir()
    ck = tmp_path / "ck"
    (ck / "config.json").write_text(json.dumps(hf))
    inv = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32) for i in range(2)}
    save_file({n: tensors[n] for n in names[:9]} | inv, str(ck / "model-00001-of-00002.safetensors"))
    save_file({n: tensors[n] for n in names[9:]}, str(ck / "model-00002-of-00002.safetensors"))
    loaded = ModelRunner.from_hf(ck, num_slots=1, capacity=16)
    expected = {n: np.asarray(a, np.float32) for n, a in tensors.items()}
    p = loaded.pure_params()
    assert "lm_head" not in p["final"]
    got = hf_tensors(hf, p)  # the loaded params written back in HF names and layouts (the test's own writer)
    assert sorted(got) == sorted(expected)
    for n in expected:
        np.testing.assert_array_equal(got[n], expected[n], err_msg=n)
    save_params(tmp_path / "orbax", p)
    restored = ModelRunner(cfg, restore_params(tmp_path / "orbax", cfg), num_slots=1, capacity=16)
    assert restored.fingerprint() == loaded.fingerprint()
    tokens = [np.arange(11) % cfg.vocab_size]
    (a,), _ = loaded.full_prefill(tokens)
    (b,), _ = restored.full_prefill(tokens)
    np.testing.assert_array_equal(a, b)
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "x").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        save_params(tmp_path / "kept", p)
    assert (tmp_path / "kept" / "x").read_text() == "mine"


def test_unreadable_config_json_is_a_value_error_naming_it(tmp_path, monkeypatch):
    """A config.json that cannot be read (no read permission for this user, an I/O error) raised a bare
    PermissionError / OSError out of load_hf_config: the runtime's model check catches ValueError only, so
    `experiments.run --config.runtime.model=<dir>` ended in a traceback instead of its `bad config` line.
    Contract: ValueError naming config.json and the reason (shards and the index already were)."""
    from pathlib import Path

    from dualpath_jax.runtime.model_ops import model_config

    _sharded(tmp_path)
    real = Path.read_text

    def denied(self, *a, **k):
        if self.name == "config.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(ValueError, match=r"config\.json: cannot read: .*Permission denied"):
        load_hf_checkpoint(tmp_path)
    with pytest.raises(KeyError, match=r"config\.json: cannot read"):  # the runtime's check: a bad config line
        model_config(str(tmp_path))


def _np_qwen2_logits(hf: dict, t: dict, tokens: np.ndarray) -> np.ndarray:
    """An independent float64 NumPy Qwen2 forward straight from HF-named tensors ([out, in] Linear weights,
    rotate_half RoPE, GQA by repeated KV heads, causal softmax, SwiGLU), as transformers computes it."""
    f = {n: np.asarray(a, np.float64) for n, a in t.items()}
    heads, kv, hidden = hf["num_attention_heads"], hf["num_key_value_heads"], hf["hidden_size"]
    d, eps, n = hidden // heads, hf["rms_norm_eps"], len(tokens)

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    def rope(x):  # [n, h, d]
        freqs = np.arange(n)[:, None] * (1.0 / hf["rope_theta"] ** (np.arange(0, d, 2) / d))[None]
        cos, sin = (np.concatenate([g(freqs)] * 2, -1)[:, None] for g in (np.cos, np.sin))
        rot = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], -1)
        return x * cos + rot * sin

    h = f["model.embed_tokens.weight"][tokens]
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = norm(h, f[p + "input_layernorm.weight"])
        q, k, v = (
            x @ f[p + f"self_attn.{w}_proj.weight"].T + f[p + f"self_attn.{w}_proj.bias"] for w in ("q", "k", "v")
        )
        q, k, v = q.reshape(n, heads, d), k.reshape(n, kv, d), v.reshape(n, kv, d)
        q, k = rope(q), rope(k)
        k, v = (np.repeat(a, heads // kv, axis=1) for a in (k, v))
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
        s = np.where(np.tril(np.ones((n, n), bool))[None], s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        o = np.einsum("hqk,khd->qhd", s / s.sum(-1, keepdims=True), v).reshape(n, heads * d)
        h = h + o @ f[p + "self_attn.o_proj.weight"].T
        x = norm(h, f[p + "post_attention_layernorm.weight"])
        g, u = x @ f[p + "mlp.gate_proj.weight"].T, x @ f[p + "mlp.up_proj.weight"].T
        h = h + (g / (1 + np.exp(-g)) * u) @ f[p + "mlp.down_proj.weight"].T
    h = norm(h, f["model.norm.weight"])
    head = f["model.embed_tokens.weight"] if hf.get("tie_word_embeddings") else f["lm_head.weight"]
    return h @ head.T


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_journey_loaded_logits_match_an_independent_numpy_forward(tmp_path, tied):
    """The journey's numerics check (no defect found; kept as its record): a Qwen2 checkpoint of bf16 tensors
    written in HF layout gives, through ModelRunner.from_hf, the logits of a float64 NumPy forward computed from
    the same HF tensors without the loader (layout, transposes, biases, tied head all right)."""
    import ml_dtypes

    hf = {**QWEN2_HF, "tie_word_embeddings": tied}
    cfg = config_from_hf(hf)
    rng = np.random.default_rng(4)
    tensors = hf_tensors(hf, ModelRunner(cfg, seed=2, num_slots=1, capacity=16).pure_params())
    tensors = {n: (a + 0.05 * rng.standard_normal(a.shape)).astype(ml_dtypes.bfloat16) for n, a in tensors.items()}
    tmp_path.joinpath("config.json").write_text(json.dumps(hf))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    tokens = (np.arange(13) * 5 + 1) % cfg.vocab_size
    (got,), _ = ModelRunner.from_hf(tmp_path, num_slots=1, capacity=16).full_prefill([tokens])
    want = _np_qwen2_logits(hf, tensors, tokens)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * np.abs(want).max())


def test_a_float8_tensor_is_named_with_its_dtype(tmp_path):
    """A shard holding float8 tensors (an FP8-quantized checkpoint, as DeepSeek-V3's official weights are) failed
    with "<file>: cannot read as safetensors: module 'numpy' has no attribute 'float8_e4m3fn'": a numpy message,
    neither the tensor nor the reason. Contract: the file, the tensor and its dtype, as an int tensor is named."""
    import ml_dtypes

    tensors = _sharded(tmp_path)
    victim = sorted(tensors)[-2]  # a tensor of b.safetensors
    names = sorted(tensors)[len(tensors) // 2 :]
    b = {n: tensors[n] for n in names} | {victim: tensors[victim].astype(ml_dtypes.float8_e4m3fn)}
    save_file(b, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError) as e:
        load_hf_checkpoint(tmp_path)
    msg = str(e.value)
    assert "b.safetensors" in msg and repr(victim) in msg and "F8_E4M3" in msg, msg
    assert "numpy" not in msg, msg
