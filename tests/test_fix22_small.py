"""Session 39's small fixes (each test fails on the code before its fix)."""

from types import SimpleNamespace


def test_the_table_gives_each_runs_hit_rate():
    """A bounded store (`capacity_bytes`) changes a run's hits, and the table had no column for them (only
    results.json's `hit_rate`): a capacity sweep had to open every results.json."""
    from experiments.run import format_table

    res = {
        "basic": SimpleNamespace(summary={"jct_s": 2.0, "hit_rate": 0.5236}),
        "x": SimpleNamespace(summary={"jct_s": 1.0}),
    }
    header, _, first, second = format_table(res).splitlines()
    names = [h.strip() for h in header.split("  ") if h.strip()]
    assert dict(zip(names, first.split(), strict=True))["hit rate"] == "52.4%"
    assert dict(zip(names, second.split(), strict=True))["hit rate"] == "n/a"  # (no hit rate given: not "nan%")


def test_bench_runtime_says_its_simulator_copy_has_no_bounded_store():
    """`bench_runtime` on a bounded store (`capacity_bytes`) printed the simulator's prediction without a word that
    the simulator's store evicts nothing (its hits, and so its JCTs, are an unbounded store's)."""
    from dualpath_jax.runtime.config import RuntimeConfig
    from experiments.bench_runtime import bounded_store_note

    cfg = RuntimeConfig()
    assert bounded_store_note(cfg) is None
    note = bounded_store_note(cfg.replace(store_options={"capacity_bytes": 1 << 20}))
    assert "capacity_bytes=1048576" in note and "unbounded" in note
