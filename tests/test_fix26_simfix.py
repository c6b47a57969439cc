"""fix26 (simulator audits): basic prefill refuses a policy that may read on the DE side (the simulator read its hits
on the PE side, silently); `collective_bytes_per_token` moves its bytes over the batch's whole compute and says when
the high class cannot carry them; a run of no turn is refused; the runtime says where an unprofiled β came from."""

import dataclasses
import logging

import pytest

from dualpath_jax.sim import MODES, load_sim_config, run
from dualpath_jax.sim.config import SimConfigError, validate_sim_config
from dualpath_jax.workloads.types import Trajectory, Turn

TINY = "configs/sim_tiny.py"


def _with(cfg, **cluster):
    return dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, **cluster))


# ---- basic prefill (layerwise off) and the read side ----------------------------------------------------------------
@pytest.mark.parametrize("item", ["de_only", "split", "dualpath_policy", "round_robin"])
def test_basic_prefill_refuses_a_policy_that_may_read_on_the_de_side(item):
    """`:de_only` with `cluster.layerwise=false` ran de_only with every hit read on the PE side, silently (the runtime
    refuses it: runtime.config.check_layerwise_reads). The file's own policy (dualpath, no mode) too."""
    spec = TINY if item == "dualpath_policy" else f"{TINY}:{item}"
    name = "dualpath" if item == "dualpath_policy" else item
    want = rf"config\.cluster\.layerwise=False \(basic prefill.*policy '{name}' may read on the DE side"
    with pytest.raises(SimConfigError, match=want):
        load_sim_config(spec, {"cluster.layerwise": False})
    built = _with(load_sim_config(spec), layerwise=False)  # a SimConfig changed in code: run() checks it too
    with pytest.raises(SimConfigError, match=want):
        run(built, [Trajectory(0, [Turn(640, 2)])])


@pytest.mark.parametrize(
    "spec",
    [f"{TINY}:{m}" for m in MODES]  # the modes set layerwise themselves (basic: off, with the basic policy)
    + [f"{TINY}:pe_only", f"{TINY}:round_robin,policy.read_side=pe"],
)
def test_the_modes_and_pe_side_policies_still_run_basic_prefill(spec):
    sc = load_sim_config(spec, {"cluster.layerwise": False})  # (a mode keeps its own layerwise, with a warning)
    validate_sim_config(sc)
    assert sc.cluster.layerwise == MODES.get(spec.split(":")[1], {}).get("layerwise", False)


# ---- collectives (the high class) -----------------------------------------------------------------------------------
def _collective_run(coll: float):
    cfg = _with(load_sim_config(f"{TINY}:dualpath,agents=4,turns=2"), collective_bytes_per_token=coll, cnic_gbps=5.0)
    return run(cfg)


def test_collectives_move_their_bytes_over_the_batchs_whole_compute(caplog):
    """The high load was tokens x coll / compute, held until compute + compute/L: (1 + 1/L) x the configured bytes."""
    coll = 1e5
    with caplog.at_level(logging.WARNING):
        res = _collective_run(coll)
    demanded = sum(r.prompt_tokens - r.hit_tokens for r in res.records) * coll
    for side in ("out", "in"):
        moved = sum(s.nbytes for s in res.links if s.link.endswith(f"/{side}/high"))
        assert moved == pytest.approx(demanded, rel=1e-6), side
    assert "collectives are cut" not in caplog.text  # (within what the high class gets)


def test_collectives_beyond_the_high_class_are_said_cut_once_per_run(caplog):
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            res = _collective_run(1e9)
    said = [r.getMessage() for r in caplog.records if "collectives are cut" in r.getMessage()]
    assert len(said) == 2, said  # one per run, not one per batch
    assert "collective_bytes_per_token = 1e+09" in said[0] and "high_share x cnic_gbps = 4.95 GB/s" in said[0]
    demanded = sum(r.prompt_tokens - r.hit_tokens for r in res.records) * 1e9
    assert sum(s.nbytes for s in res.links if s.link.endswith("/out/high")) < 0.01 * demanded


# ---- no turns -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trajectories", [[], [Trajectory(0, []), Trajectory(1, [])]], ids=["none", "no_turns"])
def test_a_run_of_no_turn_is_refused(trajectories):
    """`run(cfg, [])` gave a JCT of NaN and no error."""
    with pytest.raises(ValueError, match=r"nothing to simulate: \d trajectories given, none with a turn"):
        run(load_sim_config(TINY), trajectories)


# ---- the runtime's β without a profile ------------------------------------------------------------------------------
def test_an_unprofiled_beta_says_where_it_came_from_once(caplog, monkeypatch):
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.config import RuntimeConfig

    monkeypatch.setattr(driver, "_BETA_ASSUMED_SAID", set(), raising=False)
    cfg = RuntimeConfig().replace(**{"scheduler.name": "dualpath"})
    with caplog.at_level(logging.INFO, logger=driver.__name__):
        assert driver.policy_kwargs(cfg, 1000, 300.0)["beta_tokens"] == 1500  # profiled: nothing said
        given = cfg.replace(**{"scheduler.policy_kwargs": {"beta_tokens": 7}})
        assert driver.policy_kwargs(given, 1000)["beta_tokens"] == 7  # given: nothing said
        assert caplog.text == ""
        for _ in range(2):
            assert driver.policy_kwargs(cfg, 1000)["beta_tokens"] == 100_000
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1, said
    assert said[0].startswith("β not profiled (calibrate=False): 100,000 tokens, 20,000 tokens/s assumed")
