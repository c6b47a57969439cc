"""Tests that kill hand mutations of the schedulers the rest of the suite let pass (mutation audit 3, area "sched":
schedulers/policies.py, api.py, cost_model.py, hardware.py, batching.py, pd_bounds.py, calibrate.py). Each test names
the mutation of the code it guards against, e.g. "Algorithm 1's fallback `m < best_long` flipped to `m > best_long`",
and the contract it holds (PAPER.md "Scheduler", "Intra-engine", "Bottleneck-free P/D range"). Unit-level and
deterministic: hand-built snapshots with one right decision, small cost-model numbers worked out by hand."""

from __future__ import annotations

import pytest
from test_schedulers_policies import ALPHA, BETA, req, snapshot  # the policy tests' snapshot builders

from schedulers import make_policy

ONE_DE = {10: (0, [{"id": 100}])}


def dualpath(name="dualpath", **kw):
    kw.setdefault("alpha_tokens", ALPHA)
    kw.setdefault("beta_tokens", BETA)
    return make_policy(name, **kw)


def placed(out):
    return [(a.request_id, a.prefill_engine, a.decode_engine, a.read_side) for a in out]


# ---- DualPath: Algorithm 1 (PE) ---------------------------------------------------------------------------------


def test_when_every_node_reads_past_alpha_the_least_loaded_pe_of_them_wins():
    """`_choose_pe`: among nodes with read_q > α (Algorithm 1's fallback class) `m < best_long` flipped to
    `m > best_long`. PAPER.md Algorithm 1: no node has read_q <= α, so the PE with the lowest tok_e (<= β) on the
    other nodes is chosen, whatever node it sits on (the existing test had a single long-queue node)."""
    snap = snapshot(
        {
            0: (ALPHA + 1, [{"id": 0, "tok": 500}]),
            1: (ALPHA + 5, [{"id": 1, "tok": 100}]),
            2: (ALPHA + 9, [{"id": 2, "tok": 300}]),
        },
        {10: (0, [{"id": 100}])},
    )
    out = dualpath().schedule(snap, [req(i, hit=0) for i in range(3)])
    # 100 -> e1 (1100), then e2 (300 -> 1300), then e0 (500 -> 1500)
    assert [a.prefill_engine for a in out] == [1, 2, 0]


# ---- DualPath: DE phases --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["round_robin", "random"])
def test_round_robin_and_random_admit_a_request_that_exactly_fits_a_des_free_hbm(name):
    """round_robin's and random's room test `s.free[cand] >= r.total_tokens` changed to `>` (test_mutation_audit.py
    checks basic and dualpath only). A request is admitted when len_r = prompt + gen fits the DE's free HBM
    (policies.py docstring): exactly fitting is fitting."""
    snap = snapshot({0: (0, [{"id": 0}])}, {10: (0, [{"id": 100, "free": 1100}])})
    out = make_policy(name).schedule(snap, [req(0, prompt=1000, gen=100), req(1, prompt=1, hit=0, gen=0)])
    assert [(a.request_id, a.decode_engine) for a in out] == [(0, 100)]  # then full: r1 waits


