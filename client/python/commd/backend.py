"""commd as a torch.distributed backend, in Python alone.

    import commd.backend                      # registers the backend "commd"
    torch.distributed.init_process_group("commd", init_method=..., rank=r, world_size=n)

torch's store (whatever init_method made) gives every rank the same job name
and token; rank 0 draws them. Then the collectives, send/recv and barrier of
torch.distributed run through commd.init's communicator. new_group() makes
a communicator of its own for the group's ranks, a job named after the
world's, drawn the same way through the group's store (torch calls the
backend on the group's ranks alone, so it cannot be a comm_split). Once
destroy_process_group(g) and the last reference let g's ProcessGroup go,
its thread finishes its ops and its communicator leaves the group's job.
destroy_process_group() of the world does the same for the communicator
init_process_group() made (commd.init's): once the world's ProcessGroup is
let go, or at the next init_process_group() at the latest, its ops are
seen through (for at most 10 s at init_process_group(), after which the
old communicator is aborted and its ops fail) and commd is finalized, so
init_process_group() works again;
a script that ends without destroy_process_group() leaves the job cleanly
at exit. A commd.finalize() after destroy_process_group() (as before) has
nothing left to do.
Reductions: SUM, PRODUCT, MIN, MAX and AVG (BAND, BOR, BXOR and PREMUL_SUM
are refused, by name). all_to_all and
all_to_all_single take blocks of any sizes (comm_alltoallv); send/recv take no
tags; gather and scatter move n times the data (an all-gather, a broadcast).
Ops run as commd's async ops; the Work torch gets wraps a future that a
thread of the process group completes once commd has done the op, so that
torch's C++ (DistributedDataParallel) can wait on it too.
"""
import atexit
import queue
import secrets
import sys
import threading
import time
import warnings
import weakref

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import ProcessGroup, Work, _create_work_from_future

import commd

_REDOPS = {
    dist.ReduceOp.SUM: commd.ReduceOp.SUM,
    dist.ReduceOp.PRODUCT: commd.ReduceOp.PRODUCT,
    dist.ReduceOp.MIN: commd.ReduceOp.MIN,
    dist.ReduceOp.MAX: commd.ReduceOp.MAX,
    dist.ReduceOp.AVG: commd.ReduceOp.AVG,
}


def _redop_name(op):
    """op's name (BXOR): torch 1.13's ReduceOp is an object holding a
    RedOpType enum (op.op), an older one the enum itself."""
    name = getattr(getattr(op, "op", op), "name", None)
    if isinstance(name, str):
        return name
    for name in dir(dist.ReduceOp):
        try:
            if name.isupper() and op == getattr(dist.ReduceOp, name):
                return name
        except (TypeError, ValueError):
            continue
    return repr(op)


def _redop(opts):
    """opts' reduction; no opts: SUM, as torch's own option structs default."""
    if opts is None:
        return commd.ReduceOp.SUM
    for theirs, ours in _REDOPS.items():
        if opts.reduceOp == theirs:
            return ours
    raise ValueError(f"commd backend: reduction {_redop_name(opts.reduceOp)} is not one of "
                     "SUM, PRODUCT, MIN, MAX, AVG")


def _root(opts):
    """opts' root rank; no opts: 0, as torch's own option structs default."""
    return 0 if opts is None else opts.rootRank


def _same(op, tensors, like):
    """Lists must be blocks of like's size and dtype: commd takes equal blocks."""
    for k, t in enumerate(tensors):
        if t.numel() != like.numel() or t.dtype != like.dtype:
            raise ValueError(f"commd backend: {op}: tensor {k} is {t.numel()} x {t.dtype}, "
                             f"want {like.numel()} x {like.dtype} like the others")


def _one(op, tensors):
    if len(tensors) != 1:
        raise ValueError(f"commd backend: {op}: {len(tensors)} tensors, want one per process")
    return tensors[0]


_completers = weakref.WeakSet()


@atexit.register
def _stop_completers():
    for c in list(_completers):
        c.stop()


