"""Fix wave 20, "policyown": a researcher writes a scheduling policy of their own (a least-read-queue policy with its
own Config fields) and runs it in the simulator, a sweep and the runtime beside the built-in ones.

Walked for real from outside the package (see notes/fix20_policyown.md). What failed, each fixed here: a Config field
given a value of the wrong type (`policy.margin_tokens=1.5` for an `int`, `policy.prefer=5` for a `str`, `true` for a
`float`) ran with it silently, or failed inside schedule() at the first fetch; a policy's mistake in
`experiments.simulate` (it raised, placed a request twice, an unknown engine, ...) was a traceback through the event
loop; the simulator's table said `policy=dualpath` whatever its fields; a policy of one's own registered as `oracle`,
`layerwise` or `dualpath_rr` was never run by `:oracle` / `sweep --modes=oracle`, which ran the simulator's mode of
that name under it.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from typing import Literal

import pytest

from schedulers import POLICIES, Assignment, InterEnginePolicy
from schedulers.registry import SIM_MODE_NAMES, PolicyClassError, build_config, make_batcher, make_policy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------- a researcher's own policy
class LeastReadQueue(InterEnginePolicy):
    """Each request on the PE whose node has the shortest read queue; read on the DE side when the DE's node queue
    plus `margin_tokens` is shorter."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        margin_tokens: int = 0
        prefer: str = "de"
        slack: float = 1.0
        cap: int | None = None
        side: Literal["pe", "de"] = "de"
        flag: bool = False
        other: NoSuchName = None  # noqa: F821 - an annotation that does not resolve: not checked

    def schedule(self, snapshot, queue, fetching_node=None):
        s = snapshot.copy()
        pes, des = s.engines_of("prefill"), s.engines_of("decode")
        out = []
        for r in queue:
            fit = [d for d in des if d.free_hbm_tokens >= r.total_tokens]
            if not fit:
                break
            pe = min(pes, key=lambda e: (s.nodes[e.node_id].read_queue_tokens, e.tok))
            de = min(fit, key=lambda e: e.tok)
            q_pe, q_de = s.nodes[pe.node_id].read_queue_tokens, s.nodes[de.node_id].read_queue_tokens
            side = "de" if q_de + self.config.margin_tokens < q_pe else "pe"
            s.nodes[(de if side == "de" else pe).node_id].read_queue_tokens += r.hit_tokens
            pe.tok += r.prompt_tokens
            de.tok += r.total_tokens
            de.free_hbm_tokens -= r.total_tokens
            out.append(Assignment(r.request_id, pe.engine_id, de.engine_id, side, float(side == "de")))
        return out


@pytest.fixture(autouse=True, scope="module")
def registered():
    """Registered as a user's module would, taken out afterwards: other test modules enumerate the registries."""
    POLICIES.register("policyown_lrq")(LeastReadQueue)
    yield
    POLICIES._entries.pop("policyown_lrq", None)


# ------------------------------------------------------------------------- 1. a Config field of the wrong type
@pytest.mark.parametrize(
    "field, value, says",
    [
        ("margin_tokens", 1.5, "margin_tokens must be an int"),
        ("margin_tokens", "abc", "margin_tokens must be an int"),
        ("margin_tokens", True, "margin_tokens must be an int"),
        ("prefer", 5, "prefer must be a string"),
        ("slack", True, "slack must be a number"),
        ("slack", "fast", "slack must be a number"),
        ("cap", 2.5, "cap must be an int or None"),
        ("side", "both", "side must be one of 'pe', 'de'"),
        ("flag", "no", "flag must be a bool"),
    ],
)
def test_a_config_field_of_the_wrong_type_is_refused_naming_it(field, value, says):
    """`policy.margin_tokens=1.5` (or 'abc', true) for a field annotated `int` was taken: the run went on with a float
    where the policy counts tokens, or failed inside schedule() at its first fetch ("'>' not supported between
    instances of 'str' and 'int'"). Now the value is refused as the config is built, naming the policy and field."""
    with pytest.raises(TypeError, match=f"policyown_lrq {says}.*got {value!r}"):
        make_policy("policyown_lrq", **{field: value})


def test_values_that_fit_their_annotations_are_kept():
    """What the annotations allow still builds: an int for a float, None for `int | None`, a Literal's option, numpy
    ints, and any value for a field whose annotation does not resolve."""
    import numpy as np

    p = make_policy("policyown_lrq", margin_tokens=np.int64(3), slack=2, cap=None, side="pe", flag=True, other=[1])
    assert (p.config.margin_tokens, p.config.slack, p.config.cap, p.config.side, p.config.other) == (
        3,
        2,
        None,
        "pe",
        [1],
    )
    assert build_config(LeastReadQueue, "policyown_lrq", cap=7).cap == 7


