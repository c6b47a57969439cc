"""Defects found by the traffic-manager hunt (2026-12-03): each test failed before its fix."""

from __future__ import annotations

import re
import subprocess
import time

import pytest
from test_netns_cluster import _run, _skip_reason

from dualpath_jax.traffic import Link, Pacer


def test_a_pacer_records_each_link_when_the_chunk_crosses_the_path():
    # SNIC-like fast link, then a 10x slower CNIC-like one: every chunk crosses both at the slow link's slot. The fast
    # link granted the LOOKAHEAD chunks queued ahead at once and recorded them then, so its bins ran ~65 ms early.
    origin = time.monotonic()
    fast = Link("fast", 10e6, {"low": 1.0}, clock_origin=origin, sample_interval=0.05)
    slow = Link("slow", 1e6, {"high": 99.0, "low": 1.0}, clock_origin=origin, sample_interval=0.05)
    moved = sum(Pacer([fast, slow]).paced(300_000, "low"))
    assert moved == fast.total_bytes == slow.total_bytes == 300_000
    bins = [[(s.t0, s.nbytes) for s in link.samples()] for link in (fast, slow)]
    assert bins[0] == bins[1]


@pytest.mark.parametrize("cnic_mbit, high_kbit, low_kbit", [("1", 990, 10), ("150", 148500, 1500)])
def test_netns_cluster_shapes_any_whole_cnic_rate_99_to_1(cnic_mbit, high_kbit, low_kbit, netns_host_lock):
    # `up 1 1 1 1` failed with tc's '"rate" is required.' (1 * 99 // 100 = a 0 Mbit/s high class); 150 Mbit/s gave
    # 148:1 (low 150 // 100 = 1 Mbit/s).
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    try:
        up = _run("up", "1", "1", "10", cnic_mbit)
        assert up.returncode == 0, up.stderr
        shown = subprocess.run(
            ["ip", "netns", "exec", "dpj-n0", "tc", "class", "show", "dev", "cnic0"], capture_output=True, text=True
        ).stdout
        rates = dict(re.findall(r"class htb (1:\d+) .*? rate (\S+)", shown))
        assert rates["1:10"].lower() == f"{high_kbit}kbit" and rates["1:20"].lower() == f"{low_kbit}kbit", shown
    finally:
        _run("down")


def test_bytes_caught_up_after_an_idle_spell_are_recorded_when_they_move():
    # After an idle spell the link grants a slot up to burst_s in the past (token bucket); its bytes were recorded
    # there, in the bin before the transfer even started.
    link = Link("l", 1e6, {"low": 1.0}, burst_s=0.05, sample_interval=0.1)
    time.sleep(0.06)  # idle longer than burst_s
    link.clock_origin = time.monotonic() - 0.101  # the transfer starts 1 ms into bin 1
    link.acquire(1000)
    (sample,) = link.samples()
    assert sample.nbytes == 1000 and sample.t0 >= 0.1, sample


def test_a_negative_transfer_is_an_error():
    """A negative size was paced as nothing and recorded nothing, silently."""
    link = Link("snic/x", 1e6)
    with pytest.raises(ValueError, match="a transfer of -5 bytes"):
        list(link.paced(-5))
    with pytest.raises(ValueError, match="a transfer of -5 bytes"):
        list(Pacer([link]).paced(-5))
    assert list(link.paced(0)) == []
