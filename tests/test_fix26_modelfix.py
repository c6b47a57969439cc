"""fix26 models audit: a Full Block given as one layer's cached KV is refused; bf16 DeepSeek with one MLA form
(`mla_prefill="absorbed"`, the README's route to path-independent tokens) decodes the same greedy tokens after a prefix
hit as after a full prefill; a truncated safetensors shard says so."""

from __future__ import annotations

import numpy as np
import pytest

from models.kv import layer_block, request_kv_to_full_blocks
from models.registry import tiny_config
from models.runner import ModelRunner, PrefillRequest


@pytest.fixture(scope="module")
def qwen():
    return ModelRunner(tiny_config("tiny_qwen2"), seed=1, num_slots=1, capacity=16)  # 4 layers


def test_a_full_block_as_one_layers_cached_kv_is_refused(qwen):
    # A Full Block [4, 16, bpt] counted 4 x 16 = 64 tokens == cached_len: the 4 layers of tokens 0..15 were read as
    # 64 tokens (logits 3.4 off, another greedy token), no error
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, qwen.config.vocab_size, 80)
    kv = rng.standard_normal((4, 64, *qwen.layout.record_shape)).astype(np.float32)  # any KV does
    blocks = request_kv_to_full_blocks(qwen.layout, kv, 16)
    req = [PrefillRequest(prompt[64:], 64)]
    with pytest.raises(ValueError, match=r"layer 0, request 0: cached KV piece of shape \(4, 16, \d+\)"):
        qwen.prefill_layerwise(req, lambda layer: [blocks[0]])
    with pytest.raises(ValueError, match=r"layer 0, request 0: cached KV piece of shape \(4, 16, \d+\)"):
        qwen.prefill_layerwise(req, lambda layer: [[blocks[0]]])  # in a list too
    records = kv[:, :16]  # all-layer records [4, 16, *record]: the same mistake
    with pytest.raises(ValueError, match=r"layer 0, request 0: cached KV piece of shape \(4, 16, 2, "):
        qwen.prefill_layerwise(req, lambda layer: [records])
    # what callers give still passes: Layer Blocks [1, t, bpt], bytes [c, bpt], records [c, *record]
    ref = qwen.prefill_layerwise(req, lambda layer: [[layer_block(b, layer) for b in blocks]]).last_logits
    for one_layer in (
        lambda layer: [qwen.layout.to_bytes(kv[layer])],
        lambda layer: [kv[layer]],
        lambda layer: [kv[layer : layer + 1]],
    ):
        np.testing.assert_array_equal(qwen.prefill_layerwise(req, one_layer).last_logits, ref)


def _hit_and_full(num_layers: int):
    """bf16 tiny_deepseek, a 37-token prompt: full prefill vs layerwise prefill of the last token over the other 36
    (cached KV from the full prefill) -> (runner, full logits, full KV, layerwise result)."""
    cfg = tiny_config("tiny_deepseek", dtype="bfloat16", num_layers=num_layers, mla_prefill="absorbed")
    r = ModelRunner(cfg, seed=1, num_slots=2, capacity=64)
    p, c = 37, 36
    prompt = np.random.default_rng(p * 7 + c).integers(0, cfg.vocab_size, p)
    logits, kv = r.full_prefill([prompt])
    res = r.prefill_layerwise([PrefillRequest(prompt[c:], c)], lambda layer: [kv[0][layer, :c]], return_kv=True)
    return r, logits[0], kv[0], res


# mla_prefill="auto" takes the absorbed form for the 1-token append over 36 cached tokens and the expanded one for the
# full prefill: in bf16 the two round differently (first logits 0.03-0.04 apart) and greedy tokens part at step 15
# (documented; "auto" keeps the cheaper form). One form forced: the same bits, the same tokens.


def test_bf16_deepseek_prefill_over_a_prefix_hit_gives_the_bits_of_a_full_prefill():
    # one (dense) layer keeps it cheap; equal bits here mean decode sees the same inputs, so the same greedy tokens
    _, logits, kv, res = _hit_and_full(1)
    np.testing.assert_array_equal(res.miss_kv[0].view(np.uint16), kv[:, 36:].view(np.uint16))
    np.testing.assert_array_equal(res.last_logits[0], logits[-1])


@pytest.mark.slow
def test_bf16_deepseek_greedy_tokens_after_a_prefix_hit_equal_a_full_prefills():
    r, logits, kv, res = _hit_and_full(3)  # tiny_deepseek's own 3 layers (dense, MoE, MoE)
    r.load_prompt_kv(0, kv)
    r.load_prompt_kv(1, np.concatenate([kv[:, :36], res.miss_kv[0]], axis=1))
    full, hit = [int(np.argmax(logits[-1]))], [int(res.next_tokens[0])]
    for _ in range(19):
        full_next, hit_next = r.decode_step([0, 1], [full[-1], hit[-1]])
        full.append(int(full_next))
        hit.append(int(hit_next))
    assert hit == full


def test_a_truncated_safetensors_shard_says_truncated_with_its_sizes(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.numpy import save_file

    from models.checkpoint import _read_safetensors

    shard = tmp_path / "model.safetensors"
    save_file({"a": np.zeros((4, 8), np.float32), "b": np.ones(3, np.float32)}, str(shard))
    raw = shard.read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    for keep in (len(raw) - 4, header_end + 1):  # the data cut short: the header gives the size the file should have
        shard.write_bytes(raw[:keep])
        with pytest.raises(
            ValueError,
            match=rf"safetensors: truncated: the header describes {len(raw)} bytes, the "
            rf"file has {keep}",
        ):
            _read_safetensors(tmp_path)
    shard.write_bytes(raw[: header_end - 10])  # cut inside the header
    with pytest.raises(
        ValueError,
        match=rf"safetensors: truncated: its header alone is {header_end} bytes, the file "
        rf"has {header_end - 10}",
    ):
        _read_safetensors(tmp_path)
    shard.write_bytes(b"<html>not found</html>")  # not safetensors at all: not called truncated
    with pytest.raises(ValueError, match=r"cannot read as safetensors") as e:
        _read_safetensors(tmp_path)
    assert "truncated" not in str(e.value).split("model.safetensors: ", 1)[1]
