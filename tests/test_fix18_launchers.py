"""Fix wave 18, every launcher as a newcomer types it (README's command lines, then odd but legitimate inputs: a
missing or broken config, a bad override, a results directory in the way, a trace with one malformed line). Each
test failed on the code before its fix."""

import json
import os
import subprocess
import sys

import pytest

from dualpath_jax.workloads.traces import TraceFormatError, load_trace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, **(env or {})}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


# ---- traces: a truncated Mooncake line --------------------------------------------------------------------------------
_ROW = {"timestamp": 0, "input_length": 1024, "output_length": 10, "hash_ids": [1, 2]}


def test_a_truncated_mooncake_line_names_its_own_column(tmp_path):
    """A Mooncake line cut short (a copy interrupted, an editor's slip) said "not valid JSON (Expecting value at
    column 1)": the decoder saw the line's newline and put the error on the next line of its string, column 1.
    Contract: the column is in the line itself, where it ends early (its length + 1)."""
    good = json.dumps(_ROW)
    cut = good[:-6]  # '..., "hash_ids": [1' -> ends inside the list
    p = tmp_path / "t.jsonl"
    p.write_text(f"{good}\n{cut}\n{json.dumps(dict(_ROW, timestamp=5))}\n")
    with pytest.raises(TraceFormatError, match=rf"t\.jsonl:2: not valid JSON \(.* at column {len(cut) + 1}\)$"):
        load_trace(str(p))
    # a mistake inside the line keeps its own column, as before
    p.write_text(f"{good}\n{good.replace('1024', '1024x')}\n")
    col = good.index("1024") + 5
    with pytest.raises(TraceFormatError, match=rf"t\.jsonl:2: not valid JSON \(.* at column {col}\)$"):
        load_trace(str(p))


# ---- bench_gpu: --shapes --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shapes, says",
    [
        ("1:64:63", "--shapes: '1:64:63' needs batch >= 1, miss >= 1, cached >= 0 a multiple of 64"),
        ("1:64", "--shapes: '1:64' is not batch:miss_tokens:cached_tokens (three integers)"),
        ("", "--shapes is empty"),
        ("1:64:64,01:64:64", "--shapes names '1:64:64' twice ('01:64:64')"),
    ],
    ids=["cached_not_a_multiple", "two_numbers", "empty", "twice"],
)
def test_bench_gpu_refuses_a_bad_shapes_flag_in_one_line(shapes, says):
    """A bad shape printed bench_gpu's whole --help (36 lines) with its message last; `--shapes=` imported jax and
    printed two empty tables, exit 0; a shape given twice was measured twice. Contract: absl's one-line flag error
    naming the shape, before anything runs (no jax import: this takes well under a second)."""
    out = _launch("-m", "experiments.bench_gpu", f"--shapes={shapes}")
    assert out.returncode != 0 and not out.stdout.strip(), out.stdout[-2000:]
    assert "Traceback" not in out.stderr and "flags:" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.startswith("FATAL Flags parsing error: flag --shapes=") and says in out.stderr, out.stderr


# ---- simulate: the progress bar of an online or trace run -----------------------------------------------------------
@pytest.mark.parametrize("variant", ["dualpath,aps=0.5,duration=60", "dualpath,trace={trace}"], ids=["online", "trace"])
def test_simulate_progress_bar_of_an_online_or_trace_run_has_its_total(tmp_path, variant):
    """An online or trace run's bar had no total ("350turn [00:00, ...]": no percentage, no time left), though every
    turn of its agents is known before the run, as offline. Contract: "N/N" at the end, as an offline run's bar."""
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        "".join(json.dumps(dict(_ROW, timestamp=1000 * i, hash_ids=[i, 100 + i])) + "\n" for i in range(5))
    )
    cfg = f"--config=configs/sim_tiny.py:{variant.format(trace=trace)}"
    out = _launch("-m", "experiments.simulate", cfg, f"--output_dir={tmp_path / 'out'}", "--noplot")
    assert out.returncode == 0, out.stderr[-3000:]
    last = [b for b in out.stderr.replace("\r", "\n").splitlines() if b.startswith("simulating dualpath")][-1]
    turns = json.load(open(tmp_path / "out" / "summary.json"))["summary"]["turns"]
    assert f"| {turns}/{turns} [" in last, last