def test_the_simulator_and_the_runtime_refuse_it_as_a_bad_config():
    """Both launchers' config checks go through build_config: one line naming the item, before anything runs."""
    from dualpath_jax.runtime.config import ConfigError, check_policy_run, parse_policy_list
    from dualpath_jax.sim import load_sim_config

    with pytest.raises(ValueError, match=r"policyown_lrq margin_tokens must be an int .*got 1\.5 \(float\)"):
        load_sim_config(f"{REPO}/configs/sim_tiny.py:policyown_lrq,policy.margin_tokens=1.5", as_run=True)
    (run,) = parse_policy_list("policyown_lrq,policy.prefer=5")
    with pytest.raises(ConfigError, match=r"policy\.prefer=5 of 'policyown_lrq': policyown_lrq prefer must be a str"):
        check_policy_run(run, {}, 16)


# ------------------------------------------------------------------------- 2. a policy's mistake in simulate
_RAISES = """
import dataclasses
from schedulers import POLICIES, InterEnginePolicy


@POLICIES.register("policyown_raises")
class Raises(InterEnginePolicy):
    @dataclasses.dataclass(frozen=True)
    class Config:
        pass

    def schedule(self, snapshot, queue, fetching_node=None):
        return 1 // 0  # line 13


@POLICIES.register("policyown_no_node")
class NoNode(Raises):
    def schedule(self, snapshot, queue):
        return []
"""


