"""Models hunt 7 (2026-12-04): a value type or a byte of _METADATA damaged is named as damage, before orbax's
metadata reads (which left a coroutine never awaited); rope_scaling's original context as 8192.0 keeps the
fingerprint of 8192."""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
from test_models_checkpoint import DEEPSEEK_V3_HF, LLAMA_HF

from models.checkpoint import abstract_params, restore_params, save_params
from models.registry import config_from_hf, tiny_config
from models.runner import random_params


def test_a_value_type_damaged_in_metadata_is_named_with_no_coroutine_left_unawaited(tmp_path):
    """One flipped byte in a value type of _METADATA ("np.ndarray" -> "np.ndarrax"; 7 of 149 seeded flips of a
    tiny_deepseek_v2 _METADATA): orbax created the NumpyHandler.metadata coroutine for the arrays, failed on the
    unknown type before awaiting it (RuntimeWarning "coroutine 'NumpyHandler.metadata' was never awaited" at
    garbage collection) and returned no metadata, reported as "not an orbax checkpoint". Now the damaged value
    is named before orbax reads anything."""
    cfg = tiny_config("tiny_deepseek_v2")
    ckpt = tmp_path / "ckpt"
    save_params(ckpt, random_params(abstract_params(cfg), 0))
    meta = ckpt / "_METADATA"
    text = meta.read_text()
    i = text.rfind('"np.ndarray"')  # the last array's type: orbax has built the others' read by then
    meta.write_text(text[:i] + '"np.ndarrax"' + text[i + len('"np.ndarray"') :])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(
            ValueError,
            match=r"ckpt: cannot read the checkpoint \(damaged or incomplete\?\): _METADATA gives "
            r"'layers\.2\.[\w.]+' the value type 'np\.ndarrax', which orbax has no handler for",
        ):
            restore_params(ckpt, cfg)
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []


def test_metadata_that_is_no_longer_json_is_named_as_damage(tmp_path):
    """One flipped byte that breaks _METADATA's JSON (63 of 149 seeded flips): orbax logs and returns no
    metadata, and the checkpoint was reported as "not an orbax checkpoint, or an incomplete one"."""
    cfg = tiny_config("tiny_qwen2")
    ckpt = tmp_path / "ckpt"
    save_params(ckpt, random_params(abstract_params(cfg), 0))
    meta = ckpt / "_METADATA"
    data = bytearray(meta.read_bytes())
    data[data.index(b"{")] ^= 0x5A  # the opening brace
    meta.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"ckpt: cannot read the checkpoint \(damaged\?\): unreadable _METADATA"):
        restore_params(ckpt, cfg)


@pytest.mark.parametrize("hf", [LLAMA_HF, DEEPSEEK_V3_HF], ids=lambda h: h["architectures"][0])
def test_rope_original_context_written_as_a_float_keeps_the_fingerprint(hf):
    """`"original_max_position_embeddings": 8192.0` in rope_scaling (llama3, yarn) gave a config equal (==) to the
    one with 8192 and the same RoPE frequencies, but another fingerprint (json.dumps writes 8192.0), so KV stored
    for one was a miss for the other (the int-for-float case was fixed on 2026-12-03, this is the reverse)."""
    as_float = copy.deepcopy(hf)
    as_float["rope_scaling"]["original_max_position_embeddings"] = float(
        hf["rope_scaling"]["original_max_position_embeddings"]
    )
    a, b = config_from_hf(hf), config_from_hf(as_float)
    assert a == b
    assert b.fingerprint() == a.fingerprint()


def test_a_float32_model_asks_for_float32_dots_on_every_backend():
    # XLA:GPU computes float32 dots in TF32 by default: layerwise vs full prefill were 1.2e-3 apart on an H200
    # (2026-12-04; 1e-4 is the bar). The runner's steps set the precision at trace time, so every dot carries it.
    import numpy as np

    from models.qwen2 import tiny_qwen2
    from models.runner import ModelRunner, PrefillRequest

    for dtype, want in (("float32", True), ("bfloat16", False)):
        runner = ModelRunner(tiny_qwen2(dtype=dtype), seed=0, num_slots=1, capacity=16)
        requests = [PrefillRequest(np.arange(5), 0)]
        tokens, meta, _, _ = runner._batch(requests)
        rec = runner.layout.record_shape
        per_layer = tuple(np.zeros((tokens.shape[0], 0, *rec), runner.layout.np_dtype) for _ in runner.layer_states)
        text = runner._whole.lower(
            runner.embed_state, tuple(runner.layer_states), runner.final_state, per_layer, tokens, False, meta
        ).as_text()
        assert ("precision = [HIGHEST, HIGHEST]" in text) == want, dtype
