#!/usr/bin/env bash
# Kernel-enforced NIC caps for an emulated DualPath cluster on one Linux host (needs root, iproute2, tc).
#
# The in-process traffic manager (dualpath_jax/traffic.py) paces transfers inside one process. This script
# makes the kernel enforce the same caps across processes instead: every node is a network namespace with
#   - one storage NIC  "snic"    on the storage bridge  dpj-sbr (10.78.0.0/16), shaped to SNIC_MBIT, shared by
#     the node's engines (the root namespace, 10.78.255.254, plays the storage cluster), and
#   - one compute NIC  "cnic<g>" per engine on the compute bridge dpj-cbr (10.77.0.0/16), shaped to CNIC_MBIT
#     with two HTB classes: DSCP EF (the TCP transport's "high" stream, model traffic) guaranteed 99% and
#     DSCP CS1 (its "low" stream, KV) guaranteed 1%, each allowed to borrow the whole link (work-conserving),
#     like InfiniBand virtual lanes with weights 99:1.
# Both directions are shaped (egress of the namespace side and of the bridge side of each veth).
# Engine e = node*G + g listens on 10.77.<node>.<g+1>; run engines with `ip netns exec dpj-n<node> ...` and
# `TcpTransport(host="10.77.<node>.<g+1>", secret=...)` (non-loopback binds need a shared secret). The runtime does
# this itself with `--config.runtime.netns=true` (local launcher, TCP; dualpath_jax/runtime/netns.py): e.g. after
# `up 3 1 32 256`, `python -m experiments.run --config.runtime.netns=true --config.runtime.nics.cnic_bytes_per_s=32e6`.
#
#   experiments/netns_cluster.sh up [NODES] [G] [SNIC_MBIT] [CNIC_MBIT]   # default 2 nodes x 2 engines, 800/1600
#   experiments/netns_cluster.sh test                                     # measure a shaped CNIC (NODES >= 2)
#   experiments/netns_cluster.sh status
#   experiments/netns_cluster.sh down
#
# `up` and `down` take LOCK (flock(1), exclusive; default /run/dpj-netns.lock, $DUALPATH_NETNS_LOCK) and refuse
# while a run with --config.runtime.netns=true holds it (each run holds it shared: `down` deleted the veths under a
# run; a second run at once is warned that the two share the shaped NICs).
#
# NODES is 1..254, G 1..255 and the rates whole Mbit/s. `up` refuses while a cluster (or part of one) is up or a
# device has one of its names, and removes what it made when it fails or is interrupted. Each engine's CNIC carries
# its own traffic both ways (per-engine source routing, ARP answered only by the address's own CNIC).
#
# netem is not used (not available here); tbf/htb are. The storage network only matters for a store reached
# over the network (e.g. an NFS/3FS mount served from the root namespace); the embedded local-directory
# store reads the local disk and is paced by the traffic manager instead.
set -euo pipefail

CMD=${1:-}
NODES=${2:-2}
G=${3:-2}
SNIC_MBIT=${4:-800}
CNIC_MBIT=${5:-1600}
LOCK=${DUALPATH_NETNS_LOCK:-/run/dpj-netns.lock}

die() { echo "netns_cluster.sh: $*" >&2; exit 1; }

need_root() { [[ $(id -u) == 0 ]] || die "needs root (network namespaces, tc)"; }

hold_lock() {  # $1 (up or down): LOCK exclusively on fd 9 until the script ends, or die naming the runs holding it
  command -v flock >/dev/null || die "needs flock(1) (util-linux) to know no run uses the cluster"
  exec 9>>"$LOCK" || die "cannot open the lock file $LOCK"
  flock -n -x 9 || die "a run with --config.runtime.netns=true uses the cluster now (it holds $LOCK); wait for it to end before '$1'"
}

check_int() {  # name value max: a whole number in 1..max (no sign, no leading zero)
  [[ $2 =~ ^[1-9][0-9]{0,8}$ ]] && (( $2 <= $3 )) || die "$1 must be a whole number in 1..$3, got '$2'"
}

is_up() {  # any namespace or bridge of a cluster of this script
  grep -q '^dpj-n[0-9]' <<<"$(ip netns list)" || ip link show dpj-cbr &>/dev/null || ip link show dpj-sbr &>/dev/null
}

