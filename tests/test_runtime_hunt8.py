"""Runtime hunt, eighth round: unusual but valid configs, policies, read paths, stamps (tests fail on the commit before
their fix)."""

from __future__ import annotations

import numpy as np
import pytest

from dualpath_jax.runtime.model_ops import reference_generate


@pytest.mark.parametrize("block_size", [32, 48])
def test_a_decode_engine_precompiles_with_blocks_as_long_as_its_slots(ops, block_size):
    """`cluster.precompile` (the default) with block_size >= max_seq_len -- valid: no block ever fills in a slot, whose
    KV is at most max_seq_len - 1 tokens -- loaded a block_size-token prompt and ran a step on it: every DE node
    failed at start ("slot 0 is full (32 tokens)", "prompt of 48 tokens exceeds decode capacity 32")."""
    cap = 32
    batch = ops.new_decode_batch(2, cap)
    batch.precompile(block_size)
    # It leaves the batch as it found it: a request then decodes as the reference does.
    prompt = np.random.default_rng(3).integers(0, ops.vocab_size, 20).astype(np.int32)
    logits, kv = ops.runner.full_prefill([prompt])
    batch.runner.load_prompt_kv(0, kv[0])
    out = [int(np.argmax(logits[0][-1]))]
    for _ in range(cap - len(prompt) - 1):
        out.append(int(batch.decode(np.array([0]), np.array([out[-1]]))[0]))
    ref = reference_generate(ops, [(prompt, len(out))], cap, decode_slots=2)[0]
    np.testing.assert_array_equal(ref, out)
