"""Fix wave 19, the smaller launchers and benchmarks run with their smallest settings, with mistyped values, and
stopped part-way: `tcp_completion_model` stopped by Ctrl-C keeps the repeats that finished (it was two tracebacks
and nothing kept) and writes --out; `bench_io` stopped by SIGTERM keeps its finished sections (it wrote nothing);
its shaped section with a window shorter than two sample bins, and its tcp table's sizes that are no whole KiB /
MiB; `workload_stats` with a mistyped dataset, `pd_bounds` with an empty --config. Each test failed on the code
before its fix."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from experiments import tcp_completion_model as model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- tcp_completion_model: Ctrl-C keeps the finished repeats -----------------------------------------------------
def test_tcp_completion_model_interrupted_keeps_the_finished_repeats(monkeypatch):
    """Ctrl-C in the second repeat lost the first one (a KeyboardInterrupt out of `run`). Contract: `Interrupted`
    (a KeyboardInterrupt) carrying the rows of the one finished repeat, every case in them, ratios to its raw
    socket."""
    calls = {"n": 0}
    polls = model.Model.waiter_polls

    def stopped_in_second_repeat(self, payload, count, window):
        calls["n"] += 1  # 1: warm-up, 2: repeat 1, 3: repeat 2
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return polls(self, payload, count, window)

    monkeypatch.setattr(model.Model, "waiter_polls", stopped_in_second_repeat)
    with pytest.raises(model.Interrupted) as got:
        model.run(size=2000, count=40, window=4, repeats=3, transport=False)
    e = got.value
    assert isinstance(e, KeyboardInterrupt) and e.done == 1 and e.by == "Ctrl-C"
    assert [r["case"] for r in e.rows] == ["raw socket", "ack thread", "waiter polls"]
    assert e.rows[0]["ratio"] == pytest.approx(1.0) and all(r["GBps"] > 0 for r in e.rows)


def test_tcp_completion_model_sigint_prints_and_writes_the_finished_repeats(tmp_path):
    """SIGINT to the launcher's process group (Ctrl-C at a terminal) after a repeat finished: it was a traceback of
    the receiver process and one of the launcher, no table, and there was no --out. Contract: the table of the
    finished repeats, the rows in --out (made in a missing directory), one line saying so, no traceback."""
    out = tmp_path / "missing" / "rows.json"
    cmd = [sys.executable, "-m", "experiments.tcp_completion_model", "--notransport", "--size=1024"]
    cmd += ["--count=20000", "--repeats=1000", f"--out={out}"]
    env = {**os.environ, "PYTHONPATH": REPO}
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)  # fmt: skip
    try:
        end = time.monotonic() + 60
        for line in p.stderr:  # absl logs each repeat as it starts
            if "repeat 2 of 1000" in line or time.monotonic() > end:
                break
        os.killpg(p.pid, signal.SIGINT)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 1, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert "interrupted (Ctrl-C); the table is the best of the" in stderr
    assert "| waiter polls |" in stdout
    rows = json.loads(out.read_text())
    assert [r["case"] for r in rows] == ["raw socket", "ack thread", "waiter polls"]
    assert rows[0]["size"] == 1024 and rows[0]["repeats"] >= 1


# ---- bench_io: the shaped section's "by slot time" of a short window ------------------------------------------
def test_bench_io_slot_time_of_a_window_inside_one_bin_is_empty():
    """A window inside one 0.1 s sample bin spanned -0.1 s (a negative rate, printed "-0.000") or 0 s (a
    ZeroDivisionError traceback after the other scenarios ran). Contract: no whole bin, no bytes, 0 s."""
    from dualpath_jax.traffic import Link
    from experiments.bench_io import _bytes_by_slot_time

    link = Link("cnic/x", 1e6, {"high": 99, "low": 1}, per_class_names=True, clock_origin=100.0, sample_interval=0.1)
    link._record(100.05, 7, "low")
    for t0, t1 in ((100.02, 100.08), (100.07, 100.13)):
        assert _bytes_by_slot_time(link, t0, t1) == {"high": (0, 0.0), "low": (0, 0.0)}


def test_bench_io_sigterm_keeps_the_finished_sections_and_a_short_shaped_window_runs(tmp_path):
    """SIGTERM (a batch system's stop, `kill`) in the tcp section after the shaped one finished: the process ended
    at once and wrote nothing (Ctrl-C kept the finished sections). Contract: as Ctrl-C, the finished sections' rows
    in --out and one line naming SIGTERM, no traceback (the helper processes it also ends are no new error).
    The shaped section ran with --shaped_seconds=0.05 (a quick look): a ZeroDivisionError traceback about half the
    time, else "-0.000" in the "by slot time" column; now "-" there and null in the JSON (no whole bin)."""
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "-m", "experiments.bench_io", "--sections=shaped,tcp", "--shaped_rates_mb=100"]
    cmd += ["--shaped_seconds=0.05", "--tcp_sizes=65536", "--tcp_small_sizes=", "--tcp_total_mb=100000"]
    cmd += ["--repeats=1", f"--out={out}"]
    env = {**os.environ, "PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)  # fmt: skip
    try:
        table = []
        for line in p.stdout:  # the shaped table, then the tcp section starts
            if line.startswith("| 100 |"):
                table.append(line.rstrip())
            if len(table) == 6:
                break
        time.sleep(1.0)
        os.killpg(p.pid, signal.SIGTERM)
        _, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 1, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert stderr.rstrip().endswith("interrupted (SIGTERM) during 'tcp'; the finished ones (shaped) are kept")
    rows = json.loads(out.read_text())
    assert len(rows) == 6 and {r["section"] for r in rows} == {"shaped"}
    assert all(r["slot_ratio"] is None and r["slot_MBps"] is None and r["achieved_MBps"] >= 0 for r in rows)
    assert len(table) == 6 and all(line.endswith("| - |") for line in table)


# ---- bench_io: the tcp table's sizes -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "size, shown",
    [
        (100, "100 B"),
        (65536, "64 KiB"),
        (41984, "41 KiB"),
        (1536 * 1024, "1536 KiB"),
        (64 << 20, "64 MiB"),
        (1000, "1000 B"),
    ],  # fmt: skip
)
def test_bench_io_tcp_table_names_each_size_as_it_is(size, shown):
    """`--tcp_sizes=100` was "0 KiB" in the tcp table, 1.5 MiB "1 MiB" (floor division)."""
    from experiments.bench_io import _fmt_size

    assert _fmt_size(size) == shown


# ---- bench_io: a size no run can hold, a digit int() does not take -------------------------------------------
@pytest.mark.parametrize(
    "flag, says",
    [
        ("--tcp_sizes=99999999999", "--tcp_sizes takes values of at most 1 GiB (1073741824)"),
        ("--tcp_sizes=\u00b2", "--tcp_sizes takes positive integers"),
    ],
    ids=["huge", "superscript_two"],
)
def test_bench_io_refuses_a_size_it_cannot_measure_in_one_line(flag, says):
    """`--tcp_sizes=99999999999` was numpy's "Unable to allocate 93.1 GiB" traceback after the sections before tcp
    had run; "\u00b2" (a digit to str.isdigit) was int()'s ValueError traceback from the flag validator. Contract:
    absl's one-line flag error, before anything runs."""
    from test_fix13_launchers import _launch, _one_line_error

    line = _one_line_error(_launch("-m", "experiments.bench_io", flag, timeout=60))
    assert says in line, line


# ---- workload_stats / pd_bounds: a flag value that names nothing -------------------------------------------------
def test_workload_stats_names_a_mistyped_dataset_before_the_flags_it_takes():
    """`--workload=64k --n_agents=100` (64K mistyped) said "bad --n_agents: it applies to synthetic datasets, not to
    the trace 64k": the flag was blamed, the typo never named. Contract: the --workload line, as without --n_agents."""
    from test_fix13_launchers import _launch, _one_line_error

    line = _one_line_error(_launch("-m", "experiments.workload_stats", "--workload=64k", "--n_agents=100"))
    assert line.startswith("bad --workload: trace '64k' not found") and "synthetic datasets: 32K, 48K, 64K" in line


def test_pd_bounds_refuses_an_empty_config():
    """`--config=$CFG` with CFG unset (`--config=`) printed the default node's P/D range, as if it were the
    config's. Contract: one line naming --config."""
    from test_fix13_launchers import _launch, _one_line_error

    line = _one_line_error(_launch("-m", "experiments.pd_bounds", "--config="))
    assert line == "bad --config: it is empty (give a config file[:variant], or leave --config out)"


# ---- bench_invariant (as bench_prefill, bench_gpu): SIGTERM keeps the finished models ---------------------------
def test_bench_invariant_sigterm_keeps_the_finished_models(tmp_path):
    """SIGTERM while the second model ran ended bench_invariant at once: no table, nothing in --out (Ctrl-C kept
    the first model's rows). Contract: as Ctrl-C, with one line naming SIGTERM. Its models are no-op stand-ins
    (test_launch_hunt4's, no jax); the second one sends the SIGTERM."""
    from test_launch_hunt4 import _FAKE_INVARIANT, _launch

    fake = _FAKE_INVARIANT.replace(
        'raise MemoryError("out of memory")',
        "import os, signal, time; os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)",
    )
    assert fake != _FAKE_INVARIANT
    script = tmp_path / "fake_invariant.py"
    script.write_text(fake)
    out = tmp_path / "inv.json"
    r = _launch(str(script), "--models=tiny_qwen2,tiny_llama", "--repeats=1", f"--out={out}")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.rstrip().endswith(
        "interrupted (SIGTERM) during 'tiny_llama'; the finished ones (tiny_qwen2) are kept"
    )
    assert [x["model"] for x in json.loads(out.read_text())] == ["tiny_qwen2", "tiny_qwen2"]
    assert "| tiny_qwen2 | case a |" in r.stdout


def test_bench_gpu_sigterm_prints_the_finished_shapes_then_one_line(tmp_path):
    """SIGTERM in bench_gpu's second shape (a GPU lease running out) ended it at once: no table (the finished shape
    only in --out, when given). Contract: as Ctrl-C (test_fix11_launch's stand-in timings), one line naming SIGTERM."""
    from test_fix11_launch import _BENCH_GPU_INTERRUPTED, _launch

    fake = _BENCH_GPU_INTERRUPTED.replace(
        "raise KeyboardInterrupt", "import os, signal, time; os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)"
    )
    assert fake != _BENCH_GPU_INTERRUPTED
    out_json = tmp_path / "gpu.json"
    out = _launch("-c", fake, "--shapes=1:64:0,2:64:64", "--layers=1", "--dtype=float32", f"--out={out_json}")
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    line = f"bench_gpu: interrupted (SIGTERM) during shape 2:64:64; the 1 finished shapes are above and in {out_json}"
    assert out.stderr.rstrip().splitlines()[-1] == line
    assert "| 1 x 64 (+0) | 3.0 | 4.0 |" in out.stdout
    assert [r["batch"] for r in json.loads(out_json.read_text())] == [1]
