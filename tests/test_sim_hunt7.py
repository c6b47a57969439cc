"""Defects found by the seventh simulator hunt of 2026-12-04 (each test failed before its fix):
- the simulator had no per-DE sequence cap: the runtime's DEs hold at most `decode_slots` sequences, the simulator
  only their HBM room, so short sequences were packed beyond the slots (`cluster.de_max_seqs`, default None: no cap);
- an online workload's `workload.aps` / `workload.duration_s` given on the command line of an offline run did
  nothing, silently."""

import collections
import dataclasses
import math
import re

import pytest

from dualpath_jax.sim import load_sim_config
from dualpath_jax.sim.config import sim_config_from_dict
from dualpath_jax.sim.configs_io import load_config
from dualpath_jax.sim.runner import build_simulator, summarize

TINY = "configs/sim_tiny.py"


def _capped(spec: str, cap):
    cfg = load_sim_config(spec)
    cfg.cluster.de_max_seqs = cap  # (set on the loaded config: a field the base did not have ran uncapped there)
    return cfg


def _most_held(records) -> dict:
    """Per DE, the most turns at once between their read start (after their DE allocation) and their decode end."""
    events = collections.defaultdict(list)
    for r in records:
        events[r.decode_engine] += [(r.read_start, 1), (r.finished, -1)]
    most = {}
    for de, ev in events.items():
        n = m = 0
        for _, d in sorted(ev):
            n += d
            m = max(m, n)
        most[de] = m
    return most


# ---- 1. a DE holds at most cluster.de_max_seqs sequences ------------------------------------------------------------
@pytest.mark.parametrize("cap", [1, 2, 3])
def test_a_de_holds_at_most_de_max_seqs_sequences_and_the_policy_waits_for_a_slot(cap):
    """16 agents on 2 DEs: uncapped, each DE held 8 turns at once (their HBM room is large). The placing policy
    sees a DE of full slots as having no room, and what one fetch gives a DE beyond its free slots stays queued (as
    the runtime's scheduler holds it back): the wait is in the global queue, none at the DE."""
    cfg = _capped(f"{TINY}:dualpath,agents=16,turns=2", cap)
    sim = build_simulator(cfg)
    records, links, stats = sim.run()
    assert stats["unfinished_turns"] == 0 and len(records) == 32
    most = _most_held(records)
    assert max(most.values()) == cap, most  # was 8
    s = summarize(cfg, records, links, stats)
    assert s["ttft_allocation_mean_s"] == 0.0 and s["ttft_queue_mean_s"] > 0
    assert all(de.n_seqs == 0 and de.state.free_hbm_tokens == de.free_tokens for de in sim.des.values())


def test_a_policy_that_places_on_a_full_de_waits_there_for_a_slot():
    """dualpath_rr places on the DE in turn, room or not (round_robin full_de="queue"): the request waits in that
    DE's allocation queue for a slot, as for HBM."""
    cfg = _capped(f"{TINY}:dualpath_rr,agents=16,turns=2", 2)
    records, links, stats = build_simulator(cfg).run()
    assert stats["unfinished_turns"] == 0
    assert max(_most_held(records).values()) == 2  # was 8
    assert summarize(cfg, records, links, stats)["ttft_allocation_mean_s"] > 0


def test_one_slot_per_de_decodes_one_turn_at_a_time():
    cfg = _capped(f"{TINY}:dualpath,agents=16,turns=2", 1)
    records, links, stats = build_simulator(cfg).run()
    for de in {r.decode_engine for r in records}:
        spans = sorted((r.first_token, r.finished) for r in records if r.decode_engine == de)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans  # overlapped before
    uncapped = load_sim_config(f"{TINY}:dualpath,agents=16,turns=2")
    jct = summarize(cfg, records, links, stats)["jct_s"]
    assert jct > 1.5 * summarize(uncapped, *build_simulator(uncapped).run())["jct_s"]


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "8", math.inf])
def test_de_max_seqs_out_of_range_is_refused_by_name(value):
    cfg = _capped(f"{TINY}:dualpath", value)
    with pytest.raises(ValueError, match=re.escape("config.cluster.de_max_seqs must be")):
        build_simulator(cfg)


def test_no_cap_and_a_cap_no_de_reaches_give_the_same_run():
    """None (the default) is no cap: every existing figure is unchanged (a cap that never binds gives the same run)."""
    spec = "configs/paper_ds660b.py:dualpath,agents=24,turns=2"
    runs = [build_simulator(_capped(spec, cap)).run() for cap in (None, 10**6)]
    assert [dataclasses.astuple(r) for r in runs[0][0]] == [dataclasses.astuple(r) for r in runs[1][0]]
    assert runs[0][1] == runs[1][1]


# ---- 2. online-only fields given for a run that is not online ---------------------------------------------------------
@pytest.mark.parametrize("key, value", [("workload.duration_s", 100.0), ("workload.aps", 0.4)])
@pytest.mark.parametrize("kind", ["offline", "trace"])
def test_an_online_field_given_for_a_run_that_is_not_online_is_refused_by_name(key, value, kind):
    """`--config.workload.duration_s=100` on an offline config ran offline as if it were not there."""
    d = load_config(f"{TINY}:dualpath").to_dict()
    d["workload"][key.split(".")[1]] = value
    d["workload"]["kind"] = kind
    d["workload"]["trace_path"] = "x.jsonl"
    with pytest.raises(ValueError, match=re.escape(f"config.{key} applies to online workloads only")):
        sim_config_from_dict(d, explicit={key: value})
    assert sim_config_from_dict(d).workload.kind == kind  # the config files set both: only a given one is refused
    d["workload"]["kind"] = "online"
    assert sim_config_from_dict(d, explicit={key: value}).workload.kind == "online"


def test_an_slo_warmup_given_for_an_offline_run_is_refused_by_name():
    d = load_config(f"{TINY}:dualpath").to_dict()
    d["warmup_s"] = 10.0
    with pytest.raises(ValueError, match=re.escape("config.warmup_s applies to online and trace workloads only")):
        sim_config_from_dict(d, explicit={"warmup_s": 10.0})
    for kind in ("online", "trace"):  # (judged on the turns arriving after it)
        d["workload"]["kind"] = kind
        assert sim_config_from_dict(d, explicit={"warmup_s": 10.0}).warmup_s == 10.0