class _Completer:
    """A thread per process group that sees its ops through. torch's own C++
    (DDP's reducer, _verify_params_across_processes, _broadcast_coalesced)
    waits on a Work's future and never calls back into Python, so each op's
    future is completed here once commd has done it (in posting order, as
    commd answers a communicator's ops), after the op's closing step."""

    def __init__(self, group=None):
        self._q = queue.SimpleQueue()
        self._stopping = False
        self._group = group
        self._t = threading.Thread(target=self._run, name="commd-backend", daemon=True)
        self._t.start()
        _completers.add(self)

    def stop(self):
        """End the thread (at exit: a thread still in Python as the
        interpreter goes can take the process down with it). An op still
        running is left as it is: its Work never completes."""
        self._stopping = True
        self._q.put(None)
        self._t.join(timeout=10)

    def close(self):
        """Its ProcessGroup is gone: once the ops queued before are through,
        the thread ends, and a group of new_group() leaves its job (the
        world's: commd's communicator). Only queues, so any thread may call
        it (a finalizer the collector runs)."""
        self._q.put(_CLOSE)

    def join(self, timeout=None):
        """Wait for the thread to end (after close() or stop()), at most
        timeout seconds (None: without limit); whether it ended."""
        self._t.join(timeout)
        return not self.is_alive()

    def is_alive(self):
        return self._t.is_alive()

    def work(self, works, result, after=None):
        """The Work torch gets for commd's Works (None: done already) that
        make an op: its future gives result once all are done and after (a
        copy out) has run, or their first failure."""
        fut = torch.futures.Future()
        self._q.put(([w for w in works if w is not None], fut, result, after))
        if _from_torch_api():
            return _Work(fut)
        # torch's C++ (DDP's parameter check, state broadcast and reducer)
        # keeps a Work after the Python object of a subclass went, and then
        # waits in its base class for what never comes: torch's own Work
        return _create_work_from_future(fut.then(_value))

    def _run(self):
        while True:
            item = self._q.get()
            if item is None:
                return
            if item is _CLOSE:
                self._end_group()
                return
            works, fut, result, after = item
            try:
                for w in works:
                    polls = 0
                    while not w.is_completed():  # takes the comm's lock only briefly
                        if self._stopping:
                            return
                        polls += 1
                        time.sleep(0 if polls < 100 else 0.0002)
                    w.wait()  # its failure, if any
                if after:
                    after()
            except Exception as e:  # noqa: BLE001 (torch raises it in the waiter)
                fut.set_exception(e)
            else:
                fut.set_result(result)

    def _end_group(self):
        if self._group is None:
            # the world's ProcessGroup is gone: leave, unless a thread
            # already is (init_process_group or the exit, joining this one)
            _leave_world(self, block=False)
            return
        try:
            commd._destroy(self._group, commd._comm.Comm.finalize)
        except commd.CommError as e:
            warnings.warn(f"commd backend: a destroyed group's communicator: {e}",
                          RuntimeWarning)


_CLOSE = object()  # a _Completer's queue: its ProcessGroup is gone


def _value(fut):
    return fut.value()  # raises what set_exception set


def _from_torch_api():
    """Whether the op's caller (two frames above _Completer.work: the
    caller of a ProcessGroupCommd method) is torch.distributed's Python API,
    which keeps the Work it gets while it uses it. Called from C++ (a
    binding, an autograd thread) the frame there is some other, or none."""
    try:
        return sys._getframe(3).f_globals.get("__name__") == "torch.distributed.distributed_c10d"
    except ValueError:
        return False


class _Work(Work):
    """What torch.distributed's functions get for an op, done when fut (set
    by the _Completer) is. wait() raises the op's failure: a Work made from
    the future returns True, since torch 1.13's set_exception keeps the
    exception as the future's value, which torch's C++ takes for a success.
    For the same reason get_future() (a comm hook hands it to C++) is a
    future whose callback raises it: one that failed there too."""

    def __init__(self, fut):
        super().__init__()
        self._fut = fut
        self._failed_too = fut.then(_value)

    def is_completed(self):
        return self._fut.done()

    def is_success(self):
        return self._fut.done() and self.exception() is None

    def exception(self):
        """The op's failure, None while it runs or once it succeeded."""
        if not self._fut.done():
            return None
        try:
            self._fut.value()
        except Exception as e:  # noqa: BLE001 (any failure of the op)
            return e
        return None

    def wait(self, timeout=None):
        """Block until the op is done (at most timeout, a timedelta, else a
        RuntimeError); raises its failure."""
        if timeout is not None and timeout.total_seconds() > 0:
            end = time.monotonic() + timeout.total_seconds()
            while not self._fut.done():
                if time.monotonic() >= end:
                    raise RuntimeError(f"commd backend: the op is not done after {timeout}")
                time.sleep(0.0002)
        self._fut.wait()
        return True

    def result(self):
        return self._fut.wait()

    def get_future(self):
        return self._failed_too


def _no_tag(op, tag):
    if tag:
        raise ValueError(f"commd backend: {op}: tag {tag}: commd matches sends and recvs "
                         f"in order, without tags")


