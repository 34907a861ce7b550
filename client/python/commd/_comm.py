"""The communicator behind the module's functions: its libcomm handle, a lock
(libcomm takes none, and ctypes lets other threads run during a call), the
ops in flight as Work objects and the blocks of comm_mem_alloc in use.

An array from empty()/zeros() does not point into libcomm's mapping of its
block but into a second mapping of the same pages (mremap with old size 0:
shared memory, so commd still reads and writes it in place), and ops are
given the block's own address (libcomm_ptr); ALIAS_CAP arrays at most, past
which an array is libcomm's block itself. comm_finalize and comm_abort
unmap libcomm's segments; the second mapping is the module's, so the
arrays still alive then stay valid: finalize turns each into private memory
holding its values, unmapped once the array is gone.
"""
import bisect
import ctypes
import datetime
import math
import mmap
import operator
import sys
import threading
import warnings
import weakref

from ._lib import CommError, Result, last_error, lib

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mremap.restype = ctypes.c_void_p
_libc.mremap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                         ctypes.c_void_p)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MREMAP_MAYMOVE = 1
_MREMAP_FIXED = 2
_MAP_FAILED = ctypes.c_void_p(-1).value
_PAGE = mmap.PAGESIZE


def _alias_cap():
    """How many arrays may have a mapping of their own: each is a VMA that
    never merges with another, and a process past vm.max_map_count can no
    longer map anything (a thread's stack included)."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            most = int(f.read())
    except (OSError, ValueError):
        most = 65530
    return max(0, min(4096, most // 16))


ALIAS_CAP = _alias_cap()

# The arrays' mappings now in use: their starts, sorted, and for each start
# (end, what to add to reach libcomm's address). Changed in place, one
# entry at a time, under _alias_lock, which libcomm_ptr takes too. A
# reentrant lock: a collection in the middle of a change, or between two
# steps of libcomm_ptr (on this thread: Python 3.12 collects at any check),
# may drop another entry through an array's finalizer; so each change is
# one call, and libcomm_ptr checks that the entry it found is still ptr's.
_alias_starts = []
_alias_spans = {}
_alias_lock = threading.RLock()


def libcomm_ptr(ptr):
    """The address libcomm knows for ptr: ptr itself, unless it lies in an
    array of empty()/zeros(), whose block libcomm mapped elsewhere."""
    if not _alias_starts:
        return ptr
    with _alias_lock:
        while True:
            k = bisect.bisect_right(_alias_starts, ptr) - 1
            if k < 0:
                return ptr
            try:
                start = _alias_starts[k]
            except IndexError:  # entries dropped since the bisect: look again
                continue
            if start > ptr:  # one below it dropped since the bisect: look again
                continue
            end, delta = _alias_spans.get(start, (0, 0))
            return ptr + delta if ptr < end else ptr


def _alias_add(start, end, delta):
    """Map start..end to libcomm's block; False, adding nothing, once
    ALIAS_CAP arrays have a mapping."""
    span = (end, delta)
    with _alias_lock:
        if len(_alias_starts) >= ALIAS_CAP:
            return False
        _alias_spans[start] = span
        bisect.insort(_alias_starts, start)
    return True


def _alias_drop(start):
    """Forget the mapping at start; libcomm_ptr no longer leads from it."""
    with _alias_lock:
        if _alias_spans.pop(start, None) is not None:
            _alias_starts.remove(start)


def _map_again(ptr, nbytes):
    """A second mapping of the pages of libcomm's block at ptr, entered in
    the table: (the block's address there, (page start, length)), or (ptr,
    None) where the kernel refuses or ALIAS_CAP arrays have one already."""
    if len(_alias_starts) >= ALIAS_CAP:
        return ptr, None
    lo = ptr - ptr % _PAGE
    length = -(-(ptr + nbytes - lo) // _PAGE) * _PAGE
    p = _libc.mremap(lo, 0, length, _MREMAP_MAYMOVE, None)
    if p is None or p == _MAP_FAILED:
        return ptr, None
    addr = p + (ptr - lo)
    if not _alias_add(addr, addr + nbytes, ptr - addr):
        _libc.munmap(p, length)
        return ptr, None
    return addr, (p, length)


def _make_private(pages):
    """Turn our mapping pages of a segment that libcomm let go into private
    memory holding the same bytes, so the memfd can go: one copy into a new
    anonymous mapping, moved over the old one in one step (the array never
    reads anything else). Left shared (still valid) if the kernel refuses."""
    start, length = pages
    p = _libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE,
                   mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if p is None or p == _MAP_FAILED:
        return
    ctypes.memmove(p, start, length)
    q = _libc.mremap(p, length, length, _MREMAP_MAYMOVE | _MREMAP_FIXED, start)
    if q != start:
        _libc.munmap(p, length)


def _unmap(pages):
    _libc.munmap(*pages)


current = None  # the Comm that init() made, None outside init() .. finalize()
groups = []  # the Groups made since, not yet destroyed
init_args = (None, None)  # the socket and root init() joined with
# the torch backend finalized the world (its destroy_process_group() or the
# end of the script): one commd.finalize() after it has nothing to do
left_by_backend = False
claim = threading.Lock()  # who takes current away (finalize, abort) and when


def need(op):
    """The current Comm, or a RuntimeError naming op."""
    if current is None:
        raise RuntimeError(f"{op}: commd is not initialized; call commd.init() first")
    return current


class Group:
    """A communicator of some of the world's ranks (commd.new_group()). Its
    ranks: the world ranks in it, in its rank order; None when its ops take
    its own ranks (the torch backend's groups). On a rank not in it (comm
    None), as torch's non-member group: ops do nothing and return None,
    rank() and size() are -1."""

    def __init__(self, comm, ranks):
        self._comm = comm
        self.ranks = ranks

    def __repr__(self):
        who = self.ranks if self.ranks is not None else self._comm.size
        return f"<commd.Group {who}{'' if self._comm else ', not a member'}>"

    def rank(self):
        """This process's rank in the group, -1 when not in it."""
        return self._comm.rank if self._comm else -1

    def size(self):
        return self._comm.size if self._comm else -1


