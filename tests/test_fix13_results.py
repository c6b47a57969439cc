"""Result files as a notebook reads them (session 30, area `results`): the simulator's summary.json / turns.csv /
links.csv and the runtime's turns_<policy>.json (`metrics.write_json`), loaded with csv / json and
`metrics.read_turns` / `metrics.read_links`, recompute the summaries they sit beside."""

import csv
import dataclasses
import json
import math

import pytest

from dualpath_jax import metrics


def _strict_json(path):
    def refuse(c):
        raise ValueError(f"{path}: {c} is not JSON")

    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def _same(a, b) -> bool:
    return repr(a) == repr(b)  # equal bits, NaN equals NaN


def _record(i, arrival, gen=3, first=None):
    r = metrics.TurnRecord(i, 0, 100 + i, 64, gen, arrival)
    r.scheduled, r.read_start, r.read_end = arrival + 0.1, arrival + 0.2, arrival + 0.4
    r.prefill_start, r.prefill_end = arrival + 0.5, arrival + 0.9
    r.first_token = arrival + 1.0 if first is None else first
    if gen > 1:
        r.second_token = r.first_token + 0.05
    r.finished = r.first_token + 0.05 * max(gen - 1, 0)
    r.prefill_engine, r.decode_engine, r.read_side, r.pe_read_bytes = 0, 1, "pe", 4096 * (i + 1)
    return r


@pytest.fixture(scope="module")
def sim_outputs(tmp_path_factory):
    """A tiny simulation (4 agents x 2 turns, ~0.2 s) written as `experiments.simulate` writes it."""
    from dualpath_jax.sim import load_sim_config, run
    from dualpath_jax.sim.outputs import write_results

    cfg = load_sim_config("configs/sim_tiny.py:dualpath,agents=4,turns=2", as_run=True)
    res = run(cfg)
    out = tmp_path_factory.mktemp("sim")
    write_results(res, str(out), {}, plot=False)
    return res, out


def test_a_summary_of_no_turns_has_every_figure_of_the_schema():
    """A run cut before its first arrival (`simulate ...:dualpath,aps=0.5 --max_time=0.1`) wrote a summary of
    `turns` only: `jct_s`, the throughputs, percentiles and read bytes were missing, so a notebook reading a sweep of
    runs raised KeyError on it. Every key is there: counts and bytes 0, the figures undefined (NaN, null in JSON)."""
    full = metrics.summarize([_record(0, 0.0)])
    empty = metrics.summarize([])
    assert list(empty) == list(full)
    assert empty["turns"] == empty["turns_without_first_token"] == 0
    assert empty["pe_read_bytes"] == empty["de_read_bytes"] == 0
    for k in ("jct_s", "gen_tokens_per_s", "ttft_p50_s", "tpot_p99_s", "snic_max_over_avg"):
        assert math.isnan(empty[k]), k
    assert json.loads(json.dumps(metrics.json_safe(empty)))["jct_s"] is None


def test_the_ttft_breakdown_is_the_simulators_bit_for_bit_and_sums_to_the_mean_ttft():
    from dualpath_jax.sim import runner

    recs = [_record(i, 0.3 * i) for i in range(5)] + [_record(9, 1.0, first=math.nan)]
    got = metrics.ttft_breakdown(recs)
    assert _same(got, runner.ttft_breakdown(recs))
    done = [r for r in recs if not math.isnan(r.first_token)]
    assert math.isclose(sum(got.values()), sum(r.ttft for r in done) / len(done), rel_tol=1e-12)
    assert all(math.isnan(v) for v in metrics.ttft_breakdown([_record(0, 0.0, first=math.nan)]).values())


def test_turns_json_summary_has_the_ttft_breakdown_of_the_other_summaries(tmp_path):
    """The runtime's turns_<policy>.json summary lacked the queue / allocation / read / prefill means that its
    results.json and the simulator's summary.json give (README "Outputs"): the same run, two summaries."""
    from dualpath_jax.sim import runner

    recs = [_record(i, 0.3 * i) for i in range(4)]
    path = tmp_path / "turns_dualpath.json"
    metrics.write_json(str(path), recs, [metrics.LinkBytes("snic/node0", 0.0, 1.0, 10)], policy="dualpath")
    s = _strict_json(path)["summary"]
    for k, v in runner.ttft_breakdown(recs).items():  # (as results.json has them: driver.run)
        assert s[k] == v, k


