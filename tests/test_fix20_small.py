"""Session 37's own small fixes (the lead's; the helpers' are in tests/test_fix20_<name>.py), each test failing on the
code before."""

from __future__ import annotations

import subprocess
import sys

from test_fix20_tracejourney import REPO, _mooncake


def test_the_main_job_refuses_a_given_agent_count_past_the_trace(tmp_path):
    """`--config.runtime.workload.agents=5` on a trace of 2 sessions ran the 2 (with a warning in the log since the
    tracejourney fix): a run of another size than asked. A given count is now a `bad config` line naming both
    counts, before anything starts (a config file's own count stays the loader's warning)."""
    trace = _mooncake(tmp_path / "t.jsonl", 2)
    out = subprocess.run(
        [sys.executable, "-m", "experiments.run", "--config=configs/tiny_runtime.py:test"]
        + ["--config.runtime.workload.kind=trace", f"--config.runtime.workload.trace={trace}"]
        + ["--config.runtime.workload.agents=5", f"--config.results_dir={tmp_path / 'results'}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 1, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last == (
        f"bad config: --config.runtime.workload.agents=5, but the trace {trace} holds 2 trajectories (sessions): "
        "give agents <= 2, or 0 for all of them"
    ), out.stderr[-2000:]
    assert not (tmp_path / "results").exists()
