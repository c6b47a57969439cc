"""Fix wave 26 "smallfix" (notes/fix26_smallfix_report.md): small defects left from session 42. Each test failed on the
code before its fix:

- sweep.csv, sweep_mean.csv and run.json were written in place: a crash or a full disk mid-write left a torn file
  (the first rows of a CSV pass for a whole sweep);
- `sweep --extra=a=1,,b=2` (or a trailing comma) passed without a word, `--setups=a.py,` said "config file ''
  does not exist", and --helpfull showed --loads' default as '""';
- `ModelRunner(num_slots=0)` / `capacity=0` were accepted (every load or decode step refused later);
- `ClusterLinks(-1, 1)` was built and refused only in `TrafficManager.for_cluster`, as link 'snic/node0';
- `driver.prepare` then `driver.run` logged a kept store's "holds N blocks" line twice (`run` prepares again).
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "sim_tiny.py")


class _DiskFullAfterOneRow(csv.DictWriter):
    """A CSV writer whose disk fills after the header and the first row (`csv.DictWriter` in sweep's hands)."""

    def writerows(self, rows):
        rows = list(rows)
        self.writerow(rows[0])
        raise OSError(errno.ENOSPC, "No space left on device")


def _old_file(path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _only(directory) -> list[str]:
    return sorted(os.listdir(directory))


# ---- 1: sweep.csv / sweep_mean.csv: written beside, then renamed over ------------------------------------------


def _write_two_cells_and_fail(output_dir) -> None:
    """sweep's `_write_results` of two sim_tiny cells into `output_dir`, where the disk fills (the caller's patch):
    asserts the OSError."""
    from experiments import SigtermAsInterrupt, sweep

    cells = [(TINY, "basic", f"agents={n}", "", "") for n in (2, 3)]
    rows = [
        {"setup": "sim_tiny.py", "mode": "basic", "load": c[2], "seed": 0, "jct_s": 1.0, "spec": sweep.cell_spec(*c)}
        for c in cells
    ]
    with flagsaver.flagsaver():
        sweep.parse_flags(["sweep", f"--output_dir={output_dir}", "--noplot"])
        try:
            with pytest.raises(OSError, match="No space left"):
                sweep._write_results(rows, cells, SigtermAsInterrupt(), 0.0, [], [])
        finally:
            flags.FLAGS.unparse_flags()


def test_a_full_disk_while_sweep_csv_is_written_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    _old_file(tmp_path / "sweep.csv", "an earlier sweep's\n")
    monkeypatch.setattr(csv, "DictWriter", _DiskFullAfterOneRow)
    _write_two_cells_and_fail(tmp_path)
    assert (tmp_path / "sweep.csv").read_text() == "an earlier sweep's\n"  # (was: its header and one row)
    assert _only(tmp_path) == ["sweep.csv"]  # (no temp file left)


def test_a_failure_while_sweep_json_is_written_leaves_the_earlier_one_whole_and_no_temp_file(tmp_path, monkeypatch):
    # (sweep.json.tmp was a fixed name, shared by two sweeps writing one --output_dir, and left by a failed dump)
    from experiments import sweep

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    _old_file(tmp_path / "sweep.json", '["an earlier sweep\'s"]')
    monkeypatch.setattr(sweep.json, "dump", disk_full)
    _write_two_cells_and_fail(tmp_path)
    assert json.loads((tmp_path / "sweep.json").read_text()) == ["an earlier sweep's"]
    assert _only(tmp_path) == ["sweep.csv", "sweep.json"]  # (no sweep.json.tmp*)


def test_a_full_disk_while_sweep_mean_csv_is_written_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    from experiments import sweep

    path = tmp_path / "sweep_mean.csv"
    _old_file(path, "an earlier sweep's\n")
    rows = [
        {"setup": "sim_tiny.py", "mode": m, "load": "", "seed": s, "jct_s": 1.0 + s}
        for m in ("basic", "dualpath")
        for s in (0, 1)
    ]
    monkeypatch.setattr(csv, "DictWriter", _DiskFullAfterOneRow)
    with pytest.raises(OSError, match="No space left"):
        sweep._write_means(rows, str(path), 2)
    assert path.read_text() == "an earlier sweep's\n"
    assert _only(tmp_path) == ["sweep_mean.csv"]


def test_sweep_mean_csv_is_still_written_whole(tmp_path):
    from experiments import sweep

    rows = [{"setup": "s", "mode": "basic", "load": "", "seed": s, "jct_s": 1.0 + s} for s in (0, 1)]
    sweep._write_means(rows, str(tmp_path / "m.csv"), 2)
    with open(tmp_path / "m.csv", newline="") as f:
        (got,) = list(csv.DictReader(f))
    assert (got["seeds"], got["jct_s_mean"], got["jct_s_min"], got["jct_s_max"]) == ("2", "1.5", "1.0", "2.0")


# ---- 2: run.json --------------------------------------------------------------------------------------------------


class _Unprintable:
    def __str__(self):  # (json.dump's default=str: raises after the keys before it were written)
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failure_while_run_json_is_written_leaves_the_earlier_one_whole(tmp_path):
    from dualpath_jax.metrics import write_run_info

    _old_file(tmp_path / "run.json", '{"earlier": 1}')
    with pytest.raises(OSError, match="No space left"):
        write_run_info(str(tmp_path), {"command": "x" * 20000, "last": _Unprintable()})
    assert json.loads((tmp_path / "run.json").read_text()) == {"earlier": 1}
    assert _only(tmp_path) == ["run.json"]
    assert write_run_info(str(tmp_path), {"command": "y"}) == str(tmp_path / "run.json")
    assert json.loads((tmp_path / "run.json").read_text()) == {"command": "y"}


# ---- 3: sweep's --extra / --setups empty items, --loads' default in --helpfull -----------------------------------

# (in a process of its own: in pytest's, a launcher imported after sweep (capacity, reproduce_paper) defines --extra,
# --modes, ... there, with its own validators)
_PARSE = """
import contextlib, io, json, sys
from absl import flags
from experiments import sweep

out = {}
for key, args in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            sweep.parse_flags(["sweep", *args])
        out[key] = {"extra": flags.FLAGS.extra, "setups": flags.FLAGS.setups, "loads": flags.FLAGS.loads}
    except SystemExit as e:
        out[key] = {"said": f"{e.code}\\n{err.getvalue()}"}
    flags.FLAGS.unparse_flags()
out["help"] = flags.FLAGS.module_help(sweep.__name__)
print(json.dumps(out))
"""
_ARGS = {
    "doubled": ["--extra=turns=2,,agents=3"],
    "trailing": ["--extra=turns=2,"],
    "setups": [f"--setups={TINY},"],
    "one": ["--extra=turns=2"],
    "none": [],
}


@pytest.fixture(scope="module")
def parsed() -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PARSE, json.dumps(_ARGS)], capture_output=True, text=True, timeout=120, cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize(
    ("case", "said"),
    [
        ("doubled", "--extra item 2 of 3 is empty (a doubled or trailing comma?)"),
        ("trailing", "--extra item 2 of 2 is empty (a doubled or trailing comma?)"),
        ("setups", "--setups item 2 of 2 is empty (a doubled or trailing comma?)"),  # (was: config file '' ...)
    ],
)
def test_empty_extra_and_setups_items_are_refused_naming_the_flag_and_item(parsed, case, said):
    assert said in parsed[case].get("said", ""), parsed[case]


def test_extra_of_one_item_or_none_and_the_default_loads_still_parse(parsed):
    assert parsed["one"] == {"extra": "turns=2", "setups": [TINY], "loads": [""]}
    assert parsed["none"] == {"extra": "", "setups": [TINY], "loads": [""]}  # (a sweep without --loads: unchanged)


def test_loads_help_shows_no_quoted_empty_default(parsed):
    text = parsed["help"]
    loads = text[text.index("--loads:") :]
    loads = loads[: loads.index("\n  --", 1)]
    assert "'\"\"'" not in loads and "each setup's own load" in loads, loads


# ---- 4: ModelRunner's decode cache of no slots / no tokens ------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "said"),
    [
        ({"num_slots": 0}, "num_slots=0, capacity=512"),
        ({"capacity": 0}, "num_slots=8, capacity=0"),
        ({"num_slots": 2, "capacity": -4}, "num_slots=2, capacity=-4"),
    ],
)
def test_a_runner_of_no_decode_slots_or_capacity_is_refused(kw, said):
    from models.qwen2 import tiny_qwen2
    from models.runner import ModelRunner

    with pytest.raises(ValueError, match=f"decode cache of {said}: both must be integers >= 1"):
        ModelRunner(tiny_qwen2(num_layers=1), **kw)


