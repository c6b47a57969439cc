"""Fix wave 13, the smaller launchers (demo, workload_stats, pd_bounds, bench_prefill, bench_invariant) used as a
researcher would, with bad or edge inputs (each test failed on the code before its fix)."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def _one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode != 0, out.stdout[-2000:]
    assert "Traceback" not in out.stderr and "KeyboardInterrupt" not in out.stderr, out.stderr[-3000:]
    lines = out.stderr.rstrip().splitlines()
    return lines[-2] if lines[-1].startswith("Pass --helpshort") else lines[-1]  # an absl flag error: its first line


# ---- pd_bounds: flags whose bounds leave the float range ------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ["--s=1e-310"],
        ["--B_GBps=1e-300", "--s=1e-300"],
        ["--M_GBps=1e299", "--B_GBps=1e-10", "--s=1e-10"],
        [f"--g={10**400}"],
    ],
    ids=["tiny_s", "B_times_s_underflows", "M_over_Bs_overflows", "g_beyond_float"],
)
def test_pd_bounds_refuses_flags_whose_bounds_overflow(args):
    """Each flag passed its own check (> 0 and finite), but g/s or M/(B*s) is inf or a division by 0: an
    as_fraction ValueError, ZeroDivisionError or OverflowError traceback. Contract: one flag error naming the flags."""
    line = _one_line_error(_launch("-m", "experiments.pd_bounds", *args))
    assert "--g, --s, --B_GBps and --M_GBps give bounds beyond the float range" in line, line


def test_pd_bounds_prints_a_huge_bound_as_a_short_number():
    """--M_GBps=1e299 (valid) printed the host-memory bound as a 300-digit integer. Contract: 4 significant digits;
    the default's fractions (1/7, 7/2) are unchanged."""
    out = _launch("-m", "experiments.pd_bounds", "--M_GBps=1e299")
    assert out.returncode == 0, out.stderr[-2000:]
    (mem,) = [line for line in out.stdout.splitlines() if line.startswith("de_host_mem")]
    assert re.search(r"<=\s+1e\+297\s", mem) and not re.search(r"\d{12}", out.stdout), out.stdout
    assert "P/D range: 1/7 (0.1429) ... 7/2 (3.5000)" in out.stdout


# ---- workload_stats: flags the workload does not use -----------------------------------------------------------------
_TRACE = '{"timestamp": 0, "input_length": 1024, "output_length": 10, "hash_ids": [1, 2]}\n'


@pytest.mark.parametrize(
    "args, says",
    [
        (
            ["--workload=32K", "--limit=5"],
            "bad --limit: it applies to traces; 32K is a synthetic dataset (give --n_agents)",
        ),
        (["--workload={trace}", "--n_agents=5"], "bad --n_agents: it applies to synthetic datasets, not to the trace"),
        (["--workload={trace}", "--seed=3"], "bad --seed: it applies to synthetic datasets, not to the trace"),
    ],
    ids=["limit_on_synthetic", "n_agents_on_trace", "seed_on_trace"],
)
def test_workload_stats_refuses_a_flag_its_workload_does_not_use(tmp_path, args, says):
    """`--workload=64K --limit=5` summarized 500 agents, `--workload=<trace> --n_agents=5` the whole trace: the
    flag was dropped without a word. Contract: a usage error naming the flag; without it the same run works."""
    trace = tmp_path / "t.jsonl"
    trace.write_text(_TRACE)
    args = [a.format(trace=trace) for a in args]
    line = _one_line_error(_launch("-m", "experiments.workload_stats", *args))
    assert says in line, line
    ok = _launch("-m", "experiments.workload_stats", args[0])
    assert ok.returncode == 0 and "turns (total)" in ok.stdout, ok.stderr[-2000:]


def test_workload_stats_refuses_a_huge_agent_count():
    """--n_agents=1e20 was a numpy "Maximum allowed dimension exceeded" traceback (1e9: out of memory after
    minutes). Contract: a flag error naming --n_agents."""
    line = _one_line_error(_launch("-m", "experiments.workload_stats", "--workload=32K", f"--n_agents={10**20}"))
    assert line.startswith(f"FATAL Flags parsing error: flag --n_agents={10**20}: ") and "1000000" in line, line


