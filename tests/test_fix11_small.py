"""Fix wave 11, small items the launcher journey noticed (/work/notes/fix11_launch.md, "Noticed, left alone").

- tcp: a Ctrl-C whose KeyboardInterrupt came out of the posting thread's own `sendmsg` (a write sent inline) was
  swallowed: the set was failed as "send to ... failed: " and the write returned a failed future, so the program
  went on as if a peer had died. Contract: the set is failed (the stream may hold part of a frame) and the
  KeyboardInterrupt reaches the caller.
- traces: JSON errors said "Invalid control character at at column N"; a missing absolute trace path said "looked
  at /x and /x".
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from dualpath_jax.workloads.traces import TraceFormatError, load_trace
from transport.base import PeerLostError
from transport.tcp import TcpTransport


class _InterruptedSock:
    """The connection's socket, whose next `sendmsg` is interrupted by Ctrl-C (as a SIGINT handled during it)."""

    def __init__(self, sock):
        self._sock = sock

    def sendmsg(self, *args, **kwargs):
        raise KeyboardInterrupt

    def __getattr__(self, name):
        return getattr(self._sock, name)


def test_tcp_ctrl_c_in_an_inline_send_reaches_the_caller_and_fails_the_set():
    a, b = TcpTransport("fix11-a"), TcpTransport("fix11-b")
    try:
        a.register("src", np.ones(4096, np.uint8))
        b.register("dst", np.zeros(4096, np.uint8))
        a.connect("fix11-b", b.address)
        assert a.write("fix11-b", "src", 0, "dst", 0, 4096).result(10) == 4096  # (the set works)
        conn = a._live["fix11-b"].conns["low"]
        real = conn.sock
        conn.sock = _InterruptedSock(real)
        try:
            with pytest.raises(KeyboardInterrupt):
                a.write("fix11-b", "src", 0, "dst", 0, 4096)
        finally:
            conn.sock = real
        # the set is failed: a later write fails (it does not go into a stream that may hold half a frame)
        with pytest.raises(PeerLostError):
            a.write("fix11-b", "src", 0, "dst", 0, 4096).result(10)
    finally:
        a.close()
        b.close()


def test_a_json_error_in_a_trace_does_not_say_at_twice(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [1], "x": "a\x01"}\n')
    with pytest.raises(
        TraceFormatError, match=r"bad.jsonl:1: not valid JSON \(Invalid control character at column"
    ) as e:
        load_trace(str(p))
    assert "at at" not in str(e.value)


def test_a_missing_absolute_trace_path_is_named_once(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError) as e:
        load_trace(str(missing))
    assert f"looked at {missing};" in str(e.value)


def test_simulate_prints_the_slo_percentiles_the_run_judged(tmp_path):
    """simulate's table printed `ttft_p90_s` / `tpot_p90_s` only: with config.slo_percentile=95 the SLO figures the
    run was judged on were in summary.json alone. Its log also said "16 agents" (config.workload.n_agents) for an
    online run, which runs aps x duration agents."""
    from test_launch_hunt import _launch

    out = _launch(
        "-m", "experiments.simulate", "--config=configs/sim_tiny.py:dualpath,aps=0.5,duration=60,warmup=10",
        "--config.slo_percentile=95", "--noplot", f"--output_dir={tmp_path}",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    names = {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
    assert {"ttft_p95_s", "tpot_p95_s", "slo_met"} <= names and "ttft_p90_s" not in names
    assert "(online, 16 agents)" not in out.stderr and "(online, agents from the workload)" in out.stderr


def test_the_main_jobs_table_names_its_units():
    """experiments.run's table headers said "TTFT p50" / "TPOT p50" with no unit (values in seconds, while the README's
    tables give TPOT in ms): now "TTFT p50 s" and "TPOT p50 ms" (values in ms)."""
    from types import SimpleNamespace

    from experiments.run import format_table

    s = {"jct_s": 2.0, "ttft_p50_s": 0.25, "ttft_p99_s": 0.5, "tpot_p50_s": 0.0042, "tpot_p99_s": 0.0081}
    header, _, row = format_table({"basic": SimpleNamespace(summary=s)}).splitlines()
    cols = dict(zip([h.strip() for h in header.split("  ") if h.strip()], row.split(), strict=True))
    assert cols["TTFT p50 s"] == "0.250" and cols["TPOT p50 ms"] == "4.2" and cols["TPOT p99 ms"] == "8.1"


@pytest.mark.parametrize("where", ["the path", "a parent"])
def test_a_store_dir_that_is_a_file_is_named_so(base, tmp_path, where):
    """config.store_dir naming a file (or a path under one) said only "cannot be created: File exists" / "Not a
    directory"; now it says which path is a file."""
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.config import ConfigError

    f = tmp_path / "a_file"
    f.write_text("x")
    store_dir = f if where == "the path" else f / "store"
    why = "it is a file, not a directory" if where == "the path" else f"{str(f)!r} is a file"
    with pytest.raises(ConfigError, match=re.escape(f"config.store_dir {str(store_dir)!r} cannot be created: {why}")):
        driver.prepare(base.replace(store_dir=str(store_dir)))


def test_rope_scaling_type_and_rope_parameters_rope_type_agree():
    """A config.json with the legacy `rope_scaling {"type": "yarn", ...}` beside `rope_parameters {"rope_type": "yarn",
    ...}` of the same values was refused as "disagree" (the dicts were compared raw); different values still are."""
    from models.config import hf_rope

    legacy, new = {"type": "yarn", "factor": 4.0}, {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0}
    assert hf_rope({"rope_theta": 1e6, "rope_scaling": legacy, "rope_parameters": new}) == (
        1e6,
        {"rope_type": "yarn", "factor": 4.0},
    )
    with pytest.raises(ValueError, match="disagree"):
        hf_rope({"rope_theta": 1e6, "rope_scaling": {**legacy, "factor": 2.0}, "rope_parameters": new})