def test_turns_json_round_trips_through_read_turns(tmp_path):
    """turns_<policy>.json read back: the same records (NaN from null) and links, so summarize gives the file's
    summary again."""
    recs = [_record(i, 0.25 * i, gen=1 + i % 3) for i in range(7)] + [_record(7, 2.0, first=math.nan)]
    links = [metrics.LinkBytes("snic/node0", 0.0, 0.5, 300), metrics.LinkBytes("snic/node1", -0.1, -0.1, 0)]
    path = str(tmp_path / "turns_basic.json")
    metrics.write_json(path, recs, links, policy="basic")
    back = metrics.read_turns(path)
    # repr: the same values and types (3 is not 3.0), NaN where the file has null
    assert all(_same(dataclasses.astuple(a), dataclasses.astuple(b)) for a, b in zip(back, recs, strict=True))
    assert metrics.read_links(path) == links
    assert _same(
        metrics.json_safe({**metrics.summarize(back, links), **metrics.ttft_breakdown(back)}),
        _strict_json(path)["summary"],
    )


def test_simulator_files_are_strict_and_their_rows_recompute_the_summary(sim_outputs):
    res, out = sim_outputs
    doc = _strict_json(out / "summary.json")
    with open(out / "turns.csv", newline="") as f:
        rows = list(csv.reader(f))
    fields = [fl.name for fl in dataclasses.fields(metrics.TurnRecord)]
    assert rows[0] == fields and all(len(r) == len(fields) for r in rows[1:])
    recs = metrics.read_turns(str(out / "turns.csv"))
    links = metrics.read_links(str(out / "links.csv"))
    assert len(recs) == doc["summary"]["turns"] == len(res.records)
    assert all(_same(dataclasses.astuple(a), dataclasses.astuple(b)) for a, b in zip(recs, res.records, strict=True))
    again = metrics.json_safe({**metrics.summarize(recs, links), **metrics.ttft_breakdown(recs)})
    for k, v in again.items():
        if k != "snic_max_over_avg":
            assert _same(v, doc["summary"][k]), k
    # links.csv has no row for an SNIC that moved nothing (here node 0: every hit read on the DE side), which the
    # balance counts as 0: its names come from link_totals (the summary's comes from their floats: a few ulps apart)
    snics = [k for k in doc["link_totals"] if k.startswith("snic/")]
    balance = metrics.snic_max_over_avg(links, links=snics)
    assert math.isclose(balance, doc["summary"]["snic_max_over_avg"], rel_tol=1e-12)
    # per-link totals: links.csv's whole bytes add up to summary.json's link_totals (rounded)
    per = {}
    for s in links:
        per[s.link] = per.get(s.link, 0) + s.nbytes
    assert per and all(per[k] == round(doc["link_totals"][k]) for k in per)
    # NaN only where a value is undefined: a 1-token turn's second token
    for r in recs:
        for name in metrics.TIMESTAMPS:
            assert not math.isnan(getattr(r, name)) or (name == "second_token" and r.gen_tokens <= 1), (r, name)


def test_read_turns_names_what_it_cannot_read(tmp_path):
    p = tmp_path / "turns.csv"
    p.write_text("trajectory_id,turn_index,bogus\n0,0,1\n")
    with pytest.raises(ValueError, match="bogus"):
        metrics.read_turns(str(p))
    fields = [fl.name for fl in dataclasses.fields(metrics.TurnRecord)]
    p.write_text(",".join(fields) + "\n" + ",".join(["1"] * (len(fields) - 1)) + "\n")
    with pytest.raises(ValueError, match="line 2"):
        metrics.read_turns(str(p))
    q = tmp_path / "notes.txt"
    q.write_text("x")
    with pytest.raises(ValueError, match="notes.txt"):
        metrics.read_turns(str(q))


def test_an_online_summary_with_no_judged_turn_has_every_slo_key():
    """`slo_summary` of no turn in [warmup, duration) gave `slo_turns` and `slo_met` only: sweep.csv's
    `slo_attainment` cell was empty and a notebook's `s["ttft_p90_s"]` a KeyError."""
    from dualpath_jax.sim import load_sim_config, runner

    cfg = load_sim_config("configs/sim_tiny.py")
    cfg = dataclasses.replace(cfg, slo_percentile=90.0)
    s = runner.slo_summary(cfg, [])
    assert s["slo_turns"] == 0 and s["slo_met"] is False
    assert set(s) == {"slo_turns", "slo_attainment", "ttft_p90_s", "tpot_p90_s", "ttst_p50_s", "slo_met"}
    assert all(math.isnan(s[k]) for k in ("slo_attainment", "ttft_p90_s", "tpot_p90_s", "ttst_p50_s"))


def test_the_storage_nic_total_has_one_name_in_the_simulator_and_the_runtime():
    """The simulator's summary called it `snic_bytes_total`, the runtime's `snic_total_bytes`."""
    from dualpath_jax.sim import load_sim_config, run

    res = run(load_sim_config("configs/sim_tiny.py"))
    assert "snic_bytes_total" not in res.summary
    snic = [v for k, v in res.stats["link_totals"].items() if k.startswith("snic/")]
    assert res.summary["snic_total_bytes"] == pytest.approx(sum(snic), rel=1e-12) and sum(snic) > 0
