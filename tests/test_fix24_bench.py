"""bench_runtime ends as experiments.run does (session 41, the faults audit's fixes carried over): a run that failed
before any run was measured said "run failed: ..." without "nothing written" and named `config.run_timeout_s`, a field
path no flag has (the flag is --config.runtime.run_timeout_s)."""

import os

from test_fix12_runtime import _launch

# The end of a stub script (`python -c`, results directory as its argument): bench_runtime on the `:test` config with
# `driver.run` replaced by the script's `fake_run`, no simulator copy, no overhead runs.
BENCH_RUNTIME_WITH_FAKE_RUN = """
import sys
from absl import app
from dualpath_jax.runtime import driver
from experiments import bench_runtime as job, parse_flags_or_exit

driver.run = fake_run
driver.measure_prefill_tokens_per_s = lambda ops, cfg, *a, **k: 1000.0
sys.argv = [sys.argv[0], "--config=configs/tiny_runtime.py:test", "--config.results_dir=" + sys.argv[1], "--skip_sim",
            "--skip_overhead"]
app.run(job.main, flags_parser=parse_flags_or_exit)
"""

_STUB = (
    """
from dualpath_jax.runtime.scheduler_service import RunFailed

def fake_run(cfg, ts, **kw):
    raise RunFailed("run did not finish within 1.0 s (9/32 turns; config.run_timeout_s)")
"""
    + BENCH_RUNTIME_WITH_FAKE_RUN
)


def test_bench_runtime_failing_before_any_measurement_says_nothing_written_and_names_the_flag(tmp_path):
    results = tmp_path / "results"
    out = _launch("-c", _STUB, str(results))
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert out.stderr.rstrip().splitlines()[-1] == (
        "run failed: run did not finish within 1.0 s (9/32 turns; config.runtime.run_timeout_s); nothing written"
    )
    assert os.listdir(results) == []