# ---- 5: ClusterLinks ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "error", "said"),
    [
        ((-1, 1e6), ValueError, "snic_bytes_per_s must be > 0 bytes/s, got -1"),
        ((1e6, 0), ValueError, "cnic_bytes_per_s must be > 0 bytes/s, got 0"),
        ((math.nan, 1e6), ValueError, "snic_bytes_per_s must be > 0 bytes/s, got nan"),
        (("1e6", 1e6), TypeError, "snic_bytes_per_s must be a number, got '1e6'"),
        ((1e6, True), TypeError, "cnic_bytes_per_s must be a number, got True"),
        ((1e6, 1e6, {"high": 99, "low": 0}), ValueError, "cnic_weights['low'] must be > 0, got 0"),
        ((1e6, 1e6, {"high": math.nan}), ValueError, "cnic_weights['high'] must be > 0, got nan"),
        ((1e6, 1e6, {}), ValueError, "cnic_weights must name at least one class"),
        ((1e6, 1e6, [("high", 1)]), TypeError, "cnic_weights must be a mapping class -> weight"),
    ],
)
def test_cluster_links_are_checked_when_built(args, error, said):
    from dualpath_jax.traffic import ClusterLinks

    with pytest.raises(error) as e:
        ClusterLinks(*args)
    assert str(e.value) == f"ClusterLinks: {said}" or str(e.value).startswith(f"ClusterLinks: {said}"), e.value


