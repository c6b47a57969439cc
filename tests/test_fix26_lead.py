"""Session 43, the lead's fixes."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# In a fresh process (what an xdist worker imported before must not decide it): sweep imported, then another launcher
# defines the names it shares (as capacity and reproduce_paper do, with allow_override), then sweep parses.
_SCRIPT = """
import contextlib, io, json, sys
from absl import flags
from experiments import sweep

for n in ("modes", "loads", "workers", "output_dir"):
    flags.DEFINE_string(n, "other", "another launcher's", allow_override=True)
out = {}
for args in (["--modes=basic,"], ["--loads=agents=2,,agents=3"]):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            sweep.parse_flags(["sweep", *args])
        out[args[0]] = "passed"
    except SystemExit:
        out[args[0]] = err.getvalue()
    flags.FLAGS.unparse_flags()
sweep.parse_flags(["sweep"])
out["defaults"] = [flags.FLAGS.output_dir, flags.FLAGS.workers, flags.FLAGS.modes]
out["help"] = "modes" in {f.name for f in flags.FLAGS.flags_by_module_dict()[sweep.__name__]}
print(json.dumps(out))
"""


def test_sweep_parses_with_its_own_flags_after_another_launcher_replaced_them():
    # theirs replaced sweep's, validators and defaults with them: an empty item passed, the defaults were theirs
    run = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120, cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert "--modes item 2 of 2 is empty" in out["--modes=basic,"]
    assert "--loads item 2 of 3 is empty" in out["--loads=agents=2,,agents=3"]
    assert out["defaults"] == ["results/sweep", 1, ["basic", "dualpath"]] and out["help"]  # sweep's, and its help
