"""experiments/netns_cluster.sh: kernel-enforced NIC caps (network namespaces, veth pairs, tc HTB), run for real.

Needs root, iproute2 and tc, and a kernel that lets this process make network namespaces; skips otherwise, and
also when a netns cluster of the script is already up (the test would tear it down).
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "netns_cluster.sh")
CNIC_MBIT = 800
pytestmark = pytest.mark.usefixtures("netns_host_lock_module")  # (one netns cluster per host: conftest.py)


def _run(*args, timeout=120):
    return subprocess.run(
        ["bash", SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHON": sys.executable},
    )


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root (network namespaces, tc)"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "needs iproute2 (ip) and tc"
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True)
    if "dpj-" in listed.stdout or re.search(r"\bdpj-[cs]br\b", links.stdout):
        return "a netns cluster of experiments/netns_cluster.sh is up; not touching it"
    probe = subprocess.run(["ip", "netns", "add", "dpj-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot make a network namespace here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "dpj-probe"], capture_output=True)
    return None


def _mbit(line: str, stream: str) -> float:
    m = re.search(rf"'{stream}': '(\d+) Mbit/s'", line)
    assert m, line
    return float(m.group(1))


def test_netns_cluster_shapes_the_two_classes_of_a_cnic():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    try:
        up = _run("up", "2", "1", "400", str(CNIC_MBIT))
        assert up.returncode == 0, up.stderr
        assert "up: 2 nodes x 1 engines" in up.stdout
        test = _run("test")
        assert test.returncode == 0, test.stderr
        alone = next(line for line in test.stdout.splitlines() if line.startswith("streams ['low']"))
        both = next(line for line in test.stdout.splitlines() if line.startswith("streams ['high', 'low']"))
    finally:
        down = _run("down")
    assert down.returncode == 0, down.stderr
    assert "dpj-" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    # The low class alone borrows the whole link (work-conserving) and no more than it; beside the high class it
    # keeps about its 1% share (measured 2026-12-02: 757 Mbit/s alone; 752 / 22 Mbit/s together on 800 Mbit/s).
    low_alone = _mbit(alone, "low")
    high, low = _mbit(both, "high"), _mbit(both, "low")
    assert 10 * CNIC_MBIT / 100 < low_alone <= 1.1 * CNIC_MBIT
    assert high <= 1.1 * CNIC_MBIT and low < high / 5


def _leftovers() -> list[str]:
    """Namespaces and root-namespace links of the script (dpj-n*, dpj-cbr/sbr, dpj-c*/dpj-s* veth ends)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return re.findall(r"^dpj-n\d+", listed, re.M) + re.findall(r"^\d+: (dpj-[a-z]+\d*)[@:]", links, re.M)


@pytest.mark.parametrize(
    "args, named",
    [
        (["abc"], "NODES"),  # was "abc: unbound variable", after the bridges were made (left behind)
        (["0"], "NODES"),
        (["1", "300"], "G"),  # was an ip error half way, 1 namespace and 259 links left behind
        (["1", "1", "0"], "SNIC_MBIT"),
        (["1", "1", "400", "1.5"], "CNIC_MBIT"),
    ],
)
def test_netns_cluster_up_refuses_bad_arguments_and_leaves_nothing(args, named):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    try:
        up = _run("up", *args)
        assert up.returncode != 0
        assert f"{named} must be" in up.stderr, up.stderr
        assert _leftovers() == []
    finally:
        _run("down")


def test_netns_cluster_up_twice_refuses_and_keeps_the_first():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    try:
        assert _run("up", "1", "1", "400", "800").returncode == 0
        again = _run("up", "1", "1", "400", "800")  # was "RTNETLINK answers: File exists"
        assert again.returncode != 0 and "already up" in again.stderr, again.stderr
        assert "dpj-n0" in _leftovers()  # the failed second `up` did not tear down the first
    finally:
        assert _run("down").returncode == 0
    assert _leftovers() == []


def test_netns_cluster_up_refuses_a_clashing_device_by_name_and_keeps_it():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    # someone's device named like engine 1's veth end: `up` failed half way ("RTNETLINK answers: File exists", no
    # name), and its clean-up (`down`'s sweep) deleted that device
    subprocess.run(["ip", "link", "add", "dpj-c1", "type", "bridge"], check=True)
    try:
        up = _run("up", "1", "2", "400", "800")
        assert up.returncode != 0 and "already exist: dpj-c1" in up.stderr, up.stderr
        assert _leftovers() == ["dpj-c1"]  # nothing made, the device kept
        assert _run("down").returncode == 0
        assert _leftovers() == ["dpj-c1"]  # `down` removes only the script's veths
    finally:
        subprocess.run(["ip", "link", "del", "dpj-c1"], capture_output=True)
        _run("down")


def test_netns_cluster_up_cleans_up_when_interrupted_half_way():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    p = subprocess.Popen(
        ["bash", SCRIPT, "up", "60", "4", "400", "800"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        for _ in range(1200):  # until node 1's namespace is made (node 0 done), at most ~60 s
            if (
                p.poll() is not None
                or "dpj-n1" in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
            ):
                break
            time.sleep(0.05)
        assert p.poll() is None, "up finished before it could be interrupted"
        os.killpg(p.pid, signal.SIGTERM)
        _, err = p.communicate(timeout=120)
        assert p.returncode == 143 and "removing what it made" in err, (p.returncode, err)
        assert _leftovers() == []
    finally:
        if p.poll() is None:
            p.kill()
        _run("down")


def test_netns_cluster_each_engine_uses_its_own_cnic():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    try:
        assert _run("up", "2", "2", "400", "800").returncode == 0

        def route(ns, dst, src):
            out = subprocess.run(["ip", "-n", ns, "route", "get", dst, "from", src], capture_output=True, text=True)
            return out.stdout

        # engine 1 (node 0) -> engine 3 (node 1) left by cnic0, the first CNIC of the node: 2 engines, one cap
        assert " dev cnic1 " in route("dpj-n0", "10.77.1.2", "10.77.0.2")
        assert " dev cnic0 " in route("dpj-n0", "10.77.1.1", "10.77.0.1")
        assert " dev cnic1 " in route("dpj-n1", "10.77.0.2", "10.77.1.2")
        arp = subprocess.run(
            ["ip", "netns", "exec", "dpj-n1", "sysctl", "-n", "net.ipv4.conf.all.arp_ignore"],
            capture_output=True,
            text=True,
        )
        assert arp.stdout.strip() == "1"  # only engine 3's CNIC answers for its address: its bytes come in there
    finally:
        assert _run("down").returncode == 0
    assert _leftovers() == []


def test_netns_cluster_test_without_a_cluster_says_so():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    out = _run("test")  # was "Cannot open network namespace" twice and exit 255
    assert out.returncode == 1 and "run" in out.stderr and "up" in out.stderr, out.stderr


def test_netns_cluster_unknown_command_names_it():
    out = _run("upp")
    assert out.returncode == 2 and "unknown command 'upp'" in out.stderr, out.stderr


def test_netns_cluster_refuses_without_root():
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to drop to an unprivileged user")
    for cmd in ("up", "down", "test"):
        # the script goes in on stdin: the unprivileged user may not be able to open the checkout (a 0700 temp dir)
        with open(SCRIPT) as script:
            out = subprocess.run(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", "-s", cmd],
                stdin=script,
                capture_output=True,
                text=True,
                timeout=60,
                cwd="/",
            )
        assert out.returncode == 1 and "needs root" in out.stderr, (cmd, out.stderr)
