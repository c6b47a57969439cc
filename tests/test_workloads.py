"""Synthetic Table 2 workloads, the additive Turn fields, arrival models and summary statistics."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from dualpath_jax.workloads import (
    DATASETS,
    Trajectory,
    Turn,
    generate_trajectories,
    load_workload,
    make_agents,
    make_arrivals,
    summarize,
)

REPO = pathlib.Path(__file__).resolve().parents[1]  # run the CLIs from the repo root


@pytest.mark.parametrize("dataset", ["32K", "48K", "64K"])
def test_synthetic_matches_table2(dataset):
    spec = DATASETS.get(dataset)
    trajs = generate_trajectories(dataset, 600, seed=1)
    st = summarize(trajs)
    for got, want in [
        (st.mean_append, spec.target_append),
        (st.mean_gen, spec.target_gen),
        (st.mean_total, spec.target_total),
        (st.mean_context, spec.target_context),
    ]:
        assert abs(got - want) / want < 0.10, (dataset, got, want)
    assert all(t.total_tokens <= spec.max_len for t in trajs)  # max-length truncation
    appends = np.array([x.append_tokens for t in trajs for x in t.turns[1:]])
    assert np.percentile(appends, 90) > 2 * np.median(appends)  # a realistic (heavy-tailed) spread
    if dataset == "64K":
        assert abs(st.hit_rate - 0.987) < 0.005  # PAPER.md: ~98.7% at 64K


def test_synthetic_is_seeded():
    a = generate_trajectories("32K", 20, seed=5)
    b = generate_trajectories("32K", 20, seed=5)
    c = generate_trajectories("32K", 20, seed=6)
    assert [t.turns for t in a] == [t.turns for t in b]
    assert [t.turns for t in a] != [t.turns for t in c]
    assert (
        summarize(generate_trajectories("32K", 50, seed=0, append_scale=3.0)).mean_append
        > 2.5 * summarize(a).mean_append
    )
    with pytest.raises(KeyError, match="known: 32K, 48K, 64K"):
        generate_trajectories("128K", 1)


def test_generator_arguments_out_of_range_name_the_argument():
    """A negative seed was numpy's 'expected non-negative integer' (no argument named); a nan / inf append_scale an
    int() error; a negative base_trajectories said 'n must be >= 0'; vocab_size 0 numpy's 'high <= 0'."""
    with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
        generate_trajectories("32K", 2, seed=-1)
    with pytest.raises(ValueError, match="seed and base_seed must be >= 0, got -1 and 0"):
        make_agents("32K", 2, seed=-1, base_trajectories=3)
    with pytest.raises(ValueError, match="seed and base_seed must be >= 0, got 0 and -2"):
        make_agents("32K", 2, base_seed=-2, base_trajectories=3)
    for scale in (float("nan"), float("inf"), 0.0):
        with pytest.raises(ValueError, match="append_scale must be > 0 and finite"):
            make_agents("32K", 2, base_trajectories=3, append_scale=scale)
    with pytest.raises(ValueError, match="base_trajectories must be >= 1, got -1"):
        make_agents("32K", 2, base_trajectories=-1)
    with pytest.raises(ValueError, match="vocab_size must be >= 1, got 0"):
        make_agents("32K", 2, base_trajectories=3, with_token_ids=True, vocab_size=0)
    with pytest.raises(ValueError, match="online arrivals need an int seed >= 0, got -1"):
        make_arrivals("online", aps=1.0, seed=-1)
    # a None seed or a str aps failed in a bare comparison; aps=inf started every agent at t=0
    with pytest.raises(ValueError, match="online arrivals need an int seed >= 0, got None"):
        make_arrivals("online", aps=1.0, seed=None)
    for aps in ("1", float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="online arrivals need a finite aps > 0"):
            make_arrivals("online", aps=aps)
    # a nan gap or trace offset slipped past `< 0` into every later arrival time
    with pytest.raises(ValueError, match="turn gap must be >= 0 s and finite, got nan"):
        Turn(1, 1, gap_s=float("nan"))
    with pytest.raises(ValueError, match="arrival_offset_s must be >= 0 and finite, got nan"):
        Turn(1, 1, arrival_offset_s=float("nan"))
    # an infinite gap made the next turn arrive at t = inf: the simulator ended at inf with it unfinished
    with pytest.raises(ValueError, match="turn gap must be >= 0 s and finite, got inf"):
        Turn(1, 1, gap_s=float("inf"))
    with pytest.raises(ValueError, match="arrival_offset_s must be >= 0 and finite, got inf"):
        Turn(1, 1, arrival_offset_s=float("inf"))


