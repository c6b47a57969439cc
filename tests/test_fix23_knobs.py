"""Session 40's launcher knobs (each test fails on the code before its fix): reproduce_paper's --extra, the word None
for a placeholder field's `--config.*` override, and a hint for the other launchers' results-directory flag."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*cmd: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *cmd],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO, **(env or {})},
        check=False,
    )


# ---- 1. reproduce_paper --extra ---------------------------------------------------------------------------------------

# reproduce_paper with its simulations replaced by fixed figures; every run's spec (a capacity search's at its lowest
# APS) and the plot's note go to $SEEN at exit. The check of --extra's runs loads their configs but builds no
# simulator (a bad item's check: the test after this one)
_FAKE_REPRODUCE = """
import atexit, json, os
from absl import app
import dualpath_jax.sim.runner
import experiments.reproduce_paper as rp

dualpath_jax.sim.runner.build_simulator = lambda cfg: None

JCT = {"basic": 200.0, "layerwise": 160.0, "dualpath_rr": 120.0, "dualpath": 100.0, "oracle": 90.0}
SEEN = []
atexit.register(lambda: json.dump(SEEN, open(os.environ["SEEN"], "w")))

def offline(spec):
    SEEN.append(spec)
    mode = spec.split(":")[1].split(",")[0]
    if mode == os.environ.get("FAIL_AT"):
        raise RuntimeError("the run broke")
    return {"spec": spec, "jct_s": JCT[mode], "snic_max_over_avg": 1.2, "unfinished": 0, "wall_s": 0.0}

def capacity(args):
    SEEN.append(rp._capacity_spec(args))
    return {"capacity_aps": 0.2, "upper_aps": 0.25, "probes": [], "setup": args[0], "mode": args[1]}

def plot(headline, table_cells, path, note=""):
    SEEN.append("plot:" + note)
    return False

