"""Fix wave 13, "policy": a researcher writes their own scheduling policy / batcher and compares it with the built-in
ones in the simulator, a sweep and the runtime.

Walked for real from outside the package (/tmp modules on PYTHONPATH, a config file importing them): see
notes/fix13_policy.md. What failed, each fixed here: an `Assignment` took any engine / request id (True placed on
engine 1 silently; a float engine id made the runtime's run hang until `run_timeout_s`; a str id was reported as the
int it printed like) and any fraction (a str failed as a bare "'<=' not supported"); a subclass with only its `Config`
and `schedule()` (the README's recipe names no `__init__`) could not be built ("takes no arguments"); a class in the
wrong registry, or whose `schedule` was misspelt, failed at the first fetch naming no policy; a policy registered by a
module executed twice (a config file that defines it, loaded once per sweep cell) was refused as registered "by" its
own class, with nothing saying why; a policy name holding ',' or '=' registered, and no launcher could pass it.
"""

from __future__ import annotations

import dataclasses
import re
import textwrap

import numpy as np
import pytest

from dualpath_jax.registry import Registry
from schedulers import BATCHERS, POLICIES, Assignment, BatchItem, InterEnginePolicy, IntraEnginePolicy
from schedulers.registry import make_batcher, make_policy


# ------------------------------------------------------------------------- a researcher's own policies and batcher
class SideFromConfig(InterEnginePolicy):
    """Least-loaded PE, the DE with the most free HBM, every read on the configured side. Only what the README's
    recipe names: a nested Config dataclass and schedule(), no __init__ of its own."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        side: str = "de"

        def __post_init__(self):
            if self.side not in ("pe", "de"):
                raise ValueError(f"side must be 'pe' or 'de', got {self.side!r}")

    def schedule(self, snapshot, queue, fetching_node=None):
        s = snapshot.copy()
        pes, des = s.engines_of("prefill"), s.engines_of("decode")
        out = []
        for r in queue:
            fit = [d for d in des if d.free_hbm_tokens >= r.total_tokens]
            if not fit:
                break
            pe, de = min(pes, key=lambda e: (e.tok, e.engine_id)), max(fit, key=lambda e: e.free_hbm_tokens)
            pe.tok += r.prompt_tokens
            de.tok += r.total_tokens
            de.free_hbm_tokens -= r.total_tokens
            side = self.config.side
            out.append(Assignment(r.request_id, pe.engine_id, de.engine_id, side, 1.0 if side == "de" else 0.0))
        return out


class EngineIdAs(SideFromConfig):
    """Places the head request with its engine ids converted by `convert` (a policy's arithmetic gone wrong)."""

    convert = staticmethod(float)

    def schedule(self, snapshot, queue, fetching_node=None):
        return [
            Assignment(a.request_id, self.convert(a.prefill_engine), a.decode_engine, a.read_side, a.de_read_fraction)
            for a in super().schedule(snapshot, queue, fetching_node)[:1]
        ]


class EngineIdTrue(EngineIdAs):
    convert = staticmethod(lambda e: True)


class OneChunk(IntraEnginePolicy):
    """The head request only, at most `max_tokens` of it (no __init__ either)."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        max_tokens: int = 16

    def form_batch(self, queue):
        if not queue:
            return []
        w = queue[0]
        return [BatchItem(w.request_id, w.cached_tokens, min(w.remaining_tokens, self.config.max_tokens))]


class MisspeltSchedule(InterEnginePolicy):
    @dataclasses.dataclass(frozen=True)
    class Config:
        pass

    def shedule(self, snapshot, queue, fetching_node=None):  # (the abstract schedule() is left)
        return []


FIX13_POLICIES = {
    "fix13_side_from_config": SideFromConfig,
    "fix13_float_engine": EngineIdAs,
    "fix13_true_engine": EngineIdTrue,
    "fix13_a_batcher": OneChunk,  # a batcher registered as a policy by mistake
    "fix13_misspelt": MisspeltSchedule,
}
FIX13_BATCHERS = {"fix13_one_chunk": OneChunk, "fix13_a_policy": SideFromConfig}


@pytest.fixture(scope="module")
def registered():
    """Registered as a user's module would (decorator form), taken out afterwards: other test modules enumerate the
    registries."""
    for name, cls in FIX13_POLICIES.items():
        POLICIES.register(name)(cls)
    for name, cls in FIX13_BATCHERS.items():
        BATCHERS.register(name)(cls)
    yield
    for name in FIX13_POLICIES:
        POLICIES._entries.pop(name, None)
    for name in FIX13_BATCHERS:
        BATCHERS._entries.pop(name, None)


# ------------------------------------------------------------------------------------------- Assignment's types
@pytest.mark.parametrize("field", ["request_id", "prefill_engine", "decode_engine"])
@pytest.mark.parametrize("bad", [True, np.bool_(False), 1.0, 2.5, "3", None])
def test_an_assignment_refuses_ids_that_are_not_integers(field, bad):
    """What was wrong: `Assignment` took any id. `True` is engine 1 to a dict lookup (the simulator placed the request
    there silently), a float engine id passed the runtime's checks (`1.0 in engines`) and then named an endpoint
    'engine1.0' that does not exist (the run hung until run_timeout_s, 900 s by default), a str request id was
    reported as "placed request 0, which is not in the queue". Contract: a TypeError naming the field and the value's
    type; numpy integers are taken (as Python ints)."""
    kw = dict(request_id=7, prefill_engine=0, decode_engine=2, read_side="pe")
    with pytest.raises(
        TypeError, match=rf"Assignment {field} must be an int \(not a bool\), got {re.escape(repr(bad))} \("
    ):
        Assignment(**{**kw, field: bad})
    a = Assignment(**{**kw, field: np.int64(5)})
    assert getattr(a, field) == 5 and type(getattr(a, field)) is int


@pytest.mark.parametrize("bad", ["0.5", True, None, [0.5]])
def test_an_assignment_refuses_a_fraction_that_is_not_a_number(bad):
    """What was wrong: a str fraction failed as a bare "'<=' not supported between instances of 'float' and 'str'"
    naming neither the field nor the Assignment (the runtime reported it as the policy raising that); `True` passed as
    the fraction 1.0 of a "de" read. Contract: a TypeError naming de_read_fraction; ints and numpy floats are taken."""
    with pytest.raises(
        TypeError, match=rf"Assignment de_read_fraction must be a number in \[0, 1\], got {re.escape(repr(bad))}"
    ):
        Assignment(1, 0, 2, "split", bad)
    assert Assignment(1, 0, 2, "de", 1).de_read_fraction == 1.0
    assert Assignment(1, 0, 2, "split", np.float32(0.25)).de_read_fraction == 0.25


def test_an_engine_id_true_is_refused_in_the_simulator_not_taken_for_engine_1(registered):
    """What was wrong: the simulator looked the engine up by `True`, which is engine 1 (a PE of sim_tiny): the run
    finished with every request on PE 1 and no word. Contract: the run stops at the policy's first assignment, the
    error naming the policy and the field."""
    from dualpath_jax.sim import load_config, run, sim_config_from_dict
    from dualpath_jax.sim.runner import PolicyError

    cfg = sim_config_from_dict(load_config("configs/sim_tiny.py:fix13_true_engine").to_dict())
    with pytest.raises(
        PolicyError, match=r"'fix13_true_engine' raised TypeError\('Assignment prefill_engine must be an"
    ):
        run(cfg)


# ---------------------------------------------------------------------------------- built as the README says
def test_a_policy_and_batcher_without_their_own_init_are_built_with_their_config(registered):
    """What was wrong: the README's recipe (a subclass with a nested Config dataclass and schedule() / form_batch(),
    built as cls(config)) gave "SideFromConfig() takes no arguments" (the simulator's traceback; the runtime said
    "bad config: config.scheduler.policy_kwargs: ..."): the base classes had no __init__ taking the config, so every
    user wrote the same two lines. Contract: the base classes keep `config` (the Config's defaults when None)."""
    p = make_policy("fix13_side_from_config", side="pe")
    assert p.config == SideFromConfig.Config(side="pe") and p.name == "fix13_side_from_config"
    assert SideFromConfig().config == SideFromConfig.Config()
    b = make_batcher("fix13_one_chunk", max_tokens=4)
    assert b.config.max_tokens == 4 and b.name == "fix13_one_chunk"
    assert make_policy("basic", max_pe_tokens=5).config.max_pe_tokens == 5  # the built-in ones: unchanged


@pytest.mark.parametrize(
    "make, name, match",
    [
        (make_policy, "fix13_a_batcher", r"'fix13_a_batcher' \(OneChunk\) has no schedule\(snapshot, queue, fetch"),
        (make_batcher, "fix13_a_policy", r"'fix13_a_policy' \(SideFromConfig\) has no form_batch\(queue\) method"),
        (make_policy, "fix13_misspelt", r"'fix13_misspelt' \(MisspeltSchedule\) cannot be built as cls\(config\): "),
    ],
)
def test_a_class_that_is_not_a_policy_is_named_when_built(registered, make, name, match):
    """What was wrong: a batcher registered in POLICIES (or a policy in BATCHERS) was built, and the simulator failed
    at its first fetch with "'OneChunk' object has no attribute 'schedule'" naming no policy; a misspelt schedule()
    was "Can't instantiate abstract class ..." naming no registered name. Contract: `make_policy` / `make_batcher`
    (which the launchers' config checks call) raise a TypeError naming the registered name, its class and what it
    lacks."""
    with pytest.raises(TypeError, match=match):
        make(name)


# ------------------------------------------------------------------------------------------- registered twice
def test_a_definition_registered_again_says_its_module_ran_twice():
    """What was wrong: a module that registers a policy and is executed again (a config file that defines its own
    policy, loaded once per cell by experiments.sweep; importlib.reload; a notebook cell run again) was refused as
    "'x' is already registered (by <class 'm.X'>)": its own class, with nothing saying why. Contract: still refused
    (a silent replacement could swap another file's class of the same name in), the message says that the same
    definition ran twice and what to do; two different classes get the plain message."""
    reg = Registry("inter-engine policy")
    ns1, ns2 = {"__name__": "mine"}, {"__name__": "mine"}
    exec("class Mine: pass", ns1)
    exec("class Mine: pass", ns2)
    reg.add("mine", ns1["Mine"])
    with pytest.raises(ValueError, match=r"'mine' is already registered by the same definition \(mine\.Mine\): the"):
        reg.add("mine", ns2["Mine"])
    with pytest.raises(ValueError, match=r"'mine' is already registered \(by <class 'mine.Mine'>\); names must be"):
        reg.add("mine", int)


def test_a_config_file_defining_its_own_policy_loads_twice_and_names_the_cause_once_changed(tmp_path):
    """The journey behind the test above: a config file that defines and registers its own policy ran in
    `experiments.simulate` (loaded once) but not in `experiments.sweep`, which loads the setup file per cell. A config
    file is now executed once per process while unchanged (as an import); a changed one runs again, and its second
    registration is refused, saying why."""
    from dualpath_jax.sim.configs_io import ConfigFileError, load_config

    path = tmp_path / "own_policy.py"
    path.write_text(
        textwrap.dedent(
            """
            import dataclasses
            import schedulers
            from configs.sim_tiny import get_config as _base


            @schedulers.POLICIES.register("fix13_in_config_file")
            class InConfigFile(schedulers.policies.BasicPolicy):
                pass


            def get_config(arg=None):
                return _base(arg)
            """
        )
    )
    try:
        load_config(f"{path}:fix13_in_config_file")
        assert load_config(f"{path}:fix13_in_config_file,agents=4").workload.n_agents == 4
        path.write_text(path.read_text() + "\n# changed\n")
        with pytest.raises(ConfigFileError, match=r"same definition .*module that registers it ran again"):
            load_config(f"{path}:fix13_in_config_file,agents=4")
    finally:
        POLICIES._entries.pop("fix13_in_config_file", None)


# ---------------------------------------------------------------------------------------------------- the runtime
def test_a_float_engine_id_fails_the_runtime_run_at_once_naming_the_policy(registered, base, ops, trajs):
    """What was wrong: a policy's float engine id passed the scheduler service's checks (`0.0 in engines`) and the run
    hung, its node logging "message to engine 0 failed: ... expected 'engine0.0'", until run_timeout_s (900 s in
    configs/tiny_runtime.py). Contract: the run fails at the policy's first fetch, naming the policy and the field."""
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.scheduler_service import RunFailed

    cfg = base.replace(**{"scheduler.name": "fix13_float_engine", "run_timeout_s": 30.0})
    with pytest.raises(RunFailed, match=r"policy 'fix13_float_engine' raised TypeError\(.*prefill_engine must be an"):
        driver.run(cfg, trajs, model_ops=ops)


@pytest.mark.slow  # (the same path, a user's policy and batcher against the reference: test_fix11_extend.py)
def test_a_users_policy_runs_in_the_runtime_with_its_config_and_the_reference_tokens(
    registered, base, ops, trajs, reference
):
    """The runtime side of the journey: the README-style policy (no __init__) with its own config field and a
    one-request batcher give the reference's greedy tokens (DESIGN.md: whatever the policy), every read on the side
    its config names, the result naming the policy."""
    from dualpath_jax.runtime import driver

    cfg = base.replace(
        **{
            "scheduler.name": "fix13_side_from_config",
            "scheduler.policy_kwargs": {"side": "pe"},
            "scheduler.batcher": "fix13_one_chunk",
        }
    )
    res = driver.run(cfg, trajs, model_ops=ops)
    assert res.policy == "fix13_side_from_config"
    assert {r.read_side for r in res.records} == {"pe"}
    assert len(res.records) == sum(len(t.turns) for t in trajs)
    bad = [k for k in reference if not np.array_equal(reference[k], res.tokens[k])]
    assert not bad, f"turns whose tokens differ from the reference: {bad}"


@pytest.mark.parametrize("bad", ["least,loaded", "side=pe", " padded", "padded\t"])
def test_a_policy_name_the_launchers_cannot_pass_is_refused_when_registered(bad):
    """What was wrong: any non-empty string registered, but `--config.policies`, `experiments.sweep --modes` and a
    config variant (`configs/sim_tiny.py:NAME,agents=4`) split on ',' and read 'key=value' items, and the launchers
    strip the names: "least,loaded" ran as the policies 'least' and 'loaded' ("unknown inter-engine policy 'least'"),
    "side=pe" as a variant item. Contract: POLICIES refuses such a name when it is registered, naming it; other
    registries (batchers, whose name is one field; models, transports) are unchanged."""
    with pytest.raises(ValueError, match=rf"inter-engine policy name {re.escape(repr(bad))} cannot be given to the"):
        POLICIES.register(bad)
    with pytest.raises(
        ValueError, match=r"cannot be given to the launchers: it holds one of ',' '=' or spaces at an end"
    ):
        POLICIES.add(bad, SideFromConfig)
    assert bad not in POLICIES
    other = Registry("thing")
    other.add(bad, 1)
    assert other.get(bad) == 1


def test_a_users_dualpath_variant_gets_this_clusters_alpha_beta_and_block_size_in_the_runtime():
    """The runtime filled α / β / block size for the built-in DualPath names only: a user's subclass of the DualPath
    policy ran with the paper's DS 660B thresholds and 64-token blocks beside `dualpath` with this cluster's. Now by the
    policy's Config fields, as the simulator does."""
    from dualpath_jax.runtime.config import RuntimeConfig
    from dualpath_jax.runtime.driver import policy_kwargs
    from schedulers.policies import DualPathPolicy

    class MyDualPath(DualPathPolicy):
        pass

    POLICIES.register("fix13_my_dualpath")(MyDualPath)
    try:
        cfg = RuntimeConfig().replace(**{"nics.snic_bytes_per_s": 4e6, "block_size": 8})
        want = policy_kwargs(cfg.replace(**{"scheduler.name": "dualpath"}), 1000, 300.0)
        assert want == {"alpha_tokens": 12000, "beta_tokens": 1500, "block_size": 8}
        assert policy_kwargs(cfg.replace(**{"scheduler.name": "fix13_my_dualpath"}), 1000, 300.0) == want
    finally:
        POLICIES._entries.pop("fix13_my_dualpath", None)


@pytest.mark.parametrize("name", ["fix13_a_batcher", "fix13_misspelt"])
def test_a_runtime_config_naming_a_class_that_is_no_policy_blames_the_name_not_the_kwargs(registered, name):
    """The runtime's config check put every TypeError of building the policy under `config.scheduler.policy_kwargs`,
    also a class that is no policy (no schedule(), or a batcher registered as one), with no kwargs given."""
    from dualpath_jax.runtime.config import ConfigError, RuntimeConfig, validate

    with pytest.raises(ConfigError, match=rf"^config\.scheduler\.name: '{name}' \("):
        validate(RuntimeConfig().replace(**{"scheduler.name": name}))