# ---- reproduce_paper: flags of a part that does not run -------------------------------------------------------------
@pytest.mark.parametrize(
    "flag, part",
    [
        ("--online_iters=6", "the online capacity search (--online)"),
        ("--online_dataset=48K", "the online capacity search (--online)"),
        ("--online_warmup_s=100", "the online capacity search (--online)"),
        ("--pd_agents=16", "the DS 27B P/D sweep (--pd_ratios)"),
    ],
)
def test_reproduce_paper_refuses_a_flag_of_a_part_that_does_not_run(tmp_path, flag, part):
    """`--pd_agents=16` without --pd_ratios (README's "quick look"), `--online_iters=6` or `--online_dataset=48K`
    without --online: the offline report ran alone and the flag was dropped without a word. Contract: one line naming
    the flag and the part it belongs to, before anything runs or is written."""
    out = _launch("-m", "experiments.reproduce_paper", "--agents=8", flag, f"--output_dir={tmp_path / 'r'}")
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    name = flag.split("=")[0]
    assert out.stderr.rstrip().splitlines()[-1] == f"bad {name}: it applies to {part}, which this run does not do"
    assert not (tmp_path / "r").exists()


# ---- bench_io: flags of a section that does not run -----------------------------------------------------------------
def test_bench_io_refuses_a_flag_of_a_section_it_does_not_run(tmp_path):
    """`--sections=small --tcp_total_mb=8` ran the small section and dropped the tcp section's flag without a word
    (a newcomer shortening the default run with --tcp_total_mb, then narrowing --sections). Contract: one line naming
    the flag, its section and --sections, before anything runs; a flag of a section that runs is taken."""
    out = _launch("-m", "experiments.bench_io", "--sections=small", "--small_count=10", "--tcp_total_mb=8")
    assert out.returncode != 0 and "Traceback" not in out.stderr and "## Small" not in out.stdout, out.stderr[-3000:]
    assert out.stderr.rstrip().splitlines()[-1] == (
        "bad --tcp_total_mb: it applies to the tcp section, which --sections=small does not run"
    )
    path = tmp_path / "io.json"
    out = _launch("-m", "experiments.bench_io", "--sections=small", "--small_count=10", "--repeats=1", f"--out={path}")
    assert out.returncode == 0 and json.loads(path.read_text()), out.stderr[-3000:]


# ---- bench_runtime: --overhead_turns with --skip_overhead -----------------------------------------------------------
def test_bench_runtime_refuses_overhead_turns_when_it_skips_the_overhead(tmp_path):
    """`--skip_overhead --overhead_turns=2` ran the speedup runs and dropped --overhead_turns without a word.
    Contract: one line naming both flags, before anything runs or a results directory is made."""
    out = _launch(
        "-m", "experiments.bench_runtime", "--config=configs/tiny_runtime.py:test", "--skip_overhead",
        "--overhead_turns=2", "--skip_sim", f"--config.results_dir={tmp_path / 'res'}",
    )  # fmt: skip
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.rstrip().splitlines()[-1] == (
        "bad --overhead_turns: it applies to the overhead figure, which --skip_overhead leaves out"
    )
    assert not (tmp_path / "res").exists()


