"""The simulator's result files are written beside their names and renamed onto them: a run that fails (or is
killed) while writing turns.csv left a torn file that passed for a whole run's."""

import os

import pytest

from dualpath_jax.sim import outputs


def _rows_then_fail(n):
    for i in range(n):
        yield (i, i * 0.5)
    raise RuntimeError("killed while writing")


@pytest.mark.parametrize("c_writer", [True, False])
def test_a_failed_write_leaves_the_earlier_file_whole(tmp_path, monkeypatch, c_writer):
    if not c_writer:
        monkeypatch.setattr(outputs, "_write_rows_c", None)
    elif outputs._write_rows_c is None:
        pytest.skip("the C row writer (_csvrows) is not built here")
    path = tmp_path / "turns.csv"
    outputs.write_csv(str(path), ["a", "b"], [(1, 2.0), (3, 4.0)])
    before = path.read_bytes()
    assert before == b"a,b\r\n1,2.0\r\n3,4.0\r\n"
    with pytest.raises(RuntimeError, match="killed while writing"):
        outputs.write_csv(str(path), ["a", "b"], _rows_then_fail(10_000))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["turns.csv"]  # (no temporary file left beside it)