@pytest.mark.parametrize("loads", [int, float], ids=["packed-int-loop", "tuple-loop"])
def test_a_groups_r_is_the_prefix_that_fits_so_z_ignores_later_requests(loads):
    """DE phase 1's closing loops (`_phase1_ints`: `is_open[i] = False` dropped; the float-load tuple loop:
    `open_groups.discard(gid)` dropped). PAPER.md: R of a group is the prefix of its queue that fits its free HBM:
    once a request does not fit, the group's R is closed, and a later smaller request does not join it. R sets Z
    (= slack·(Σ_R len_r + Σ tok_e)/|E|), so a reopened R (r0 + r2 = 1900 <= 2000) raised Z from 210 to 1155 and
    put r0 on the DE with fewer seq but more tokens. A second group stays open, so the loop goes on past r1."""
    des = {
        10: (
            0,
            [
                {"id": 100, "tok": loads(300), "seq": 0, "free": 1000},
                {"id": 101, "tok": loads(0), "seq": 5, "free": 1000},
            ],
        ),
        11: (0, [{"id": 110, "tok": loads(100_000)}]),  # stays open (and never the least loaded)
    }
    snap = snapshot({0: (0, [{"id": 0}])}, des)
    queue = [req(0, prompt=100, hit=0, gen=0), req(1, prompt=5000, hit=0, gen=0), req(2, prompt=1800, hit=0, gen=0)]
    # R = [r0] (r1 overflows 2000): Z = 1.05 * (100 + 300) / 2 = 210; only d101 (0 + 100) is within Z
    out = dualpath().schedule(snap, queue)
    assert placed(out) == [(0, 0, 101, "pe")]  # r1 fits no DE: the fetch stops there


@pytest.mark.parametrize("loads", [int, float], ids=["packed-int-loop", "tuple-loop"])
def test_after_every_groups_r_closed_later_requests_still_go_to_the_least_loaded_group(loads):
    """DE phase 1 past the point where every group's R closed (`assign_group`: `k + (lens[i] << shift)` changed to
    `k`, the group's load not raised). PAPER.md: each request goes to the group with the smallest Σ tok_e, its len_r
    added, for the whole queue. Here each group's free HBM sums to 500 (one DE over-committed to -9,500), so r0 and
    r1 close both R at once; r2 and r3 must still alternate (loads 1000/1100, then 2000/1100): without the
    increment every later request piled onto group 10."""
    des = {
        10: (0, [{"id": 100, "tok": loads(0), "free": 10_000}, {"id": 101, "tok": loads(0), "free": -9_500}]),
        11: (0, [{"id": 110, "tok": loads(0), "free": 10_000}, {"id": 111, "tok": loads(100), "free": -9_500}]),
    }
    snap = snapshot({0: (0, [{"id": 0, "tok": loads(0)}])}, des)
    out = dualpath().schedule(snap, [req(i, prompt=1000, hit=0, gen=0) for i in range(4)])
    assert [a.decode_engine for a in out] == [100, 110, 100, 110]


# ---- every policy's scratch loads (`_Scratch.commit`) -------------------------------------------------------------


@pytest.mark.parametrize("name", ["dualpath", "basic", "round_robin", "random"])
def test_a_placed_request_takes_its_whole_len_r_from_the_des_free_hbm(name):
    """`_Scratch.commit`: `free[de] -= r.total_tokens` changed to `-= r.prompt_tokens`. Later decisions of the same
    fetch see earlier ones (policies.py docstring), and a DE holds len_r = prompt + gen by the end of decode: after
    a 1,500-token request a DE of 2,500 free has 1,000 left, too little for the next (with the prompt only, 1,500
    were left and it took it: over-filled HBM). Deterministic (only the randomized invariants test caught it)."""
    snap = snapshot({0: (0, [{"id": 0}])}, {10: (0, [{"id": 100, "free": 2500}])})
    pol = dualpath() if name == "dualpath" else make_policy(name)
    out = pol.schedule(snap, [req(i, prompt=1000, hit=0, gen=500) for i in range(2)])
    assert [(a.request_id, a.decode_engine) for a in out] == [(0, 100)]


def test_a_de_side_read_lengthens_only_the_de_nodes_read_queue():
    """`_Scratch.commit`: the PE node's read queue `+= r.hit_tokens - de_hit` changed to `+= r.hit_tokens` (a DE-side
    read also charged to the PE node). PAPER.md: the read side is the node with the shorter read queue, and the
    queue a read joins is its own side's. r0 reads on the DE side (0 < 500): DE node 900, PE node still 500, so r1
    reads on the PE side (with both charged, 900 < 1400 sent it to the DE side too)."""
    snap = snapshot({0: (500, [{"id": 0}])}, {10: (0, [{"id": 100}])})
    out = dualpath(alpha_tokens=10**9).schedule(snap, [req(0), req(1)])
    assert [a.read_side for a in out] == ["de", "pe"]


