"""Small defects left from session 31 (helper fix15_small): `python -m schedulers.hardware`'s runpy warning, the one
key list of `metrics.summarize`, a tiny workload's `max_context_tokens`, a turn of max_seq_len + 1 tokens (prompt +
generation: the last token's KV is never written), and the host memory of buffers and decode caches together."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module, args, says",
    [
        ("schedulers.hardware", ["--gpu=h100"], "takes no arguments"),
        ("schedulers.bench", ["--nosuchflag"], "Unknown command line flag"),
        ("schedulers.calibrate", ["--nosuchflag"], "Unknown command line flag"),
    ],
)
def test_the_schedulers_entry_points_run_without_runpys_warning(module, args, says):
    """`python -m schedulers.hardware` printed runpy's RuntimeWarning ("'schedulers.hardware' found in sys.modules
    after import of package 'schedulers', but prior to execution"): the package imports it (cost_model's profiles), so
    the script ran as a second copy of the module. Its command line is `schedulers/hardware/__main__.py` now. (A bad
    argument: each exits at once, after the imports that warned.)"""
    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and says in out.stdout + out.stderr, out
    assert "RuntimeWarning" not in out.stderr and "found in sys.modules" not in out.stderr, out.stderr


# ---------------------------------------------------------------------------------------------- the runtime's driver


def _stub_ops():
    """A stand-in for `prepare`'s model_ops: its checks run before the model is built (compared with it last)."""
    import types

    return types.SimpleNamespace(config=types.SimpleNamespace(batch_invariant=False))


def test_a_tiny_workloads_max_context_tokens_is_refused_not_ignored(base):
    """`workload.max_context_tokens` cuts synthetic and trace agents (as the simulator's field cuts its workloads);
    a tiny workload's agents were run whole, the field silently ignored (a turn past the given cut ran). Refused
    before anything starts, naming the tiny agents' own lengths; 0 (no cut) runs as before."""
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.config import ConfigError

    cfg = base.replace(**{"workload.max_context_tokens": 80})
    with pytest.raises(ConfigError, match=r"max_context_tokens=80 .*kind='tiny'") as e:
        driver.prepare(cfg, model_ops=_stub_ops())
    assert "first_append_tokens" in str(e.value) and "set it to 0" in str(e.value), e.value
    trajs, _ = driver.prepare(base, model_ops=_stub_ops())
    assert max(p + g for t in trajs for p, _, g in t.turn_shapes(1)) > 80  # what the cut would have dropped


def test_a_turn_of_max_seq_len_plus_one_tokens_passes_the_checks():
    """A decode slot of max_seq_len tokens holds a turn of prompt + generation = max_seq_len + 1: the PE makes the
    first token (no decode step: a max_seq_len prompt with 1 token needs none), each decode step writes the KV of the
    token before the one it makes, and the last token's KV is never written. `prepare` refused prompt + generation >
    max_seq_len (a max_seq_len prompt with 1 generated token among them); the prompt alone still must fit."""
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.config import ConfigError, RuntimeConfig
    from dualpath_jax.workloads.types import Trajectory, Turn

    cfg = RuntimeConfig().replace(**{"cluster.max_seq_len": 16})
    for prompt, gen in ((16, 1), (15, 2), (10, 7), (1, 16)):
        driver.prepare(cfg, [Trajectory(0, [Turn(prompt, gen)])], model_ops=_stub_ops())
    with pytest.raises(ConfigError, match=r"longest turn \(prompt \+ generation = 18 tokens"):
        driver.prepare(cfg, [Trajectory(0, [Turn(10, 8)])], model_ops=_stub_ops())
    with pytest.raises(ConfigError, match=r"shorter than the longest prompt \(17 tokens\)"):
        driver.prepare(cfg, [Trajectory(0, [Turn(17, 1)])], model_ops=_stub_ops())