rp._offline, rp._capacity, rp.plot_report = offline, capacity, plot
app.run(rp.main)
"""

_SMALL = [
    "--agents=4",
    "--appends=2",
    "--pd_ratios=1P1D",
    "--pd_agents=4",
    "--online",
    "--online_duration_s=300",
    "--online_warmup_s=100",
    "--online_iters=1",
]


def _fake_reproduce(tmp_path, name: str, *args: str, env: dict | None = None):
    script = tmp_path / f"{name}.py"
    script.write_text(_FAKE_REPRODUCE)
    out_dir, seen = tmp_path / name, tmp_path / f"{name}.seen.json"
    out = _launch(str(script), f"--output_dir={out_dir}", *args, env={"SEEN": str(seen), **(env or {})})
    return out, out_dir, json.loads(seen.read_text())


def test_reproduce_paper_extra_reaches_every_run_and_heads_the_report(tmp_path):
    """A researcher wanted the paper's report under a bounded KV store: reproduce_paper had no way to change its
    runs' setup (`--extra`: "Unknown command line flag"). Now --extra's items end every run's variant (headline,
    append, P/D, the online searches), report.md and report.json say so first, and the plot gets it as its title;
    without --extra nothing of it appears."""
    item = "cluster.store_capacity_gb=500"
    with ThreadPoolExecutor(3) as pool:  # (three launches at once: ~2 s, not ~4)
        extra, plain, failed = pool.map(
            lambda a: _fake_reproduce(tmp_path, *a[:-1], env=a[-1]),
            [
                ("extra", *_SMALL, f"--extra={item}", None),
                ("plain", *_SMALL, None),
                ("failed", "--agents=4", f"--extra={item}", {"FAIL_AT": "oracle"}),
            ],
        )
    out, out_dir, seen = extra
    assert out.returncode == 0, out.stderr[-2000:]
    runs = [s for s in seen if not s.startswith("plot:")]
    assert len(runs) == 5 + 2 + 2 + 4, runs  # 5 modes, append x2, P/D 1P1D, 4 capacity searches
    assert all(s.endswith(f",{item}") for s in runs), runs
    assert seen[-1] == f"plot:Not the paper's setup: every run had the variant items {item} appended (--extra)."
    lines = (out_dir / "report.md").read_text().splitlines()
    assert (
        lines[2] == f"**Not the paper's setup**: every run below had the variant items `{item}` appended (`--extra`)."
    )
    raw = json.loads((out_dir / "report.json").read_text())
    assert list(raw)[:2] == ["extra", "note"] and raw["extra"] == item
    ran = json.loads((out_dir / "run.json").read_text())["runs"]
    assert len(ran) == 13 and all(item in r for r in ran)

    out, out_dir, seen = plain
    assert out.returncode == 0, out.stderr[-2000:]
    assert seen[-1] == "plot:" and not any("store_capacity" in s for s in seen)
    report = (out_dir / "report.md").read_text()
    assert "Not the paper's setup" not in report and report.splitlines()[2].startswith("Offline DS 660B 2P4D")
    assert not {"extra", "note"} & set(json.loads((out_dir / "report.json").read_text()))

    # a failed run's partial report.json says it too
    out, out_dir, _ = failed
    assert out.returncode == 1 and f"oracle,dataset=64K,agents=4,seed=0,{item}: RuntimeError" in out.stderr
    assert json.loads((out_dir / "report.json").read_text())["extra"] == item


@pytest.mark.parametrize(
    "item, says",
    [
        ("seed=1", "use --seeds"),
        ("agents=8", "use --agents (the headline runs), --pd_agents"),
        ("dataset=48K", "use --dataset (the headline runs) or --online_dataset"),
        ("append=2", "use --appends"),
        ("pd=1P1D", "use --pd_ratios"),
        ("cluster.decode_nodes=8", "use --pd_ratios"),
        ("aps=0.5", "use --online"),
        ("warmup=10", "use --online_warmup_s"),
        ("kind=online", "use --online"),
        ("trace=x.jsonl", "not a trace"),
        ("dualpath", "is a mode, and the report's rows set each run's mode"),
    ],
)
def test_reproduce_paper_refuses_extra_items_the_report_sets_per_run(item, says):
    """An item the report sets per run clashed with the run's own (`two values for seed`) after the others ran, or
    changed what a row is (kind=online ran the offline rows online): one line naming the flag to use."""
    from experiments.reproduce_paper import extra_items, refuse_extra_items

    extra = extra_items(f" cluster.snic_gbps=25, {item},")
    with pytest.raises(SystemExit, match=r"^bad --extra: ") as e:
        refuse_extra_items(extra)
    assert f"{item!r}" in str(e.value) and says in str(e.value)
    refuse_extra_items(extra_items("cluster.store_capacity_gb=500, policy.x=1"))  # (their check: the runs' configs)


def test_reproduce_paper_checks_extra_items_before_any_run(tmp_path):
    """A bad item (no such field) is one line naming it and the run, before anything runs or is written."""
    out_dir = tmp_path / "out"
    out = _launch(
        "-m",
        "experiments.reproduce_paper",
        "--agents=4",
        "--noplot",
        "--extra=cluster.snic_gbs=5",
        f"--output_dir={out_dir}",
    )
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("bad --extra (run 'configs/paper_ds660b.py:basic,dataset=64K,agents=4,seed=0,cluster.snic")
    assert "config.cluster has no field 'snic_gbs' (did you mean 'snic_gbps'?)" in last
    assert not out_dir.exists()


# ---- 2. --config.FIELD=None for a placeholder field --------------------------------------------------------------------

_PARSE = """
import sys
from absl import flags
from experiments import parse_flags_or_exit
import experiments.simulate
parse_flags_or_exit(sys.argv)
c = flags.FLAGS.config.cluster
print(c.store_capacity_gb, c.de_max_seqs, c.de_host_buffer_gb, flags.FLAGS["config"].override_values)
"""


def test_none_resets_a_placeholder_field():
    """`--config.cluster.store_capacity_gb=None` (a bounded store back to unbounded) failed: "could not convert
    string to float: 'None'" (ml_collections' float parser). A placeholder field now takes None (or none), also where
    the config file's variant set it; its numbers still parse."""
    spec = "--config=configs/sim_tiny.py:basic,cluster.store_capacity_gb=500,cluster.de_max_seqs=8"
    cap, seqs, host = (
        "--config.cluster.store_capacity_gb",
        "--config.cluster.de_max_seqs",
        "--config.cluster.de_host_buffer_gb",
    )
    out = _launch("-c", _PARSE, spec, f"{cap}=None", f"{seqs}=none", f"{host}=2")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == (
        "None None 2.0 {'cluster.store_capacity_gb': None, 'cluster.de_max_seqs': None, 'cluster.de_host_buffer_gb': 2.0}"
    )


