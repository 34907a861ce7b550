"""commd: collectives and point-to-point messages between the ranks of a job,
through the node's commd, shaped like torch.distributed.

libcomm is loaded with ctypes ($COMMD_LIBCOMM, else libcomm.so.0). Buffers
are numpy arrays or torch tensors, contiguous, of a dtype libcomm knows;
neither package is needed to import this one. init() joins the job (unset
arguments come from the environment, as comm_init takes them: commrun's
COMM_*, torchrun's RANK, WORLD_SIZE, MASTER_ADDR, ...); every op then uses
that communicator until finalize(), or with group= a Group of some of its
ranks (new_group(), whose ops still name world ranks as src and dst, as
torch.distributed's do). An op blocks until its result is in
place, or with async_op=True returns a Work to wait for. Arrays from empty()
and zeros() are shared with commd; any other host memory is staged: an
async op reads it when posted and writes it when its Work is waited for.
"""
import ctypes
import enum
import operator
import os
import sys
import threading

from . import _comm
from ._buf import buf, same_dtype
from ._comm import Group, Work
from ._lib import CommError, Result, last_error, lib
from ._mem import empty, zeros

__all__ = [
    "init", "finalize", "destroy_process_group", "abort", "is_initialized", "get_rank",
    "get_world_size", "all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce",
    "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv", "barrier", "empty",
    "zeros", "ReduceOp", "Work", "CommError", "Result", "new_group", "Group",
] + [f"COMM_{r.name}" for r in Result]

globals().update({f"COMM_{r.name}": r for r in Result})


class ReduceOp(enum.IntEnum):
    """Reductions, as comm_redop_t. AVG on integers truncates toward zero."""
    SUM = 0
    PRODUCT = 1
    MIN = 2
    MAX = 3
    AVG = 4


def _text(op, name, value):
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise TypeError(f"{op}: {name} is a {type(value).__name__}, want a str")


def init(job=None, rank=None, world_size=None, socket=None, token=None, timeout_ms=None,
         root=None):
    """Connect to commd and join the job; blocks until every rank has joined.
    An argument left None is taken from the environment by libcomm."""
    if _comm.current is not None:
        raise RuntimeError("init: commd is already initialized; call commd.finalize() first")
    cfg = lib.comm_config_default()
    cfg.socket = None if socket is None else os.fsencode(socket)
    cfg.job = _text("init", "job", job)
    cfg.token = _text("init", "token", token)
    cfg.root = _text("init", "root", root)
    if rank is not None:
        cfg.rank = operator.index(rank)
    if world_size is not None:
        cfg.world_size = operator.index(world_size)
    if timeout_ms is not None:
        cfg.timeout_ms = operator.index(timeout_ms)
    _comm.current = _join("init", cfg)
    _comm.left_by_backend = False
    _comm.init_args = (cfg.socket, cfg.root)


def _join(op, cfg):
    """comm_init with cfg: a Comm."""
    handle = ctypes.c_void_p()
    rc = lib.comm_init(ctypes.byref(handle), ctypes.byref(cfg))
    if rc != Result.OK:
        raise CommError(op, rc, last_error(None))
    return _comm.Comm(handle.value)


def _init_group(op, job, token, rank, world_size, timeout_ms):
    """A Group of its own job (the torch backend's new_group()), joined as
    init() joined the world (its socket and root); its ops take its ranks."""
    _comm.need(op)
    cfg = lib.comm_config_default()
    cfg.socket, cfg.root = _comm.init_args
    cfg.job = _text(op, "job", job)
    cfg.token = _text(op, "token", token)
    cfg.rank = operator.index(rank)
    cfg.world_size = operator.index(world_size)
    if timeout_ms is not None:
        cfg.timeout_ms = operator.index(timeout_ms)
    g = _comm.Group(_join(op, cfg), None)
    _comm.groups.append(g)
    return g


def is_initialized():
    return _comm.current is not None


def get_rank(group=None):
    """This process's rank in the world, or in group (-1: not in it)."""
    c = _comm.pick("get_rank", group)[0]
    return c.rank if c else -1


def get_world_size(group=None):
    """The number of ranks in the world, or in group (-1: not in it)."""
    c = _comm.pick("get_world_size", group)[0]
    return c.size if c else -1