our_veths() {  # veth ends in the root namespace named like this script's (dpj-c<engine>, dpj-s<node>)
  ip -o link show type veth | awk -F': ' '{sub(/@.*/, "", $2); print $2}' | grep -E '^dpj-[cs][0-9]+$' || true
}

name_clashes() {  # devices of any kind with a name `up` would make (it failed half way on them, unnamed)
  ip -o link show | awk -F': ' '{sub(/@.*/, "", $2); print $2}' | grep -E '^dpj-([cs][0-9]+|cbr|sbr)$' | tr '\n' ' ' || true
}

shape_cnic() {  # dev [netns]: HTB root with a high (EF) and a low (CS1) class, 99:1, both may borrow all
  local dev=$1 ns=${2:-} run=()
  [[ -n $ns ]] && run=(ip netns exec "$ns")
  # (in kbit/s: whole Mbit/s made 1 Mbit/s a 0 Mbit/s high class, which tc refuses, and 150 Mbit/s 148:1)
  local high=$((CNIC_MBIT * 990)) low=$((CNIC_MBIT * 10))
  "${run[@]}" tc qdisc replace dev "$dev" root handle 1: htb default 20
  "${run[@]}" tc class add dev "$dev" parent 1: classid 1:1 htb rate "${CNIC_MBIT}mbit" ceil "${CNIC_MBIT}mbit" quantum 60000
  "${run[@]}" tc class add dev "$dev" parent 1:1 classid 1:10 htb rate "${high}kbit" ceil "${CNIC_MBIT}mbit" prio 0 quantum 60000
  "${run[@]}" tc class add dev "$dev" parent 1:1 classid 1:20 htb rate "${low}kbit" ceil "${CNIC_MBIT}mbit" prio 1 quantum 60000
  # DSCP EF = TOS 0xb8 -> high; everything else (CS1 = 0x20, control) -> low
  "${run[@]}" tc filter add dev "$dev" parent 1: protocol ip prio 1 u32 match ip tos 0xb8 0xfc flowid 1:10
}

shape_snic() {  # dev [netns]: one rate for all storage traffic
  local dev=$1 ns=${2:-} run=()
  [[ -n $ns ]] && run=(ip netns exec "$ns")
  "${run[@]}" tc qdisc replace dev "$dev" root handle 1: htb default 10
  "${run[@]}" tc class add dev "$dev" parent 1: classid 1:10 htb rate "${SNIC_MBIT}mbit" ceil "${SNIC_MBIT}mbit" quantum 60000
}

up() {
  need_root
  hold_lock up
  check_int NODES "$NODES" 254   # 10.77.<node>.x / 10.78.<node>.1; 10.78.255.254 is the storage side
  check_int G "$G" 255           # 10.77.<node>.<g+1>
  check_int SNIC_MBIT "$SNIC_MBIT" 100000000
  check_int CNIC_MBIT "$CNIC_MBIT" 100000000
  is_up && die "a cluster is already up (dpj-* namespaces or bridges); run '$0 down' first"
  # (a device of someone else named like a veth end made `up` fail half way with "File exists", and the clean-up
  # then deleted that device)
  local clash
  clash=$(name_clashes)
  [[ -z $clash ]] || die "devices named like this script's already exist: ${clash}(rename them, or '$0 down' if they are a cluster's veths)"
  # A failure or an interrupt half way left namespaces and bridges behind (and the next `up` failed on them).
  trap 'set +e; echo "netns_cluster.sh: up did not finish; removing what it made" >&2; down held >/dev/null' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM HUP
  for br in dpj-cbr dpj-sbr; do
    ip link add "$br" type bridge
    ip link set "$br" up
  done
  ip addr add 10.78.255.254/16 dev dpj-sbr
  for ((n = 0; n < NODES; n++)); do
    ns=dpj-n$n
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    # The node's CNICs share 10.77/16 in one namespace: each answers ARP for its own address only (else engine g's
    # bytes came in through another engine's shaped veth) ...
    ip netns exec "$ns" sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2
    ip link add "dpj-s$n" type veth peer name snic netns "$ns"
    ip link set "dpj-s$n" master dpj-sbr up
    ip -n "$ns" addr add "10.78.$n.1/16" dev snic
    ip -n "$ns" link set snic up
    shape_snic snic "$ns"     # node -> storage (write-back)
    shape_snic "dpj-s$n"      # storage -> node (reads)
    for ((g = 0; g < G; g++)); do
      e=$((n * G + g))
      ip link add "dpj-c$e" type veth peer name "cnic$g" netns "$ns"
      ip link set "dpj-c$e" master dpj-cbr up
      ip -n "$ns" addr add "10.77.$n.$((g + 1))/16" dev "cnic$g"
      ip -n "$ns" link set "cnic$g" up
      # ... and sends from its own (the main table sent all of 10.77/16 out of cnic0: G engines shared one cap)
      ip -n "$ns" route add 10.77.0.0/16 dev "cnic$g" src "10.77.$n.$((g + 1))" table $((100 + g))
      ip -n "$ns" rule add from "10.77.$n.$((g + 1))" table $((100 + g))
      shape_cnic "cnic$g" "$ns"   # engine egress
      shape_cnic "dpj-c$e"        # engine ingress
    done
  done
  trap - EXIT INT TERM HUP
  echo "up: $NODES nodes x $G engines; SNIC ${SNIC_MBIT} Mbit/s per node, CNIC ${CNIC_MBIT} Mbit/s per engine"
}

