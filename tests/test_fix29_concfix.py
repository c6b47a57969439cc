"""Fix wave 29, "concfix": the concurrency audit's launcher findings (/work/notes/fix29_concurrent_report.md).

- 5: a sweep, capacity search or report into a directory whose run.json another launcher wrote is refused (it
  replaced that run.json: the other launcher's results stayed with no record of what made them), unless --overwrite.
- capacity.csv / capacity.json and report.md / report.json are written beside and renamed (in place, a kill
  mid-write tore them): a hard link to the earlier file keeps the earlier bytes.
"""

from __future__ import annotations

import json
import os

import pytest
from test_fix14_repro import _launch

import experiments

TINY = "configs/sim_tiny.py"


def _run_json(directory, module: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "run.json"), "w") as f:
        json.dump({"command": f"python -m {module} --output_dir={directory}"}, f)


def test_run_file_launcher_reads_the_module_of_run_json(tmp_path):
    assert experiments.run_file_launcher(str(tmp_path)) is None  # (none there)
    (tmp_path / "run.json").write_text("[1, 2]")
    assert experiments.run_file_launcher(str(tmp_path)) is None  # (not a run.json)
    _run_json(tmp_path, "experiments.reproduce_paper")
    assert experiments.run_file_launcher(str(tmp_path)) == "experiments.reproduce_paper"


def test_another_launchers_run_json_is_refused_unless_overwrite_and_the_same_launchers_is_not(tmp_path):
    _run_json(tmp_path, "experiments.reproduce_paper")
    with pytest.raises(SystemExit, match=r"run\.json is another launcher's \(experiments\.reproduce_paper\)"):
        experiments.no_earlier_results_or_exit(
            str(tmp_path), ("sweep.csv",), "--output_dir", False, "experiments.sweep"
        )
    experiments.no_earlier_results_or_exit(str(tmp_path), ("sweep.csv",), "--output_dir", True, "experiments.sweep")
    experiments.no_earlier_results_or_exit(
        str(tmp_path), ("report.md",), "--output_dir", False, "experiments.reproduce_paper"
    )


@pytest.mark.parametrize(
    "earlier, launch, made",
    [
        (
            "experiments.reproduce_paper",
            ["experiments.sweep", f"--setups={TINY}", "--modes=basic", "--loads=agents=2", "--noplot"],
            "sweep.csv",
        ),
        (
            "experiments.sweep",
            ["experiments.capacity", f"--setups={TINY}", "--modes=basic", "--iters=0", "--noplot"],
            "capacity.csv",
        ),
        ("experiments.capacity", ["experiments.reproduce_paper", "--agents=2", "--noplot"], "report.md"),
        ("experiments.sweep", ["experiments.simulate", f"--config={TINY}:basic", "--noplot"], "summary.json"),
    ],
    ids=[
        "sweep-after-reproduce_paper",
        "capacity-after-sweep",
        "reproduce_paper-after-capacity",
        "simulate-after-sweep",
    ],
)
def test_a_launcher_into_a_directory_another_launcher_recorded_is_refused(tmp_path, earlier, launch, made):
    """Before: each launcher checked only its own result names, ran, and its run.json replaced the other's."""
    out = tmp_path / "out"
    _run_json(out, earlier)
    done = _launch(*launch, f"--output_dir={out}", timeout=120)
    assert done.returncode != 0, done.stderr[-2000:]
    assert f"run.json is another launcher's ({earlier})" in done.stderr, done.stderr[-2000:]
    assert not (out / made).exists()
    assert earlier in (out / "run.json").read_text()  # (kept)


def _linked_aside(out, names) -> dict:
    """Each of `names` in `out` as a file of old bytes with a hard link to it outside `out`: {name: link}."""
    os.makedirs(out, exist_ok=True)
    links = {}
    for name in names:
        (out / name).write_text("old " + name)
        links[name] = out.parent / f"link-{name}"
        os.link(out / name, links[name])
    return links


@pytest.mark.parametrize(
    "launch, names",
    [
        (
            [
                "experiments.capacity", f"--setups={TINY}", "--modes=basic", "--lo=0.5", "--hi=16", "--iters=0",
                "--extra=duration=30", "--noplot",
            ],
            ("capacity.csv", "capacity.json"),
        ),
        (["experiments.reproduce_paper", "--agents=2", "--noplot"], ("report.md", "report.json")),
    ],
    ids=["capacity", "reproduce_paper"],
)  # fmt: skip
def test_results_are_written_beside_then_renamed(tmp_path, launch, names):
    """A file written in place is the earlier file's inode, torn by a kill mid-write; renamed onto it, the earlier
    inode (a hard link to it here) keeps its bytes whole and the name holds the new file."""
    out = tmp_path / "out"
    links = _linked_aside(out, names)
    done = _launch(*launch, f"--output_dir={out}", "--overwrite", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for name, link in links.items():
        assert link.read_text() == "old " + name  # (written in place: the new results)
        assert (out / name).read_text() != "old " + name
        assert not os.path.samefile(out / name, link)
    assert not [n for n in os.listdir(out) if ".tmp-" in n]


def test_bench_store_keeps_what_its_root_holds(tmp_path):
    """Aside: bench_store removed `--root`/<layout name>{,-crc32,-wsum64,-raw} before and after each layout: a
    user's directory of that name was lost, and two runs with one --root deleted each other's stores mid-benchmark.
    Its stores now go in a directory of their own there."""
    from experiments.bench_store import run_store_bench

    mine = tmp_path / "deepseek_v3_fp8"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    rows = run_store_bench(["deepseek_v3_fp8"], root=str(tmp_path), total_mb=1, repeats=1, threads=1, cold_blocks=0)
    assert rows and (mine / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["deepseek_v3_fp8"]  # (its own directory removed at the end)
