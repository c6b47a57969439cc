"""Round 9 of the simulator's speed work: a run cut by max_time grows its turn table (metrics.TurnTable) as turns
arrive instead of holding a row for every turn of its workload; a whole run still sizes it once, for every turn."""

from test_sim_e2e import _cfg

from dualpath_jax.sim import run, runner


def _rows_held(records) -> int:
    """Rows the table has room for (its columns' length), not the rows it gives (`len`)."""
    return len(records.arrival)


def test_cut_run_holds_rows_for_the_turns_that_came_only():
    cfg = _cfg("dualpath,agents=300,turns=8")
    n_turns = sum(len(t.turns) for t in runner.build_simulator(cfg).trajectories)
    res = run(cfg, max_time=0.5)
    records = res.records
    assert 300 <= len(records) <= n_turns / 3 and res.stats["unfinished_turns"] > 0
    # (rows for every turn of the workload before: 152 B each, 0.5 GB at 48P96D for a 100-second window); the
    # table grows by doubling from 1,024 rows
    assert _rows_held(records) <= max(2 * len(records), 1024) < n_turns, (_rows_held(records), n_turns)


def test_whole_run_sizes_its_table_once_for_every_turn():
    res = run(_cfg("dualpath,agents=20,turns=8"))
    assert res.stats["unfinished_turns"] == 0
    assert len(res.records) == _rows_held(res.records) > 100
