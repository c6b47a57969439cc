# Types for compiling network.py with Cython in pure Python mode (setup.py; the build is optional):
# network.py stays the one source and runs as plain Python when the extension is not built. Time buckets
# (`t // bucket_s`) are left to Python objects on purpose: C's floor(t / b) can round up where Python's
# floor division does not, and the compiled module must give the same bytes as the Python one.
cimport cython


cdef class Flow:
    cdef public long long fid, version, mark
    cdef public tuple path
    cdef public double remaining, rate, t_last, max_rate, size, event_t, nr
    cdef public object on_done


cdef class FlowNetwork:
    cdef public list names, capacity, high_load, high_share, reserved, low_cap, link_flows, _link_mark
    cdef public long long _stamp, _next_fid, solves, solved_flows
    cdef public dict flows
    cdef public object bucket_s
    cdef public double _wake_t, coalesce_s
    cdef public list buckets, high_bytes, _high_t, link_rate, _link_t, link_total, _rem, _cnt, _agg
    cdef public object scheduler, wake, _due
    cdef public list _pending, _resv
    cdef public long long _resv_seq
    cdef public set _cut
    cdef public set _asked
    cdef public bint defer

    @cython.locals(f=Flow, fid=cython.longlong, link=cython.Py_ssize_t)
    cpdef Flow start_flow(self, path, nbytes, now, on_done, max_rate=*)

    @cython.locals(f=Flow, flows=list, seeds=set, link=cython.Py_ssize_t)
    cpdef list start_flows(self, specs, now)

    @cython.locals(link=cython.Py_ssize_t)
    cpdef finish_flow(self, Flow f, now)

    cpdef _update_low_cap(self, Py_ssize_t link)

    @cython.locals(link=cython.Py_ssize_t, over=cython.bint)
    cpdef double reserve(self, path, nbytes, rate, now) except? -1.0

    @cython.locals(link=cython.Py_ssize_t, full=cython.bint)
    cpdef release(self, path, rate, now=*)

    @cython.locals(f=Flow, horizon=cython.double, rem=cython.double, t=cython.double, version=cython.longlong,
                   flows=dict, done=list)
    cpdef list check_due(self, double now)

    @cython.locals(f=Flow, rem=cython.double, seeds=set, link=cython.Py_ssize_t)
    cpdef finish_flows(self, fl, double now)

    @cython.locals(stamp=cython.longlong, f=Flow, i=cython.Py_ssize_t, link=cython.Py_ssize_t,
                   l2=cython.Py_ssize_t, lmark=list, link_flows=list, links=list, flows=list)
    cpdef tuple _component(self, seed_links)

    @cython.locals(f=Flow, share=cython.double, rem=cython.double, r=cython.double, dt=cython.double,
                   t=cython.double, t_min=cython.double, a=cython.double, nb=cython.double,
                   link=cython.Py_ssize_t, links=list, flows=list, link_rate=list, low_cap=list, link_t=list,
                   buckets=list, link_total=list, path=tuple)
    cpdef _resolve(self, seed_links, double now)

    @cython.locals(f=Flow, m=cython.double, a=cython.double, link=cython.Py_ssize_t, agg=list,
                   inf=cython.double)
    cpdef _all_capped(self, list links, list flows, list low_cap)

    @cython.locals(f=Flow, remaining=list, count=list, agg=list, heap=list, n=cython.Py_ssize_t,
                   rem=cython.double, inf=cython.double, capped=list, n_capped=cython.Py_ssize_t,
                   ci=cython.Py_ssize_t, left=cython.Py_ssize_t, share=cython.double, link=cython.Py_ssize_t,
                   s0=cython.double, l0=cython.Py_ssize_t, cur=cython.double, l2=cython.Py_ssize_t)
    cpdef list _fill(self, list links, list flows, list link_flows, list low_cap)