def pick(op, group):
    """The Comm that op runs on (group None: the world's), and a function
    taking a rank given to op to that Comm's rank: a world rank, for a
    group of new_group(). (None, None) for a group this rank is not in: op
    does nothing."""
    c = need(op)
    if group is not None:
        if not isinstance(group, Group):
            raise TypeError(f"{op}: group is a {type(group).__name__}, want a commd.Group")
        if group._comm is None:
            return None, None
        if group not in groups:
            raise RuntimeError(f"{op}: the group was destroyed")
        c = group._comm

    def local(name, value):
        value = operator.index(value)
        if group is None or group.ranks is None:
            if not 0 <= value < c.size:
                raise ValueError(f"{op}: {name} {value} is not a rank of 0..{c.size - 1}")
            return value
        if value not in group.ranks:
            raise ValueError(f"{op}: {name} {value} is not in the group (world ranks "
                             f"{list(group.ranks)})")
        return group.ranks.index(value)
    return c, local


def _timeout_ms(timeout):
    if timeout is None:
        return -1
    if isinstance(timeout, datetime.timedelta):
        timeout = timeout.total_seconds()
    if timeout < 0:
        raise ValueError(f"wait: timeout {timeout} is negative; None waits without limit")
    return min(math.ceil(timeout * 1000), 2**31 - 1)


class Work:
    """An op posted with async_op=True. Its arrays or tensors are kept alive
    until it is done."""

    def __init__(self, comm, op, req, bufs, after):
        self._comm = comm
        self._op = op
        self._req = req
        self._bufs = bufs
        self._after = after
        self._error = None

    def wait(self, timeout=None):
        """Wait for the op, at most timeout seconds (a number or a timedelta;
        None: without limit). True once it is done; False when the time ran
        out, and the op can be waited for again. Raises CommError when the op
        failed."""
        ms = _timeout_ms(timeout)
        with self._comm.lock:
            if self._req is not None:
                rc = lib.comm_wait(self._req, ms)
                if rc == Result.INPROGRESS:
                    return False
                self._done(rc)
        if self._error is not None:
            raise self._error
        return True

    def is_completed(self):
        """Whether the op has finished, successfully or not; does not block."""
        with self._comm.lock:
            if self._req is not None:
                done = ctypes.c_int()
                rc = lib.comm_test(self._req, ctypes.byref(done))
                if not done.value:
                    return False
                self._done(rc)
        return True

    def _done(self, rc):
        """libcomm has freed the request: keep its result, run the op's
        closing step, let the buffers go. Called with the lock held."""
        self._req = None
        self._comm.pending.remove(self)
        if rc == Result.OK:
            if self._after:
                self._after()
        else:
            self._error = self._comm.error(self._op, rc)
        self._bufs = self._after = None