# ---- Ctrl-C before the first measured part: one line, nothing written ------------------------------------------------
# Ctrl-C while `module` is imported (`import jax` in the launcher's main: seconds), or `patch` raises it
_INTERRUPTED = """
import sys
from absl import app

AT = sys.argv[2]

class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == AT:
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, CtrlC())
launcher = __import__("experiments." + sys.argv[1], fromlist=["main"])
if AT == "load_workload":
    def load_workload(*args, **kwargs):
        raise KeyboardInterrupt
    launcher.load_workload = load_workload
if AT == "prefill_layerwise":  # the demo's first prefill (in the warm-up conversation)
    import models.runner

    def prefill_layerwise(*args, **kwargs):
        raise KeyboardInterrupt
    models.runner.ModelRunner.prefill_layerwise = prefill_layerwise
sys.argv = [sys.argv[1], *sys.argv[3:]]
app.run(launcher.main)
"""


@pytest.mark.parametrize(
    "launcher, at, args, says",
    [
        ("demo", "jax", ["--agents=1"], "demo: interrupted (Ctrl-C) before the conversation finished"),
        ("bench_prefill", "jax", [], "bench_prefill: interrupted (Ctrl-C) before any model ran; nothing written"),
        (
            "bench_invariant",
            "models.runner",
            ["--models=tiny_qwen2"],
            "bench_invariant: interrupted (Ctrl-C) before any model ran; nothing written",
        ),
        (
            "workload_stats",
            "load_workload",
            ["--workload=32K"],
            "workload_stats: interrupted (Ctrl-C) while loading or summarizing 32K",
        ),
    ],
)
def test_ctrl_c_before_the_first_part_is_one_line(tmp_path, launcher, at, args, says):
    """Ctrl-C in the seconds a launcher imports jax / the model runner (or while workload_stats loads a trace) was a
    KeyboardInterrupt traceback. Contract: one line naming the launcher, a failing exit, no --out file."""
    out_file = tmp_path / "out.json"
    extra = [f"--out={out_file}"] if launcher.startswith("bench") else []
    line = _one_line_error(_launch("-c", _INTERRUPTED, launcher, at, *args, *extra))
    assert line == says, line
    assert not out_file.exists()


# the demo with both prefill paths giving NaN logits from the measured conversation's second turn (the 4th prefill,
# after 2 warm-up turns): a broken model whose paths agree
_DEMO_NAN = """
import runpy, sys
import numpy as np
import models.runner as mr

real_layerwise, real_full, calls = mr.ModelRunner.prefill_layerwise, mr.ModelRunner.full_prefill, []

def prefill_layerwise(self, *args, **kwargs):
    calls.append(1)
    res = real_layerwise(self, *args, **kwargs)
    if len(calls) < 4:
        return res
    nan = np.full_like(res.last_logits, np.nan)
    return mr.PrefillResult(np.zeros_like(res.next_tokens), nan, res.miss_kv)  # argmax of NaNs: 0

def full_prefill(self, *args, **kwargs):
    logits, kv = real_full(self, *args, **kwargs)
    return ([np.full_like(lg, np.nan) for lg in logits] if len(calls) >= 4 else logits), kv

mr.ModelRunner.prefill_layerwise, mr.ModelRunner.full_prefill = prefill_layerwise, full_prefill
sys.argv = ["demo", *sys.argv[1:]]
runpy.run_module("experiments.demo", run_name="__main__", alter_sys=True)
"""


def test_the_demo_says_what_runs_and_fails_on_nan_logits():
    """Three things of one tiny demo run: (1) the warm-up conversation (compiles: tens of seconds on CPU) ran with
    nothing printed after the model line; (2) --gen_tokens=1 (no decode step) printed "decode 0 tok/s", as if
    measured; (3) the --check passed NaN logits of both paths (`diff > 1e-4` is False for NaN, and argmax agrees on
    the first NaN). Contract: a line announces the warm-up, the rate is "-", NaN logits fail the check."""
    out = _launch("-c", _DEMO_NAN, "--agents=1", "--turns=2", "--append_tokens=4", "--gen_tokens=1",
                  "--no_persistent_cache")  # fmt: skip
    assert out.returncode != 0, out.stdout[-2000:]
    assert "warm-up conversation (not measured: it compiles every bucket) ..." in out.stdout, out.stdout
    assert re.search(r"turn 0: prefill [\d,]+ tok/s, decode - tok/s", out.stdout), out.stdout
    assert "RuntimeError: turn 1: layerwise prefill differs from full prefill (max diff nan)" in out.stderr, out.stderr[
        -2000:
    ]