def test_a_placement_raises_the_des_seq_for_the_next_phase_2_choice():
    """`_Scratch.commit`: `seq[de] += 1` dropped. DE phase 2 prefers, within Z, the DE with the fewest seq_e
    (PAPER.md), counting what this fetch placed: Z = 1.05·(400 + 150)/2 = 288.75; r0 goes to d100 (seq 0, tok 0),
    then r1 to d101 (seq 0 beats d100's 1), then back to d100, which holds the lowest tok once neither is under Z.
    Without the seq update r1 went to d100 again (seq 0, tok 100 < 150)."""
    des = {10: (0, [{"id": 100, "tok": 0}, {"id": 101, "tok": 150}])}
    snap = snapshot({0: (0, [{"id": 0}])}, des)
    out = dualpath().schedule(snap, [req(i, prompt=100, hit=0, gen=0) for i in range(4)])
    assert [a.decode_engine for a in out] == [100, 101, 100, 100]


# ---- basic, random, split, DualPathConfig -----------------------------------------------------------------------


def test_basic_gives_work_to_a_pe_at_exactly_its_cap_and_keeps_a_de_it_skipped():
    """`BasicPolicy.schedule`: the cap test `pe_heap[0][0] > cap` changed to `>=`, and the DEs skipped for lack of
    room not pushed back on the heap. A PE with tok_e = max_pe_tokens still takes work (PEs *above* the cap get
    nothing); a DE too small for one request is still the least-loaded candidate for the next, smaller one."""
    snap = snapshot({0: (0, [{"id": 0, "tok": 1000}])}, ONE_DE)
    out = make_policy("basic", max_pe_tokens=1000).schedule(snap, [req(0), req(1)])
    assert [a.request_id for a in out] == [0]  # then tok 2000 > 1000: the fetch stops
    des = {10: (0, [{"id": 100, "tok": 0, "free": 500}, {"id": 101, "tok": 100}])}
    out = make_policy("basic").schedule(
        snapshot({0: (0, [{"id": 0}])}, des), [req(0), req(1, prompt=200, hit=0, gen=0)]
    )
    assert [(a.request_id, a.decode_engine) for a in out] == [(0, 101), (1, 100)]


def test_random_draws_both_read_sides():
    """`RandomPolicy.schedule`: the read side drawn with `rng.choice(("pe", "de"))` replaced by "pe". Its docstring:
    uniformly random PE, DE and read side; seeded, so the draw is the same every run."""
    snap = snapshot({0: (0, [{"id": 0}, {"id": 1}])}, {10: (0, [{"id": 100}, {"id": 101}])})
    out = make_policy("random", seed=5).schedule(snap, [req(i) for i in range(40)])
    sides = [a.read_side for a in out]
    assert len(out) == 40 and 10 <= sides.count("de") <= 30
    assert all(a.de_read_fraction == (1.0 if a.read_side == "de" else 0.0) for a in out)


def test_split_rounds_a_partial_last_block_up_when_counting_the_hit_blocks():
    """`SplitPolicy._read_side`: the hit's block count `-(-h // bs)` (ceil) changed to `h // bs` (floor). 1,000 hit
    tokens are 16 blocks of 64 (the last one partial); a PE queue 920 tokens longer gives x = round((920 + 1000) /
    128) = 15 blocks on the DE side: a split of 960/1000, not every block (with 15 blocks counted, all went
    DE-side)."""
    snap = snapshot({0: (920, [{"id": 0}])}, {10: (0, [{"id": 100}])})
    (a,) = dualpath("split").schedule(snap, [req(0, prompt=1100, hit=1000)])
    assert (a.read_side, a.de_read_fraction) == ("split", 0.96)


