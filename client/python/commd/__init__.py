"""commd: collectives and point-to-point messages between the ranks of a job,
through the node's commd, shaped like torch.distributed.

libcomm is loaded with ctypes ($COMMD_LIBCOMM, else libcomm.so.0). Buffers
are numpy arrays or torch tensors, contiguous, of a dtype libcomm knows;
neither package is needed to import this one. init() joins the job (unset
arguments come from the environment, as comm_init takes them: commrun's
COMM_*, torchrun's RANK, WORLD_SIZE, MASTER_ADDR, ...); every op then uses
that communicator until finalize(). An op blocks until its result is in
place, or with async_op=True returns a Work to wait for. Arrays from empty()
and zeros() are shared with commd; any other host memory is staged: an
async op reads it when posted and writes it when its Work is waited for.
"""
import ctypes
import enum
import operator
import os
import sys

from . import _comm
from ._buf import buf, same_dtype
from ._comm import Work
from ._lib import CommError, Result, last_error, lib
from ._mem import empty, zeros

__all__ = [
    "init", "finalize", "destroy_process_group", "abort", "is_initialized", "get_rank",
    "get_world_size", "all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce",
    "all_to_all", "send", "recv", "isend", "irecv", "barrier", "empty", "zeros", "ReduceOp",
    "Work", "CommError", "Result",
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
    handle = ctypes.c_void_p()
    rc = lib.comm_init(ctypes.byref(handle), ctypes.byref(cfg))
    if rc != Result.OK:
        raise CommError("init", rc, last_error(None))
    _comm.current = _comm.Comm(handle.value)


def is_initialized():
    return _comm.current is not None


def get_rank():
    return _comm.need("get_rank").rank


def get_world_size():
    return _comm.need("get_world_size").size


def finalize():
    """Wait for the ops not yet waited for, leave the job, free the
    communicator. Arrays from empty() and zeros() must not be used after."""
    c = _comm.need("finalize")
    _comm.current = None
    c.finalize()


destroy_process_group = finalize


def abort():
    """Leave at once: the other ranks' pending and later ops fail with
    COMM_ERR_ABORTED, and so do this rank's Works not yet done."""
    c = _comm.need("abort")
    _comm.current = None
    c.abort()


def _redop(op, redop):
    try:
        return ReduceOp(redop)
    except ValueError:
        raise ValueError(f"{op}: op {redop!r} is not a ReduceOp") from None


def _rank_arg(op, c, name, value):
    value = operator.index(value)
    if not 0 <= value < c.size:
        raise ValueError(f"{op}: {name} {value} is not a rank of 0..{c.size - 1}")
    return value


def all_reduce(t, op=ReduceOp.SUM, async_op=False):
    """Every rank's t becomes the reduction of all ranks' t."""
    c = _comm.need("all_reduce")
    redop = _redop("all_reduce", op)
    b = buf("all_reduce", "t", t, writable=True)
    return c.post("all_reduce", lambda req: lib.comm_allreduce(
        c.handle, b.ptr, b.ptr, b.count, b.dtype, redop, req), [b], async_op)


def reduce_scatter(out, inp, op=ReduceOp.SUM, async_op=False):
    """Rank r's out gets block r of the reduction of all ranks' inp
    (world_size blocks of out's size)."""
    c = _comm.need("reduce_scatter")
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
    outs = [buf("all_gather", f"out[{k}]", x, writable=True) for k, x in enumerate(out)]
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


def all_gather(out, inp, async_op=False):
    """Every rank's out gets all ranks' inp in rank order: out is one array
    of world_size times inp's elements, or a list of world_size arrays."""
    c = _comm.need("all_gather")
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


def broadcast(t, src, async_op=False):
    """Rank src's t is copied into every rank's t."""
    c = _comm.need("broadcast")
    src = _rank_arg("broadcast", c, "src", src)
    b = buf("broadcast", "t", t, writable=True)
    return c.post("broadcast", lambda req: lib.comm_broadcast(
        c.handle, b.ptr, b.ptr, b.count, b.dtype, src, req), [b], async_op)


def reduce(t, dst, op=ReduceOp.SUM, async_op=False):
    """Rank dst's t becomes the reduction of all ranks' t; the others' t
    are left as they are."""
    c = _comm.need("reduce")
    dst = _rank_arg("reduce", c, "dst", dst)
    redop = _redop("reduce", op)
    b = buf("reduce", "t", t, writable=c.rank == dst)
    recv = b.ptr if c.rank == dst else None
    return c.post("reduce", lambda req: lib.comm_reduce(
        c.handle, b.ptr, recv, b.count, b.dtype, redop, dst, req), [b], async_op)


def all_to_all(out, inp, async_op=False):
    """Block j of rank i's inp goes to block i of rank j's out: inp and out
    are world_size blocks of equal size."""
    c = _comm.need("all_to_all")
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


def _send(op, t, dst, async_op):
    c = _comm.need(op)
    dst = _rank_arg(op, c, "dst", dst)
    b = buf(op, "t", t)
    return c.post(op, lambda req: lib.comm_send(
        c.handle, b.ptr, b.count, b.dtype, dst, req), [b], async_op)


def _recv(op, t, src, async_op):
    c = _comm.need(op)
    src = _rank_arg(op, c, "src", src)
    b = buf(op, "t", t, writable=True)
    return c.post(op, lambda req: lib.comm_recv(
        c.handle, b.ptr, b.count, b.dtype, src, req), [b], async_op)


def send(t, dst):
    """Send t to rank dst; blocks until dst has posted the matching recv.
    The k-th send to dst matches dst's k-th recv from this rank, and their
    sizes in bytes must agree."""
    return _send("send", t, dst, False)


def recv(t, src):
    """Receive into t from rank src; blocks until it has arrived."""
    return _recv("recv", t, src, False)


def isend(t, dst):
    """send() without blocking: a Work. As in NCCL, this rank's later ops
    wait until dst has posted its recv."""
    return _send("isend", t, dst, True)


def irecv(t, src):
    """recv() without blocking: a Work."""
    return _recv("irecv", t, src, True)


def barrier(async_op=False):
    """Done on every rank once every rank has called it."""
    c = _comm.need("barrier")
    return c.post("barrier", lambda req: lib.comm_barrier(c.handle, req), [], async_op)
