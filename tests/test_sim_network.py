"""Validation of the flow-level network: closed forms, max-min fairness, monotonicity, byte conservation."""

import heapq
import math
import random

import pytest

from dualpath_jax import compiled

# What the simulator runs (`compiled.load`, as simulator.py builds its network): the compiled module, or network.py
# itself under DUALPATH_PURE_PYTHON=1 or when the build is older than the source (a plain import tested the stale
# build while the simulator ran the edited source)
_network = compiled.load("dualpath_jax.sim.network")
FlowNetwork, max_min_rates = _network.FlowNetwork, _network.max_min_rates


class _Loop:
    """A minimal event loop driving a FlowNetwork (the simulator's loop, without engines)."""

    def __init__(self, bucket_s=1.0, defer=False, wake=False):
        self.net = FlowNetwork(bucket_s=bucket_s)
        self.net.defer = defer  # True: one settle per instant, as the simulator's loop does
        self.events = []
        self.seq = 0
        self.now = 0.0
        self.done = {}
        self.net.scheduler = self._sched
        if wake:  # the simulator's way: the network's own completion heap, one check event at its earliest
            self.net.wake = lambda t: self._push(t, "check", t)

    def _push(self, t, kind, arg):
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, arg))

    def _sched(self, t, f, version):
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, "flow", (f, version)))

    def start(self, name, path, size, at=0.0, max_rate=math.inf):
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, "start", (name, path, size, max_rate)))

    def high(self, link, rate, at):
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, "high", (link, rate)))

    def run(self):
        while self.events:
            t, _, kind, arg = heapq.heappop(self.events)
            self.now = t
            if kind == "start":
                name, path, size, max_rate = arg
                self.net.start_flow(path, size, t, lambda name=name: self.done.__setitem__(name, self.now), max_rate)
            elif kind == "high":
                self.net.set_high_load(arg[0], arg[1], t)
            elif kind == "check":
                done = self.net.check_due(t)
                self.net.finish_flows(done, t)
                for f in done:
                    f.on_done()
            else:
                f, version = arg
                if self.net.handle_event(f, version, t):
                    f.on_done()
            if not self.events or self.events[0][0] > t:
                self.net.settle(t)
        self.net.flush(self.now)
        return self.done


def test_single_link_closed_form():
    lp = _Loop()
    a = lp.net.add_link("a", 10.0)
    lp.start("x", (a,), 35.0, at=2.0)
    assert lp.run()["x"] == pytest.approx(2.0 + 3.5)


def test_two_flows_one_link_closed_form():
    # Equal shares until the small one ends at 2*S1/C, then the big one alone: (S1+S2)/C.
    lp = _Loop()
    a = lp.net.add_link("a", 10.0)
    lp.start("small", (a,), 20.0)
    lp.start("big", (a,), 50.0)
    done = lp.run()
    assert done["small"] == pytest.approx(4.0)
    assert done["big"] == pytest.approx(7.0)


def test_staggered_start_and_multi_link_path():
    # Flow y crosses a (cap 10) and b (cap 4): b bottlenecks it at 4, x gets the 6 left on a.
    lp = _Loop()
    a = lp.net.add_link("a", 10.0)
    b = lp.net.add_link("b", 4.0)
    lp.start("x", (a,), 60.0)
    lp.start("y", (a, b), 8.0, at=1.0)
    done = lp.run()
    assert done["y"] == pytest.approx(3.0)  # 8 bytes at 4 B/s from t=1
    # x: 10 B in [0,1), 6 B/s in [1,3) -> 22 B, then 38 B at 10 B/s.
    assert done["x"] == pytest.approx(3.0 + 3.8)


def test_high_priority_class_takes_its_share_and_is_work_conserving():
    lp = _Loop()
    a = lp.net.add_link("cnic", 100.0, high_share=0.99)
    lp.start("kv", (a,), 100.0)
    lp.high(a, 80.0, at=0.0)  # collectives want 80: KV gets 20
    lp.high(a, 0.0, at=2.0)  # idle high class: KV gets all of it
    done = lp.run()
    assert done["kv"] == pytest.approx(2.0 + 60.0 / 100.0)
    lp2 = _Loop()
    a2 = lp2.net.add_link("cnic", 100.0, high_share=0.99)
    lp2.start("kv", (a2,), 1.0)
    lp2.high(a2, 1e9, at=0.0)  # saturating high class: KV keeps 1%
    assert lp2.run()["kv"] == pytest.approx(1.0)


