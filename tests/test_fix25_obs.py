"""fix25 observability audit (notes/fix25_observe_report.md), the fixes a person sees:

- capacity: log lines and probe lines were glued to the progress bar (`... 0/2 [00:00<?, ?it/s]I1206 ...`), also
  from a worker process; the bar counted searches and stood still for a whole search. run_jobs now writes log
  records and each job's `job_step` line above the bar (a worker's through a queue) and counts a unit of its own.
- bars said `it/s`: sweep counts cells, capacity probes, reproduce_paper runs.
- simulate logged `output_dir: results/sim/sim_tiny` while it wrote to --output_dir.
- bench_runtime.png had an empty second panel under --skip_overhead.
- sweep's table was not padded; sweep.png had no x label, JCT / TTFT axes not from 0, no suptitle.
- plot.png (simulate), run.png, report.png: no title / y labels; PE / DE missing from the SNIC legend.
- run.json's rerun gave --output_dir twice.
- bench_gpu on CPU printed 0.0 TFLOP/s; simulate printed raw byte counts.
- a start line (versions + flags) shared by the launchers.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import types

import pytest

from experiments import job_step, log_start, run_jobs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _glued(err: str, text: str) -> list[str]:
    """The occurrences of `text` in `err` not at the start of a line (after a bar: glued to it)."""
    out, i = [], err.find(text)
    while i >= 0:
        if i > 0 and err[i - 1] not in "\r\n":
            out.append(err[max(0, i - 40) : i + len(text)])
        i = err.find(text, i + 1)
    return out


def _log_and_step(x: int) -> int:
    logging.getLogger().warning("LOGLINE %d", x)
    job_step(f"STEPLINE {x}")
    return x


def test_run_jobs_writes_log_and_step_lines_above_its_bar_and_counts_its_unit(capsys):
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)  # (as absl's handler: a console stream on the root logger)
    root.addHandler(handler)
    try:
        out = run_jobs(_log_and_step, [1, 2], 1, "fix25", unit="probe", steps=3)
    finally:
        root.removeHandler(handler)
    err = capsys.readouterr().err
    assert out == [(1, None), (2, None)]
    assert err.count("LOGLINE") == 2 and err.count("STEPLINE") == 2
    assert _glued(err, "LOGLINE") == [] and _glued(err, "STEPLINE") == [], err
    assert "6/6" in err and "probe/s" in err and "it/s" not in err  # (2 jobs x 3 steps; the rest at each job's end)


def test_a_worker_processs_step_lines_reach_the_parents_bar(capsys):
    out = run_jobs(job_step, ["STEPLINE a", "STEPLINE b"], 2, "fix25", unit="probe", steps=2)
    err = capsys.readouterr().err
    assert [e for _, e in out] == [None, None]
    assert err.count("STEPLINE a") == 1 and err.count("STEPLINE b") == 1  # (written by the parent, once)
    assert _glued(err, "STEPLINE") == [], err
    assert "4/4" in err


def test_capacity_probe_lines_go_through_job_step(monkeypatch):
    """Each probe: a line above the bar and a bar step (job_step), not a worker's bare stderr line."""
    from experiments import _job_steps_to, capacity

    cfg = types.SimpleNamespace(
        slo_percentile=90.0,
        seed=0,
        slo_ttft_s=4.0,
        slo_tpot_s=0.05,
        warmup_s=0.0,
        workload=types.SimpleNamespace(duration_s=60.0),
    )
    probe = {"aps": 0.5, "slo_met": True, "slo_attainment": 1.0, "slo_turns": 3, "ttft_p90_s": 0.2, "tpot_p90_s": 0.01}

    def search(cfg, lo, hi, iters, on_probe):
        on_probe(probe)
        return {"capacity_aps": hi, "probes": [probe]}

    monkeypatch.setattr(capacity, "load_search_config", lambda s, overrides: cfg)
    monkeypatch.setattr("dualpath_jax.sim.capacity.capacity_search", search)
    seen = []
    with _job_steps_to(seen.append):
        capacity.run_search((("x.py", "basic", "", ""), {}, 0.5, 1.0, 0, "x.py:basic"))
    assert seen == [
        "capacity x.py:basic: 0.5 APS: SLO met, attainment 100.0%, TTFT p90 0.2 s, TPOT p90 10 ms (3 turns judged)"
    ]


