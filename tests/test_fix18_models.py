"""A researcher's own model (fix18): bf16 layerwise prefill == full prefill bit for bit; config.json head_dim 0."""

from __future__ import annotations

import numpy as np
import pytest

from models.registry import config_from_hf, tiny_config
from models.runner import ModelRunner, PrefillRequest


@pytest.fixture(scope="module")
def bf16_qwen2():
    return ModelRunner(tiny_config("tiny_qwen2", dtype="bfloat16", num_layers=2), seed=1, num_slots=1, capacity=136)


# (prompt tokens, cached tokens): one token; a block + 1 over a cached 64-token block; with -m slow (the same steps at
# other buckets) exactly one block, and every block cached but the last token (the runtime recomputes it)
@pytest.mark.parametrize(
    "total, cached",
    [(1, 0), (65, 64), pytest.param(64, 0, marks=pytest.mark.slow), pytest.param(128, 127, marks=pytest.mark.slow)],
)
def test_bf16_layerwise_prefill_gives_the_bits_of_full_prefill(bf16_qwen2, total, cached):
    # XLA kept bfloat16 values in float32 between fused ops ("excess precision") as far as each program allowed, so
    # one jit of the whole model (full_prefill, the reference) and the per-layer steps gave KV 1-2 bf16 ulps apart
    # (logits 0.02) for the same prompt; each step now rounds as its dtype says
    r = bf16_qwen2
    ids = np.random.default_rng(total).integers(0, r.config.vocab_size, total)
    logits, kv = r.full_prefill([ids])
    res = r.prefill_layerwise(
        [PrefillRequest(ids[cached:], cached)],
        (lambda layer: [kv[0][layer, :cached]]) if cached else None,
        return_kv=True,
    )
    np.testing.assert_array_equal(res.miss_kv[0].view(np.uint16), kv[0][:, cached:].view(np.uint16))
    np.testing.assert_array_equal(res.last_logits[0], logits[0][-1])
    # decode after the layerwise prefill == decode after the full prefill
    tokens = []
    for prompt_kv, first in (
        (np.concatenate([kv[0][:, :cached], res.miss_kv[0]], axis=1), int(res.next_tokens[0])),
        (kv[0], int(np.argmax(logits[0][-1]))),
    ):
        r.load_prompt_kv(0, prompt_kv)
        out = [first]
        for _ in range(3):
            out.append(int(r.decode_step([0], [out[-1]])[0]))
        r.free_slot(0)
        tokens.append(out)
    assert tokens[0] == tokens[1]


def test_hf_head_dim_zero_is_named():
    # `"head_dim": 0` was read as absent (hidden_size // num_attention_heads), where HF builds heads of dim 0
    from test_models_checkpoint import QWEN2_HF as d

    assert config_from_hf({**d, "head_dim": None}).head_dim == 8  # null: derived, as HF's LlamaConfig does
    with pytest.raises(ValueError, match=r"config.json: field 'head_dim' must be an integer >= 1, got 0"):
        config_from_hf({**d, "head_dim": 0})