def _is_max_min_fair(caps, paths, rates, max_rates, tol=1e-7):
    """Independent check (bottleneck characterisation): feasible, and every flow is either at its own
    cap or crosses a saturated link on which no flow has a larger rate."""
    load = {}
    for p, r in zip(paths, rates, strict=False):
        for link in p:
            load[link] = load.get(link, 0.0) + r
    for link, total in load.items():
        if total > caps[link] * (1 + tol) + tol:
            return False
    for i, (p, r) in enumerate(zip(paths, rates, strict=False)):
        if r >= max_rates[i] - tol:
            continue
        ok = False
        for link in p:
            saturated = load[link] >= caps[link] * (1 - tol) - tol
            biggest = all(rates[j] <= r + tol for j, q in enumerate(paths) if link in q)
            if saturated and biggest:
                ok = True
        if not ok:
            return False
    return True


@pytest.mark.parametrize("seed", range(40))
def test_max_min_against_bottleneck_characterisation(seed):
    rng = random.Random(seed)
    n_links = rng.randint(1, 6)
    caps = [rng.choice([1.0, 2.0, 5.0, 10.0]) * rng.uniform(0.5, 2) for _ in range(n_links)]
    n_flows = rng.randint(1, 8)
    paths = [tuple(rng.sample(range(n_links), rng.randint(1, min(3, n_links)))) for _ in range(n_flows)]
    max_rates = [rng.choice([math.inf, math.inf, rng.uniform(0.1, 3.0)]) for _ in range(n_flows)]
    rates = max_min_rates(caps, paths, max_rates)
    assert _is_max_min_fair(caps, paths, rates, max_rates)
    # The network's incremental solver agrees with the reference on the same flows.
    net = FlowNetwork()
    for k, c in enumerate(caps):
        net.add_link(f"l{k}", c)
    net.scheduler = lambda t, f, v: None
    flows = [net.start_flow(p, 1e9, 0.0, None, m) for p, m in zip(paths, max_rates, strict=False)]
    for f, r in zip(flows, rates, strict=False):
        assert f.rate == pytest.approx(r, rel=1e-9, abs=1e-9)


def test_incremental_solve_touches_only_the_component():
    net = FlowNetwork()
    a = net.add_link("a", 1.0)
    b = net.add_link("b", 1.0)
    net.scheduler = lambda t, f, v: None
    fa = net.start_flow((a,), 10.0, 0.0, None)
    for _ in range(5):
        net.start_flow((b,), 10.0, 0.0, None)
    before = net.solved_flows
    net.start_flow((a,), 10.0, 0.0, None)
    assert net.solved_flows - before == 2  # the two flows on a, not the five on b
    assert fa.rate == pytest.approx(0.5)


def _random_scenario(seed, scale=1.0, defer=False, wake=False):
    rng = random.Random(seed)
    lp = _Loop(bucket_s=0.7, defer=defer, wake=wake)
    n_links = rng.randint(2, 5)
    links = [lp.net.add_link(f"l{k}", rng.uniform(1, 10) * scale) for k in range(n_links)]
    sizes = []
    for i in range(rng.randint(2, 10)):
        path = tuple(rng.sample(links, rng.randint(1, min(3, n_links))))
        size = rng.uniform(1, 30)
        sizes.append((path, size))
        lp.start(f"f{i}", path, size, at=rng.uniform(0, 5))
    return lp, links, sizes


@pytest.mark.parametrize("seed", range(15))
def test_byte_conservation_per_link(seed):
    lp, links, sizes = _random_scenario(seed)
    lp.run()
    for link in links:
        expected = sum(s for p, s in sizes if link in p)
        bucketed = sum(lp.net.buckets[link].values())
        assert bucketed == pytest.approx(expected, rel=1e-9)
        assert lp.net.link_total[link] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("seed", range(15))
def test_more_bandwidth_is_never_slower(seed):
    # Scaling every capacity up never delays the last completion (all-flows makespan).
    slow, _, _ = _random_scenario(seed, scale=1.0)
    fast, _, _ = _random_scenario(seed, scale=1.5)
    t_slow = max(slow.run().values())
    t_fast = max(fast.run().values())
    assert t_fast <= t_slow + 1e-9


def test_bad_inputs_are_named():
    net = FlowNetwork()
    with pytest.raises(ValueError, match="link 'x'"):
        net.add_link("x", 0.0)
    a = net.add_link("a", 1.0)
    net.scheduler = lambda t, f, v: None
    with pytest.raises(ValueError, match="positive size"):
        net.start_flow((a,), 0.0, 0.0, None)