def test_split_places_a_request_without_a_hit_as_dualpath_does():
    """`SplitPolicy._read_side`: a request with no hit tokens handed to DualPath's rule (`super()._read_side`)
    replaced by a fixed "pe". With nothing to split, split is DualPath: the read side is the shorter queue's (here the
    DE node's), so its decisions match dualpath's on a cold request."""
    snap = snapshot({0: (500, [{"id": 0}])}, {10: (0, [{"id": 100}])})
    queue = [req(0, prompt=800, hit=0)]
    (a,) = dualpath("split").schedule(snap, queue)
    assert (a.read_side, a.de_read_fraction) == ("de", 1.0)
    assert placed([a]) == placed(dualpath().schedule(snap, queue))


def test_a_zero_beta_takes_the_paper_default_and_keeps_the_alpha_given():
    """`DualPathConfig.__post_init__`: `alpha_tokens or default` changed to the default whenever α or β is 0. A 0
    (the default) means "derive from the paper's DS 660B on H800" for that threshold only."""
    from schedulers import DualPathConfig

    d = DualPathConfig()
    c = DualPathConfig(alpha_tokens=5, beta_tokens=0)
    assert (c.alpha_tokens, c.beta_tokens) == (5, d.beta_tokens)
    c = DualPathConfig(alpha_tokens=0, beta_tokens=7)
    assert (c.alpha_tokens, c.beta_tokens) == (d.alpha_tokens, 7)


# ---- cost model and hardware -------------------------------------------------------------------------------------


def test_alpha_is_measured_on_the_storage_nic():
    """`CostModel.read_tokens_per_s`: `hw.snic_bandwidth` changed to `hw.cnic_bandwidth`. α is the hit tokens one
    node's SNIC reads in 3 s (PAPER.md "Scheduler"); on H800 both NICs are 400 Gbps, so only a profile whose NICs
    differ tells them apart: the cpu profile's SNIC reads 1e9 B/s (its CNIC 2e9) over ds27b's 23,640 B/token."""
    from schedulers import DualPathConfig
    from schedulers.cost_model import CostModel

    cm = CostModel("ds27b", "cpu")
    assert cm.model.kv_bytes_per_token == 30 * 788
    assert cm.read_tokens_per_s() == 1e9 / 23_640
    assert DualPathConfig.from_cost_model(cm).alpha_tokens == int(3.0 * 1e9 / 23_640)


def test_qkv_bias_counts_the_query_heads_and_both_key_and_value_heads():
    """`ModelShape.attention_params`: the QKV bias `(heads + 2 * kv_heads) * head_dim` changed to
    `(heads + kv_heads) * head_dim` (the V bias dropped). Qwen2.5-32B (HF config: 40 query heads, 8 KV heads of 128,
    bias on q, k and v) has 40·128 + 2·8·128 = 7,168 bias weights per layer: the published-count test's tolerance
    could not see 1,024 weights a layer."""
    from schedulers.cost_model import get_model_shape

    m = get_model_shape("qwen2.5-32b")
    proj = 5120 * 40 * 128 + 2 * 5120 * 8 * 128 + 40 * 128 * 5120
    assert m.attention_params == proj + (40 + 2 * 8) * 128


def test_every_shared_expert_is_active_for_every_token_of_every_moe_layer():
    """`ModelShape.active_params_per_token`: `(top_k + n_shared) * expert_params` changed to `top_k * expert_params`.
    A MoE layer runs its top_k routed experts and all n_shared shared ones for each token, so DS 660B's 1 shared
    expert adds 58 MoE layers x 3·7168·2048 weights to the active count (the published-count test's 6% tolerance
    took the 2.6 B missing)."""
    import dataclasses

    from schedulers.cost_model import get_model_shape

    ds = get_model_shape("ds660b")
    no_shared = dataclasses.replace(ds, n_shared=0)
    assert ds.active_params_per_token - no_shared.active_params_per_token == 58 * 1 * 3 * 7168 * 2048
    assert ds.total_params - no_shared.total_params == 58 * 1 * 3 * 7168 * 2048


