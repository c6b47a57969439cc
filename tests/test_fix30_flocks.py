"""dualpath_jax.flocks: the one flock helper behind the output-dir, temp-dir, netns-cluster and store-keeper locks.

flock(2) locks belong to an open file description, so two `os.open`s of one path in this process conflict as two
processes would."""

import os

import pytest

from dualpath_jax import flocks


def test_an_exclusive_lock_is_seen_elsewhere_until_its_descriptor_closes(tmp_path):
    d = str(tmp_path)
    first = flocks.open_dir(d)
    assert flocks.take(first) is True
    assert flocks.held_elsewhere(d)
    second = flocks.open_dir(d)
    try:
        assert flocks.take(second) is False
        assert flocks.take(second, shared=True) is False
    finally:
        os.close(second)
    os.close(first)
    assert not flocks.held_elsewhere(d)
    assert not flocks.held_elsewhere(str(tmp_path / "missing"))  # (cannot be opened: not held)


def test_hold_shared_says_whether_another_holder_is_there(tmp_path):
    path = str(tmp_path / "run.lock")
    a, b, c = (flocks.open_lock_file(path) for _ in range(3))
    try:
        assert flocks.hold_shared(a) is False  # alone
        assert flocks.hold_shared(b) is True  # a holds it too
        assert flocks.take(c) is False  # both hold it shared: no exclusive lock for a third
        assert flocks.take(c, shared=True) is True
    finally:
        for fd in (a, b, c):
            os.close(fd)


def test_an_exclusive_holder_is_refused_when_asked_not_to_wait(tmp_path):
    path = str(tmp_path / "cluster.lock")
    owner, run = flocks.open_lock_file(path), flocks.open_lock_file(path)
    try:
        assert flocks.take(owner) is True  # (`netns_cluster.sh up` holds it exclusive)
        with pytest.raises(BlockingIOError):
            flocks.hold_shared(run, wait_for_exclusive=False)
        assert flocks.take(run, shared=True) is False  # (nothing taken by the refusal)
    finally:
        os.close(owner)
        os.close(run)