class Comm:
    """A comm_t and what Python keeps beside it."""

    def __init__(self, handle):
        self.handle = handle
        self.rank = lib.comm_rank(handle)
        self.size = lib.comm_size(handle)
        self.lock = threading.RLock()
        self.pending = []  # Works not yet known to be done, in posting order
        self.blocks = {}  # address -> weakref.finalize of a comm_mem_alloc block
        self.freed = []  # blocks let go while another thread held the lock
        self.editing = 0  # in alloc or _free: a block let go meanwhile waits
        self.closed = False  # finalize or abort has begun: blocks go with the comm
        self.cuda_checked = False

    def error(self, op, rc):
        return CommError(op, rc, last_error(self.handle))

    def post(self, op, call, bufs, async_op, after=None):
        """Post op: call(req) makes the libcomm call, req being a
        comm_request_t ** (None: block until done). bufs: its Bufs; after:
        run once the op succeeded. A Work with async_op, else None."""
        with self.lock:
            self._drain()
            if any(b.cuda for b in bufs):
                self._follow_stream(op, bufs)
            req = ctypes.c_void_p() if async_op else None
            rc = call(ctypes.byref(req) if async_op else None)
            if rc != Result.OK:
                raise self.error(op, rc)
            if not async_op:
                if after:
                    after()
                return None
            work = Work(self, op, req, bufs, after)
            self.pending.append(work)
            return work

    def _follow_stream(self, op, bufs):
        """Device memory: the op follows torch's current stream there."""
        torch = sys.modules["torch"]
        dev = next(b.obj.device for b in bufs if b.cuda)
        stream = torch.cuda.current_stream(dev).cuda_stream
        if not self.cuda_checked:
            # libcomm built without CUDA takes device pointers for host ones,
            # but refuses any stream but NULL: ask with one before the first op
            rc = lib.comm_set_stream(self.handle, stream or 1)
            if rc != Result.OK:
                raise self.error(op, rc)
            self.cuda_checked = True
        rc = lib.comm_set_stream(self.handle, stream or None)
        if rc != Result.OK:
            raise self.error(op, rc)

    def alloc(self, op, nbytes):
        """A ctypes array over nbytes from comm_mem_alloc, given back to
        libcomm once the array is gone. It lies in the module's own mapping
        of the block when the kernel allows, for ALIAS_CAP arrays at most
        (see above)."""
        with self.lock:
            self._drain()
            ptr = lib.comm_mem_alloc(self.handle, nbytes)
            if not ptr:
                # comm_mem_alloc gives no code; its detail says why
                raise CommError(op, Result.ERR_NO_MEMORY, last_error(self.handle))
            self.editing += 1
            try:
                addr, pages = _map_again(ptr, nbytes)
                raw = (ctypes.c_ubyte * nbytes).from_address(addr)
                self.blocks[addr] = weakref.finalize(raw, self._let_go, addr, ptr, pages)
            finally:
                self.editing -= 1
            return raw

    def _let_go(self, addr, ptr, pages):
        # runs wherever the last reference went, maybe in a thread that
        # another one's blocking call keeps from the lock, or in this one
        # amid alloc's changes (a collection): then later. Once finalize or
        # abort has begun (closed, set before it reads freed: either it sees
        # this block or this sees closed) only our mapping is left to undo.
        self.freed.append((addr, ptr, pages))
        if self.closed:
            self._unmap_freed()
        elif not self.editing and self.lock.acquire(blocking=False):
            try:
                self._drain()
            finally:
                self.lock.release()

    def _free(self, addr, ptr, pages):
        self.editing += 1
        try:
            del self.blocks[addr]
            if pages:
                # no address of the mapping may lead to libcomm once it is gone
                _alias_drop(addr)
                _unmap(pages)
            lib.comm_mem_free(self.handle, ptr)
        finally:
            self.editing -= 1

    def _drain(self):
        while self.freed:
            self._free(*self.freed.pop())

    def _unmap_freed(self):
        """The blocks let go once the comm is closing: libcomm frees them
        with it; our mappings go here. Any thread, lock or not: each entry
        is popped by one."""
        while True:
            try:
                addr, _, pages = self.freed.pop()
            except IndexError:
                return
            if pages:
                _alias_drop(addr)
                _unmap(pages)

    def _forget_blocks(self, op):
        """Before comm_finalize or comm_abort, which release the blocks with
        the comm: never free them after. The arrays still alive in our own
        mappings, with what keeps them; those without one get a warning."""
        self.closed = True
        self._unmap_freed()
        kept, lost = [], 0
        for fin in list(self.blocks.values()):
            got = fin.detach()
            if got is None:
                continue  # let go meanwhile: _let_go saw closed
            raw, _, (addr, _, pages), _ = got
            if pages:
                _alias_drop(addr)
                kept.append((raw, pages))
            else:
                lost += 1
        self.blocks.clear()
        if lost:
            warnings.warn(f"{op}: {lost} arrays from commd.empty()/zeros() still use the "
                          "communicator's memory, which goes with it: they are invalid from "
                          "now on, and touching one crashes the process",
                          RuntimeWarning, stacklevel=4)
        return kept

    def _keep(self, kept):
        """After comm_finalize or comm_abort: the arrays that outlive the
        comm keep their values in private memory until they are gone."""
        for raw, pages in kept:
            _make_private(pages)
            weakref.finalize(raw, _unmap, pages).atexit = False

    def finalize(self):
        """Wait for the Works not waited for, then comm_finalize. Raises the
        first of their failures (as comm_finalize returns it)."""
        with self.lock:
            first = None
            for work in list(self.pending):
                work._done(lib.comm_wait(work._req, -1))
                if first is None and work._error is not None:
                    first = work._error
            kept = self._forget_blocks("finalize")
            rc = lib.comm_finalize(self.handle)
            self.handle = None
            self._keep(kept)
        if first is not None:
            raise CommError("finalize", first.code, f"{first.op}: {first.detail}")
        if rc != Result.OK:
            raise CommError("finalize", rc, "")

    def abort(self):
        """comm_abort; the Works not done fail with COMM_ERR_ABORTED."""
        with self.lock:
            for work in list(self.pending):
                work._req = None
                self.pending.remove(work)
                work._error = CommError(work._op, Result.ERR_ABORTED,
                                        "this rank aborted the communicator")
                work._bufs = work._after = None
            kept = self._forget_blocks("abort")
            lib.comm_abort(self.handle)
            self.handle = None
            self._keep(kept)