def test_tied_embeddings_are_counted_once():
    """`ModelShape.embedding_params`: `vocab * hidden * (1 if tied_embeddings else 2)` changed to `* 2` (no registered
    model ties them, so nothing saw it). A tied model's input embedding is its LM head: one matrix, not two."""
    import dataclasses

    from schedulers.cost_model import get_model_shape

    q = get_model_shape("qwen2.5-32b")
    tied = dataclasses.replace(q, tied_embeddings=True)
    assert tied.embedding_params == 152064 * 5120 and q.embedding_params == 2 * 152064 * 5120
    assert q.total_params - tied.total_params == 152064 * 5120


def test_a_model_whose_every_layer_is_dense_is_a_valid_shape():
    """`ModelShape.__post_init__`: `first_k_dense > layers` refused changed to `>=`. first_k_dense = layers (every
    layer a dense MLP) is a valid shape; only more dense layers than layers is not."""
    import dataclasses

    from schedulers.cost_model import get_model_shape

    base = get_model_shape("ds27b")
    shape = dataclasses.replace(base, first_k_dense=base.layers)
    assert shape.moe_layers == 0 and shape.routed_expert_params == 0
    with pytest.raises(ValueError, match="first_k_dense 31 > layers 30"):
        dataclasses.replace(base, first_k_dense=31)


def test_the_h200_profile_streams_hbm_at_4_8_tb_per_s():
    """hardware.py's "h200" profile: its `hbm_bandwidth=4.8e12` dropped (it inherited the H800's 3.35 TB/s). H200 SXM
    datasheet: 141 GB of HBM3e at 4.8 TB/s, H100 compute; a memory-bound decode step is then faster than on H100."""
    from schedulers.cost_model import CostModel
    from schedulers.hardware import get_hardware

    h200, h100 = get_hardware("h200"), get_hardware("h100")
    assert (h200.hbm_bandwidth, h200.hbm_bytes, h200.peak_flops) == (4.8e12, 141e9, h100.peak_flops)
    assert CostModel("qwen2.5-32b", "h200").decode_step_time(8, 80_000) < CostModel(
        "qwen2.5-32b", "h100"
    ).decode_step_time(8, 80_000)


# ---- api -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [1.5, -0.25])
def test_a_split_reads_fraction_must_lie_between_0_and_1(fraction):
    """`Assignment.__post_init__`: the `0.0 <= de_read_fraction <= 1.0` check dropped (only "pe"/"de" fractions were
    tested). A split read puts a fraction of the hit blocks on the DE side: 1.5 or a negative share would have the
    runner read more blocks than the hit, or a negative number of them, on one side."""
    from schedulers.api import Assignment

    with pytest.raises(ValueError, match=r"de_read_fraction must be in \[0, 1\]"):
        Assignment(0, 0, 100, "split", fraction)
    assert Assignment(0, 0, 100, "split", 0.25).de_read_fraction == 0.25


def test_a_snapshot_copy_holds_its_own_engine_states():
    """`ClusterSnapshot.copy`: the engines dict copied but its EngineStates shared (`{k: v ...}` for
    `dataclasses.replace(v)`). "Policies may mutate a copy, never the original": a change to a copy's engine load
    must not reach the original."""
    snap = snapshot({0: (0, [{"id": 0, "tok": 5}])}, ONE_DE)
    c = snap.copy()
    c.engines[0].tok += 100
    c.nodes[0].read_queue_tokens += 7
    assert snap.engines[0].tok == 5 and snap.nodes[0].read_queue_tokens == 0
    assert c.engine_set_key is None


# ---- batching ------------------------------------------------------------------------------------------------------