@pytest.mark.parametrize("seed", range(10))
def test_start_flows_at_once_equals_one_by_one(seed):
    rng = random.Random(seed)
    caps = [rng.uniform(1, 10) for _ in range(5)]
    specs = [(tuple(rng.sample(range(5), rng.randint(1, 3))), rng.uniform(1, 9), None, math.inf) for _ in range(7)]
    nets = []
    for _ in range(2):
        net = FlowNetwork()
        for k, c in enumerate(caps):
            net.add_link(f"l{k}", c)
        net.scheduler = lambda t, f, v: None
        nets.append(net)
    one = [nets[0].start_flow(p, n, 0.0, d, m) for p, n, d, m in specs]
    many = nets[1].start_flows(specs, 0.0)
    assert [f.rate for f in one] == pytest.approx([f.rate for f in many], rel=1e-12)


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("capped_share", [0.0, 0.5, 1.0])  # 1.0: only capped flows (read streams)
def test_incremental_rates_equal_reference_as_flows_start_and_finish(seed, capped_share):
    """After every start and every finish, the rates of all active flows equal the reference solver on the
    active set (exercises the one-flow, all-capped and progressive-filling paths of the network)."""
    rng = random.Random(seed)
    n_links = rng.randint(1, 5)
    caps = [rng.uniform(1, 10) for _ in range(n_links)]
    net = FlowNetwork()
    for k, c in enumerate(caps):
        net.add_link(f"l{k}", c)
    net.scheduler = lambda t, f, v: None
    active = []

    def check():
        ref = max_min_rates(caps, [f.path for f in active], [f.max_rate for f in active])
        assert [f.rate for f in active] == pytest.approx(ref, rel=1e-9, abs=1e-12)

    for step in range(14):
        if active and rng.random() < 0.4:
            f = active.pop(rng.randrange(len(active)))
            net.finish_flow(f, float(step))
        else:
            path = tuple(rng.sample(range(n_links), rng.randint(1, min(3, n_links))))
            cap = rng.uniform(0.05, 4.0) if rng.random() < capped_share else math.inf
            active.append(net.start_flow(path, 1e9, float(step), None, cap))
        check()


@pytest.mark.parametrize("seed", range(20))
def test_deferred_solves_give_the_reference_rates(seed):
    """Defer mode (the simulator): several starts, finishes and high-class changes at one instant, then one
    settle; the rates equal the reference solver on the active set, and nothing is solved before the settle."""
    rng = random.Random(seed)
    n_links = rng.randint(1, 6)
    caps = [rng.uniform(1, 10) for _ in range(n_links)]
    net = FlowNetwork()
    for k, c in enumerate(caps):
        net.add_link(f"l{k}", c, high_share=0.5)
    net.scheduler = lambda t, f, v: None
    net.defer = True
    active = []
    high = [0.0] * n_links
    for step in range(8):
        now = float(step)
        for _ in range(rng.randint(1, 5)):
            u = rng.random()
            if active and u < 0.35:
                net.finish_flow(active.pop(rng.randrange(len(active))), now)
            elif u < 0.5:
                link = rng.randrange(n_links)
                high[link] = rng.choice([0.0, rng.uniform(0.1, 8.0)])
                net.set_high_load(link, high[link], now)
            else:
                path = tuple(rng.sample(range(n_links), rng.randint(1, min(3, n_links))))
                cap = rng.uniform(0.05, 4.0) if rng.random() < 0.3 else math.inf
                f = net.start_flow(path, 1e9, now, None, cap)
                assert f.rate == 0.0  # not solved before the settle
                active.append(f)
        solves = net.solves
        net.settle(now)
        assert net.solves <= solves + 1  # one solve for the whole instant
        low = [c - min(h, 0.5 * c) for c, h in zip(caps, high, strict=True)]
        ref = max_min_rates(low, [f.path for f in active], [f.max_rate for f in active])
        assert [f.rate for f in active] == pytest.approx(ref, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(15))
def test_deferred_solves_finish_flows_at_the_same_times(seed):
    exact, _, _ = _random_scenario(seed)
    deferred, links, sizes = _random_scenario(seed, defer=True)
    t_exact, t_deferred = exact.run(), deferred.run()
    assert t_deferred == pytest.approx(t_exact, rel=1e-9)
    for link in links:  # byte conservation holds in defer mode too
        assert sum(deferred.net.buckets[link].values()) == pytest.approx(sum(s for p, s in sizes if link in p))


@pytest.mark.parametrize("seed", range(15))
def test_completion_heap_finishes_flows_at_the_per_flow_event_times(seed):
    """`wake` mode (one check event at the earliest projected completion) gives exactly the completion
    times of one event per flow, deferred solves or not (no coalescing below COALESCE_MIN_FLOWS flows)."""
    per_flow, _, _ = _random_scenario(seed)
    expected = per_flow.run()
    for defer in (False, True):
        heap_mode, links, sizes = _random_scenario(seed, defer=defer, wake=True)
        got = heap_mode.run()
        assert got.keys() == expected.keys()
        assert [got[k] for k in sorted(got)] == pytest.approx([expected[k] for k in sorted(expected)], rel=1e-9)
        assert all(f.fid not in heap_mode.net.flows for _, _, _, f, _ in heap_mode.net._due.entries())
        for link in links:
            assert sum(heap_mode.net.buckets[link].values()) == pytest.approx(sum(s for p, s in sizes if link in p))