down() {
  need_root
  [[ ${1:-} == held ]] || hold_lock down  # (up's clean-up: up holds it already)
  for ns in $(ip netns list | awk '/^dpj-n[0-9]+/ {print $1}'); do ip netns del "$ns"; done
  for br in dpj-cbr dpj-sbr; do ip link del "$br" 2>/dev/null || true; done
  # veth ends left in the root namespace (their peer's namespace is gone with it, so normally none); only veths:
  # another kind of device with such a name is not this script's
  for dev in $(our_veths); do
    ip link del "$dev" 2>/dev/null || true
  done
  echo "down"
}

test_cluster() {
  # One TCP transport per side: node 1 engine 0 receives; node 0 engine 0 sends high and low streams.
  need_root
  grep -q '^dpj-n1\b' <<<"$(ip netns list)" || die "test needs a cluster of 2 or more nodes; run '$0 up' first"
  local py=${PYTHON:-python}
  local here
  here=$(cd "$(dirname "$0")/.." && pwd)
  ip netns exec dpj-n1 env PYTHONPATH="$here" "$py" - <<'EOF' &
import numpy as np, time
from transport.tcp import TcpTransport
ep = TcpTransport("sink", host="10.77.1.1", port=47000, secret="netns-test")
ep.register("dst", np.zeros(64 << 20, np.uint8))
time.sleep(25)
EOF
  local sink=$!
  trap "kill $sink 2>/dev/null || true" EXIT  # a failed sender (set -e) left the sink running
  sleep 2
  ip netns exec dpj-n0 env PYTHONPATH="$here" "$py" - <<'EOF'
import numpy as np, threading, time
from transport.tcp import TcpTransport
ep = TcpTransport("src", host="10.77.0.1", secret="netns-test")
ep.register("src", np.ones(64 << 20, np.uint8))
ep.connect("sink", ("10.77.1.1", 47000))
def run(prio, n, out):
    t0 = time.monotonic(); nbytes = 0
    while time.monotonic() - t0 < n:
        ep.write("sink", "src", 0, "dst", 0, 8 << 20, priority=prio).result(60); nbytes += 8 << 20
    out[prio] = nbytes / (time.monotonic() - t0)
for scenario in (["low"], ["high", "low"]):
    out = {}
    ts = [threading.Thread(target=run, args=(p, 3.0, out)) for p in scenario]
    [t.start() for t in ts]; [t.join() for t in ts]
    print("streams", scenario, {k: f"{v * 8 / 1e6:.0f} Mbit/s" for k, v in out.items()})
ep.close()
EOF
}

case $CMD in
  up) up ;;
  down) down ;;
  test) test_cluster ;;
  status)
    is_up || { echo "no cluster up (make one: $0 up [NODES] [G] [SNIC_MBIT] [CNIC_MBIT])"; exit 0; }
    ip netns list | grep dpj- || true; tc -s class show dev dpj-c0 2>/dev/null | head -20 || true ;;
  *)
    [[ -n $CMD ]] && echo "netns_cluster.sh: unknown command '$CMD' (up, test, status, down)" >&2
    awk 'NR > 1 && !/^#/ {exit} NR > 1 {print}' "$0" >&2
    exit 2
    ;;
esac
