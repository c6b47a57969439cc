"""A stand-in for pyverbs, so `RdmaTransport` runs on a host without an RDMA device (tests only).

One device whose RC QPs run RDMA WRITE/READ as memmoves between the fake MRs of this process, as a NIC would:
- a work request with an rkey no MR holds (deregistered) or a range outside the MR completes with a remote access
  error and puts the requester's QP in the error state;
- a QP knows the QP it was connected to (`to_rts`): a work request whose responder QP is gone or in the error state
  fails the same way, nothing moved;
- `QP.modify` to IBV_QPS_ERR takes effect under the same lock as the work requests, so no memmove into a responder
  runs once its `modify` returned;
- while `hold` is set the completion queues report nothing (work requests still "in flight").

`install(monkeypatch)` puts it in `sys.modules` for one test; `installed()` is the stand-in in use, if any. The
conformance and ordering suites run their "rdma-fake" cases over it (tests/test_transport_hunt8.py checks the
error-state model above); test_transport_hunt5/6/7 use it too.
"""

from __future__ import annotations

import ctypes
import itertools
import sys
import threading
import types
from collections import deque

import pytest

ns = types.SimpleNamespace


class FakeVerbs:
    """The stand-in's state (MRs by rkey, QPs by number) and its `pyverbs.*` modules (`modules`)."""

    REM_ACCESS_ERR = 10  # (IBV_WC_REM_ACCESS_ERR)

    def __init__(self, max_msg_sz: int = 1 << 31):
        self.mrs: dict[int, tuple[int, int]] = {}  # rkey -> (address, length)
        self.qps: dict[int, object] = {}  # qp_num -> QP
        self.keys = itertools.count(0x100)
        self.qpns = itertools.count(1)
        self.lock = threading.Lock()
        self.serial = threading.Lock()  # a work request's run vs. a responder's `modify` to the error state
        self.hold = False  # completion queues report nothing while set (work requests still "in flight")
        self.modules = self._modules(max_msg_sz)

    def _modules(self, max_msg_sz: int) -> dict[str, types.ModuleType]:
        fake = self
        e = types.ModuleType("pyverbs.enums")
        e.IBV_ACCESS_LOCAL_WRITE, e.IBV_ACCESS_REMOTE_WRITE, e.IBV_ACCESS_REMOTE_READ = 1, 2, 4
        e.IBV_PORT_ACTIVE, e.IBV_QPT_RC, e.IBV_MTU_4096 = 4, 2, 5
        e.IBV_WR_RDMA_WRITE, e.IBV_WR_RDMA_READ, e.IBV_WC_SUCCESS = 0, 4, 0
        e.IBV_QPS_ERR, e.IBV_QP_STATE = 6, 1

        class Context:
            def __init__(self, name):
                self.name = name

            def query_device(self):
                return ns(phys_port_cnt=1, max_qp_rd_atom=16, max_qp_init_rd_atom=16, max_cqe=4096)

            def query_port(self, port):
                return ns(state=4, gid_tbl_len=1, active_mtu=5, lid=0, max_msg_sz=max_msg_sz)

            def query_gid(self, port, index):
                return ns(gid="fe80:0000:0000:0000:0202:c9ff:fe00:0001")

            def close(self):
                pass

        class CQ:
            def __init__(self, ctx, cqe, *args):
                self.q, self.lock = deque(), threading.Lock()

            def poll(self, num_entries=1):
                if fake.hold:
                    return 0, []
                with self.lock:
                    out = [self.q.popleft() for _ in range(min(num_entries, len(self.q)))]
                return len(out), out

            def close(self):
                pass

        class PD:
            def __init__(self, ctx):
                pass

            def close(self):
                pass

        class MR:
            def __init__(self, pd, length, access, address=0):
                with fake.lock:
                    self.lkey = self.rkey = next(fake.keys)
                    fake.mrs[self.rkey] = (address, length)

            def close(self):
                with fake.lock:
                    fake.mrs.pop(self.rkey, None)

        class Attrs:
            def __init__(self, **kw):
                self.__dict__.update(kw)

        class QP:
            def __init__(self, pd, init, attr):
                self.cq, self.error, self.dest = init.scq, False, None
                with fake.lock:
                    self.qp_num = next(fake.qpns)
                    fake.qps[self.qp_num] = self

            def to_rts(self, attr):
                self.dest = attr.dest_qp_num

            def modify(self, attr, mask):
                assert mask == e.IBV_QP_STATE and attr.qp_state == e.IBV_QPS_ERR  # (the only use of it)
                with fake.serial:
                    self.error = True

            def post_send(self, wr):
                with fake.serial:  # (a responder's `modify` waits for a work request being run)
                    responder = fake.qps.get(self.dest)
                    if responder is None or responder.error:
                        self.error = True  # (completes with a remote access error, nothing moved)
                    sge = wr.sg[0]
                    with fake.lock:
                        base, size = fake.mrs.get(wr.rkey, (0, -1))
                    ok = not self.error and base <= wr.raddr and wr.raddr + sge.length <= base + size
                    if ok and wr.opcode == e.IBV_WR_RDMA_WRITE:
                        ctypes.memmove(wr.raddr, sge.addr, sge.length)
                    elif ok:
                        ctypes.memmove(sge.addr, wr.raddr, sge.length)
                    else:
                        self.error = True
                with self.cq.lock:
                    self.cq.q.append(ns(wr_id=wr.wr_id, status=e.IBV_WC_SUCCESS if ok else fake.REM_ACCESS_ERR))

            def close(self):
                pass

        class SendWR:
            def __init__(self, wr_id=0, opcode=0, num_sge=1, sg=()):
                self.wr_id, self.opcode, self.sg = wr_id, opcode, list(sg)

            def set_wr_rdma(self, rkey, addr):
                self.rkey, self.raddr = rkey, addr

        mods = {"pyverbs": types.ModuleType("pyverbs"), "pyverbs.enums": e}
        mods["pyverbs"].stand_in = fake  # (what `installed` looks for; no attribute of the real package)
        contents = {
            "device": {"Context": Context, "get_device_list": lambda: [ns(name=b"fake0")]},
            "cq": {"CQ": CQ},
            "pd": {"PD": PD},
            "mr": {"MR": MR},
            "qp": {"QP": QP, "QPAttr": Attrs, "QPCap": Attrs, "QPInitAttr": Attrs},
            "addr": {"GID": str, "AHAttr": Attrs, "GlobalRoute": Attrs},
            "wr": {"SGE": lambda addr, length, lkey: ns(addr=addr, length=length, lkey=lkey), "SendWR": SendWR},
        }
        for sub, names in contents.items():
            m = mods[f"pyverbs.{sub}"] = types.ModuleType(f"pyverbs.{sub}")
            m.__dict__.update(names)
        for name, m in mods.items():
            if name != "pyverbs":
                setattr(mods["pyverbs"], name.split(".")[1], m)
        return mods


def install(monkeypatch: pytest.MonkeyPatch, **kw) -> FakeVerbs:
    """A new stand-in in `sys.modules` as `pyverbs.*` until `monkeypatch` undoes it (the test's end)."""
    fake = FakeVerbs(**kw)
    for name, mod in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return fake


def installed() -> FakeVerbs | None:
    """The stand-in `import pyverbs` gives now, or None (no pyverbs, or the real one)."""
    return getattr(sys.modules.get("pyverbs"), "stand_in", None)
