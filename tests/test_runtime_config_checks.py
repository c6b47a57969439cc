"""Runtime config checks of host buffers against this host's memory (`dualpath_jax.runtime.config.validate`).

A buffer that can never be allocated used to stop each node at start with ENOMEM (a traceback from the node
process, after the cluster started); now it is one `bad config` line naming the field, the bytes and the limit.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from configs.tiny_runtime import get_config
from dualpath_jax.runtime import config as config_mod
from dualpath_jax.runtime.config import ConfigError, RuntimeConfig, host_memory_bytes, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHYS = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def cfg():
    return RuntimeConfig.from_config_dict(get_config("test").runtime)


def test_host_memory_is_at_most_the_physical_memory():
    limit, what = host_memory_bytes()
    assert 0 < limit <= PHYS and what


@pytest.mark.parametrize("launcher", ["local", "inprocess"])
@pytest.mark.parametrize("field", ["pe_buffer_bytes", "de_buffer_bytes"])
def test_a_buffer_larger_than_this_host_is_one_error_naming_field_bytes_and_limit(cfg, launcher, field):
    limit, what = host_memory_bytes()
    bad = cfg.replace(**{"launcher": launcher, "transport": "tcp", f"buffers.{field}": limit + 1})
    with pytest.raises(ConfigError) as e:
        validate(bad)
    msg = str(e.value)
    assert msg.startswith(f"config.buffers.{field}={limit + 1} B ")
    assert f"is more than {what}: {limit} B" in msg


@pytest.mark.parametrize("launcher", ["local", "inprocess"])
def test_buffers_of_all_nodes_on_this_host_together_are_checked(cfg, launcher):
    """Each buffer fits, but the nodes that run on this host (1 PE + 2 DE nodes) do not together."""
    limit, what = host_memory_bytes()
    each = limit // 2  # 3 nodes x limit/2 > limit
    bad = cfg.replace(
        **{"launcher": launcher, "transport": "tcp", "buffers.pe_buffer_bytes": each, "buffers.de_buffer_bytes": each}
    )
    total = 3 * each
    match = (
        f"config.buffers: the 3 nodes of launcher {launcher!r} all run on this host and need {total} B "
        f"({total / 2**30:.1f} GiB) of host buffers together (1 PE node(s) x pe_buffer_bytes={each} + 2 DE node(s) x "
        f"de_buffer_bytes={each}), more than {what}: {limit} B"
    )
    with pytest.raises(ConfigError, match=re.escape(match)):
        validate(bad)


@pytest.mark.parametrize("value", [0, -1])
@pytest.mark.parametrize("field", ["pe_buffer_bytes", "de_buffer_bytes"])
def test_a_buffer_of_no_bytes_is_refused(cfg, field, value):
    """(It reached HostBufferPool in each node: 'budget_bytes=0 is smaller than one slot', a traceback.)"""
    with pytest.raises(ConfigError, match=re.escape(f"config.buffers.{field} must be >= 1 B, got {value}")):
        validate(cfg.replace(**{f"buffers.{field}": value}))


def test_a_smaller_cgroup_memory_limit_is_the_limit(cfg, monkeypatch):
    """In a container the cgroup's memory limit, not the host's RAM, is what the nodes can hold."""
    import io

    def fake_open(path, *a, **kw):
        if path == "/sys/fs/cgroup/memory.max":
            return io.StringIO(f"{1 << 30}\n")
        raise FileNotFoundError(path)

    monkeypatch.setattr(config_mod, "open", fake_open, raising=False)
    assert host_memory_bytes() == (1 << 30, "the cgroup memory limit (/sys/fs/cgroup/memory.max)")
    with pytest.raises(
        ConfigError, match=re.escape("is more than the cgroup memory limit (/sys/fs/cgroup/memory.max): 1073741824 B")
    ):
        validate(cfg.replace(**{"buffers.de_buffer_bytes": (1 << 30) + 1}))
    monkeypatch.setattr(config_mod, "open", lambda *a, **kw: io.StringIO("max\n"), raising=False)
    assert host_memory_bytes() == (PHYS, "this host's physical memory")


def test_run_command_with_a_buffer_larger_than_this_host_prints_one_line():
    """The researcher's command: one `bad config` line before any node starts (was: ENOMEM tracebacks from the
    node processes)."""
    limit, _ = host_memory_bytes()
    out = subprocess.run(
        [sys.executable, "-m", "experiments.run", f"--config.runtime.buffers.de_buffer_bytes={limit + 1}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode != 0
    assert f"bad config: config.runtime.buffers.de_buffer_bytes={limit + 1} B" in out.stderr
    assert "Traceback" not in out.stderr and "turn/s" not in out.stderr


@pytest.mark.parametrize(
    "path,value,match",
    [
        (("cluster", "decode_slots"), float("inf"), "config.cluster.decode_slots must be an integer, got inf"),
        (("cluster", "decode_slots"), float("nan"), "config.cluster.decode_slots must be an integer, got nan"),
        (("buffers", "pe_buffer_bytes"), float("inf"), "config.buffers.pe_buffer_bytes must be an integer, got inf"),
        (("scheduler", "policy_kwargs"), "abc", "config.scheduler.policy_kwargs must be a mapping, got 'abc'"),
        (("scheduler", "batcher_kwargs"), [1, 2], "config.scheduler.batcher_kwargs must be a mapping, got [1, 2]"),
    ],
)
def test_config_dict_values_that_cannot_be_read_are_one_config_error(path, value, match):
    """An infinite or NaN integer field was an OverflowError / ValueError from int(), a kwargs field that is not a
    mapping a ValueError / TypeError from dict(): tracebacks from `from_config_dict` instead of a `bad config` line."""
    d = get_config("test").runtime.to_dict()
    d[path[0]][path[1]] = value
    with pytest.raises(ConfigError, match=re.escape(match)):
        RuntimeConfig.from_config_dict(d)
