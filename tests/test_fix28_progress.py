"""Progress bars written to a log file (not a terminal): one line per redraw, no carriage returns."""

import io

import experiments
from dualpath_jax import progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_bar_in_a_file_writes_lines_not_carriage_returns(monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)  # every redraw a line, to see each
    f = io.StringIO()
    with progress.bar(file=f, total=4, desc="sim", unit="turn") as b:
        for i in range(4):
            b.update()
            b.set_postfix_str(f"step {i}")
    text = f.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0].startswith("sim:   0%") and all(line.startswith("sim: ") for line in lines)
    assert any("step 2" in line for line in lines) and "4/4" in lines[-1]


def test_bar_in_a_file_is_rate_limited_and_keeps_first_and_last():
    f = io.StringIO()
    with progress.bar(file=f, total=1000, desc="x") as b:
        for _ in range(1000):
            b.update()
    lines = f.getvalue().splitlines()
    assert 2 <= len(lines) <= 4, lines  # the first, the last (and its close), not 1000
    assert "1000/1000" in lines[-1]


def test_bar_on_a_terminal_redraws_in_place():
    f = _Tty()
    with progress.bar(file=f, total=3, desc="x", mininterval=0) as b:
        for _ in range(3):
            b.update()
    assert "\r" in f.getvalue()


def test_run_jobs_bar_in_a_log_has_no_carriage_returns(capfd):
    out = experiments.run_jobs(lambda j: j * 2, [1, 2, 3], workers=1, desc="jobs")
    assert [r for r, _ in out] == [2, 4, 6]
    err = capfd.readouterr().err
    assert "\r" not in err and "jobs: 100%" in err


def test_simulation_bar_in_a_log_has_no_carriage_returns(capfd):
    from dualpath_jax.sim import load_sim_config, runner

    cfg = load_sim_config("configs/sim_tiny.py:dualpath,agents=2,turns=2")
    res = runner.run(cfg, progress=True)
    err = capfd.readouterr().err
    assert len(res.records) == 4 and "\r" not in err and "simulating dualpath: 100%" in err
