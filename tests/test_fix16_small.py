"""Small defects left from session 32 (helper fix16_small): a tiny workload's `scale` / `time_scale` ignored without a
word, the advice of `driver.warn_past_positions` for every workload kind, the tiny agents' lengths written twice,
the decode caches checked against this host's memory on an accelerator, and `launcher.import_node_modules` of a pair.
"""

from __future__ import annotations

import logging
import types

import pytest

from dualpath_jax.runtime import config, driver, launcher
from dualpath_jax.runtime.config import ConfigError, RuntimeConfig, shorten_turns_hint, validate_workload

# The tiny agents' own lengths, as `shorten_turns_hint` names them (one text for every line that names them)
TINY_LENGTHS = (
    "config.workload.first_append_tokens, append_tokens, gen_tokens (means; each turn draws 0.5-1.5x of them) or turns"
)


# ------------------------------------------------------------------------- a tiny workload's scale and time_scale


@pytest.mark.parametrize(
    "field, value, instead",
    [("scale", 0.5, TINY_LENGTHS), ("time_scale", 2.0, "config.workload.gap_s"), ("max_context_tokens", 80, "")],
)
def test_a_tiny_workloads_scale_and_time_scale_are_refused_not_ignored(base, field, value, instead):
    """`workload.scale` and `time_scale` shape synthetic and trace agents only (README "Commands": a tiny workload is
    not scaled); a tiny workload's were ignored without a word (the agents of scale=0.5 were those of the default).
    Refused where the other workload fields are checked, as `max_context_tokens` is, naming what shapes tiny agents;
    also by `make_trajectories` itself. Their defaults (what configs/tiny_runtime.py sets) run as before."""
    cfg = base.replace(**{f"workload.{field}": value})
    for check in (validate_workload, driver.make_trajectories):
        with pytest.raises(ConfigError, match=rf"^config.workload.{field}={value:g} .*kind='tiny'") as e:
            check(cfg)
        assert instead in str(e.value) and "synthetic and trace agents only" in str(e.value), e.value
    default = getattr(config.WorkloadConfig(), field)
    assert f"set it to {default:g}" in str(e.value), e.value
    validate_workload(base)  # (scale=0.02, time_scale=1.0, max_context_tokens=0: the defaults)
    validate_workload(base.replace(**{"workload.kind": "synthetic", f"workload.{field}": value}))


def test_the_tiny_agents_lengths_are_one_text(base):
    """`make_trajectories`' refusal of a tiny workload's max_context_tokens named the tiny agents' lengths in its own
    words ("first_append_tokens, append_tokens, gen_tokens or turns"), beside `shorten_turns_hint`'s: one text now."""
    assert TINY_LENGTHS in shorten_turns_hint(base)
    for field, value in (("max_context_tokens", 80), ("scale", 0.5)):
        with pytest.raises(ConfigError) as e:
            validate_workload(base.replace(**{f"workload.{field}": value}))
        assert TINY_LENGTHS in str(e.value), e.value


# ----------------------------------------------------------------------------------- advice past the model's positions


@pytest.mark.parametrize("kind", ["tiny", "synthetic"])
def test_the_warning_past_the_models_positions_advises_by_the_workloads_kind(caplog, kind):
    """`warn_past_positions` advised `max_context_tokens` / `scale`, which do not shape a tiny workload (following it
    changed nothing); its advice is `shorten_turns_hint`'s for the run's workload kind now."""
    cfg, mcfg = RuntimeConfig().replace(**{"workload.kind": kind}), types.SimpleNamespace(max_position_embeddings=4096)
    with caplog.at_level("WARNING", logger="dualpath_jax.runtime.driver"):
        assert driver.warn_past_positions(mcfg, longest_turn=4150, cfg=cfg)  # (a model_config's field: tiny_qwen2's)
    (msg,) = [r.getMessage() for r in caplog.records]
    assert "4150 tokens" in msg and "max_position_embeddings=4096" in msg and shorten_turns_hint(cfg) in msg, msg
    assert ("lower config.workload.scale" in msg) == (kind != "tiny"), msg
    assert (TINY_LENGTHS in msg) == (kind == "tiny"), msg


# ------------------------------------------------------------------------------- decode caches on an accelerator

GiB = 2**30
KV = 64 * 1024  # B/token, all layers (a 7B-class model's order)


def _caches(base, slots: int, engines: int = 1) -> RuntimeConfig:
    """`base` (1 PE node, launcher inprocess) with `engines` decode engines of `slots` x 32K-token slots: 2 GiB each."""
    return base.replace(
        **{"cluster.decode_nodes": engines, "cluster.decode_slots": slots, "cluster.max_seq_len": 2**15}
    )


