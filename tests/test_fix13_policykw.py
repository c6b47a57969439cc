"""Fix wave 13, area `policykw`: a researcher compares a policy of their own, with its own config fields, against the
built-in ones in one `python -m experiments.run` (`--config.policies=basic,dualpath,policy.alpha_tokens=N,mine,
policy.side=pe`: a `policy.NAME=value` item sets a field of the policy named before it, as the simulator's config
variant items do).

What was wrong (`experiments/run.py`): `config.runtime.scheduler.policy_kwargs` went to every policy of
`config.policies`, so `basic,mine` failed with "'basic' does not take ['side']"; the base config was checked against
`config.runtime.scheduler.name` (`dualpath`) even where the list did not run it ("'dualpath' does not take ['side']"
with `--config.policies=mine`); `--config.runtime.scheduler.policy_kwargs.side=pe` is a "bad override" (the mapping
is empty); an unknown name of the list was reported as `config.scheduler.name`, a field the user did not set; the
results did not say which fields each policy ran with.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest

from schedulers import POLICIES, Assignment, InterEnginePolicy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------- a researcher's policy with its own field
class ReadsOnItsSide(InterEnginePolicy):
    """Least-loaded PE, the DE with the most free HBM, every read on the side its config names."""

    @dataclasses.dataclass
    class Config:
        side: str = "de"

        def __post_init__(self):
            if self.side not in ("pe", "de"):
                raise ValueError(f"fix13pk_side side must be 'pe' or 'de', got {self.side!r}")

    def schedule(self, snapshot, queue, fetching_node=None):
        snap = snapshot.copy()
        pes, des = snap.engines_of("prefill"), snap.engines_of("decode")
        out = []
        for r in queue:
            pe = min(pes, key=lambda e: e.tok)
            de = max(des, key=lambda e: e.free_hbm_tokens)
            need = r.prompt_tokens + r.gen_tokens
            if de.free_hbm_tokens < need:
                break
            pe.tok += r.prompt_tokens
            de.tok += need
            de.free_hbm_tokens -= need
            side = self.config.side
            out.append(Assignment(r.request_id, pe.engine_id, de.engine_id, side, 1.0 if side == "de" else 0.0))
        return out


@pytest.fixture
def registered():
    POLICIES.register("fix13pk_side")(ReadsOnItsSide)
    try:
        yield
    finally:
        POLICIES._entries.pop("fix13pk_side", None)


def job_config(policies: str, **scheduler):
    """configs/tiny_runtime.py:test with `config.policies` and `config.runtime.scheduler.*` set."""
    from configs.tiny_runtime import get_config

    c = get_config("test")
    c.policies = policies
    for k, v in scheduler.items():
        c.runtime.scheduler[k] = v
    return c


def runs_of(config, overrides=None):
    from experiments.run import policy_configs

    return policy_configs(config, overrides or {})


# ------------------------------------------------------------------------------------- the list and its items
def test_each_policy_of_the_list_runs_with_its_own_fields(registered):
    """Contract: `policy.NAME=value` items set a field of the policy named before them, only for that policy (values
    read as the simulator's variant values: ints, floats, true/false, None and strings); the others run with
    `config.runtime.scheduler.policy_kwargs` alone (here none). Before: "'basic' does not take [...]"."""
    runs = runs_of(
        job_config("basic, dualpath,policy.alpha_tokens=500000,policy.z_slack=1.2 ,fix13pk_side,policy.side=pe")
    )
    assert list(runs) == ["basic", "dualpath", "fix13pk_side"]
    assert {p: r.scheduler.name for p, r in runs.items()} == {p: p for p in runs}
    assert {p: dict(r.scheduler.policy_kwargs) for p, r in runs.items()} == {
        "basic": {},
        "dualpath": {"alpha_tokens": 500000, "z_slack": 1.2},
        "fix13pk_side": {"side": "pe"},
    }
    assert runs_of(job_config("basic,policy.max_pe_tokens=None"))["basic"].scheduler.policy_kwargs == {
        "max_pe_tokens": None
    }


def test_one_policy_runs_twice_with_fields_of_its_own_each_time(registered):
    """An ablation in one run: `dualpath,dualpath,policy.alpha_tokens=500000` compares dualpath at its α with dualpath
    at another, each run labelled by its own fields (results.json keys, the table, turns_<label>.json with a file-safe
    label). Before: "names a policy twice"."""
    from dualpath_jax.runtime.config import file_label, parse_policy_list

    runs = runs_of(job_config("dualpath,dualpath,policy.alpha_tokens=500000,policy.z_slack=1.2,basic"))
    assert list(runs) == ["dualpath", "dualpath[alpha_tokens=500000,z_slack=1.2]", "basic"]
    assert [r.scheduler.name for r in runs.values()] == ["dualpath", "dualpath", "basic"]
    assert [dict(r.scheduler.policy_kwargs) for r in runs.values()] == [
        {},
        {"alpha_tokens": 500000, "z_slack": 1.2},
        {},
    ]
    assert [file_label(p) for p in runs] == ["dualpath", "dualpath.alpha_tokens=500000.z_slack=1.2", "basic"]
    (odd,) = parse_policy_list("fix13pk_side,policy.side=a/b c")  # (once: labelled by its name alone)
    assert odd.label == odd.file_label == "fix13pk_side"
    a, b = parse_policy_list("fix13pk_side,policy.side=a/b c,fix13pk_side")
    assert (a.label, a.file_label, b.label) == ("fix13pk_side[side=a/b c]", "fix13pk_side.side=a_b_c", "fix13pk_side")


def test_the_shared_policy_kwargs_still_go_to_every_policy_and_an_own_field_wins(registered):
    """Backward compatible: `config.runtime.scheduler.policy_kwargs` is given to every policy of the list, as before
    (a one-policy run, or policies that all take the fields); a policy's own item wins over it for that policy."""
    shared = {"alpha_tokens": 1000}
    runs = runs_of(job_config("dualpath,split,policy.alpha_tokens=2000", policy_kwargs=shared))
    assert dict(runs["dualpath"].scheduler.policy_kwargs) == {"alpha_tokens": 1000}
    assert dict(runs["split"].scheduler.policy_kwargs) == {"alpha_tokens": 2000}
    one = runs_of(job_config("fix13pk_side", policy_kwargs={"side": "pe"}))
    assert dict(one["fix13pk_side"].scheduler.policy_kwargs) == {"side": "pe"}


def test_the_run_is_checked_against_the_policies_it_runs_not_the_scheduler_name(registered):
    """`config.runtime.scheduler.name` (`dualpath` in the shipped config) was checked with the shared fields even when
    the list did not run it: `policy_kwargs={'side': 'pe'}` with `--config.policies=fix13pk_side` failed with
    "'dualpath' does not take ['side']". Contract: only the policies of the list are checked."""
    from dualpath_jax.runtime.config import ConfigError, validate

    c = job_config("fix13pk_side", policy_kwargs={"side": "pe"})
    assert c.runtime.scheduler.name == "dualpath"
    (run,) = runs_of(c).values()
    validate(run)  # (the check `driver.prepare` makes of each run)
    with pytest.raises(ConfigError, match=r"'dualpath' does not take \['side'\]"):
        validate(run.replace(**{"scheduler.name": "dualpath"}))


@pytest.mark.parametrize(
    "policies, shared, line",
    [
        (
            "basic,fix13pk_side,policy.sid=pe",
            {},
            "--config.policies item policy.sid=pe of 'fix13pk_side': 'fix13pk_side' does not take ['sid']; its config "
            "fields are: ['side']",
        ),
        (
            "basic,policy.side=pe,fix13pk_side",
            {},
            "--config.policies item policy.side=pe of 'basic': 'basic' does not take ['side']; its config fields "
            "are: ['max_pe_tokens']",
        ),
        (
            "fix13pk_side,policy.side=xx",
            {},
            "--config.policies item policy.side=xx of 'fix13pk_side': fix13pk_side side must be 'pe' or 'de', got 'xx'",
        ),
        (
            "basic,fix13pk_side",
            {"side": "pe"},
            "config.runtime.scheduler.policy_kwargs {'side': 'pe'} goes to every policy of --config.policies: "
            "'basic' does not take ['side']; its config fields are: ['max_pe_tokens'] (give a policy's own fields "
            "as items after its name: --config.policies=...,NAME,policy.FIELD=value)",
        ),
        (  # (the shared value is refused, not the policy's own item: blamed on the shared mapping, 2026-12-05)
            "dualpath,policy.alpha_tokens=500000",
            {"z_slack": -1.0},
            "config.runtime.scheduler.policy_kwargs: dualpath z_slack must be >= 1 and finite, got -1.0 (float)",
        ),
        (
            "dualpath,policy.z_slack=0.5",
            {"alpha_tokens": 500000},
            "--config.policies item policy.z_slack=0.5 of 'dualpath': dualpath z_slack must be >= 1 and finite, got "
            "0.5 (float)",
        ),
        (
            "basic,dualpth",
            {},
            "--config.policies: unknown inter-engine policy 'dualpth' (did you "
            "mean 'dualpath'?); known: basic, de_only, dualpath, fix13pk_side, pe_only, random, round_robin, split "
            "(a policy of one's own: register it in a module that your --config file imports; README \"A policy of "
            "one's own\")",
        ),
        (
            "split,policy.block_size=64",
            {},
            "--config.policies item policy.block_size=64 of 'split': block_size 64 differs from "
            "config.runtime.block_size=16, the size of the blocks the runtime stores and reads: leave it out (it "
            "defaults to config.runtime.block_size)",
        ),
    ],
    ids=[
        "own-unknown-field",
        "field-after-the-wrong-policy",
        "own-bad-value",
        "shared-field",
        "shared-bad-value-beside-own-items",
        "own-bad-value-beside-shared",
        "unknown-name",
        "block",
    ],
)
def test_a_field_a_policy_does_not_take_names_the_policy_and_the_item(registered, policies, shared, line):
    """Contract: one error naming the policy, the item (or the shared mapping) and the field; an unknown name of the
    list is named as an item of `--config.policies` (it was `config.scheduler.name`, which the user did not set)."""
    from dualpath_jax.runtime.config import ConfigError

    with pytest.raises(ConfigError) as e:
        runs_of(job_config(policies, policy_kwargs=shared))
    assert str(e.value) == line


@pytest.mark.parametrize(
    "policies, line",
    [
        (
            "policy.side=pe,basic",
            "--config.policies item 'policy.side=pe' comes before any policy name: a policy's field follows its name "
            "(e.g. basic,mine,policy.side=pe)",
        ),
        (
            "fix13pk_side,policy.side=pe,policy.side=de",
            "--config.policies: two values for fix13pk_side's policy.side, 'pe' and 'de'; give one",
        ),
        (
            "basic,fix13pk_side.side=pe",
            "--config.policies item 'fix13pk_side.side=pe': an item is a registered policy name, policy.NAME=value "
            "(a field of the policy named before it, e.g. basic,mine,policy.side=pe) or layerwise=false (its run's "
            "prefill)",
        ),
        (
            "basic,policy.side",
            "--config.policies item 'policy.side' has no value: a field is given as policy.NAME=value",
        ),
        (
            "basic,batcher.token_budget=8",
            "--config.policies item 'batcher.token_budget=8': every policy of the run has the one batcher of "
            "config.runtime.scheduler.batcher; its fields are config.runtime.scheduler.batcher_kwargs (e.g. "
            "--config.runtime.scheduler.batcher_kwargs=\"{'token_budget': 8}\")",
        ),
        (
            "fix13pk_side,policy.side=pe,fix13pk_side,policy.side=pe",
            "--config.policies runs 'fix13pk_side' twice with the same fields (policy.side=pe): "
            "fix13pk_side[side=pe],fix13pk_side[side=pe]; give each run of a policy its own policy.NAME=value items",
        ),
        (" , ", "--config.policies is empty"),
    ],
    ids=["field-first", "field-twice", "dotted-name", "no-value", "batcher-field", "name-twice", "empty"],
)
def test_a_bad_item_of_the_list_is_one_error_naming_it(registered, policies, line):
    from dualpath_jax.runtime.config import ConfigError

    with pytest.raises(ConfigError) as e:
        runs_of(job_config(policies))
    assert str(e.value) == line


def test_a_scheduler_name_override_that_no_run_uses_is_refused():
    """`--config.runtime.scheduler.name=X` is not what `experiments.run` runs (the list is): one it did not run was
    silently ignored. Contract: refused, naming the list; one the list runs is harmless and taken."""
    from dualpath_jax.runtime.config import ConfigError

    with pytest.raises(ConfigError, match=r"^--config.runtime.scheduler.name=random is not run: experiments.run runs"):
        runs_of(job_config("basic,dualpath"), {"runtime.scheduler.name": "random"})
    assert list(runs_of(job_config("basic,dualpath"), {"runtime.scheduler.name": "basic"})) == ["basic", "dualpath"]


# --------------------------------------------------------------------------------------- the launcher end to end
_CONFIG_FILE = """
import dataclasses

import schedulers
from configs.tiny_runtime import get_config  # noqa: F401
from schedulers import Assignment, InterEnginePolicy


@schedulers.POLICIES.register("fix13pk_side")
{source}
"""


def test_the_launcher_compares_policies_each_with_its_own_fields_and_names_them_in_the_results(tmp_path):
    """The journey end to end: a config file registering the researcher's policy, `basic`, `dualpath` with its own α
    and the policy with its own `side`, in one `experiments.run` (the small in-process variant). Contract: it runs,
    every read of the researcher's policy is on the side its item names, and `results.json`, `turns_<policy>.json` and
    the table name each policy's given fields (results.json also every field it ran with)."""
    import inspect

    source = textwrap.dedent(inspect.getsource(ReadsOnItsSide))
    (tmp_path / "mine.py").write_text(_CONFIG_FILE.format(source=source))
    results = tmp_path / "results"
    out = subprocess.run(
        [
            sys.executable, "-m", "experiments.run", f"--config={tmp_path / 'mine.py'}:test",
            "--config.policies=basic,dualpath,policy.alpha_tokens=123456,fix13pk_side,policy.side=pe,"
            "fix13pk_side,policy.side=de",
            "--config.runtime.workload.agents=2", "--config.runtime.workload.turns=2", f"--config.results_dir={results}",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=170,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = results.iterdir()
    summary = json.loads((run_dir / "results.json").read_text())
    # (one policy twice, each run with its own side: labelled by its fields, 2026-12-05; it was refused)
    mine_pe, mine_de = "fix13pk_side[side=pe]", "fix13pk_side[side=de]"
    assert summary["policy_kwargs"] == {
        "basic": {},
        "dualpath": {"alpha_tokens": 123456},
        mine_pe: {"side": "pe"},
        mine_de: {"side": "de"},
    }
    assert summary["policy_config"][mine_pe] == {"side": "pe"}
    assert summary["policy_config"]["basic"] == {"max_pe_tokens": None}
    dp = summary["policy_config"]["dualpath"]
    assert dp["alpha_tokens"] == 123456 and dp["block_size"] == 16 and dp["beta_tokens"] > 0  # (β from this cluster)
    for side, label in (("pe", mine_pe), ("de", mine_de)):
        turns = json.loads((run_dir / f"turns_fix13pk_side.side={side}.json").read_text())
        assert (
            turns["policy"] == "fix13pk_side" and turns["label"] == label and turns["policy_kwargs"] == {"side": side}
        )
        assert {t["read_side"] for t in turns["turns"]} == {side}
    assert summary["results"][mine_pe]["de_read_bytes"] == 0 < summary["results"][mine_de]["de_read_bytes"]
    assert len(set(summary["greedy_tokens"]["sha256"].values())) == 1  # the same tokens whatever the side
    assert f"policy fields: dualpath alpha_tokens=123456; {mine_pe} side='pe'; {mine_de} side='de'" in out.stdout
    assert "policy fields: dualpath alpha_tokens=123456" in (run_dir / "table.txt").read_text()
