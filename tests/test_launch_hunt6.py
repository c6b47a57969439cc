"""Hunt 6 of the launchers, workloads, schedulers and configs (notes: /work/notes/hunt_launch6.md)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dualpath_jax.workloads import Turn

pytest.importorskip("ml_collections")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_variants_none_is_none():
    """`batcher.token_budget=None` (or `null`) in a config variant was the string 'None', refused by the batcher's
    check (`... or None, got 'None' (str)`): a field that takes None could not be given it."""
    import schedulers
    from configs.sim_tiny import get_config
    from dualpath_jax.sim.config import sim_config_from_dict

    sc = sim_config_from_dict(get_config("basic,batcher.token_budget=None,policy.max_pe_tokens=null").to_dict())
    assert sc.batcher_kwargs == {"token_budget": None} and sc.policy_kwargs == {"max_pe_tokens": None}
    assert schedulers.make_batcher(sc.batcher, **sc.batcher_kwargs).config.token_budget is None
    with pytest.raises(ValueError, match=r"quota_s must be > 0, got None"):  # a field without None: its own check
        sim_config_from_dict(get_config("batcher.quota_s=None").to_dict())


def test_a_kwarg_called_name_is_an_unknown_field():
    """`make_batcher("fifo", name=...)` (a variant's `batcher.name=fifo`) was `build_config() got multiple values for
    argument 'name'`; it is a field the batcher does not take, named with the fields it does."""
    import schedulers

    with pytest.raises(TypeError, match=r"'fifo' does not take \['name'\]; its config fields are"):
        schedulers.make_batcher("fifo", name="fifo")
    with pytest.raises(TypeError, match=r"'basic' does not take \['name'\]"):
        schedulers.make_policy("basic", name="x")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(append_tokens=True, gen_tokens=False),
        dict(append_tokens=8, gen_tokens=True),
        dict(append_tokens=8, gen_tokens=2, context_tokens=True),
    ],
)
def test_a_bool_token_count_is_refused(kwargs):
    """Turn(True, False) was a 1-token turn (bools pass `0 <= x < inf` and `% 1`)."""
    field = next(k for k, v in kwargs.items() if isinstance(v, bool))
    with pytest.raises(ValueError, match=rf"turn {field} must be a token count, not a bool"):
        Turn(**kwargs)


def test_a_bool_context_window_is_refused():
    """`Trajectory.cut_at_tokens(True)` was a 1-token window: every turn cut, silently."""
    from dualpath_jax.workloads import Trajectory

    with pytest.raises(ValueError, match=r"cut_at_tokens limit must be a token count, not a bool"):
        Trajectory(0, [Turn(3, 4)]).cut_at_tokens(True)


# reproduce_paper with its simulations replaced by fixed JCTs; each run's spec is logged to $RUNS_LOG
_FAKE_REPRODUCE = """
import os
from absl import app
import experiments.reproduce_paper as rp

JCT = {"basic": 200.0, "layerwise": 160.0, "dualpath_rr": 120.0, "dualpath": 100.0, "oracle": 90.0}

def fake(spec):
    with open(os.environ["RUNS_LOG"], "a") as f:
        f.write(spec + "\\n")
    mode = spec.split(":", 1)[1].split(",", 1)[0]
    return {"spec": spec, "jct_s": JCT[mode], "snic_max_over_avg": 1.25, "unfinished": 0, "wall_s": 0.0}

rp._offline = fake
app.run(rp.main)
"""


def test_reproduce_paper_runs_each_simulation_once(tmp_path):
    """`--table=2048` ran the 64K row's three cells twice (the headline's `...,agents=2048,seed=0` is the same
    simulation), and `--appends=2,2.0000001` printed two x2 rows of one run."""
    script, log = tmp_path / "fake_reproduce.py", tmp_path / "runs.log"
    script.write_text(_FAKE_REPRODUCE)
    out = subprocess.run(
        [sys.executable, str(script), f"--output_dir={tmp_path}", "--noplot", "--table=2048", "--appends=2,2.0000001"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO, "RUNS_LOG": str(log)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    runs = log.read_text().split()
    assert len(runs) == len(set(runs)) == 5 + 2 + 9 - 3  # headline, x2, table less its 3 headline cells
    report = (tmp_path / "report.md").read_text()
    assert report.count("| x2 |") == 1
    assert "| 2048 | 64K | 4844 / 90 (0.02) | 5313 / 100 (0.02) | 10000 / 200 (0.02) |" in report


def test_bench_runtime_simulator_copy_caps_sequences_per_de():
    """The runtime's DEs decode at most `cluster.decode_slots` sequences; the simulator copy had only their HBM room
    (decode_slots x max_seq_len tokens), so short sequences were packed past the slots."""
    from configs.tiny_runtime import get_config
    from dualpath_jax.runtime.config import RuntimeConfig
    from experiments import bench_runtime
    from schedulers.cost_model import MODEL_SHAPES

    cfg = RuntimeConfig.from_config_dict(get_config().runtime).replace(**{"cluster.decode_slots": 5})
    sc = bench_runtime.sim_config(cfg, MODEL_SHAPES.get("qwen2.5-32b"), {})
    assert getattr(sc.cluster, "de_max_seqs", None) == 5


@pytest.mark.parametrize("digits", [400, 5000], ids=["past-float-range", "past-python-int-digits"])
def test_a_trace_line_with_a_huge_number_is_a_trace_format_error(tmp_path, digits):
    """A Mooncake line whose timestamp is an int past the float range was a bare OverflowError, one of more than
    4,300 digits a bare ValueError of the json module: neither named the file and line (module docstring)."""
    from dualpath_jax.workloads import traces

    huge = "1" + "0" * digits
    p = tmp_path / "odd.jsonl"
    row = '{"timestamp": TS, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]}'
    p.write_text(row.replace("TS", "0") + "\n" + row.replace("TS", huge) + "\n")
    with pytest.raises(traces.TraceFormatError, match=rf"{p}:2: "):
        traces.load_trace(p)
    session = tmp_path / "odd.json"  # a kv-cache-tester session: the same
    request = '{"type": "n", "t": TS, "in": 64, "out": 1, "hash_ids": [1]}'.replace("TS", huge)
    session.write_text('{"block_size": 64, "requests": [' + request + "]}")
    with pytest.raises(traces.TraceFormatError, match=rf"{session}"):
        traces.load_trace(session)