def test_good_cluster_links_still_shape_the_cluster():
    from dualpath_jax.traffic import ClusterLinks, TrafficManager

    tm = TrafficManager.for_cluster({0: [0]}, ClusterLinks(math.inf, np.float32(2e6), {"high": 3, "low": 1}))
    assert math.isinf(tm.snic(0).rate) and tm.cnic(0).rate == 2e6 and tm.cnic(0).weights == {"high": 3, "low": 1}


# ---- 7: prepare, then run: a kept store's block count said once -------------------------------------------------


def test_run_after_prepare_says_a_kept_stores_block_count_once(tmp_path, monkeypatch, caplog):
    from configs.tiny_runtime import get_config
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.config import RuntimeConfig
    from dualpath_jax.runtime.node import block_layout
    from dualpath_jax.store import LocalDirStore

    cfg = RuntimeConfig.from_config_dict(get_config("test").runtime).replace(store_dir=str(tmp_path))
    # (the model ops `prepare` reads: the store's layout; a stand-in, no model built)
    ops = types.SimpleNamespace(
        config=types.SimpleNamespace(batch_invariant=False),
        kv_layout=types.SimpleNamespace(num_layers=2, bytes_per_token_per_layer=64),
        fingerprint="fix26/smallfix",
    )
    layout = block_layout(cfg, ops)
    store = LocalDirStore(str(tmp_path), layout)

    def add_blocks(first: int, n: int) -> None:
        for i in range(first, first + n):
            assert store.write(bytes([i]) * 16, np.full(layout.full_block_nbytes, i, np.uint8))

    add_blocks(0, 3)
    monkeypatch.setattr(driver, "_run", lambda *a: "ran")  # (what `run` does after its `prepare`: not this test's)

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if "blocks of this model" in r.getMessage()]

    with caplog.at_level(logging.INFO, logger="dualpath_jax.runtime.driver"):
        trajs, _ = driver.prepare(cfg, model_ops=ops)
        assert driver.run(cfg, trajs, model_ops=ops) == "ran"
        assert [s.split(": ", 1)[1] for s in said()] == ["holds 3 blocks of this model (kept: a run hits them)"]
        add_blocks(3, 2)  # (a run wrote two more: said again, once)
        driver.run(cfg, trajs, model_ops=ops)
        driver.run(cfg, trajs, model_ops=ops)
    store.close()
    assert [s.split(": ", 1)[1][:14] for s in said()] == ["holds 3 blocks", "holds 5 blocks"]
