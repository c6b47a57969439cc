"""`sweep --resume` over rows it cannot check (fix29 compat audit F3, F4d).

- An older sweep's rows lack a digest this sweep records (`trace_sha256` before 12-05 20:22, `setup_sha256` before
  17:54): they were kept unchecked, so a trace replaced since gave the old trace's figures under the new one's name.
  Now refused, naming the cells and the digest they lack.
- Rows with `code` None (a sweep outside a git checkout) resumed by a sweep outside one compared 'None' == 'None' and
  said nothing; now a warning says the code cannot be compared.
- An older sweep's sweep.json (rows without a `spec`) was called malformed ("mend or remove it"); now it is named as
  an older sweep's, which cannot be resumed.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from test_fix20_tracejourney import _mooncake
from test_fix25_sweep import REPO, TINY, _launch

# a sweep run outside a git checkout: its rows' and its own `code` are None
_GITLESS = """
from absl import app
import experiments.sweep as sw

sw.code_version = lambda: None
app.run(sw.main, flags_parser=sw.parse_flags)
"""


def _args(trace: str, out_dir) -> list[str]:
    return [
        f"--setups={TINY}",
        "--modes=basic",
        f"--loads=agents=2,trace={trace}",
        "--noplot",
        f"--output_dir={out_dir}",
    ]


@pytest.fixture(scope="module")
def earlier(tmp_path_factory):
    """A finished sweep (a synthetic cell and a trace cell) run outside a git checkout, and its script and trace."""
    d = tmp_path_factory.mktemp("fix29_sweep")
    trace = _mooncake(d / "t.jsonl", 2)
    script = d / "gitless_sweep.py"
    script.write_text(_GITLESS)
    out = _launch(str(script), *_args(trace, d / "out"))
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((d / "out" / "sweep.json").read_text())
    assert len(rows) == 2 and all(r["code"] is None and r["setup_sha256"] for r in rows), rows
    assert [r["trace_sha256"] is None for r in rows] == [True, False], rows
    return d, trace, script


def _copy(earlier, tmp_path, mend=None):
    d, trace, script = earlier
    out_dir = tmp_path / "out"
    shutil.copytree(d / "out", out_dir)
    if mend is not None:
        path = out_dir / "sweep.json"
        rows = json.loads(path.read_text())
        mend(rows)
        path.write_text(json.dumps(rows))
    return out_dir, trace, script


def _files(d) -> dict[str, bytes]:
    return {p: (d / p).read_bytes() for p in sorted(os.listdir(d))}


def test_resume_outside_a_checkout_says_the_code_cannot_be_compared(earlier, tmp_path):
    out_dir, trace, script = _copy(earlier, tmp_path)
    out = _launch(str(script), *_args(trace, out_dir), "--resume")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "kept 2 finished cells of 2" in out.stderr
    said = "--resume: the code the kept cells ran cannot be compared with this sweep's: this sweep runs outside a git"
    assert out.stderr.count(said) == 1, out.stderr[-3000:]


def test_resume_in_a_checkout_names_the_rows_that_record_no_commit(earlier, tmp_path):
    from dualpath_jax.metrics import git_state

    if not (git_state() or {}).get("commit"):
        pytest.skip("runs from no git checkout: the sweep has no commit of its own")
    out_dir, trace, _ = _copy(earlier, tmp_path)
    out = _launch("-m", "experiments.sweep", *_args(trace, out_dir), "--resume", cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cannot be compared with this sweep's: 2 of the 2 kept rows record no commit" in out.stderr, out.stderr
    assert "kept cells ran at code None" not in out.stderr  # ('None' is no commit to name)


def test_resume_refuses_rows_without_the_digests_this_sweep_checks(earlier, tmp_path):
    def older(rows):  # rows of sweeps before the trace's (12-05 20:22) and the setup file's (17:54) sha256
        del rows[0]["setup_sha256"]
        del rows[1]["trace_sha256"]

    out_dir, trace, script = _copy(earlier, tmp_path, older)
    specs = [r["spec"] for r in json.loads((out_dir / "sweep.json").read_text())]
    before = _files(out_dir)
    out = _launch(str(script), *_args(trace, out_dir), "--resume")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"--resume: cells {specs[0]} lack their setup file's sha256 (`setup_sha256`), and cells "), (
        last
    )
    assert f"cells {specs[1]} lack their trace's sha256 (`trace_sha256`): an older sweep ran them without" in last, last
    assert last.endswith("cannot be checked; --overwrite to run them again"), last
    assert _files(out_dir) == before


def test_resume_over_an_older_sweeps_rows_without_specs_says_so(earlier, tmp_path):
    def older(rows):  # rows before each named its cell (12-05 17:30)
        for r in rows:
            del r["spec"]

    out_dir, trace, script = _copy(earlier, tmp_path, older)
    out = _launch(str(script), *_args(trace, out_dir), "--resume")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last == (
        f"--resume: {out_dir / 'sweep.json'} row 1 is an older sweep's row (it names no cell `spec`, `file:variant`): "
        "that sweep cannot be resumed; --overwrite to run every cell again, or give another --output_dir"
    ), last