def new_group(ranks):
    """A Group of the world ranks in ranks (as torch.distributed.new_group:
    its ranks in ascending order), for the ops' group argument, whose src
    and dst stay world ranks. Every rank of the world calls it with the same
    ranks, in the same order as its collectives; on the ranks not in it,
    ops with it do nothing, as torch's. Through comm_split: a job of its
    own, and arrays from empty() and zeros() are used in place by it too."""
    c, world_rank = _comm.pick("new_group", None)
    members = sorted({world_rank("rank", r) for r in ranks})
    if not members:
        raise ValueError("new_group: no ranks")
    me = c.rank in members
    handle = ctypes.c_void_p()
    with c.lock:
        rc = lib.comm_split(c.handle, 0 if me else -1, members.index(c.rank) if me else 0,
                            ctypes.byref(handle))
    if rc != Result.OK:
        raise c.error("new_group", rc)
    if not me:
        return _comm.Group(None, tuple(members))
    g = _comm.Group(_comm.Comm(handle.value), tuple(members))
    _comm.groups.append(g)
    return g


_ending = threading.Lock()


def _destroy(group, how):
    """Take group off the list and end it: how(comm). Once: a group another
    thread took off already (the torch backend's, whose thread ends its
    group once its ProcessGroup is gone) is left to that thread."""
    with _ending:
        if group not in _comm.groups:
            return
        _comm.groups.remove(group)
    how(group._comm)


def finalize():
    """Wait for the ops not yet waited for, leave the job, free the
    communicator, the groups' first. Arrays from empty() and zeros() keep
    their values, in memory no longer shared with commd. Nothing to do
    once, after the torch backend left the job (destroy_process_group())."""
    with _comm.claim:
        if _comm.current is None and _comm.left_by_backend:
            _comm.left_by_backend = False
            return
        c = _comm.need("finalize")
        _comm.current = None
    _end(c)


def _end(c):
    """finalize() of c, taken from _comm.current already."""
    first = None
    for g in list(_comm.groups):
        try:
            _destroy(g, _comm.Comm.finalize)
        except CommError as e:
            first = first or e
    c.finalize()
    if first is not None:
        raise first


def _leave_for_backend(c):
    """The torch backend's finalize() of c, the world it made: False, doing
    nothing, when c is not the world now (the user finalized it)."""
    with _comm.claim:
        if _comm.current is not c:
            return False
        _comm.current = None
        _comm.left_by_backend = True
    _end(c)
    return True


def _abort_for_backend(c):
    """The torch backend's abort() of c, the world it made, whose ops did
    not end: False, doing nothing, when c is not the world now."""
    with _comm.claim:
        if _comm.current is not c:
            return False
        _comm.current = None
        _comm.left_by_backend = True
    for g in list(_comm.groups):
        _destroy(g, _comm.Comm.abort)
    c.abort()
    return True


def destroy_process_group(group=None):
    """group: finalize that group alone; None: finalize() (every group, then
    the world)."""
    if group is None:
        return finalize()
    if _comm.pick("destroy_process_group", group)[0] is not None:
        _destroy(group, _comm.Comm.finalize)


def abort():
    """Leave at once, the groups too: the other ranks' pending and later ops
    fail with COMM_ERR_ABORTED, and so do this rank's Works not yet done."""
    with _comm.claim:
        c = _comm.need("abort")
        _comm.current = None
    for g in list(_comm.groups):
        _destroy(g, _comm.Comm.abort)
    c.abort()


def _redop(op, redop):
    try:
        return ReduceOp(redop)
    except ValueError:
        raise ValueError(f"{op}: op {redop!r} is not a ReduceOp") from None


def all_reduce(t, op=ReduceOp.SUM, async_op=False, group=None):
    """Every rank's t becomes the reduction of all ranks' t."""
    c, _ = _comm.pick("all_reduce", group)
    if c is None:
        return None
    redop = _redop("all_reduce", op)
    b = buf("all_reduce", "t", t, writable=True)
    return c.post("all_reduce", lambda req: lib.comm_allreduce(
        c.handle, b.ptr, b.ptr, b.count, b.dtype, redop, req), [b], async_op)


def reduce_scatter(out, inp, op=ReduceOp.SUM, async_op=False, group=None):
    """Rank r's out gets block r of the reduction of all ranks' inp
    (world_size blocks of out's size)."""
    c, _ = _comm.pick("reduce_scatter", group)
    if c is None:
        return None
    redop = _redop("reduce_scatter", op)
    o = buf("reduce_scatter", "out", out, writable=True)
    i = buf("reduce_scatter", "inp", inp)
    same_dtype("reduce_scatter", o, "out", i, "inp")
    if i.count != c.size * o.count:
        raise ValueError(f"reduce_scatter: inp has {i.count} elements, want world_size "
                         f"{c.size} x out's {o.count} = {c.size * o.count}")
    return c.post("reduce_scatter", lambda req: lib.comm_reduce_scatter(
        c.handle, i.ptr, o.ptr, o.count, o.dtype, redop, req), [o, i], async_op)


