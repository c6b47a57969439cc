"""`--config.reference` of experiments.run (session 41): the run's "greedy tokens: identical" line compares the
policies with each other only, so a store that served the same wrong KV to every policy passed it, and the README
gave no way to check a run (or one's own checkpoint) against the single-process reference but test internals.
Now `--config.reference=True` generates every turn in the driver's process (`model_ops.reference_conversations`)
and prints, and keeps in results.json, how each policy's tokens compare with it."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import test_launch_hunt as launch_hunt

from experiments import reference_agreement

# A store of one's own (README "A KV store of one's own") that serves every hit block as zeros after its
# checksums passed: wrong KV, read the same way under every policy.
_ZEROING = """
from dualpath_jax.store import STORES, LocalDirStore


@STORES.register("fix24-zeroing")
class ZeroingStore(LocalDirStore):
    def read(self, key, out, layers=None):
        ok = super().read(key, out, layers)
        if ok:
            out[...] = 0
        return ok
"""

_SETUP = """
import fix24_zeroing  # noqa: F401 - registers the store
from configs.tiny_runtime import get_config as _tiny


def get_config(arg=None):
    c = _tiny("test")
    c.runtime.store = {store!r}
    return c
"""


def _run(tmp_path, store: str):
    (tmp_path / "fix24_zeroing.py").write_text(_ZEROING)
    (tmp_path / "setup.py").write_text(textwrap.dedent(_SETUP.format(store=store)))
    out = tmp_path / f"res-{store}"
    proc = launch_hunt._launch(
        "-m", "experiments.run", f"--config={tmp_path / 'setup.py'}", "--config.reference=True",
        f"--config.results_dir={out}", env={"PYTHONPATH": f"{launch_hunt.REPO}:{tmp_path}"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = out.iterdir()
    return proc.stdout, json.loads((run_dir / "results.json").read_text())["greedy_tokens"]


def test_a_store_serving_the_same_wrong_kv_to_every_policy_is_caught_by_the_reference(tmp_path):
    stdout, tokens = _run(tmp_path, "fix24-zeroing")
    assert "greedy tokens: identical under basic / dualpath for all 12 turns" in stdout  # (what passed it before)
    line = next(x for x in stdout.splitlines() if x.startswith("greedy tokens vs the single-process reference"))
    assert "basic equal" not in line and "dualpath equal" not in line, line
    ref = tokens["reference"]
    assert ref["basic"]["turns"] == ref["dualpath"]["turns"] == 12
    assert ref["basic"]["turns_differing"] > 0 and ref["dualpath"]["turns_differing"] > 0  # (turns with hits)
    assert ref["sha256"] != tokens["sha256"]["basic"]


def test_the_local_dir_store_gives_the_reference_tokens(tmp_path):
    stdout, tokens = _run(tmp_path, "local_dir")
    assert "greedy tokens vs the single-process reference (12 turns): basic equal, dualpath equal" in stdout
    assert tokens["reference"]["sha256"] == tokens["sha256"]["basic"] == tokens["sha256"]["dualpath"]


class _Result:
    def __init__(self, tokens):
        self.tokens = tokens


def test_reference_agreement_counts_a_turn_missing_on_either_side_as_differing():
    ref = {(0, 0): np.array([1, 2]), (0, 1): np.array([3])}
    results = {"a": _Result({(0, 0): np.array([1, 2]), (0, 1): np.array([3])}), "b": _Result({(0, 0): np.array([1])})}
    line, info = reference_agreement(results, ref, batch_invariant=True)
    assert info["a"] == {"turns": 2, "turns_differing": 0, "first_differing": []}
    assert info["b"] == {"turns": 2, "turns_differing": 2, "first_differing": [(0, 0)]}
    assert line == "greedy tokens vs the single-process reference (2 turns): a equal, b 2 of 2 differ (first: (0, 0))"
