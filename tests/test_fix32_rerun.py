"""Fix wave 32, "rerun": a `rerun` line that checks it reruns the same inputs (session 48's audit F6-F8,
/work/notes/fix31_rerun_report.md).

- F6: the line pasted after an edit (one's own policy file, a trace) ran the edited inputs silently. Now it passes
  `--rerun_of=<its run.json>` and the launcher stops, before running, with one line per input changed since that run
  (`--rerun_of_allow_changes` runs it anyway); a bad --rerun_of file is one line naming it; every launcher that writes
  run.json takes the flag.
- F7: the line said a bare `python` (none, or another one, in a shell without the run's venv) and kept the pasting
  shell's DUALPATH_* / JAX_* / XLA_* variables the run did not have. Now it runs the run's interpreter and unsets them.
- F8: the versions left out ml_dtypes and the GPU plugins with their CUDA libraries; bench_runtime.json had no digest
  of each policy's greedy tokens to compare a rerun's with.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest
from test_fix12_runtime import _launch
from test_fix14_repro import REPO
from test_fix14_repro import _launch as _launch_bare
from test_fix24_bench import BENCH_RUNTIME_WITH_FAKE_RUN
from test_fix31_rerun import _POLICY, _in

_RUN_JSON_WRITERS = sorted(
    os.path.basename(p)[: -len(".py")]
    for p in glob.glob(os.path.join(REPO, "experiments", "*.py"))
    if re.search(r"\b(run_info|write_rows_json)\(", open(p).read()) and not p.endswith("__init__.py")
)


def _into(line: str, name: str) -> str:
    """A `rerun` line writing into `<output_dir>/<name>` instead of `<output_dir>/rerun` (one directory per paste)."""
    assert line.endswith("/rerun"), line
    return line[: -len("rerun")] + name


def _paste(line: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """A `rerun` line pasted into bash from / in a shell without the venv on PATH (only the system's binaries, unless
    `env` gives another PATH)."""
    env = {"HOME": os.environ.get("HOME", "/root"), "PATH": "/usr/bin:/bin", **(env or {})}
    return subprocess.run(
        line, shell=True, executable="/bin/bash", cwd="/", capture_output=True, text=True, timeout=300, env=env
    )


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    """A simulation of one's own policy from one's own config file (as session 48's audit F1), its run.json."""
    tmp = tmp_path_factory.mktemp("own")
    (tmp / "my_policies.py").write_text(_POLICY)
    (tmp / "my_config.py").write_text("import my_policies  # noqa: F401\n\nfrom configs.sim_tiny import get_config\n")
    args = ["--config=my_config.py:agents=4,turns=2", "--config.scheduler.name=fix31_least_loaded", "--output_dir=out"]
    done = _in(tmp, "experiments.simulate", *args, "--noplot", "--noprogress")
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp, json.loads((tmp / "out" / "run.json").read_text())


def test_the_rerun_line_names_its_run_json_and_the_runs_interpreter(own_run):
    """F6, F7: `--rerun_of=<abs path of run.json>`, the run's python (not a bare `python`), and `env -u` of the
    variables that change what runs where the run did not have them."""
    tmp, info = own_run
    line = info["rerun"]
    assert f"--rerun_of={tmp / 'out' / 'run.json'}" in line
    assert f" {sys.executable} -m experiments.simulate " in line and " python -m " not in line
    assert (
        "env -u DUALPATH_PURE_PYTHON " in line and " -u XLA_FLAGS " in line and "DUALPATH_JAX_CLOCK_EPOCH" not in line
    )
    assert line.endswith(f"--output_dir={tmp / 'out' / 'rerun'}")


def test_a_rerun_after_an_edit_of_ones_own_policy_stops_naming_the_file(own_run):
    """F6: pasted from a shell without the venv and with DUALPATH_PURE_PYTHON=1 (unset by the line), the rerun of
    unchanged inputs runs and gives the same turns; after an edit of my_policies.py it stops before running, with a
    line naming the file (relative to the run's directory, where the line's `cd` goes) and both digests; --rerun_of_allow_changes runs it anyway, saying what changed. Before: the
    edited policy ran silently (turns.csv differed, run.json said nothing)."""
    tmp, info = own_run
    same = _paste(info["rerun"], {"DUALPATH_PURE_PYTHON": "1"})
    assert same.returncode == 0, same.stderr[-3000:]
    assert "its inputs are as they were" in same.stderr
    assert (tmp / "out" / "rerun" / "turns.csv").read_bytes() == (tmp / "out" / "turns.csv").read_bytes()
    rerun_info = json.loads((tmp / "out" / "rerun" / "run.json").read_text())
    assert rerun_info["compiled"] == info["compiled"] and "DUALPATH_PURE_PYTHON" not in rerun_info["env"]
    # a rerun's own line checks against its own run.json (not the first one's; no --rerun_of twice)
    assert rerun_info["rerun"].count("--rerun_of=") == 1
    assert f"--rerun_of={tmp / 'out' / 'rerun' / 'run.json'}" in rerun_info["rerun"]

    policy = tmp / "my_policies.py"
    before = info["sources"][str(policy)]
    policy.write_text(_POLICY.replace('SIDE = "de"', 'SIDE = "pe"'))
    try:
        stopped = _paste(_into(info["rerun"], "rerun2"))
        assert stopped.returncode == 1 and not (tmp / "out" / "rerun2").exists()
        lines = stopped.stderr.strip().splitlines()
        assert lines[0] == (
            f"--rerun_of={tmp / 'out' / 'run.json'}: 1 input(s) changed since that run, so this would not rerun it "
            "(--rerun_of_allow_changes runs it anyway):"
        )
        assert re.fullmatch(
            rf"  my_policies\.py changed since the run \(sha256 {before[:12]}\.\.\. -> [0-9a-f]{{12}}\.\.\.\)",
            lines[1],
        ), lines
        anyway = _paste(_into(info["rerun"], "rerun3") + " --rerun_of_allow_changes")
        assert anyway.returncode == 0, anyway.stderr[-3000:]
        assert "running anyway (--rerun_of_allow_changes) with 1 input(s) changed" in anyway.stderr
        assert (tmp / "out" / "rerun3" / "turns.csv").read_bytes() != (tmp / "out" / "turns.csv").read_bytes()
    finally:
        policy.write_text(_POLICY)


def test_a_rerun_stops_on_a_variable_the_run_did_not_have(own_run):
    """F6, F7: a variable of the recorded families the line does not unset (here DUALPATH_FIX32=1), set in the
    pasting shell, is a changed input."""
    tmp, info = own_run
    env = {"DUALPATH_FIX32": "1", "PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin"}
    out = _paste(_into(info["rerun"], "rerun4"), env)
    assert out.returncode == 1 and "$DUALPATH_FIX32 is '1' now, the run had it unset" in out.stderr, out.stderr[-2000:]


def test_a_rerun_stops_on_an_edited_trace(tmp_path):
    """F6: a trace workload's file edited since the run: its line names the trace."""
    trace = tmp_path / "trace.jsonl"
    rows = [(0, 1024, 4, [0, 1]), (2000, 1600, 4, [0, 1, 2, 3])]
    keys = ("timestamp", "input_length", "output_length", "hash_ids")
    trace.write_text("".join(json.dumps(dict(zip(keys, r, strict=True))) + "\n" for r in rows))
    out = tmp_path / "a"
    args = ["--config=configs/sim_tiny.py:kind=trace", f"--config.workload.trace_path={trace}", f"--output_dir={out}"]
    done = _launch("-m", "experiments.simulate", *args, "--noplot", "--noprogress")
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((out / "run.json").read_text())
    trace.write_text(trace.read_text().replace('"output_length": 4', '"output_length": 9'))
    again = _paste(info["rerun"], {"PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin"})
    assert again.returncode == 1 and f"  trace {trace} changed since the run (sha256 " in again.stderr, again.stderr


def test_every_launcher_that_writes_run_json_defines_rerun_of_and_parses_with_its_check():
    """F6: each launcher whose run.json (or X.run.json) carries the line defines --rerun_of and parses its flags with a
    parser that checks it (found from the sources, so a new launcher is covered; four of them run below)."""
    assert len(_RUN_JSON_WRITERS) >= 12  # simulate, sweep, capacity, reproduce_paper, run, the benchmarks
    parsers = "parse_flags_or_exit|parse_flags_checking_locale|parse_flags_checking_rerun"
    for launcher in _RUN_JSON_WRITERS:
        source = open(os.path.join(REPO, "experiments", f"{launcher}.py")).read()
        assert "define_rerun_of()" in source, launcher
        parser = re.search(r"app\.run\(main, flags_parser=(\w+)\)", source)
        assert parser, launcher
        if not re.fullmatch(parsers, parser[1]):  # (a parser of its own: one that calls a checking one)
            body = source[source.index(f"def {parser[1]}(") :].split("\ndef ")[0]
            assert re.search(rf"\b({parsers})\(", body), launcher


@pytest.mark.parametrize("launcher", ["simulate", "capacity", "run", "bench_store"])
def test_a_launcher_given_a_missing_rerun_of_says_so_in_one_line(launcher, tmp_path):
    """F6: a launcher of each flag parser given a missing --rerun_of file: one line naming it (before: absl's "Unknown
    command line flag 'rerun_of'")."""
    missing = tmp_path / "none" / "run.json"
    out = _launch("-m", f"experiments.{launcher}", f"--rerun_of={missing}", timeout=120)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == f"bad --rerun_of '{missing}': no such file", out.stderr[-2000:]


def test_a_bad_rerun_of_is_one_line_naming_it(tmp_path):
    """F6: a directory, a file that is not JSON, JSON that is not a run.json, another launcher's run.json, and
    --rerun_of_allow_changes alone: each one line, nothing run."""
    (tmp_path / "text.json").write_text("not json\n")
    (tmp_path / "list.json").write_text("[1, 2]\n")
    (tmp_path / "sweep.json").write_text(
        json.dumps({"command": "python -m experiments.sweep --setups=a.py", "rerun": ""})
    )
    cases = {
        str(tmp_path): "a directory; give the run.json in it",
        str(tmp_path / "text.json"): "not a run.json (not JSON: Expecting value: line 1 column 1 (char 0))",
        str(tmp_path / "list.json"): "not a run.json (no `command` of `python -m LAUNCHER` and `rerun` line)",
        str(
            tmp_path / "sweep.json"
        ): "the run.json of experiments.sweep, not of experiments.reproduce_paper; paste its own `rerun` line",
    }
    for path, why in cases.items():
        out = _launch("-m", "experiments.reproduce_paper", f"--rerun_of={path}", f"--output_dir={tmp_path / 'o'}")
        assert out.returncode == 1 and out.stderr.strip().splitlines()[-1] == f"bad --rerun_of {path!r}: {why}"
    out = _launch("-m", "experiments.reproduce_paper", "--rerun_of_allow_changes")
    assert out.stderr.strip().splitlines()[-1] == (
        "bad flags: --rerun_of_allow_changes without --rerun_of=<the run.json of the run to rerun>"
    )
    assert not (tmp_path / "o").exists()


def test_changes_since_names_the_commit_the_code_and_fields_it_cannot_compare(tmp_path):
    """F6: what `changes_since` compares besides files: the git commit, the package's sources (`code`), the
    versions, the interpreter; an older run.json without `sources` says it cannot be compared."""
    from dualpath_jax import clock, metrics

    info = metrics.run_info("experiments.simulate", clock.now(), output_dir=str(tmp_path))
    assert metrics.changes_since(info) == []
    info["code"], info["versions"]["numpy"], info["executable"] = "0.0.0+000000000000", "0.1", "/no/python"
    if info["git"] and info["git"].get("commit"):
        info["git"]["commit"] = "0" * 40
    del info["sources"]
    lines = metrics.changes_since(info)
    assert "run.json records no `sources` (written before it was recorded): it cannot be compared" in lines
    assert any(
        s.startswith("the package's sources (dualpath_jax, ") and "(code 0.0.0+000000000000 -> " in s for s in lines
    )
    assert any(s.startswith("numpy 0.1 -> ") for s in lines)
    assert f"python is {sys.executable}, the run's was /no/python" in lines
    assert not info["git"] or any(s.startswith("the git commit changed since the run (000000000000 -> ") for s in lines)


def test_versions_name_ml_dtypes_the_gpu_plugins_and_their_cuda_libraries(tmp_path, monkeypatch):
    """F8: ml_dtypes, jax-cuda12-plugin / -pjrt and every nvidia-* distribution (here, stand-ins on sys.path) are in
    run.json's versions; before, only the package's pins."""
    from dualpath_jax import metrics

    for name, version in (("jax_cuda12_plugin", "0.4.99"), ("nvidia_cublas_cu12", "12.4.5.8")):
        d = tmp_path / f"{name}-{version}.dist-info"
        d.mkdir()
        (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    versions = metrics._versions()
    assert versions["ml_dtypes"]
    assert versions["jax-cuda12-plugin"] == "0.4.99" and versions["nvidia-cublas-cu12"] == "12.4.5.8"


_STUB_BENCH = (
    """
import types

def fake_run(cfg, ts, **kw):  # each policy its own tokens
    p = cfg.scheduler.name
    summary = {"jct_s": 1.0, "pe_read_bytes": 0, "de_read_bytes": 0, "snic_max_over_avg": 1.0}
    return types.SimpleNamespace(summary=summary, tokens={(0, 0): [1, 2, len(p)]}, slo=None, store_stats={})
"""
    + BENCH_RUNTIME_WITH_FAKE_RUN
)


def test_bench_runtime_records_each_policys_greedy_tokens_digest(tmp_path):
    """F8: bench_runtime.json's measured.<policy>.greedy_tokens_sha256, as experiments.run's results.json
    greedy_tokens.sha256 (the same digest); its run.json's line names that run.json."""
    from dualpath_jax import metrics

    out = _launch("-c", _STUB_BENCH, str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = glob.glob(str(tmp_path / "bench_runtime-*"))
    measured = json.loads(open(os.path.join(run_dir, "bench_runtime.json")).read())["measured"]
    for p in ("basic", "dualpath"):
        tokens = {(0, 0): [1, 2, len(p)]}
        assert measured[p]["greedy_tokens_sha256"] == metrics.tokens_sha256(tokens)
    assert measured["basic"]["greedy_tokens_sha256"] != measured["dualpath"]["greedy_tokens_sha256"]
    info = json.loads(open(os.path.join(run_dir, "run.json")).read())
    assert f"-m experiments.bench_runtime --rerun_of={os.path.join(run_dir, 'run.json')} " in info["rerun"]


def test_a_benchmarks_rerun_line_names_its_run_json_beside_the_rows(tmp_path):
    """F6: a benchmark's X.run.json line passes --rerun_of=X.run.json, and pasted, its check passes."""
    out = tmp_path / "rows.json"
    args = ["--layouts=deepseek_v3_fp8", "--total_mb=1", "--repeats=1", "--threads=1", "--cold_blocks=0"]
    done = _launch_bare("experiments.bench_store", *args, f"--root={tmp_path}", f"--out={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((tmp_path / "rows.run.json").read_text())
    assert f"--rerun_of={tmp_path / 'rows.run.json'} " in info["rerun"]
    again = _paste(info["rerun"], {"PYTHONPATH": "/nowhere"})  # (unset by the line: the run had none)
    assert again.returncode == 0 and "its inputs are as they were" in again.stderr, again.stderr[-3000:]
    assert (tmp_path / "rows.rerun.json").is_file()
