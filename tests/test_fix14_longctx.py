"""Long contexts and tight buffers on the runtime (helper fix14_longctx): what a researcher meets pushing
`configs/tiny_runtime.py:test` toward its limits -- prompts near `max_seq_len`, buffers of one prompt, few slots.
"""

from __future__ import annotations

import pytest

from dualpath_jax.runtime import driver
from dualpath_jax.runtime.config import ConfigError


def test_a_tiny_prompt_past_max_seq_len_names_the_tiny_workloads_fields(base):
    """A tiny workload whose longest prompt is past max_seq_len was told to "lower config.workload.scale, or cut the
    agents there with config.workload.max_context_tokens": both apply to synthetic and trace agents only, so following
    the line changed nothing and gave the same error. It names the tiny agents' own lengths now."""
    cfg = base.replace(
        **{"workload.first_append_tokens": 200}
    )  # (max_context_tokens of a tiny workload: refused first)
    with pytest.raises(ConfigError, match=r"shorter than the longest prompt") as e:
        driver.prepare(cfg)
    text = str(e.value)
    assert "config.workload.first_append_tokens" in text and "turns" in text, text
    assert "cut the agents there" not in text and "lower config.workload.scale" not in text, text


def test_a_synthetic_prompt_past_max_seq_len_still_names_scale_and_the_cut(base):
    """Synthetic and trace agents: `scale` and `max_context_tokens` are the way out, as before."""
    cfg = base.replace(**{"workload.kind": "synthetic", "workload.agents": 3, "workload.turns": 4})
    longest = max(p for t in driver.make_trajectories(cfg) for p, _, _ in t.turn_shapes(1))
    with pytest.raises(ConfigError, match=r"shorter than the longest prompt") as e:
        driver.prepare(cfg.replace(**{"cluster.max_seq_len": longest - 1}))
    text = str(e.value)
    assert "lower config.workload.scale" in text and "config.workload.max_context_tokens" in text, text


def test_a_tiny_turn_past_max_seq_len_with_its_generation_names_the_tiny_workloads_fields_too(base):
    """The same for a prompt that fits but whose generation does not (driver.prepare's "longest turn" line)."""
    trajs = driver.make_trajectories(base)
    shapes = [s for t in trajs for s in t.turn_shapes(1)]
    longest_prompt, longest_turn = max(p for p, _, _ in shapes), max(p + g for p, _, g in shapes)
    assert longest_prompt < longest_turn
    with pytest.raises(ConfigError, match=r"shorter than the longest turn") as e:
        # (a slot holds prompt + generation - 1 tokens of KV: the last token is never fed back)
        driver.prepare(base.replace(**{"cluster.max_seq_len": longest_turn - 2}), trajs)
    text = str(e.value)
    assert "config.workload.first_append_tokens" in text and "lower config.workload.scale" not in text, text


def test_a_turn_past_the_models_positions_is_warned_about(caplog):
    """A turn longer than the model's `max_position_embeddings` (a real checkpoint's trained window) ran silently with
    positions it was not trained for; `driver.prepare` warns, naming both numbers (helper fix14_longctx's note). (Its
    advice by the workload's kind: tests/test_fix16_small.py.)"""
    from dualpath_jax.runtime.config import RuntimeConfig
    from dualpath_jax.runtime.model_ops import model_config

    mcfg, cfg = model_config("tiny_qwen2"), RuntimeConfig()
    assert mcfg.max_position_embeddings == 4096
    with caplog.at_level("WARNING", logger="dualpath_jax.runtime.driver"):
        assert not driver.warn_past_positions(mcfg, 4096, cfg)
        assert driver.warn_past_positions(mcfg, 4150, cfg)
        # (the last token is never fed back: 4097 tokens run positions 0..4095; 2026-12-05 it warned at 4097)
        assert not driver.warn_past_positions(mcfg, 4097, cfg)
        assert driver.warn_past_positions(mcfg, 4098, cfg)
    msg, _ = [r.getMessage() for r in caplog.records]  # (4150, then 4098)
    assert "4150 tokens" in msg and "max_position_embeddings=4096" in msg