# ---- simulator config: a given field its workload kind does not use --------------------------------------------------
@pytest.mark.parametrize(
    "key, value, wrong, right",
    [
        ("workload.trace_path", "x.jsonl", ["offline", "online"], ["trace"]),
        ("workload.dataset", "48K", ["trace"], ["offline", "online"]),
        ("slo_ttft_s", 1.0, ["offline"], ["online", "trace"]),
        ("slo_tpot_s", 0.02, ["offline"], ["online", "trace"]),
        ("slo_percentile", 95.0, ["offline"], ["online", "trace"]),
    ],
)
def test_a_given_field_the_workload_kind_does_not_use_is_refused_by_name(key, value, wrong, right):
    """`simulate --config=configs/sim_tiny.py --config.workload.trace_path=T` ran the synthetic agents, not the trace;
    `--config.workload.dataset=48K` on a trace run ran the trace; `--config.slo_ttft_s=1` on an offline run judged no
    SLO: each silently (aps / duration / warm-up were refused already). Contract: a ValueError naming the field and
    the kind (simulate prints it as one "bad config" line); the file's own values and the right kinds load."""
    from dualpath_jax.sim.config import sim_config_from_dict
    from dualpath_jax.sim.configs_io import load_config

    d = load_config("configs/sim_tiny.py:dualpath").to_dict()
    section, _, field = key.rpartition(".")
    (d[section] if section else d)[field] = value
    d["workload"]["trace_path"] = "x.jsonl"  # (the file's own value: every kind loads)
    for kind in wrong:
        d["workload"]["kind"] = kind
        with pytest.raises(ValueError, match=rf"config\.{key} applies to .* config\.workload\.kind='{kind}'"):
            sim_config_from_dict(d, explicit={key: value})
        assert sim_config_from_dict(d).workload.kind == kind  # not given: only a given field is refused
    for kind in right:
        d["workload"]["kind"] = kind
        assert sim_config_from_dict(d, explicit={key: value}).workload.kind == kind


def test_simulate_refuses_a_trace_path_override_on_a_synthetic_run(tmp_path):
    out = _launch(
        "-m", "experiments.simulate", "--config=configs/sim_tiny.py", "--config.workload.trace_path=x.jsonl",
        f"--output_dir={tmp_path / 'o'}", "--noplot",
    )  # fmt: skip
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.rstrip().splitlines()[-1]
    assert last.startswith(
        "bad config: config.workload.trace_path applies to trace workloads only, and this one is "
        "config.workload.kind='offline'"
    ), last
    assert not (tmp_path / "o").exists()


