"""The bucket that holds a run's end ends there, in both drivers (`metrics.links_ended_at`): the runtime's last 0.1 s
bin ran past its run's end (t1 14.23 s against the last token at 14.18 s), so bytes / (t1 - t0) understated its rate,
where the simulator's was trimmed."""

import math

from dualpath_jax import metrics
from dualpath_jax.metrics import LinkBytes
from dualpath_jax.runtime import driver


def _total(links):
    out = {}
    for s in links:
        out[s.link] = out.get(s.link, 0) + s.nbytes
    return out


def test_the_bucket_holding_the_end_ends_there_and_no_byte_is_lost():
    links = [
        LinkBytes("snic/node0", 0.0, 0.0, 0),  # an idle link's marker: kept as it is
        LinkBytes("snic/node1", 14.1, 14.2, 300),
        LinkBytes("cnic/engine0/low", 14.1, 14.2, 50),
        LinkBytes("snic/node1", 14.2, 14.3, 100),  # holds the end (14.23): ends there
        LinkBytes("cnic/engine0/low", 14.3, 14.4, 7),  # past the end, no bucket of its link ends there: moved before
        LinkBytes("snic/node1", 14.3, 14.4, 5),  # past the end (a clock-offset error): added to the bucket ending there
        LinkBytes("cnic/engine1/low", 14.3, 14.4, 9),
    ]
    got = metrics.links_ended_at(links, 14.23)
    assert got == [
        LinkBytes("snic/node0", 0.0, 0.0, 0),
        LinkBytes("snic/node1", 14.1, 14.2, 300),
        LinkBytes("cnic/engine0/low", 14.1, 14.2, 50),
        LinkBytes("snic/node1", 14.2, 14.23, 105),
        LinkBytes("cnic/engine0/low", got[4].t0, 14.23, 7),
        LinkBytes("cnic/engine1/low", got[5].t0, 14.23, 9),
    ]
    assert math.isclose(got[4].t0, 14.13) and math.isclose(got[5].t0, 14.13)
    assert _total(got) == _total(links)
    assert all(s.t0 < s.t1 <= 14.23 for s in got if s.t0 != s.t1)


def test_a_bucket_ending_exactly_at_the_end_takes_the_dust_after_it():
    """The simulator's case: a flow's last rounding dust accounted at the instant `end`, in the bucket starting there."""
    links = [LinkBytes("snic/node0", 9.0, 10.0, 40), LinkBytes("snic/node0", 10.0, 11.0, 1)]
    assert metrics.links_ended_at(links, 10.0) == [LinkBytes("snic/node0", 9.0, 10.0, 41)]


def test_runtime_links_end_at_the_runs_end():
    """`driver.run_links` with the run's end: its last bin ends there, the list stays in time order."""
    got = driver.run_links(
        [
            LinkBytes("snic/node1", 1.1, 1.2, 100),
            LinkBytes("snic/node2", -0.0641, -0.0641, 0),
            LinkBytes("snic/node1", 1.2, 1.3, 30),
        ],
        end=1.25,
    )
    assert got == [
        LinkBytes("snic/node2", 0.0, 0.0, 0),
        LinkBytes("snic/node1", 1.1, 1.2, 100),
        LinkBytes("snic/node1", 1.2, 1.25, 30),
    ]
    # without an end (as before): as reported
    assert driver.run_links([LinkBytes("snic/node1", 1.2, 1.3, 30)]) == [LinkBytes("snic/node1", 1.2, 1.3, 30)]