def test_make_agents_prepends_random_first_turn():
    base = generate_trajectories("48K", 30, seed=0)
    agents = make_agents("48K", 100, seed=3, base_trajectories=30)
    assert len(agents) == 100 and [a.trajectory_id for a in agents] == list(range(100))
    base_turns = [tuple(b.turns) for b in base]
    for a in agents:
        first = a.turns[0]
        assert first.gen_tokens == 1 and 1 <= first.append_tokens <= 64
        assert tuple(a.turns[1:]) in base_turns
    assert len({a.turns[0].append_tokens for a in agents}) > 10
    with_ids = make_agents("32K", 3, seed=0, base_trajectories=5, with_token_ids=True, vocab_size=1000)
    for a in with_ids:
        for t in a.turns:
            assert t.append_token_ids is not None and len(t.append_token_ids) == t.append_tokens
            assert t.append_token_ids.max() < 1000
    # agents share no prefix: the random first turns differ in content
    firsts = {tuple(a.turns[0].append_token_ids) for a in with_ids}
    assert len(firsts) == 3


def test_turn_context_override_and_shapes():
    plain = Trajectory(0, [Turn(100, 10), Turn(50, 5), Turn(30, 3)])
    assert plain.turn_shapes(64) == [(100, 0, 10), (160, 64, 5), (195, 128, 3)]
    assert [plain.prompt_tokens(i) for i in range(3)] == [100, 160, 195]
    assert plain.total_tokens == 198 and plain.num_turns == 3 and plain.miss_tokens(2, 64) == 67
    # a trace turn that re-reads only 120 tokens of its 165-token earlier context
    tr = Trajectory(
        1, [Turn(100, 10, context_tokens=0), Turn(50, 5, context_tokens=110), Turn(30, 3, context_tokens=120)]
    )
    assert tr.context_before(2) == 120 and tr.prompt_tokens(2) == 150 and tr.hit_tokens(2, 64) == 64
    assert tr.turn_shapes(64) == [(tr.prompt_tokens(i), tr.hit_tokens(i, 64), tr.turns[i].gen_tokens) for i in range(3)]
    assert tr.total_tokens == 153
    # the turn holding the most KV (prompt + generation): the last one when context grows, an earlier one when
    # a trace's turn re-reads less than came before (tr: 110, 165, 153 tokens)
    assert plain.peak_turn() == (2, 198) and tr.peak_turn() == (1, 165)
    assert Trajectory(2, []).peak_turn() == (-1, 0)
    # cut before the first turn whose prompt + generation exceeds the limit (a context window)
    assert plain.cut_at_tokens(198) is plain and plain.cut_at_tokens(197).turns == list(plain.turns)[:2]
    assert plain.cut_at_tokens(109).turns == [] and tr.cut_at_tokens(164).turns == list(tr.turns)[:1]
    with pytest.raises(ValueError, match="context_tokens"):
        Turn(1, 1, context_tokens=-1)
    with pytest.raises(ValueError, match="hash_block_size"):
        Turn(1, 1, block_hashes=np.arange(2))


def test_offline_arrivals():
    agents = make_agents("32K", 5, base_trajectories=5)
    m = make_arrivals("offline")
    assert (m.agent_arrivals(agents) == 0).all()
    t = Trajectory(0, [Turn(10, 1, gap_s=2.5), Turn(10, 1)])
    assert m.turn_ready(t, 1, prev_finish=7.0) == 9.5
    with pytest.raises(ValueError):
        m.turn_ready(t, 0, 0.0)


def test_online_poisson_arrivals():
    agents = [Trajectory(i, [Turn(1, 1)]) for i in range(4000)]
    m = make_arrivals("online", aps=0.5, seed=2)
    times = m.agent_arrivals(agents)
    gaps = np.diff(np.concatenate([[0.0], times]))
    assert (gaps > 0).all() and abs(gaps.mean() - 2.0) / 2.0 < 0.05
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.06  # exponential: CV = 1
    assert (make_arrivals("online", aps=0.5, seed=2).agent_arrivals(agents) == times).all()
    t = Trajectory(0, [Turn(10, 1, gap_s=3.0), Turn(10, 1)])
    assert make_arrivals("online", aps=1, use_gaps=False).turn_ready(t, 1, 4.0) == 4.0
    assert m.turn_ready(t, 1, 4.0) == 7.0
    with pytest.raises(ValueError, match="aps > 0"):
        make_arrivals("online", aps=0)
    assert make_arrivals("online", aps=1).with_arrivals(agents[:3])[2].arrival_time > 0
    with pytest.raises(KeyError, match="known: offline, online, trace"):
        make_arrivals("poisson")