def test_largest_fitting_bsz_takes_a_cost_exactly_at_the_budget():
    """`largest_fitting_bsz`: `cost(1) > budget` changed to `>=`, and the search's `cost(mid) <= budget` to `<`. Its
    contract: the largest b with cost(b) <= budget (PAPER.md "Intra-engine": the chunk that fits the quota). With
    cost(b) = b exactly (float), a budget of 1 fits 1 token and a budget of 5 fits 5 of 10."""
    from schedulers.batching import largest_fitting_bsz

    def cost(b):
        return float(b)

    assert largest_fitting_bsz(cost, 1.0, 10) == 1
    assert largest_fitting_bsz(cost, 5.0, 10) == 5
    assert largest_fitting_bsz(cost, 6.5, 10) == 6
    assert largest_fitting_bsz(cost, 0.5, 10) == 0


def test_the_progress_chunk_never_exceeds_what_the_head_request_has_left():
    """`ComputeQuotaBatcher.form_batch`: the progress guarantee `max(take, min(min_chunk_tokens, upper))` changed to
    `max(take, min_chunk_tokens)`. A head request that alone exceeds the quota gets at least min_chunk_tokens
    (batching.py docstring), but never more tokens than it has left (5 here) or than token_budget allows (3)."""
    from schedulers import PrefillWork, make_batcher
    from schedulers.cost_model import CostModel

    cm = CostModel("ds27b", "h800")
    b = make_batcher("compute_quota", quota_s=1e-9, cost_model=cm, min_chunk_tokens=16)
    assert [(x.request_id, x.bsz) for x in b.form_batch([PrefillWork(1, 100_000, 5), PrefillWork(2, 0, 9)])] == [(1, 5)]
    b = make_batcher("compute_quota", quota_s=1e-9, cost_model=cm, min_chunk_tokens=16, token_budget=3)
    assert [(x.request_id, x.bsz) for x in b.form_batch([PrefillWork(1, 100_000, 50)])] == [(1, 3)]


# ---- PD bounds (PAPER.md "Bottleneck-free P/D range") ----------------------------------------------------------


def test_the_de_cnic_bound_is_g_minus_2s_over_s_and_binds_when_s_is_above_g_over_3():
    """`pd_ratio_constraints`: de_cnic's (g − 2s)/s changed to (g − s)/s. PAPER.md states P/D <= (g − 2s)/s; at
    g = 8, s = 1 it never binds (6 > 3.5), so the existing tests missed it. At s = 3 it is the upper bound: 2/3
    (de_cnic_in gives 5/6, pe_cnic_in the lower bound 3/5)."""
    from schedulers.pd_bounds import binding_constraints, pd_ratio_bounds, pd_ratio_constraints

    values = {c.name: c.value for c in pd_ratio_constraints(8, 1, 50e9, 500e9)}
    assert values == pytest.approx({"pe_cnic_in": 1 / 7, "de_cnic": 6.0, "de_cnic_in": 3.5, "de_host_mem": 3.5})
    assert pd_ratio_bounds(8, 3, 50e9, 5e13) == pytest.approx((3 / 5, 2 / 3))
    assert binding_constraints(8, 3, 50e9, 5e13) == (["pe_cnic_in"], ["de_cnic"])


def test_an_snic_of_exactly_half_a_node_of_cnics_is_allowed():
    """`pd_ratio_constraints`: the PE-CNIC read check `2 * s > g` changed to `>=`. PAPER.md: 2s/g <= 1, so s = g/2
    is allowed (the range it gives is empty: lo = 1 > hi = 0, which is the answer, not an error)."""
    from schedulers.pd_bounds import pd_ratio_bounds

    assert pd_ratio_bounds(8, 4, 50e9, 5e13) == pytest.approx((1.0, 0.0))


def test_binding_constraints_with_a_zero_tolerance_names_the_exact_binders():
    """`binding_constraints`: `abs(c.value - lo) <= rel_tol * ...` changed to `<`. rel_tol = 0 is allowed (>= 0) and
    means exact ties: the constraint that sets the bound is always named (with `<`, none was)."""
    from schedulers.pd_bounds import binding_constraints

    low, up = binding_constraints(8, 1, 50e9, 500e9, rel_tol=0)
    assert low == ["pe_cnic_in"] and up == ["de_cnic_in", "de_host_mem"]  # both exactly 3.5