@pytest.mark.parametrize(
    "launcher, flag, kind",
    [
        ("experiments.simulate", "--config.cluster.snic_gbps=None", "a number"),
        ("experiments.run", "--config.runtime.block_size=none", "an integer"),  # (run's default config file)
    ],
)
def test_none_for_a_field_that_takes_no_none_is_one_line_naming_it(launcher, flag, kind):
    args = ["--config=configs/sim_tiny.py"] if launcher == "experiments.simulate" else []
    out = _launch("-m", launcher, *args, flag)
    first, *rest = out.stderr.strip().splitlines()
    assert out.returncode == 1 and rest == ["Pass --helpshort or --helpfull to see help on flags."], out.stderr
    assert first == (
        f"FATAL Flags parsing error: flag {flag}: None is not allowed for this field: it takes {kind} (None goes only "
        "to a field whose default is None, an ml_collections placeholder)"
    )


def test_none_for_a_placeholder_of_a_default_config_file(tmp_path):
    """A launcher whose --config has a default file defines the override flags when --config is defined (at import),
    not when the command line is parsed: None reaches a placeholder there too."""
    cfg = tmp_path / "cfg.py"
    cfg.write_text(
        "import ml_collections\n\ndef get_config():\n"
        "    return ml_collections.ConfigDict({'cap': ml_collections.config_dict.placeholder(float), 'x': 1.5})\n"
    )
    code = (
        "import sys\nfrom absl import flags\nfrom experiments import define_config_file, parse_flags_or_exit\n"
        f"define_config_file('config', {str(cfg)!r}, 'h')\n"
        "parse_flags_or_exit(sys.argv)\nprint(flags.FLAGS.config.cap, flags.FLAGS.config.x)\n"
    )
    out = _launch("-c", code, "--config.cap=None", "--config.x=2")
    assert out.returncode == 0 and out.stdout.strip() == "None 2.0", out.stderr[-2000:]


# ---- 3. the other launchers' results-directory flag --------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, given, use",
    [
        (["experiments.run", "--output_dir=/tmp/fix23-x"], "output_dir", "--config.results_dir=/tmp/fix23-x"),
        (
            ["experiments.bench_runtime", "--results_dir=/tmp/fix23-x"],
            "results_dir",
            "--config.results_dir=/tmp/fix23-x",
        ),
        (
            ["experiments.simulate", "--config=configs/sim_tiny.py", "--results_dir=/tmp/fix23-x"],
            "results_dir",
            "--output_dir=/tmp/fix23-x",
        ),
    ],
)
def test_an_unknown_results_flag_names_this_launchers_own(argv, given, use):
    """`run --output_dir=X` said only "Unknown command line flag 'output_dir'" (the runtime writes under
    --config.results_dir, the simulator's launchers under --output_dir): absl's line stays first, a hint follows."""
    out = _launch("-m", *argv)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and lines[0] == f"FATAL Flags parsing error: Unknown command line flag '{given}'", lines
    assert lines[1].startswith(f"Hint: this launcher writes its results under {use.split('=')[0]} (e.g. {use});")
    assert lines[2] == "Pass --helpshort or --helpfull to see help on flags."


def test_another_unknown_flag_gets_no_hint():
    out = _launch("-m", "experiments.run", "--nosuch_dir=/tmp/fix23-x")
    assert out.stderr.strip().splitlines() == [
        "FATAL Flags parsing error: Unknown command line flag 'nosuch_dir'",
        "Pass --helpshort or --helpfull to see help on flags.",
    ]
