# Types for compiling simulator.py with Cython in pure Python mode (setup.py; the build is optional):
# simulator.py stays the one source and runs as plain Python when the extension is not built. The engines,
# requests and the simulator become extension types with C fields, so the event handlers read and write
# them without attribute lookups and call each other as C functions. Token counts stay Python ints (objects):
# a C integer would silently truncate a float that a workload might pass. Times and rates are C doubles,
# the same IEEE operations as Python floats (`-ffp-contract=off` in setup.py).
cimport cython


cdef class Request:
    cdef public object rid, traj, turn, pending, prompt, hit, miss, gen, hit_pe, hit_de, cached, remaining
    cdef public object work, wb
    cdef public PrefillEngine pe
    cdef public DecodeEngine de
    cdef public double frac, target, vjoin
    cdef public long long reads_left
    cdef public bint wb_done, decode_done


cdef class Node:
    cdef public object nid, role, snic, dram, read_queue, buf_queue, state
    cdef public double buffer_free, buffer_bytes
    cdef public long long reads_active, buf_held
    cdef public list engines


cdef class PrefillEngine:
    cdef public object eid, cnic, cnic_in, admit_queue, state
    cdef public Node node
    cdef public list queue
    cdef public bint busy
    cdef public double hbm_free
    cdef public long long hbm_held


cdef class DecodeGroup:
    cdef public list members, finish_heap
    cdef public object second
    cdef public double v, tv, step
    cdef public long long version


cdef class DecodeEngine:
    cdef public object eid, cnic, cnic_in, sum_prompt, state, wb, hbm_free, alloc_queue, free_tokens
    cdef public long long n_seqs
    cdef public Node node
    cdef public dict active
    cdef public DecodeGroup group
    cdef public double step, sum_vjoin


cdef class _Batch:
    cdef public PrefillEngine pe
    cdef public list items, reqs
    cdef public long long left
    cdef public double t0


