"""Fix wave 13: a user's policy in the simulator (dualpath_jax/sim/runner.py `CheckedPolicy`). The simulator hands
policies its live snapshot: one that changed it (instead of `snapshot.copy()`) skewed the run without a word, and an
exception from it did not name the policy."""

from __future__ import annotations

import pytest

from dualpath_jax.sim import load_sim_config, run
from dualpath_jax.sim.runner import PolicyError
from schedulers import POLICIES
from schedulers.policies import BasicPolicy


class LikeBasic(BasicPolicy):
    """The basic policy under a user's name: the checks change nothing of its run."""


class TakesHbm(BasicPolicy):
    """Lowers a DE's free HBM in the snapshot it was given (the README: must work on a copy)."""

    def schedule(self, snapshot, queue, fetching_node=None):
        out = super().schedule(snapshot, queue, fetching_node)
        snapshot.engines_of("decode")[0].free_hbm_tokens -= 1
        return out


class Raises(BasicPolicy):
    def schedule(self, snapshot, queue, fetching_node=None):
        raise ZeroDivisionError("a bug of the user's")


USERS = {"fix13_like_basic": LikeBasic, "fix13_takes_hbm": TakesHbm, "fix13_raises": Raises}


@pytest.fixture(scope="module")
def registered():
    for name, cls in USERS.items():
        POLICIES.register(name)(cls)
    yield
    for name in USERS:
        POLICIES._entries.pop(name, None)


def _cfg(policy):
    return load_sim_config("configs/sim_tiny.py", {"scheduler.name": policy})


def test_a_users_policy_that_changes_the_snapshot_is_named_with_what_it_changed(registered):
    with pytest.raises(
        PolicyError, match=r"policy 'fix13_takes_hbm' changed the snapshot .*free_hbm_tokens \d+ -> \d+"
    ):
        run(_cfg("fix13_takes_hbm"))


def test_a_users_policy_that_raises_is_named(registered):
    with pytest.raises(PolicyError, match=r"policy 'fix13_raises' raised ZeroDivisionError\(\"a bug of the user's\"\)"):
        run(_cfg("fix13_raises"))


def test_the_checks_change_nothing_of_a_well_behaved_policys_run(registered):
    mine, basic = run(_cfg("fix13_like_basic")).summary, run(_cfg("basic")).summary
    drop = ("wall_s", "events_per_s", "turns_per_s", "policy", "compiled")
    assert {k: v for k, v in mine.items() if k not in drop} == {k: v for k, v in basic.items() if k not in drop}