@pytest.mark.parametrize(
    "policy, last",
    [
        ("policyown_raises", "simulate: policy 'policyown_raises' raised ZeroDivisionError('integer division or modulo "
         "by zero') in schedule() at t=0 s (at {module}:13 in schedule); nothing written to {out}"),
        ("policyown_no_node", "bad config: 'policyown_no_node' (NoNode).schedule(snapshot, queue) cannot be called as "
         "schedule(snapshot, queue, fetching_node=None), as the simulator and the runtime call it: got an unexpected "
         "keyword argument 'fetching_node'"),
    ],
)  # fmt: skip
def test_simulate_names_a_policys_mistake_in_one_line(tmp_path, policy, last):
    """A policy that raised in `experiments.simulate` was a traceback through the event loop and runner, one whose
    schedule() the simulator cannot call the traceback of building it; now the last line names the policy, what is
    wrong and (raised) the file and line in the policy, and nothing is written."""
    (tmp_path / "po_mod.py").write_text(textwrap.dedent(_RAISES))
    (tmp_path / "po_cfg.py").write_text("import po_mod  # noqa\nfrom configs.sim_tiny import get_config  # noqa\n")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.simulate", f"--config=po_cfg.py:{policy},agents=2,turns=1"]
        + [f"--output_dir={out}", "--noplot", "--noprogress"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == last.format(module=tmp_path / "po_mod.py", out=out)
    assert not out.exists()


def test_policy_mistake_is_one_line_only_for_the_policys_errors():
    """The simulator's own checks of what a policy returned (RuntimeError / TypeError naming the policy) are one
    line; any other error keeps its traceback (None)."""
    from dualpath_jax.sim.runner import PolicyError
    from experiments.simulate import policy_mistake

    e = RuntimeError("policy 'mine' placed request 3 twice")
    assert policy_mistake(e, "mine") == "policy 'mine' placed request 3 twice"
    assert policy_mistake(RuntimeError("heap corrupted"), "mine") is None
    assert policy_mistake(RuntimeError("policy 'other' placed request 3 twice"), "mine") is None
    bad_batch = RuntimeError("batcher 'own' returned a bad item BatchItem(...): request listed twice")
    assert policy_mistake(bad_batch, "mine", "own") == str(bad_batch)
    assert policy_mistake(PolicyError("policy 'mine' changed the snapshot"), "mine") == (
        "policy 'mine' changed the snapshot"
    )


class BadSide(LeastReadQueue):
    """Writes the read side in capitals: the Assignment refuses it, inside schedule()."""

    def schedule(self, snapshot, queue, fetching_node=None):
        return [Assignment(r.request_id, 0, 1, "DE") for r in queue]  # the policy's own line


def test_a_policy_error_names_the_policys_own_line(tmp_path):
    """A bad Assignment raises in schedulers/api.py (or a dataclass's generated __init__): the line given is the
    deepest one of the policy's own code, not the framework's."""
    from dualpath_jax.sim.runner import CheckedPolicy, PolicyError
    from experiments.simulate import policy_mistake
    from schedulers import ClusterSnapshot, EngineState, NodeState, PendingRequest

    snap = ClusterSnapshot(
        0.0,
        {0: EngineState(0, "prefill", 0), 1: EngineState(1, "decode", 1, free_hbm_tokens=100)},
        {0: NodeState(0, "prefill"), 1: NodeState(1, "decode")},
    )
    policy = CheckedPolicy(BadSide(), "policyown_bad_side")
    with pytest.raises(PolicyError) as info:
        policy.schedule(snap, [PendingRequest(7, 0, 0, 10, 0, 1)])
    line = policy_mistake(info.value, "policyown_bad_side")
    assert "raised ValueError(\"read_side must be 'pe', 'de' or 'split', got 'DE'\")" in line
    at = f"(at {__file__}:{BadSide.schedule.__code__.co_firstlineno + 1} in "
    assert line.endswith((at + "schedule)", at + "<listcomp>)")), line  # (3.12 inlines the list comprehension)


def test_the_simulate_table_labels_the_policy_with_its_fields():
    """The table's setup line said `policy=dualpath` for every α: now `dualpath[alpha_tokens=500000]`, as the
    runtime's table labels a run."""
    from experiments.simulate import policy_label

    assert policy_label("dualpath", {}) == "dualpath"
    assert policy_label("mine", {"side": "pe", "margin": 5}) == "mine[margin=5,side=pe]"


# ------------------------------------------------------------------------- 3. a class the runners cannot call
class NoFetchingNode(LeastReadQueue):
    def schedule(self, snapshot, queue):  # (the runners pass fetching_node= by keyword)
        return []


class FormBatchOfNothing(LeastReadQueue):
    def form_batch(self):
        return []


def test_a_schedule_the_runners_cannot_call_is_refused_as_built(monkeypatch):
    """`def schedule(self, snapshot, queue)` was built and failed at the first fetch ("got an unexpected keyword
    argument 'fetching_node'", a traceback in the simulator blaming its runner's line); now a config error naming the
    policy and its signature. A PolicyClassError is a ValueError too: `sweep` and `simulate` say "bad config" / "bad
    sweep cell" in one line (it was the traceback of building the simulator)."""
    from schedulers import BATCHERS

    monkeypatch.setitem(POLICIES._entries, "policyown_no_fetching_node", NoFetchingNode)
    monkeypatch.setitem(BATCHERS._entries, "policyown_form_batch", FormBatchOfNothing)
    with pytest.raises(
        PolicyClassError, match=r"\.schedule\(snapshot, queue\) cannot be called as schedule\(snapshot, "
    ):
        make_policy("policyown_no_fetching_node")
    with pytest.raises(ValueError, match=r"form_batch\(\) cannot be called as form_batch\(queue\)"):
        make_batcher("policyown_form_batch")


# ------------------------------------------------------------------------- 4. a name the simulator's modes hold
@pytest.mark.parametrize("name", SIM_MODE_NAMES)
def test_a_policy_named_as_a_simulator_mode_is_refused(name):
    """`@POLICIES.register("oracle")` registered, but `configs/sim_tiny.py:oracle` (and `sweep --modes=oracle`) ran the
    simulator's oracle mode (DualPath with free I/O) under that name, never the policy: refused as it registers."""
    with pytest.raises(ValueError, match=f"name {name!r} is the simulator's mode {name!r}.*pick another name"):
        POLICIES.register(name)
    assert name not in POLICIES


def test_the_refused_names_are_the_simulators_modes():
    """Every simulator mode name is taken: a built-in policy's, or refused (the list follows sim.config.MODES)."""
    from dualpath_jax.sim.config import MODES

    assert set(SIM_MODE_NAMES) == set(MODES) - set(POLICIES.names())


# ------------------------------------------------------------------------- 5. a sweep of policies with fields of their own
def test_a_sweep_mode_takes_fields_of_its_own_joined_by_plus():
    """`sweep --modes=round_robin,dualpath,mine` could not give `mine` a field: --loads and --extra go to every mode
    (and a mode that does not take the field refuses the whole sweep). Now `mine+policy.margin_tokens=1000` is a mode
    with its own items, as `experiments.capacity --modes` reads it; the cell runs that policy with that field."""
    from dualpath_jax.sim import load_sim_config
    from experiments.sweep import cell_spec

    spec = cell_spec(f"{REPO}/configs/sim_tiny.py", "policyown_lrq+policy.margin_tokens=1000", "agents=2", "turns=1")
    assert spec == f"{REPO}/configs/sim_tiny.py:policyown_lrq,policy.margin_tokens=1000,agents=2,turns=1"
    sc = load_sim_config(spec, as_run=True)
    assert (sc.policy, sc.policy_kwargs, sc.workload.n_agents) == ("policyown_lrq", {"margin_tokens": 1000}, 2)
    assert cell_spec("s.py", "dualpath", "", "cluster.snic_gbps=1e+2") == "s.py:dualpath,cluster.snic_gbps=1e+2"


def test_a_sweep_mode_that_is_a_bare_field_is_refused():
    """`--modes=dualpath,policy.alpha_tokens=500000` (the runtime's `--config.policies` syntax) ran a second "mode"
    named `policy.alpha_tokens=500000`: the setup's default policy with that field, whichever mode it was meant for.
    Now a flag error saying to join it with '+'."""
    from absl import flags

    from experiments.sweep import _check_modes

    assert _check_modes(["dualpath", "dualpath+policy.alpha_tokens=5", "mine+policy.x=+inf"])
    with pytest.raises(flags.ValidationError, match=r"'policy.alpha_tokens=5' is a variant item.*\(dualpath\+policy"):
        _check_modes(["dualpath", "policy.alpha_tokens=5"])