cdef class Simulator:
    cdef public _DecodeTime decode_time
    cdef public object cfg, c, policy, batcher, cost, trajectories, arrival_model, events, net, queue
    cdef public object _qids, _qlens, storage_link, snapshot, de_buffer_bytes, records
    cdef public dict _shapes, requests, pes, des
    cdef public list nodes, de_groups
    cdef public double now, b, read_cap, _next_tick, fetch_step, max_seqs
    cdef public long long L, _seq, n_events, turns_done, _next_rid, _fetch_rr, n_fetches, de_group_engines
    cdef public long long _idle_fetches
    cdef public bint fetch_running, dram_binds, _ran, shared_hits, bounded
    cdef public set _stored
    # the bounded KV store (cluster.store_capacity_gb): an OrderedDict; token counts as Python ints
    cdef public object _store, store_cap_tokens, store_held, store_evicted_tokens, store_evicted_entries
    cdef public object store_lost_lookups, store_lost_tokens, _store_refs, _store_hashes

    cpdef at(self, double t, fn, arg=*)
    cpdef tuple _dram(self, Node node)
    cpdef _schedule_check(self, double t)
    cpdef bint _check_event(self, _arg) except -1
    cpdef bint _flow(self, path, double nbytes, on_done, double max_rate=*)

    @cython.locals(r=Request)
    cpdef _turn_arrival(self, arg)

    cpdef _store_lookup(self, traj, i, prompt, hit)
    cpdef _store_drop_hashes(self, tid)
    cpdef _store_write(self, Request r)

    @cython.locals(r=Request, pe=PrefillEngine, de=DecodeEngine)
    cpdef _assign(self, a)

    cpdef _de_room(self, DecodeEngine de)

    @cython.locals(node=Node)
    cpdef _submit_reads(self, Request r)

    @cython.locals(r=Request, need=cython.double)
    cpdef _pump_buffer(self, Node node)

    @cython.locals(node=Node)
    cpdef _de_buffer_free(self, Request r)

    cpdef _room_freed(self, Node node, double nbytes)

    @cython.locals(node=Node)
    cpdef _start_reads(self, Request r)

    @cython.locals(r=Request, nbytes=cython.double)
    cpdef _pump_reads(self, Node node)

    cpdef _read_done(self, Request r, Node node, tokens)
    cpdef _reads_done(self, Request r)

    @cython.locals(node=Node)
    cpdef _pe_buffer_free(self, Request r)

    @cython.locals(r=Request, need=cython.double)
    cpdef _admit_basic(self, PrefillEngine pe)

    @cython.locals(node=Node, nbytes=cython.double)
    cpdef _h2d_basic(self, Request r)

    cpdef _h2d_basic_done(self, Request r)

    @cython.locals(pe=PrefillEngine)
    cpdef _enqueue_prefill(self, Request r)

    @cython.locals(r=Request, batch=_Batch, compute=cython.double, b=cython.double, tail=cython.double,
                   inf=cython.double, n=cython.Py_ssize_t, j=cython.Py_ssize_t, queue=list, reqs=list,
                   specs=list, de_side=cython.double, out=cython.double, first=cython.bint)
    cpdef _start_batch(self, PrefillEngine pe)

    cpdef _compute_done(self, _Batch batch)

    @cython.locals(pe=PrefillEngine, r=Request, done_ids=set, q=list, k=cython.Py_ssize_t)
    cpdef _batch_part_done(self, _Batch batch)

    @cython.locals(pe=PrefillEngine, nbytes=cython.double)
    cpdef _prefill_done(self, Request r)

    @cython.locals(pe=PrefillEngine)
    cpdef _basic_sent(self, Request r)

    @cython.locals(node=Node)
    cpdef _de_h2d(self, Request r)

    @cython.locals(node=Node)
    cpdef _de_h2d_done(self, Request r)

    @cython.locals(now=cython.double, v=cython.double, t=cython.double, target=cython.double)
    cpdef _de_sync(self, DecodeGroup g)

    @cython.locals(n=cython.Py_ssize_t, context=cython.double)
    cpdef _de_step(self, DecodeEngine de)

    @cython.locals(m=DecodeEngine, step=cython.double, target=cython.double, h=list)
    cpdef _de_reschedule(self, DecodeGroup g)

    @cython.locals(de=DecodeEngine, g=DecodeGroup)
    cpdef _de_join(self, Request r)

    @cython.locals(de=DecodeEngine, nbytes=cython.double, pace=cython.double, min_capacity=cython.double,
                   end=cython.double, node=Node)
    cpdef _start_writeback(self, Request r, double decode_s)

    @cython.locals(r=Request)
    cpdef _wb_release(self, arg)

    @cython.locals(pace=cython.double, end=cython.double, left=cython.double)
    cpdef _unpace_writeback(self, Request r)

    @cython.locals(g=DecodeGroup, de=DecodeEngine, r=Request, version=cython.longlong, h=list, eps=cython.double,
                   now=cython.double, step=cython.double, changed=list, last=DecodeEngine)
    cpdef _de_finish(self, arg)

    cpdef _wb_done(self, Request r)

    @cython.locals(de=DecodeEngine, w=Request)
    cpdef _turn_done_decode(self, Request r)

    cpdef _allocated(self, Request r)

    @cython.locals(t=cython.double)
    cpdef _turn_complete(self, Request r)

    @cython.locals(n=cython.longlong, t=cython.double, last=cython.double)
    cpdef tuple run(self, double max_time=*, progress=*)


cdef class _DecodeTime:
    cdef public object cost
    cdef public list by_n
    cdef public double scale, topk, pf, ipf, layers, tp, kv_tok, index_kv, main_kv, overhead, a_lin, a_attn, a_byte
    cdef public double linear_rate, attention_rate, hbm_rate, ctx_max
    cdef public bint native, sparse_kv, fit

    cpdef object _terms(self, Py_ssize_t n)

    @cython.locals(lin=cython.double, weights=cython.double, c=cython.double, layers=cython.double,
                   sel=cython.double, main_pairs=cython.double, attn=cython.double, kv=cython.double,
                   nbytes=cython.double, t=cython.double, compute=cython.double, memory=cython.double, terms=tuple)
    cpdef double time(self, long long n, long long ctx) except? -1.0


cdef class _Call:
    cdef public object fn, arg


cdef class _ReadDone:
    cdef public Simulator sim
    cdef public Request r
    cdef public Node node
    cdef public object tokens


cdef class _BatchPart:
    cdef public Simulator sim
    cdef public _Batch batch