def _gather_list(c, out, i):
    """all_gather into a list: check it, and gather into a temporary of the
    list's kind whose blocks are copied out once the op is done."""
    if len(out) != c.size:
        raise ValueError(f"all_gather: out is a list of {len(out)}, want world_size {c.size}")
    outs = [buf("all_gather", f"out[{k}]", x, writable=True, contiguous=False)
            for k, x in enumerate(out)]
    for k, ob in enumerate(outs):
        same_dtype("all_gather", ob, f"out[{k}]", i, "inp")
        if ob.count != i.count:
            raise ValueError(f"all_gather: out[{k}] has {ob.count} elements, "
                             f"want inp's {i.count}")
        if ob.kind != outs[0].kind:
            raise TypeError(f"all_gather: out[{k}] is a {ob.kind} array and out[0] "
                            f"a {outs[0].kind} one; use one kind")
    n = i.count
    if outs[0].kind == "numpy":
        np = sys.modules["numpy"]
        tmp = np.empty(c.size * n, dtype=out[0].dtype)

        def copy_out():
            for k, x in enumerate(out):
                x[...] = tmp[k * n:(k + 1) * n].reshape(x.shape)
    else:
        torch = sys.modules["torch"]
        tmp = torch.empty(c.size * n, dtype=out[0].dtype, device=out[0].device)

        def copy_out():
            with torch.no_grad():
                for k, x in enumerate(out):
                    x.copy_(tmp[k * n:(k + 1) * n].view(x.shape))
    return buf("all_gather", "out", tmp, writable=True), outs, copy_out


def all_gather(out, inp, async_op=False, group=None):
    """Every rank's out gets all ranks' inp in rank order: out is one array
    of world_size times inp's elements, or a list of world_size arrays."""
    c, _ = _comm.pick("all_gather", group)
    if c is None:
        return None
    i = buf("all_gather", "inp", inp)
    if isinstance(out, (list, tuple)):
        o, outs, after = _gather_list(c, out, i)
    else:
        o = buf("all_gather", "out", out, writable=True)
        same_dtype("all_gather", o, "out", i, "inp")
        if o.count != c.size * i.count:
            raise ValueError(f"all_gather: out has {o.count} elements, want world_size "
                             f"{c.size} x inp's {i.count} = {c.size * i.count}")
        outs, after = [], None
    return c.post("all_gather", lambda req: lib.comm_allgather(
        c.handle, i.ptr, o.ptr, i.count, i.dtype, req), [o, i] + outs, async_op, after)


def broadcast(t, src, async_op=False, group=None):
    """Rank src's t is copied into every rank's t."""
    c, local = _comm.pick("broadcast", group)
    if c is None:
        return None
    src = local("src", src)
    b = buf("broadcast", "t", t, writable=True)
    return c.post("broadcast", lambda req: lib.comm_broadcast(
        c.handle, b.ptr, b.ptr, b.count, b.dtype, src, req), [b], async_op)


def reduce(t, dst, op=ReduceOp.SUM, async_op=False, group=None):
    """Rank dst's t becomes the reduction of all ranks' t; the others' t
    are left as they are."""
    c, local = _comm.pick("reduce", group)
    if c is None:
        return None
    dst = local("dst", dst)
    redop = _redop("reduce", op)
    b = buf("reduce", "t", t, writable=c.rank == dst)
    recv = b.ptr if c.rank == dst else None
    return c.post("reduce", lambda req: lib.comm_reduce(
        c.handle, b.ptr, recv, b.count, b.dtype, redop, dst, req), [b], async_op)