def test_decode_caches_on_an_accelerator_are_checked_against_its_memory(base):
    """On an accelerator the decode caches (JAX arrays on the default device) take the device's memory: they were
    compared with this host's (a GPU's 40 GiB of caches were refused on a host of 16 GiB, 64 GiB were let through on a
    host of 128 GiB, for a device whose allocator may hand out 60 GiB: RESOURCE_EXHAUSTED in the node). The decision,
    `check_decode_cache_memory(cfg, kv, backend, device_bytes, host)`, here with the numbers of an H100 (80 GB, 75%
    for XLA's allocator) on a host of 16 / 128 GiB."""
    check = config.check_decode_cache_memory
    h100, small_host, big_host = 60 * GiB, (16 * GiB, "the test host's memory"), (128 * GiB, "the test host's memory")
    check(_caches(base, 20), KV, "gpu", h100, small_host)  # 40 GiB: on the device (refused before, against 16 GiB)
    with pytest.raises(ConfigError, match=r"= 68719476736 B \(64.0 GiB\) of decode cache per decode engine is") as e:
        check(_caches(base, 32), KV, "gpu", h100, big_host)  # (let through before: 64 GiB < 128 GiB)
    device = "the default gpu device's memory for JAX (memory_stats bytes_limit)"
    assert f"more than {device}: 64424509440 B (60.0 GiB)" in str(e.value), e.value
    with pytest.raises(ConfigError, match=r"2 decode engines of launcher 'inprocess' all run on this host's default"):
        check(_caches(base, 16, engines=2), KV, "gpu", h100, big_host)  # 2 x 32 GiB
    check(_caches(base, 15, engines=2), KV, "gpu", h100, None)  # 2 x 30 GiB: fits (host memory unknown: no matter)
    # XLA:CPU: the caches are this host's memory, beside every node's host buffers (as before)
    buffers = base.buffers.pe_buffer_bytes + base.buffers.de_buffer_bytes  # (1 PE + 1 DE node)
    check(_caches(base, 20), KV, "cpu", None, (40 * GiB + buffers, "the test host's memory"))
    with pytest.raises(ConfigError, match=r"more than the test host's memory"):
        check(_caches(base, 20), KV, "cpu", None, (40 * GiB + buffers - 1, "the test host's memory"))
    with pytest.raises(ConfigError, match=r"of decode cache per decode engine is more than the test host's memory"):
        check(_caches(base, 20), KV, "cpu", h100, small_host)  # (a device limit does not count on XLA:CPU)


def test_an_accelerator_without_a_memory_limit_skips_the_decode_cache_check(base, caplog):
    """A device whose `memory_stats()` reports no `bytes_limit`: not guessed (nor the host's taken), a debug line."""
    with caplog.at_level(logging.DEBUG, logger="dualpath_jax.runtime.config"):
        config.check_decode_cache_memory(_caches(base, 1000), KV, "tpu", None, (16 * GiB, "the test host's memory"))
    assert "tpu device reports no memory limit" in caplog.text, caplog.text


def test_validate_compares_the_decode_caches_with_the_default_devices_memory(base, monkeypatch):
    """`validate` passes this host's numbers to `check_decode_cache_memory`: the default device's backend and limit
    (`_decode_cache_device`) and this host's memory (launchers local / inprocess; Ray: other hosts, not checked)."""
    monkeypatch.setattr(config, "_decode_cache_device", lambda: ("gpu", 60 * GiB))
    monkeypatch.setattr(config, "host_memory_bytes", lambda: (16 * GiB, "the test host's memory"))
    config.validate(_caches(base, 20), KV)  # 40 GiB on the device
    with pytest.raises(ConfigError, match=r"more than the default gpu device's memory for JAX"):
        config.validate(_caches(base, 32), KV)
    config._validate_decode_cache_memory(_caches(base, 32).replace(launcher="ray"), KV)  # (other hosts)
    monkeypatch.setattr(config, "_decode_cache_device", lambda: ("cpu", None))
    with pytest.raises(ConfigError, match=r"per decode engine is more than the test host's memory"):
        config.validate(_caches(base, 20), KV)  # XLA:CPU: 40 GiB of this host's 16


def test_the_default_devices_backend_and_limit(monkeypatch):
    """`_decode_cache_device` on this machine: XLA:CPU (CI) gives no limit (the caches are host memory there); an
    accelerator gives its allocator's bytes_limit, or None where it reports none."""
    backend, limit = config._decode_cache_device()
    if backend == "cpu":
        assert limit is None
    else:
        assert limit is None or limit > 0, (backend, limit)


# ------------------------------------------------------------------------------------------ node modules: a triple


def test_import_node_modules_takes_node_modules_triple_only(base):
    """`import_node_modules` took a pair too (no store modules, the store still checked): only tests passed one; every
    launcher passes `node_modules`' triple (batchers, transports, stores). A pair is an error now."""
    launcher.import_node_modules(base, launcher.node_modules(base))
    with pytest.raises(ValueError, match=r"expected 3, got 2"):
        launcher.import_node_modules(base, ((), ()))
