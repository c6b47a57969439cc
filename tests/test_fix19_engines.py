"""fix19 "engines": defects of the runtime's engines found by the session-36 hunt (README "The runtime").

- `driver.run(cfg, trajs, model_ops=ops)` with ops of another model (or seed) than cfg.model: the inprocess
  launcher's engines served ops' model under cfg.model's name, silently (a tiny_llama run gave tiny_qwen2's
  tokens), with host buffers, decode slots and token ids checked for cfg.model. The engine group now refuses them.
- With such ops (1 KiB against tiny_llama's 384 B of KV per token) a prompt larger than an engine's whole host
  buffer share was taken by `_alloc_area` for "the budget is full now": the request, and every one behind it (FIFO),
  waited until config.run_timeout_s (900 s by default). The engine now fails at once (the run ends with its error),
  naming the buffer field; what remains reaching it is an engine built outside `driver.run`.
"""

from __future__ import annotations

import types

import pytest

from dualpath_jax.host_buffers import BufferBudgetExceeded, HostBufferPool
from dualpath_jax.runtime import driver, engines
from dualpath_jax.runtime.config import ConfigError


class _Transport:
    def register(self, name, arena):
        pass


def _engine(cls, pool: HostBufferPool, **kw):
    """An engine built by its own __init__ over stand-ins: 2 layers x 8 B/token/layer, blocks of 4 tokens."""
    cfg = types.SimpleNamespace(block_size=4, cluster=types.SimpleNamespace(decode_slots=2, max_seq_len=64))
    model = types.SimpleNamespace(
        name="stand-in",
        kv_layout=types.SimpleNamespace(bytes_per_token_per_layer=8, num_layers=2),
        new_decode_batch=lambda slots, seq: None,
    )
    ctx = types.SimpleNamespace(cfg=cfg, model=model, emit=lambda ev: None)
    return cls(engine_id=3, node_id=0, ctx=ctx, transport=_Transport(), buffer_pool=pool, snic=None, **kw)


@pytest.mark.parametrize(
    "cls, kw, field",
    [(engines.PrefillEngine, {"batcher": None}, "pe_buffer_bytes"), (engines.DecodeEngine, {}, "de_buffer_bytes")],
)
def test_a_prompt_the_whole_host_buffer_can_never_hold_fails_naming_the_field(cls, kw, field):
    pool = HostBufferPool(slot_nbytes=32, num_slots=4, name="e3", prefault=False)  # Layer Blocks of 4 x 8 B
    eng = _engine(cls, pool, **kw)
    # 8 tokens x 2 layers x 8 B = 4 slots: all of them. Taken, the next one waits (full now), it is not refused.
    held = eng._alloc_area(8)
    assert held is not None and held[1].shape == (2, 8, 8)
    assert eng._alloc_area(1) is None
    # 9 tokens: 5 slots, more than the whole budget. It used to wait (None) like the one above, for ever.
    with pytest.raises(
        BufferBudgetExceeded, match=rf"a prompt of 9 tokens .* can never fit; raise config\.buffers\.{field}"
    ):
        eng._alloc_area(9)
    held[0].release()
    with pytest.raises(BufferBudgetExceeded, match="can never fit"):  # (also with the whole budget free)
        eng._alloc_area(9)
    assert eng._alloc_area(8) is not None


@pytest.mark.parametrize("change", [{"model": "tiny_llama"}, {"model_seed": 1}])
def test_model_ops_of_another_model_than_the_configs_are_refused(base, ops, trajs, change):
    """Model ops of another model (or seed) than cfg.model are refused when the engines are built, naming both (the
    run served them under cfg.model's name, to the end)."""
    with pytest.raises(ConfigError, match=r"config\.model=.* but the engines' model ops are 'tiny_qwen2' \(seed 0\)"):
        driver.run(base.replace(**change), trajs, model_ops=ops)
