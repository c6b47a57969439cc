"""Session 45's review findings fixed by the lead: the stale-module note says what ran (the start), not the files at
the end of the run."""

_SIMULATE_WITH_A_STALE_START = """
import sys
from absl import flags
from dualpath_jax import compiled
from experiments import simulate
import os

def stale_modules():  # network.py stale when the run starts (its twin runs), simulator.py edited while it runs
    if os.path.exists(os.path.join(sys.argv[1], "summary.json")):  # (the run is over)
        return {"dualpath_jax.sim.simulator": "edited since the build: simulator.py"}
    return {"dualpath_jax.sim.network": "edited since the build: network.py"}

compiled.stale_modules = stale_modules
flags.FLAGS(["simulate", "--config=configs/sim_tiny.py:dualpath,agents=2,turns=2", "--output_dir=" + sys.argv[1],
             "--noplot", "--noprogress"])
simulate.main([])
"""


def test_simulate_notes_the_modules_that_were_stale_when_it_started(tmp_path):
    from test_fix12_runtime import _launch

    out = _launch("-c", _SIMULATE_WITH_A_STALE_START, str(tmp_path / "sim"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert (
        "note: dualpath_jax.sim.network ran as its Python twin, slower (edited since the build: network.py)"
        in out.stdout
    ), out.stdout[-2000:]
    assert "dualpath_jax.sim.simulator ran as" not in out.stdout  # (edited after it was loaded: the old code ran)


def test_a_turn_table_equals_the_same_records_by_value():
    """(review finding) Two runs' TurnTables compared by identity (a Sequence's default): equal records read unequal."""
    from dualpath_jax.metrics import TurnTable

    def table(arrival):
        t = TurnTable()
        t.add(0, 0, 100, 64, 3, arrival)
        t.finished[0] = 2.5  # (the other stamps NaN)
        return t

    a, b = table(1.0), table(1.0)
    assert a == b and a == list(b) and list(a) == b
    assert a != table(1.5) and a != [] and a != "x"
    b.add(1, 0, 5, 0, 1, 2.0)
    assert a != b