def test_simulate_logs_the_output_dir_it_writes_and_rerun_gives_it_once(tmp_path):
    out_dir = tmp_path / "sim"
    cmd = [sys.executable, "-m", "experiments.simulate", "--config=configs/sim_tiny.py:agents=2,turns=2", "--noplot"]
    cmd += ["--noprogress", f"--output_dir={out_dir}"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"output_dir: {out_dir}\n" in r.stderr and "output_dir: results/sim" not in r.stderr
    assert f"output directory: {out_dir}" in r.stderr
    assert "offline agents=2 dataset=" in r.stdout and "GB" in r.stdout.split("pe_read_bytes")[1].splitlines()[0]
    rerun = json.loads((out_dir / "run.json").read_text())["rerun"]
    assert rerun.count("--output_dir") == 1 and rerun.endswith(f"--output_dir={out_dir / 'rerun'}")


@pytest.mark.parametrize("given", [["--output_dir=/o/a"], ["--output_dir", "/o/a"], ["-output_dir=/o/a"]])
def test_rerun_drops_the_output_dir_given(monkeypatch, given):
    from dualpath_jax import metrics

    monkeypatch.setattr(sys, "argv", ["x", "--seeds=1", *given, "--workers=2"])
    monkeypatch.setattr(metrics, "git_state", lambda root=None: None)
    info = metrics.run_info("experiments.sweep", 0.0, output_dir="/o/a")
    assert info["rerun"].endswith("--seeds=1 --workers=2 --output_dir=/o/a/rerun"), info["rerun"]
    assert info["command"].endswith(" ".join(given) + " --workers=2")  # (the command as given)


@pytest.fixture
def kept_figures(monkeypatch):
    """Figures the plot functions draw, kept open (pyplot.close is a no-op here) to read their texts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "close", lambda *a: None)
    plt.close("all")
    yield plt
    for n in plt.get_fignums():
        plt.figure(n).clear()
    matplotlib.pyplot.close("all")


def test_bench_runtime_plot_has_no_empty_panel_without_the_overhead(kept_figures, tmp_path):
    from experiments import bench_runtime

    out = {"measured": {"basic": {"jct_s": 2.0}, "dualpath": {"jct_s": 1.0}}, "measured_speedup": 2.0}
    bench_runtime._plot(out, str(tmp_path / "a.png"))
    assert len(kept_figures.gcf().axes) == 1
    o = {"model_compute_ms": 1.0, "overhead_ms": 0.5}
    bench_runtime._plot({**out, "overhead_per_turn": o}, str(tmp_path / "b.png"))
    assert len(kept_figures.gcf().axes) == 2


def test_sweep_table_is_padded_and_its_plot_labelled(kept_figures, tmp_path, capsys):
    from experiments import sweep

    sweep.print_table([["setup", "mode", "load", "jct_s"], ["sim_tiny.py", "basic", "", "43.35"]])
    head, row = capsys.readouterr().out.splitlines()
    assert row.index("-") == head.index("load") and row.index("43.35") == head.index("jct_s")
    rows = [
        {"setup": "s.py", "mode": m, "load": ld, "seed": 0, "jct_s": j, "ttft_p50_s": 0.1, "snic_max_over_avg": 1.2}
        for m, j in (("basic", 43.35), ("dualpath", 43.15))
        for ld in ("agents=16", "agents=32")
    ]
    assert sweep.plot_sweep(rows, str(tmp_path / "sweep.png"))
    fig = kept_figures.gcf()
    jct, ttft = fig.axes[0], fig.axes[1]
    assert jct.get_xlabel() == "load" and jct.get_ylim()[0] == 0 and ttft.get_ylim()[0] == 0
    assert "basic, dualpath" in fig._suptitle.get_text() and "seed 0" in fig._suptitle.get_text()


def test_plots_say_what_they_show(kept_figures, tmp_path):
    """simulate's plot.png: config, policy, agents, JCT; PE / DE in the legend. run.png: model, P/D, NIC caps and
    the warm-up note. report.png: each headline panel's y label."""
    from configs.tiny_runtime import get_config
    from dualpath_jax.metrics import LinkBytes
    from dualpath_jax.sim import load_sim_config
    from dualpath_jax.sim.outputs import plot_result
    from experiments import reproduce_paper
    from experiments import run as run_launcher

    cfg = load_sim_config(os.path.join(REPO, "configs", "sim_tiny.py:dualpath,agents=2,turns=2"))
    links = [LinkBytes(f"snic/node{n}", 0.0, 1.0, 10**9) for n in range(3)]  # (sim_tiny: 1P2D)
    result = types.SimpleNamespace(config=cfg, links=links, records=[], summary={"jct_s": 43.1})
    plot_result(result, str(tmp_path / "plot.png"), name="sim_tiny")
    fig = kept_figures.gcf()
    assert fig._suptitle.get_text() == "sim_tiny dualpath, 2 agents offline (32K): JCT 43.1 s"
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["snic/node0 (PE)", "snic/node1 (DE)", "snic/node2 (DE)"]

    config = get_config("test")
    config.warmup = False
    res = types.SimpleNamespace(summary={"jct_s": 1.0, "link_bytes": {"snic/node0": 10**6}}, records=[])
    assert run_launcher.plot({"basic": res, "dualpath": res}, str(tmp_path / "run.png"), config)
    title = kept_figures.gcf()._suptitle.get_text()
    assert title.startswith("tiny_qwen2, 1P2D, storage NIC 1 GB/s, compute NIC 1 GB/s, 4 agents offline")
    assert "note: --config.warmup=False, so basic's JCT includes" in title

    headline = {
        "JCT change vs basic (%)": [("a", -10.0, [-9.0])],
        "speedup and storage-NIC max/avg": [("b", 1.8, [1.7])],
    }
    assert reproduce_paper.plot_report(headline, [], str(tmp_path / "report.png"))
    labels = [ax.get_ylabel() for ax in kept_figures.gcf().axes]
    assert labels == ["JCT change vs basic (%)", "ratio (speedup; storage-NIC max / avg)"]


def test_bench_gpu_prints_gflops_below_one_tflops(capsys, monkeypatch):
    from experiments import bench_gpu

    for name, value in (("_LAYERS", 2), ("_DTYPE", "float32"), ("_DEVICE_ONLY", True)):
        monkeypatch.setattr(bench_gpu, name, types.SimpleNamespace(value=value))
    row = {
        "batch": 1,
        "miss_tokens": 64,
        "cached_tokens": 64,
        "on_device": {"step_s": 0.1, "model_gflops_per_s": 10.18},
    }
    fast = {**row, "batch": 2, "on_device": {"step_s": 0.1, "model_gflops_per_s": 2500.0}}
    bench_gpu._print_tables(types.SimpleNamespace(platform="cpu", device_kind="cpu"), [row, fast], None)
    out = capsys.readouterr().out
    assert "| 1 x 64 (+64) | 100.0 | 10.2 GFLOP/s |" in out and "| 2 x 64 (+64) | 100.0 | 2.5 |" in out


def test_log_start_logs_versions_and_flags(caplog):
    from importlib.metadata import version

    # (absl's own logger too: a launcher run earlier in this process may have left it at WARNING)
    with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger="absl"):
        log_start("experiments.fix25", results_dir="/r", resolved_config="\na: 1")
    text = caplog.text
    assert "experiments.fix25: python " in text and f"jax {version('jax')}" in text and "flags: " in text
    assert "results dir: /r" in text and "resolved config:\na: 1" in text


def test_a_variant_that_changes_the_workload_is_named_in_the_description():
    # (paper_ds660b:dualpath,agents=256 logged and stored "... 2048 agents offline": the file's own words)
    from configs.paper_ds660b import get_config

    assert get_config("dualpath").description == "DS 660B 2P4D, H800, 64K dataset, 2048 agents offline"
    assert get_config("dualpath,agents=256").description.endswith("; changed by the variant dualpath,agents=256")


def test_a_benchmarks_rows_get_a_run_json_beside_them(tmp_path):
    # (the --out rows held no command, flags, versions, host or git: the other launchers' run.json did)
    from experiments import write_rows_json

    write_rows_json(str(tmp_path / "bench.json"), [{"a": 1.0}], "rows")
    assert json.loads((tmp_path / "bench.json").read_text()) == [{"a": 1.0}]
    info = json.loads((tmp_path / "bench.run.json").read_text())
    assert info["rows"] == str(tmp_path / "bench.json") and info["command"].startswith("python -m ")
    assert "versions" in info and info["rerun"].endswith(f"--out={tmp_path / 'bench.rerun.json'}")  # (not over these)