class ProcessGroupCommd(ProcessGroup):
    """The world of a job, or a group of its ranks (group: a commd.Group
    whose ops take its own ranks, as torch gives them), its ops through
    commd."""

    def __init__(self, rank, size, group=None):
        super().__init__(rank, size)
        self._g = group
        self._kw = {"async_op": True, "group": group}
        self._c = _Completer(group)
        # torch tells a backend nothing of destroy_process_group(): the
        # object's end says it (not at exit, where the threads are stopped)
        weakref.finalize(self, self._c.close).atexit = False

    def getBackendName(self):
        return "commd"

    def allreduce(self, tensors, opts=None):
        t = _one("allreduce", tensors)
        return self._c.work([commd.all_reduce(t, _redop(opts), **self._kw)], tensors)

    def allreduce_coalesced(self, tensors, opts=None):
        # every tensor checked before any is posted: none is left running alone
        for k, t in enumerate(tensors):
            commd._buf.buf("allreduce_coalesced", f"tensors[{k}]", t, writable=True)
        return self._c.work([commd.all_reduce(t, _redop(opts), **self._kw) for t in tensors],
                            tensors)

    def broadcast(self, tensors, opts=None):
        t = _one("broadcast", tensors)
        return self._c.work([commd.broadcast(t, _root(opts), **self._kw)], tensors)

    def reduce(self, tensors, opts=None):
        t = _one("reduce", tensors)
        return self._c.work([commd.reduce(t, _root(opts), _redop(opts), **self._kw)], tensors)

    def allgather(self, output_lists, inputs, opts=None):
        outs, t = _one("allgather", output_lists), _one("allgather", inputs)
        return self._c.work([commd.all_gather(outs, t, **self._kw)], output_lists)

    def _allgather_base(self, out, inp, opts=None):
        return self._c.work([commd.all_gather(out, inp, **self._kw)], [out])

    def reduce_scatter(self, outputs, input_lists, opts=None):
        out, ins = _one("reduce_scatter", outputs), _one("reduce_scatter", input_lists)
        _same("reduce_scatter", ins, out)
        inp = torch.cat([x.reshape(-1) for x in ins])
        return self._c.work([commd.reduce_scatter(out, inp, _redop(opts), **self._kw)], outputs)

    def _reduce_scatter_base(self, out, inp, opts=None):
        return self._c.work([commd.reduce_scatter(out, inp, _redop(opts), **self._kw)], [out])

    def alltoall_base(self, out, inp, out_splits, in_splits, opts=None):
        return self._c.work([commd.all_to_all_single(out, inp, out_splits, in_splits, **self._kw)],
                     [out])

    def alltoall(self, outs, ins, opts=None):
        """Tensors of any sizes, one from and one to each rank: an
        all_to_all_single of their flattened concatenations."""
        if len(outs) != self.size() or len(ins) != self.size():
            raise ValueError(f"commd backend: all_to_all: {len(outs)} outputs and {len(ins)} "
                             f"inputs, want world_size {self.size()} of each")
        for k, t in enumerate(ins + outs):
            if t.dtype != ins[0].dtype:
                raise ValueError(f"commd backend: all_to_all: tensor {k} is {t.dtype}, want "
                                 f"{ins[0].dtype} like the others")
        inp = torch.cat([x.reshape(-1) for x in ins])
        out = torch.empty(sum(o.numel() for o in outs), dtype=inp.dtype, device=inp.device)

        def copy_out():
            at = 0
            with torch.no_grad():
                for o in outs:
                    o.copy_(out[at:at + o.numel()].view(o.shape))
                    at += o.numel()
        return self._c.work([commd.all_to_all_single(out, inp, [o.numel() for o in outs],
                                              [x.numel() for x in ins], **self._kw)],
                     outs, copy_out)

    def gather(self, output_lists, inputs, opts=None):
        """An all-gather whose blocks the root keeps (the others' go to a
        scratch tensor): the root's list is filled in place of torch's gather."""
        t = _one("gather", inputs)
        if self.rank() == _root(opts):
            outs = _one("gather", output_lists)
            _same("gather", outs, t)
        else:
            outs = torch.empty(self.size() * t.numel(), dtype=t.dtype, device=t.device)
        return self._c.work([commd.all_gather(outs, t, **self._kw)], output_lists)

    def scatter(self, outputs, input_lists, opts=None):
        """A broadcast of the root's blocks, each rank keeping its own."""
        out = _one("scatter", outputs)
        if self.rank() == _root(opts):
            ins = _one("scatter", input_lists)
            _same("scatter", ins, out)
            buf = torch.cat([x.reshape(-1) for x in ins])
        else:
            buf = torch.empty(self.size() * out.numel(), dtype=out.dtype, device=out.device)
        n, r = out.numel(), self.rank()

        def copy_out():
            with torch.no_grad():
                out.copy_(buf[r * n:(r + 1) * n].view(out.shape))
        return self._c.work([commd.broadcast(buf, _root(opts), **self._kw)], outputs, copy_out)

    def send(self, tensors, dst, tag):
        _no_tag("send", tag)
        return self._c.work([commd.isend(_one("send", tensors), dst, group=self._g)], tensors)

    def recv(self, tensors, src, tag):
        _no_tag("recv", tag)
        return self._c.work([commd.irecv(_one("recv", tensors), src, group=self._g)], tensors)

    def barrier(self, opts=None):
        return self._c.work([commd.barrier(**self._kw)], [])