# ---- calibration --------------------------------------------------------------------------------------------------


class _FakeClock:
    """perf_counter of a fake clock the fake step moves by scripted durations (no wall-clock dependence)."""

    def __init__(self, durations):
        self.t = 0.0
        self.durations = list(durations)
        self.calls = []

    def perf_counter(self):
        return self.t

    def step(self, *args):
        self.calls.append(args)
        self.t += self.durations.pop(0)


def test_the_timers_record_the_fastest_timed_repeat_after_the_warmup(monkeypatch):
    """`time_prefill` / `time_decode`: `min(times)` changed to the last or the largest repeat, and the warmup loop
    run once more than asked. The docstring's contract: the best (min) of `repeats` timed calls after `warmup`
    untimed ones (on a shared machine the least-disturbed run is the closest to the step's own cost)."""
    from schedulers import calibrate

    clock = _FakeClock([100.0, 5.0, 2.0, 7.0, 100.0, 3.0, 1.0, 4.0])
    monkeypatch.setattr(calibrate, "time", clock)
    (m,) = calibrate.time_prefill(clock.step, [((0, 8),)], repeats=3, warmup=1)
    assert m.items == ((0, 8),) and m.seconds == 2.0
    (d,) = calibrate.time_decode(clock.step, [(2, 50)], repeats=3, warmup=1)
    assert (d.batch_size, d.total_context_tokens, d.seconds) == (2, 50, 1.0)
    assert len(clock.calls) == 8 and not clock.durations


def test_fit_report_gives_the_median_and_the_max_relative_error():
    """`fit_report`: `np.median(errs)` changed to `np.mean(errs)`. Errors |predicted − measured| / measured of
    0, 0.5 and 0.75: median 0.5 (the mean would be 0.4167)."""
    from schedulers.calibrate import fit_report
    from schedulers.cost_model import PrefillMeasurement

    class OneSecond:
        def batch_prefill_time(self, items):
            return 1.0

    ms = [PrefillMeasurement(((0, 4),), s) for s in (1.0, 2.0, 4.0)]
    r = fit_report(OneSecond(), ms)
    assert (r.median_rel_error, r.max_rel_error, r.n) == (0.5, 0.75, 3)


def test_default_grid_scales_its_contexts_to_the_cache():
    """`default_grid`: the contexts x·max_context/4096 changed to min(x, max_context). The grid spans the cache it
    is given: at 8192 every context of the 4096 grid doubles (a clipped grid never reached past 4096)."""
    from schedulers.calibrate import default_grid

    fit4, held4 = default_grid(4096)
    fit8, held8 = default_grid(8192)
    assert [[(2 * c, b) for c, b in items] for items in fit4] == [list(items) for items in fit8]
    assert [[(2 * c, b) for c, b in items] for items in held4] == [list(items) for items in held8]
    assert max(c for items in fit8 for c, _ in items) == 8192


def test_the_numpy_prefill_layer_is_causal():
    """`NumpyPrefill._layer`: the causal mask `key <= query position` changed to `<= position + 1` (each query saw
    the next token). A layer's output for the first tokens of a chunk must not depend on the tokens after them."""
    import numpy as np

    from schedulers.calibrate import NumpyPrefill
    from schedulers.cost_model import ModelShape

    shape = ModelShape("causal", 1, 16, 2, 1, 8, 32, 10, kv_dtype_bytes=4, weight_bytes=4)
    f = NumpyPrefill(shape, max_context=8)
    x = np.random.default_rng(1).standard_normal((4, 16), dtype=np.float32)
    whole, prefix = f._layer(f.layers[0], x, 2), f._layer(f.layers[0], x[:2], 2)
    np.testing.assert_allclose(whole[:2], prefix, rtol=1e-5, atol=1e-5)