def test_the_shortest_tiny_last_turn_may_be_max_seq_len_plus_one_tokens():
    """`_check_tiny_fits` (the shortest last turn a tiny workload can draw, before the agents are built) by the same
    rule: least lengths 50 + 3 x 5 + 2 x 10 = 85 tokens fit max_seq_len=84, not 83."""
    from dualpath_jax.runtime.config import ConfigError, RuntimeConfig
    from dualpath_jax.runtime.driver import _check_tiny_fits

    w = {"workload.turns": 3, "workload.first_append_tokens": 100, "workload.gen_tokens": 10}
    w["workload.append_tokens"] = 20
    _check_tiny_fits(RuntimeConfig().replace(**w, **{"cluster.max_seq_len": 84}))
    with pytest.raises(ConfigError, match="reach 85 tokens or more"):
        _check_tiny_fits(RuntimeConfig().replace(**w, **{"cluster.max_seq_len": 83}))


def test_turns_of_max_seq_len_plus_one_tokens_run_as_the_reference_in_one_slot(base, ops, reference_for):
    """The same turns run: a max_seq_len prompt with 1 token, and max_seq_len - 1 with 2 (one decode step filling the
    slot), on DEs of one slot each, give the reference's tokens. The policies admit a request on its len_r = prompt +
    generation, so a DE's slots are offered max_seq_len + 1 tokens each (with max_seq_len, such a request was never
    placed: "placed none of the queued requests on an idle cluster")."""
    from dualpath_jax.runtime import driver
    from dualpath_jax.workloads.types import Trajectory, Turn

    cap = 32
    cfg = base.replace(**{"cluster.max_seq_len": cap, "cluster.decode_slots": 1, "run_timeout_s": 60.0})
    trajs = [Trajectory(0, [Turn(cap, 1)]), Trajectory(1, [Turn(cap - 1, 2)])]
    res = driver.run(cfg, trajs, model_ops=ops)
    ref = reference_for(cfg, ops, trajs)
    assert sorted(res.tokens) == sorted(ref) == [(0, 0), (1, 0)]
    for k, want in ref.items():
        assert res.tokens[k].tolist() == want.tolist(), k


# ------------------------------------------------------------------------------------- host memory, buffers + caches


def test_host_buffers_and_decode_caches_are_checked_together_against_the_hosts_memory(base, monkeypatch):
    """The host buffers of every node and the decode caches of every decode engine were each checked against this
    host's memory, never their sum: on XLA:CPU (the caches are host memory) a config whose two halves fit but whose
    whole does not passed, and a node then failed allocating (ENOMEM / RESOURCE_EXHAUSTED). On an accelerator the
    caches are its HBM, not the host's memory: the sum is not asked there (the device's own memory: test_fix16_small)."""
    from dualpath_jax.runtime import config
    from dualpath_jax.runtime.config import ConfigError

    kv, c, b = 1024, base.cluster, base.buffers  # tiny_qwen2: 4 layers x 256 B of KV per token
    buffers = c.prefill_nodes * b.pe_buffer_bytes + c.decode_nodes * b.de_buffer_bytes
    caches = c.decode_nodes * c.engines_per_node * c.decode_slots * c.max_seq_len * kv
    monkeypatch.setattr(config, "_decode_cache_device", lambda: ("cpu", None))
    monkeypatch.setattr(config, "host_memory_bytes", lambda: (buffers + caches - 1, "the test's memory"))
    with pytest.raises(ConfigError, match=rf"need {buffers} B of host buffers .* and {caches} B of decode caches") as e:
        config.validate(base, kv, 100, 4)
    assert f"{buffers + caches} B" in str(e.value) and "the test's memory" in str(e.value), e.value
    monkeypatch.setattr(config, "host_memory_bytes", lambda: (buffers + caches, "the test's memory"))
    config.validate(base, kv, 100, 4)  # just fits
    monkeypatch.setattr(config, "host_memory_bytes", lambda: (buffers + caches - 1, "the test's memory"))
    monkeypatch.setattr(config, "_decode_cache_device", lambda: ("gpu", caches))
    config.validate(base, kv, 100, 4)  # the caches in an accelerator's memory