def all_to_all(out, inp, async_op=False, group=None):
    """Block j of rank i's inp goes to block i of rank j's out: inp and out
    are world_size blocks of equal size."""
    c, _ = _comm.pick("all_to_all", group)
    if c is None:
        return None
    o = buf("all_to_all", "out", out, writable=True)
    i = buf("all_to_all", "inp", inp)
    same_dtype("all_to_all", o, "out", i, "inp")
    if i.count % c.size:
        raise ValueError(f"all_to_all: inp has {i.count} elements, not a multiple of "
                         f"world_size {c.size}")
    if o.count != i.count:
        raise ValueError(f"all_to_all: out has {o.count} elements, want inp's {i.count}")
    return c.post("all_to_all", lambda req: lib.comm_alltoall(
        c.handle, i.ptr, o.ptr, i.count // c.size, i.dtype, req), [o, i], async_op)


def _rows(op, what, b, splits, n):
    """Elements per rank of Buf b cut along its first dimension by splits
    (None or empty: n equal parts), and where each part starts."""
    shape = b.obj.shape
    first = shape[0] if len(shape) else 1
    row = b.count // first if first else 0
    if splits is None or len(splits) == 0:
        if first % n:
            raise ValueError(f"{op}: {what} has {first} rows, not a multiple of world_size "
                             f"{n}; give split sizes")
        splits = [first // n] * n
    splits = [int(s) for s in splits]
    if len(splits) != n or min(splits) < 0:
        raise ValueError(f"{op}: {what}'s split sizes {splits}: want {n} sizes >= 0, "
                         "one per rank")
    if sum(splits) != first:
        raise ValueError(f"{op}: {what}'s split sizes add up to {sum(splits)}, but it has "
                         f"{first} rows")
    counts = [s * row for s in splits]
    displs = [sum(counts[:j]) for j in range(n)]
    return counts, displs


def all_to_all_single(out, inp, output_split_sizes=None, input_split_sizes=None,
                      async_op=False, group=None):
    """As torch.distributed.all_to_all_single: inp is cut along its first
    dimension, input_split_sizes[j] rows going to rank j, and out takes
    output_split_sizes[i] rows from rank i, in rank order (None: equal
    parts). A rank's output_split_sizes[i] must be rank i's
    input_split_sizes for it. out and inp must not overlap."""
    c, _ = _comm.pick("all_to_all_single", group)
    if c is None:
        return None
    o = buf("all_to_all_single", "out", out, writable=True)
    i = buf("all_to_all_single", "inp", inp)
    same_dtype("all_to_all_single", o, "out", i, "inp")
    # each cut by its own rows, as torch's backends do: (4, 2) into (8,) is fine
    sc, sd = _rows("all_to_all_single", "inp", i, input_split_sizes, c.size)
    rc, rd = _rows("all_to_all_single", "out", o, output_split_sizes, c.size)
    equal = all(s is None or len(s) == 0 for s in (input_split_sizes, output_split_sizes))
    if equal and o.count != i.count:
        raise ValueError(f"all_to_all_single: out has {o.count} elements and inp {i.count}; "
                         "without split sizes they must be equal")
    arr = ctypes.c_size_t * c.size
    sc, sd, rc, rd = arr(*sc), arr(*sd), arr(*rc), arr(*rd)
    return c.post("all_to_all_single", lambda req: lib.comm_alltoallv(
        c.handle, i.ptr, sc, sd, o.ptr, rc, rd, i.dtype, req), [o, i], async_op)


def _send(op, t, dst, async_op, group):
    c, local = _comm.pick(op, group)
    if c is None:
        return None
    dst = local("dst", dst)
    b = buf(op, "t", t)
    return c.post(op, lambda req: lib.comm_send(
        c.handle, b.ptr, b.count, b.dtype, dst, req), [b], async_op)


def _recv(op, t, src, async_op, group):
    c, local = _comm.pick(op, group)
    if c is None:
        return None
    src = local("src", src)
    b = buf(op, "t", t, writable=True)
    return c.post(op, lambda req: lib.comm_recv(
        c.handle, b.ptr, b.count, b.dtype, src, req), [b], async_op)


def send(t, dst, group=None):
    """Send t to rank dst; blocks until dst has posted the matching recv.
    The k-th send to dst matches dst's k-th recv from this rank, and their
    sizes in bytes must agree."""
    return _send("send", t, dst, False, group)


def recv(t, src, group=None):
    """Receive into t from rank src; blocks until it has arrived."""
    return _recv("recv", t, src, False, group)


def isend(t, dst, group=None):
    """send() without blocking: a Work. This rank's sends and recvs posted
    after it progress with it, as in a group (an isend then an irecv on
    each of two ranks meet); a collective after it waits until dst has
    posted its recv."""
    return _send("isend", t, dst, True, group)


def irecv(t, src, group=None):
    """recv() without blocking: a Work."""
    return _recv("irecv", t, src, True, group)


def barrier(async_op=False, group=None):
    """Done on every rank once every rank has called it."""
    c, _ = _comm.pick("barrier", group)
    if c is None:
        return None
    return c.post("barrier", lambda req: lib.comm_barrier(c.handle, req), [], async_op)