def _draw(store, rank, size, job):
    """Every rank's (job, token) from store, drawn by rank 0 (job: the name
    it gives). A store used again (a file store) keeps the last round's
    keys: each call is a round of its own."""
    rnd = (store.add("commd/joins", 1) - 1) // size
    if rank == 0:
        store.set(f"commd/{rnd}/job", job)
        store.set(f"commd/{rnd}/token", secrets.token_hex(16))
    return store.get(f"commd/{rnd}/job").decode(), store.get(f"commd/{rnd}/token").decode()


def _timeout(timeout):
    ms = int(timeout.total_seconds() * 1000) if timeout else 0
    return min(max(ms, 1), 86400000) if ms else None


_world_job = None
_world = None  # (commd's Comm, the world ProcessGroup's _Completer) made by _make
_world_lock = threading.Lock()


_EXIT_WAIT_S = 10  # how long the exit waits for the world's ops still queued
_DESTROYED_WAIT_S = 10  # how long init_process_group waits for a destroyed world's ops


def _leave_world(by=None, block=True, wait=None, abort_late=False):
    """The world's ProcessGroup was destroyed, or the process ends: once
    its thread has seen its queued ops through, finalize the communicator
    _make had commd.init make, unless it is gone already (commd.finalize()
    or abort() of the user). by: that thread itself, which cannot wait for
    itself; block=False: return at once when another thread is leaving;
    wait: at most so many seconds for the ops (None: without limit). Then
    an op still running (a recv never matched) would keep finalize waiting
    as well: abort_late aborts the communicator, which fails the ops, so
    their Works raise; else (at exit) the thread is stopped and the job is
    not left, its connection closing with the process."""
    global _world
    if not _world_lock.acquire(blocking=block):
        return
    try:
        if _world is None or (by is not None and _world[1] is not by):
            return
        comm, completer = _world
        _world = None
        if by is None:
            completer.close()
            if not completer.join(wait) and abort_late:
                if not commd._abort_for_backend(comm):  # the user finalized it already
                    completer.stop()
                    return
                completer.join(wait)  # it fails their Works, then ends
                warnings.warn(f"commd backend: the destroyed world's ops still running after "
                              f"{wait} s; its communicator is aborted, they fail "
                              "COMM_ERR_ABORTED", RuntimeWarning)
                return
            if completer.is_alive():
                completer.stop()
                warnings.warn(f"commd backend: ops still running after {wait} s at exit; "
                              "the job is not left cleanly, its connection closes with the "
                              "process", RuntimeWarning)
                return
        try:
            commd._leave_for_backend(comm)
        except commd.CommError as e:
            warnings.warn(f"commd backend: leaving the job: {e}", RuntimeWarning)
    finally:
        _world_lock.release()


@atexit.register
def _leave_at_exit():
    # registered after _stop_completers, so run before it: the world's
    # thread sees its ops through, then the job is left cleanly (not a
    # connection closed under commd, which fails the job); an op that does
    # not end within _EXIT_WAIT_S is left as _stop_completers leaves it
    _leave_world(wait=_EXIT_WAIT_S)


def _make(store, rank, size, timeout):
    global _world_job, _world
    if dist.is_initialized():
        # new_group(): torch calls this on the group's ranks alone, with a store of its own
        if _world_job is None or not commd.is_initialized():
            raise RuntimeError("commd backend: new_group(backend=\"commd\") needs the "
                               "world on commd too")
        job, token = _draw(store, rank, size, f"{_world_job}/group-{secrets.token_hex(4)}")
        g = commd._init_group("new_group", job, token, rank, size, _timeout(timeout))
        return ProcessGroupCommd(rank, size, g)
    # a world destroyed before, whose ProcessGroup someone still holds
    _leave_world(wait=_DESTROYED_WAIT_S, abort_late=True)
    if commd.is_initialized():
        raise RuntimeError("commd backend: commd is initialized already (commd.init() "
                           "outside the backend); commd.finalize() before "
                           "init_process_group()")
    job, token = _draw(store, rank, size, f"torch-{secrets.token_hex(8)}")
    commd.init(job=job, token=token, rank=rank, world_size=size, timeout_ms=_timeout(timeout))
    _world_job = job
    pg = ProcessGroupCommd(rank, size)
    _world = (commd._comm.current, pg._c)
    return pg


dist.Backend.register_backend("commd", _make)