def test_trace_arrivals_closed_and_open_loop():
    t = Trajectory(
        0,
        [Turn(10, 1, arrival_offset_s=0.0, gap_s=1.0), Turn(10, 1, arrival_offset_s=5.0)],
        arrival_time=100.0,
    )
    closed, open_ = make_arrivals("trace"), make_arrivals("trace", closed_loop=False)
    assert closed.agent_arrivals([t])[0] == 100.0
    assert closed.turn_ready(t, 1, prev_finish=101.0) == 105.0  # trace time
    assert closed.turn_ready(t, 1, prev_finish=110.0) == 111.0  # previous turn finished late
    assert open_.turn_ready(t, 1, prev_finish=110.0) == 105.0


def test_summarize_by_hand():
    t = [Trajectory(0, [Turn(100, 10), Turn(50, 5)]), Trajectory(1, [Turn(64, 0, gap_s=2.0)])]
    st = summarize(t, block_size=64)
    assert st.n_trajectories == 2 and st.n_turns == 3 and st.mean_turns == 1.5
    assert st.mean_append == pytest.approx(214 / 3) and st.mean_gen == 5
    assert st.mean_context == pytest.approx((100 + 160 + 64) / 3)
    assert st.hit_rate == pytest.approx(64 / 324)  # only turn 2 of trajectory 0 hits one block
    assert st.mean_total == pytest.approx((165 + 64) / 2)
    with pytest.raises(ValueError, match="no trajectory"):
        summarize([])


def test_load_workload_and_cli():
    assert len(load_workload("64K", n_agents=7)) == 7
    out = subprocess.run(
        [sys.executable, "-m", "experiments.workload_stats", "--workload=32K", "--n_agents=50"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    assert "append (mean)" in out.stdout and "608" in out.stdout and "hit rate" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "experiments.workload_stats", "--workload=99K"], capture_output=True, text=True, cwd=REPO
    )
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "bad --workload: trace '99K' not found" in bad.stderr and "synthetic datasets: 32K, 48K, 64K" in bad.stderr


def test_workload_stats_cli_bad_seed_and_turnless_trace(tmp_path):
    """A negative --seed and a trace without turns (a session file without requests) were tracebacks."""
    empty = tmp_path / "trace_empty.json"
    empty.write_text('{"id": "e", "block_size": 64, "requests": []}')
    for args, says in [
        (["--workload=32K", "--seed=-1"], "flag --seed=-1: -1 is not a non-negative integer"),
        ([f"--workload={empty}"], f"bad --workload: {empty} holds no turn"),
    ]:
        out = subprocess.run(
            [sys.executable, "-m", "experiments.workload_stats", *args], capture_output=True, text=True, cwd=REPO
        )
        assert out.returncode != 0 and "Traceback" not in out.stderr and says in out.stderr, out.stderr


def test_tune_spec_brings_a_detuned_spec_back_to_its_table_2_targets():
    """tune_spec (how DATASETS was set, offline) from a spec whose gen and append means are 60% off: its generated
    trajectories come back to the 32K dataset's targets (mean append, gen, total and context within 2%)."""
    import dataclasses

    from dualpath_jax.workloads import synthetic
    from dualpath_jax.workloads.stats import summarize

    spec = synthetic.DATASETS.get("32K")
    off = dataclasses.replace(spec, gen_mean=spec.gen_mean * 1.6, append_mean=spec.append_mean * 0.6)
    before = summarize(synthetic.generate_trajectories(off, 300, 0))
    assert abs(before.mean_gen / spec.target_gen - 1) > 0.3
    st = summarize(synthetic.generate_trajectories(synthetic.tune_spec(off, seed=0, n=300, rounds=6), 300, 0))
    for got, want in [
        (st.mean_gen, spec.target_gen),
        (st.mean_append, spec.target_append),
        (st.mean_total, spec.target_total),
        (st.mean_context, spec.target_context),
    ]:
        assert abs(got / want - 1) < 0.02, (got, want)


def test_make_agents_generates_its_base_trajectories_once_and_hands_out_copies():
    """The 500 base trajectories are made once per process and (dataset, count, seed, append scale): every simulator
    run of a sweep or `reproduce_paper` made them again. An agent's turns are its own list: changing one run's agents
    leaves the next run's as they were."""
    from dualpath_jax.workloads import synthetic
    from dualpath_jax.workloads.types import Turn

    synthetic._base_trajectories.cache_clear()
    a = make_agents("32K", 4, base_trajectories=5)
    a[0].turns.append(Turn(7, 7))
    b = make_agents("32K", 4, base_trajectories=5)
    assert synthetic._base_trajectories.cache_info().hits == 1
    assert len(b[0].turns) == len(a[0].turns) - 1 and b[0].turns == a[0].turns[:-1]
    make_agents("32K", 4, base_trajectories=5, append_scale=2.0)
    assert synthetic._base_trajectories.cache_info().misses == 2