# ---- bench_invariant: more decode slots than prompt tokens ----------------------------------------------------------
class _FakeRunner:
    """What `_cases` uses of a ModelRunner; decode_step checks one last token per slot, as the real one does."""

    def __init__(self):
        self.config = type("Cfg", (), {"vocab_size": 50})()
        self.length = 0
        self.decoded = []

    def full_prefill(self, seqs):
        return None, [np.zeros((2, len(seqs[0]), 4), np.float32)]

    def init_decode(self, slots, capacity):
        self.capacity = capacity

    def load_prompt_kv(self, slot, kv):
        self.length = kv.shape[1]

    def free_slot(self, slot):
        pass

    def slot_length(self, slot):
        return self.length

    def prefill_layerwise(self, *args, **kwargs):
        pass

    def decode_step(self, slots, last_tokens):
        if len(slots) != len(last_tokens):  # models.runner: "{n} slots but {m} last tokens"
            raise ValueError(f"{len(slots)} slots but {len(last_tokens)} last tokens")
        self.decoded.append(np.asarray(last_tokens))
        self.length += 1


def test_bench_invariant_decodes_more_slots_than_prompt_tokens():
    """--slots=70 with --prompt=64 --append=1 gave the decode step 65 tokens for 70 slots: "ValueError: 70 slots but
    65 last tokens" after both prefill cases had been measured. Contract: one token per slot, in the vocabulary."""
    import experiments.bench_invariant as bi

    runner = _FakeRunner()
    cases = bi._cases(runner, 64, 1, 70, np.random.default_rng(0))
    cases["decode x70"]()
    (tokens,) = runner.decoded
    assert tokens.shape == (70,) and tokens.min() >= 0 and tokens.max() < 50


# ---- bench_prefill: which MoE dispatch was measured ------------------------------------------------------------------
# bench_prefill with run_one replaced by fixed figures (no model runs)
_BENCH_PREFILL_STUB = """
from absl import app
import experiments.bench_prefill as bp

def run_one(name, *args):
    step = {"step_s": 0.01, "tokens_per_s": 100.0, "traces": {"embed": 1}, "compile_s": 0.5, "model_gflops_per_s": 1.0}
    return {"model": name, "arch": "A", "layers": 2, "layer_kinds": 1, "layerwise": step, "whole": step,
            "ratio": 1.0, "ratio_min": 1.0, "max_abs_logit_diff": 0.0}

bp.run_one = run_one
app.run(bp.main)
"""


def test_bench_prefill_names_the_moe_dispatch_it_measured(tmp_path):
    """`--moe_dispatch=ragged` was in neither the table's header nor the JSON (a ragged run's file and a dense one's
    were alike), and with --models=dense it was dropped without a word. Contract: the header and the moe row say
    which; a --moe_dispatch without the moe model is one line naming it."""
    import json

    path = tmp_path / "prefill.json"
    out = _launch("-c", _BENCH_PREFILL_STUB, "--models=dense,moe", "--moe_dispatch=ragged", f"--out={path}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "batch=4, miss=128, cached=256, moe_dispatch=ragged\n" in out.stdout, out.stdout
    dense, moe = json.loads(path.read_text())
    assert "moe_dispatch" not in dense and moe["moe_dispatch"] == "ragged"
    line = _one_line_error(_launch("-c", _BENCH_PREFILL_STUB, "--models=dense", "--moe_dispatch=ragged"))
    assert line == "bad --moe_dispatch: it applies to the moe model, not to --models=dense", line


def test_ctrl_c_in_bench_prefill_prints_the_finished_models_without_out():
    """Ctrl-C in the second model said "the finished ones (dense) are kept", but without --out they were printed
    nowhere (bench_invariant prints them). Contract: the finished models' table, then the one line."""
    stub = _BENCH_PREFILL_STUB.replace(
        "def run_one(name, *args):\n",
        "def run_one(name, *args):\n    if name == 'moe':\n        raise KeyboardInterrupt\n",
    )
    out = _launch("-c", stub, "--models=dense,moe")
    assert _one_line_error(out) == "interrupted (Ctrl-C) during 'moe'; the finished ones (dense) are kept"
    assert "| dense (A) | 2 (1) | 10.0 |" in out.stdout and "| moe" not in out.stdout, out.stdout