# ---- traces: the traces directory given as the trace -----------------------------------------------------------------
def test_a_directory_without_session_files_names_the_traces_it_holds(tmp_path):
    """`workload_stats --workload=../shared/traces` (the directory, not a trace in it) said only "no *.json /
    *.json.gz session file", though it holds two Mooncake traces and a directory of sessions. Contract: the error
    names them; a directory with none of them says what it said before."""
    (tmp_path / "b.jsonl.gz").write_bytes(b"")
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "sessions").mkdir()
    (tmp_path / "sessions" / "s.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TraceFormatError, match=r"session file; give one of the traces in it: a\.jsonl, b\.jsonl\.gz, "):
        load_trace(str(tmp_path))
    with pytest.raises(TraceFormatError) as e:
        load_trace(str(tmp_path))
    assert str(e.value).endswith("b.jsonl.gz, sessions/")
    with pytest.raises(TraceFormatError) as e:
        load_trace(str(tmp_path / "empty"))
    assert str(e.value) == f"{tmp_path / 'empty'}: no *.json / *.json.gz session file"


# ---- bench_store: an empty --root ----------------------------------------------------------------------------------
def test_bench_store_takes_an_empty_root_as_its_default_temp_dir(tmp_path):
    """`--root=` (a script's empty variable) passed the --root check (skipped for an empty value) and then failed in
    os.makedirs('') with a FileNotFoundError traceback. Contract: an empty --root is the default, a temp dir, as an
    empty --out is no file."""
    path = tmp_path / "store.json"
    out = _launch(
        "-m", "experiments.bench_store", "--root=", "--layouts=deepseek_v3_fp8", "--total_mb=1", "--repeats=1",
        "--cold_blocks=0", "--threads=1", f"--out={path}",
    )  # fmt: skip
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert {r["layout"] for r in json.loads(path.read_text())} == {"deepseek_v3_fp8"}


# ---- config files: a get_config that returns no config ---------------------------------------------------------------
@pytest.mark.parametrize(
    "body, says",
    [
        (
            "    cfg = base_config()\n    cfg = apply_variant(cfg, arg)\n",
            "returned None (its get_config has no `return`?)",
        ),
        ("    return 5\n", "returned 5 (int)"),
    ],
    ids=["no_return", "an_int"],
)
def test_a_get_config_that_returns_no_config_is_one_line_naming_the_file(tmp_path, body, says):
    """A get_config that forgot `return cfg` (a newcomer's first config file) was an AttributeError traceback
    ("'NoneType' object has no attribute 'to_dict'") from pd_bounds, sweep and capacity. Contract: a ConfigFileError
    naming the file and what get_config returned; pd_bounds prints it as one line."""
    from dualpath_jax.sim.configs_io import ConfigFileError, load_config

    path = tmp_path / "mine.py"
    path.write_text(f"from configs.sim_base import apply_variant, base_config\n\ndef get_config(arg=None):\n{body}")
    with pytest.raises(ConfigFileError) as e:
        load_config(str(path))
    assert str(e.value) == f"config file {str(path)!r}: get_config {says}, not an ml_collections ConfigDict"
    out = _launch("-m", "experiments.pd_bounds", f"--config={path}")
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.rstrip().splitlines()[-1] == f"bad --config: {e.value}"


# ---- tcp_completion_model: a payload no machine holds ---------------------------------------------------------------
def test_tcp_completion_model_refuses_a_payload_larger_than_a_gib():
    """`--size=99999999999` started the receiver process and then died in numpy's "Unable to allocate 93.1 GiB"
    traceback. Contract: absl's one-line flag error, before anything starts."""
    out = _launch("-m", "experiments.tcp_completion_model", "--size=99999999999", "--count=1", timeout=60)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.startswith("FATAL Flags parsing error: flag --size=99999999999: ") and "1073741824" in out.stderr


# ---- pd_bounds: simulate's --config.* override style -----------------------------------------------------------------
def test_pd_bounds_says_how_to_give_a_cluster_field_it_was_given_as_an_override():
    """`pd_bounds --config=X --config.cluster.gpus_per_node=4` (simulate's override style) was absl's "Unknown command
    line flag 'config.cluster.gpus_per_node'": pd_bounds' --config is a file[:variant] string. Contract: one line
    naming the flag and the variant item that does it; that variant item works."""
    cfg = "--config=configs/paper_ds27b.py"
    out = _launch("-m", "experiments.pd_bounds", cfg, "--config.cluster.gpus_per_node=4")
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert (
        out.stderr.rstrip()
        .splitlines()[-1]
        .startswith("bad --config.cluster.gpus_per_node: pd_bounds takes no --config.* overrides")
    ), out.stderr
    assert "--config=configs/paper_ds27b.py:cluster.gpus_per_node=4" in out.stderr
    out = _launch("-m", "experiments.pd_bounds", f"{cfg}:cluster.gpus_per_node=4")
    assert out.returncode == 0 and "g=4  " in out.stdout, out.stderr[-3000:]
    out = _launch("-m", "experiments.pd_bounds", "--gg=4")  # other unknown flags: absl's own line, as before
    assert out.returncode != 0 and "Unknown command line flag 'gg'" in out.stderr, out.stderr[-3000:]


def test_simulate_names_the_earlier_run_it_replaces(tmp_path):
    """Two runs of one config with other `--config.*` overrides share its output_dir, and the second replaced the
    first's results without a word (sweep / reproduce_paper / capacity refuse; simulate's re-run into its config's
    directory is its documented workflow): it now warns, naming the earlier run's command."""
    args = ["-m", "experiments.simulate", "--config=configs/sim_tiny.py:agents=2,turns=2", "--noplot"]
    first = _launch(*args, "--config.scheduler.name=basic", f"--output_dir={tmp_path}")
    assert first.returncode == 0 and "earlier run" not in first.stderr, first.stderr[-2000:]
    second = _launch(*args, f"--output_dir={tmp_path}")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "holds an earlier run's results (python -m experiments.simulate" in second.stderr
    assert "--config.scheduler.name=basic" in second.stderr and "this run replaces them" in second.stderr
