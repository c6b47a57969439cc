"""Fix wave 13, the benchmarks' `--out` file (experiments/__init__.py): checked before a benchmark runs, written
whole or not at all."""

from __future__ import annotations

import json
import os

import pytest

from experiments import writable_file_or_exit, write_rows_json


def test_an_out_path_naming_a_missing_directory_or_a_dangling_link_is_refused_before_the_benchmark(tmp_path):
    """`--out=/tmp/x/` (a directory that does not exist) and a dangling symbolic link passed the check and failed
    with IsADirectoryError / FileNotFoundError after the whole benchmark had run."""
    with pytest.raises(SystemExit, match="it is a directory, not a file"):
        writable_file_or_exit(f"{tmp_path}/missing/", "--out")
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "gone" / "x.json")
    with pytest.raises(SystemExit, match="a symbolic link to .*gone/x.json.*which does not exist"):
        writable_file_or_exit(str(link), "--out")
    assert writable_file_or_exit(str(tmp_path / "new.json"), "--out") == str(tmp_path / "new.json")


def test_rows_are_written_whole_or_the_earlier_file_is_kept(tmp_path, monkeypatch):
    """A failure mid-dump (Ctrl-C, a full disk, a value json cannot write) left half a JSON over the earlier run's
    file; NaN went out as the non-JSON token NaN."""
    out = tmp_path / "bench.json"
    write_rows_json(str(out), [{"a": 1, "b": float("nan")}], "rows")
    assert json.loads(out.read_text()) == [{"a": 1, "b": None}]
    with pytest.raises(TypeError):
        write_rows_json(str(out), [{"a": 2}, {"b": object()}], "rows")  # fails after the first row is dumped
    assert json.loads(out.read_text()) == [{"a": 1, "b": None}]
    assert sorted(os.listdir(tmp_path)) == ["bench.json", "bench.run.json"]  # no temporary file left beside them
    link = tmp_path / "latest.json"
    link.symlink_to(out)
    write_rows_json(str(link), [{"a": 3}], "rows")
    assert link.is_symlink() and json.loads(out.read_text()) == [{"a": 3}]
