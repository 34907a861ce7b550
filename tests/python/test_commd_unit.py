"""test_commd_unit.py: the commd Python package against a real commd.

Every rank of a job runs the whole suite (commrun -n 2, or more ranks):
unittest runs the tests in name order, so all ranks post the same ops in the
same order. Tests that need a job of their own (init failing, life after
finalize, imports) run one-rank jobs in a child python. Needs numpy; the
torch tests are skipped without torch. Closes with one line per rank:
"rank R: N tests, F failed, S skipped".
"""
import gc
import io
import math
import os
import subprocess
import sys
import tempfile
import time
import unittest
import weakref

import numpy as np

try:
    import torch
except ImportError:
    torch = None

import commd

NUMPY_DTYPES = ["int8", "uint8", "int32", "uint32", "int64", "uint64", "float16", "float32",
                "float64"]
TORCH_DTYPES = ["int8", "uint8", "int32", "int64", "float16", "bfloat16", "float32", "float64"]
BITS = {"int8": 8, "uint8": 8, "int32": 32, "uint32": 32, "int64": 64, "uint64": 64}
JOB = os.environ.get("COMM_JOB", "local")


def rank():
    return commd.get_rank()


def size():
    return commd.get_world_size()


def sum_inputs(name, r):
    """What rank r adds up for dtype name: exact in every dtype; unsigned
    ones wrap around at the last element."""
    if name.startswith(("float", "bfloat")):
        return [0.5 * (i + 1) * (r + 1) * (-1) ** i for i in range(8)]
    if name.startswith("u"):
        return [(i + 1) * (r + 1) for i in range(7)] + [2 ** BITS[name] - 1 - r]
    return [(i + 1) * (r + 1) * (-1) ** i for i in range(8)]


def max_inputs(name, r):
    """For MAX: what rank 0 has is the largest only if read unsigned."""
    if name.startswith(("float", "bfloat")):
        return [-0.5 if r == 0 else 1.0]
    return [(2 ** BITS[name] - 1 if name.startswith("u") else -1) if r == 0 else 1]


def expected_sum(name):
    sums = [sum(col) for col in zip(*(sum_inputs(name, r) for r in range(size())))]
    if name.startswith("u"):
        sums = [s % 2 ** BITS[name] for s in sums]
    return sums


def expected_max(name):
    return [max(col) for col in zip(*(max_inputs(name, r) for r in range(size())))]


def reduced(op, cols, integer):
    """The reduction op of each column, computed here."""
    out = []
    for col in cols:
        if op == commd.ReduceOp.SUM:
            out.append(sum(col))
        elif op == commd.ReduceOp.PRODUCT:
            out.append(math.prod(col))
        elif op == commd.ReduceOp.MIN:
            out.append(min(col))
        elif op == commd.ReduceOp.MAX:
            out.append(max(col))
        elif integer:
            s = sum(col)
            out.append(abs(s) // len(col) * (1 if s >= 0 else -1))
        else:
            out.append(sum(col) / len(col))
    return out


def two_ranks(test):
    if size() < 2:
        test.skipTest("needs two ranks or more")


def signal_path(tag):
    return os.path.join(tempfile.gettempdir(), f"commd-unit-{JOB}-{tag}")


def signal(tag):
    """Tell the partner rank it may go on (ranks share the node)."""
    with open(signal_path(tag), "w"):
        pass


def await_signal(tag, seconds=30):
    path = signal_path(tag)
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"no signal {tag} within {seconds} s")
        time.sleep(0.01)
    os.unlink(path)


def child(code, **env):
    """Run code in a child python (a job of its own); its stdout and stderr."""
    e = dict(os.environ, **env)
    p = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,
                       timeout=60)
    return p.returncode, p.stdout, p.stderr


def setUpModule():
    commd.init()


def tearDownModule():
    commd.finalize()


class TestAsync(unittest.TestCase):
    def test_all_reduce_waits_for_the_partner(self):
        two_ranks(self)
        x = np.full(4, rank() + 1, np.int64)
        if rank() == 1:
            await_signal("allreduce")
        w = commd.all_reduce(x, async_op=True)
        if rank() == 0:
            self.assertFalse(w.wait(timeout=0.1))
            self.assertFalse(w.is_completed())
            signal("allreduce")
        self.assertTrue(w.wait(timeout=30))
        self.assertTrue(w.is_completed())
        self.assertTrue(w.wait())
        np.testing.assert_array_equal(x, np.full(4, size() * (size() + 1) // 2))

    def test_isend_irecv(self):
        two_ranks(self)
        if rank() == 0:
            w = commd.isend(np.arange(5, dtype=np.float32), 1)
            self.assertFalse(w.wait(0.1))
            signal("p2p")
            self.assertTrue(w.wait())
        elif rank() == 1:
            await_signal("p2p")
            y = np.zeros(5, np.float32)
            w = commd.irecv(y, 0)
            self.assertTrue(w.wait(30))
            np.testing.assert_array_equal(y, np.arange(5, dtype=np.float32))
        commd.barrier()

    def test_keeps_buffers_alive(self):
        a = np.ones(16, np.int32)
        ref = weakref.ref(a)
        w = commd.all_reduce(a, async_op=True)
        del a
        gc.collect()
        self.assertIsNotNone(ref())
        self.assertTrue(w.wait())
        gc.collect()
        self.assertIsNone(ref())

    def test_mismatch_fails_the_work(self):
        two_ranks(self)
        x = np.ones(2, np.float32)
        w = commd.all_reduce(x, op=commd.ReduceOp.SUM if rank() == 0 else commd.ReduceOp.MIN,
                             async_op=True)
        with self.assertRaises(commd.CommError) as cm:
            w.wait(30)
        self.assertEqual(cm.exception.name, "COMM_ERR_MISMATCH")
        self.assertTrue(w.is_completed())
        self.assertRaises(commd.CommError, w.wait)
        self.assertRaisesRegex(ValueError, "negative", w.wait, -1)

    def test_barrier(self):
        self.assertIsNone(commd.barrier())
        self.assertTrue(commd.barrier(async_op=True).wait())


class TestDtypes(unittest.TestCase):
    def test_numpy(self):
        for name in NUMPY_DTYPES:
            with self.subTest(dtype=name):
                x = np.array(sum_inputs(name, rank()), dtype=name)
                commd.all_reduce(x)
                np.testing.assert_array_equal(x, np.array(expected_sum(name), dtype=name))
                self.assertEqual(x.dtype, np.dtype(name))
                m = np.array(max_inputs(name, rank()), dtype=name)
                commd.all_reduce(m, op=commd.ReduceOp.MAX)
                np.testing.assert_array_equal(m, np.array(expected_max(name), dtype=name))

    @unittest.skipIf(torch is None, "no torch")
    def test_torch(self):
        for name in TORCH_DTYPES:
            with self.subTest(dtype=name):
                dt = getattr(torch, name)
                x = torch.tensor(sum_inputs(name, rank()), dtype=dt)
                commd.all_reduce(x)
                self.assertTrue(torch.equal(x, torch.tensor(expected_sum(name), dtype=dt)),
                                f"{x} != {expected_sum(name)}")
                m = torch.tensor(max_inputs(name, rank()), dtype=dt)
                commd.all_reduce(m, op=commd.ReduceOp.MAX)
                self.assertTrue(torch.equal(m, torch.tensor(expected_max(name), dtype=dt)))

    def test_unsupported(self):
        for dt in ["bool", "int16", "uint16", "complex64", "float128", ">f4"]:
            with self.subTest(dtype=dt):
                x = np.zeros(2, dtype=dt)
                shown = x.dtype.name if x.dtype.isnative else x.dtype.str
                self.assertRaisesRegex(
                    TypeError, rf"^all_reduce: t has dtype {shown}, which commd does not "
                    r"support; numpy dtypes supported: int8, uint8, int32, uint32, int64, "
                    r"uint64, float16, float32, float64$", commd.all_reduce, x)

    @unittest.skipIf(torch is None, "no torch")
    def test_unsupported_torch(self):
        for dt in [torch.bool, torch.int16, torch.complex64]:
            with self.subTest(dtype=dt):
                self.assertRaisesRegex(
                    TypeError, rf"^broadcast: t has dtype {str(dt)[6:]}, .*; torch dtypes "
                    r"supported: int8, uint8, int32, int64, float16, bfloat16, float32, "
                    r"float64$", commd.broadcast, torch.zeros(2, dtype=dt), 0)


class TestErrors(unittest.TestCase):
    def test_mismatch(self):
        two_ranks(self)
        x = np.ones(4, np.float32)
        with self.assertRaises(commd.CommError) as cm:
            commd.all_reduce(x, op=commd.ReduceOp.SUM if rank() == 0 else commd.ReduceOp.MAX)
        e = cm.exception
        self.assertIsInstance(e, RuntimeError)
        self.assertEqual(e.code, commd.Result.ERR_MISMATCH)
        self.assertEqual(e.code, commd.COMM_ERR_MISMATCH)
        self.assertEqual(e.name, "COMM_ERR_MISMATCH")
        self.assertIn("redop", e.detail)
        self.assertEqual(str(e), f"all_reduce: COMM_ERR_MISMATCH: {e.detail}")
        # the communicator goes on
        x[:] = 1
        commd.all_reduce(x)
        np.testing.assert_array_equal(x, np.full(4, size(), np.float32))

    def test_daemon_unreachable(self):
        code = ("import commd\n"
                "try:\n"
                "    commd.init(job='j', rank=0, world_size=1, socket='/nonexistent/commd.sock')\n"
                "except commd.CommError as e:\n"
                "    print(e.code == commd.Result.ERR_DAEMON_UNREACHABLE, e.name,\n"
                "          commd.is_initialized())\n"
                "    print(e.detail)\n")
        rc, out, err = child(code)
        self.assertEqual(rc, 0, err)
        lines = out.splitlines()
        self.assertEqual(lines[0], "True COMM_ERR_DAEMON_UNREACHABLE False")
        self.assertRegex(lines[1], r"^init: connect /nonexistent/commd\.sock: ")

    def test_init_twice(self):
        self.assertRaisesRegex(RuntimeError, "already initialized", commd.init)

    def test_not_initialized(self):
        code = ("import numpy as np, commd\n"
                "for f, args in [(commd.all_reduce, (np.ones(1),)), (commd.barrier, ()),\n"
                "                (commd.get_rank, ()), (commd.empty, (1, 'int8'))]:\n"
                "    try:\n"
                "        f(*args)\n"
                "    except RuntimeError as e:\n"
                "        print(e)\n")
        rc, out, err = child(code)
        self.assertEqual(rc, 0, err)
        self.assertEqual(out.splitlines(), [
            f"{f}: commd is not initialized; call commd.init() first"
            for f in ["all_reduce", "barrier", "get_rank", "empty"]])

    def test_libcomm_missing(self):
        rc, out, err = child("import commd", COMMD_LIBCOMM="/nonexistent/libcomm.so.0")
        self.assertNotEqual(rc, 0)
        self.assertRegex(err, r"ImportError: commd: cannot load libcomm from "
                              r"COMMD_LIBCOMM=/nonexistent/libcomm\.so\.0: ")

    def test_not_contiguous(self):
        x = np.zeros((4, 4), np.float32)[:, 1]
        self.assertRaisesRegex(ValueError, r"^all_reduce: t is not contiguous; pass "
                               r"np\.ascontiguousarray\(t\)$", commd.all_reduce, x)
        self.assertRaisesRegex(ValueError, r"^all_gather: inp is not contiguous",
                               commd.all_gather, np.zeros(4 * size(), np.float32), x)
        if torch is not None:
            t = torch.zeros(3, 4).t()
            self.assertRaisesRegex(ValueError, r"^reduce: t is not contiguous; pass "
                                   r"t\.contiguous\(\)$", commd.reduce, t, 0)

    def test_read_only(self):
        x = np.zeros(4, np.float32)
        x.setflags(write=False)
        self.assertRaisesRegex(ValueError, r"^all_reduce: t is read-only",
                               commd.all_reduce, x)
        self.assertRaisesRegex(ValueError, r"^reduce_scatter: out is read-only",
                               commd.reduce_scatter, x, np.zeros(4 * size(), np.float32))

    def test_sizes_and_args(self):
        n = size()
        z = np.zeros
        cases = [
            (commd.reduce_scatter, (z(3, np.float32), z(3 * n + 2, np.float32)), ValueError,
             f"reduce_scatter: inp has {3 * n + 2} elements, want world_size {n} x out's 3 = "
             f"{3 * n}"),
            (commd.all_gather, (z(2 * n + 1, np.int32), z(2, np.int32)), ValueError,
             f"all_gather: out has {2 * n + 1} elements, want world_size {n} x inp's 2 = "
             f"{2 * n}"),
            (commd.all_gather, ([z(2, np.int32)] * (n + 1), z(2, np.int32)), ValueError,
             f"all_gather: out is a list of {n + 1}, want world_size {n}"),
            (commd.all_gather, ([z(2, np.int32)] * (n - 1) + [z(3, np.int32)],
                                z(2, np.int32)), ValueError,
             f"all_gather: out[{n - 1}] has 3 elements, want inp's 2"),
            (commd.all_to_all, (z(n, np.int8), z(2 * n, np.int8)), ValueError,
             f"all_to_all: out has {n} elements, want inp's {2 * n}"),
            (commd.reduce_scatter, (z(1, np.float32), z(n, np.float64)), TypeError,
             "reduce_scatter: out is float32 and inp float64; use one dtype"),
            (commd.broadcast, (z(1), n), ValueError,
             f"broadcast: src {n} is not a rank of 0..{n - 1}"),
            (commd.reduce, (z(1), -1), ValueError,
             f"reduce: dst -1 is not a rank of 0..{n - 1}"),
            (commd.send, (z(1), rank()), commd.CommError,
             f"send: COMM_ERR_INVALID_ARG: send: peer {rank()} is this rank: outside a group "
             f"it would wait for itself (comm_group_start)"),
            (commd.all_to_all_single, (z((3, 2), np.int32), z((3, 2), np.int32), None,
                                       [3] + [0] * (n - 1)), ValueError if n > 1 else None,
             f"all_to_all_single: out has 3 rows, not a multiple of world_size {n}; give "
             "split sizes"),
            (commd.all_to_all_single, (z((3, 2), np.int32), z((3, 2), np.int32), [3] * n,
                                       [3] * n), ValueError,
             f"all_to_all_single: inp's split sizes add up to {3 * n}, but it has 3 rows"),
            (commd.all_to_all_single, (z(3, np.int32), z(3, np.int32), [3], [3, 0, 0, 0, 0]),
             ValueError,
             f"all_to_all_single: inp's split sizes [3, 0, 0, 0, 0]: want {n} sizes >= 0, one "
             "per rank"),
            (commd.all_to_all_single, (z((n, 3), np.int32), z((n, 2), np.int32)), ValueError,
             f"all_to_all_single: out has {3 * n} elements and inp {2 * n}; without split "
             "sizes they must be equal"),
            (commd.all_reduce, (z(1), 9), ValueError, "all_reduce: op 9 is not a ReduceOp"),
            (commd.all_reduce, ([1.0],), TypeError,
             "all_reduce: t is a list; want a numpy array or a torch tensor"),
        ]
        if n > 1:
            cases.append((commd.all_to_all, (z(n + 1, np.int8), z(n + 1, np.int8)), ValueError,
                          f"all_to_all: inp has {n + 1} elements, not a multiple of world_size "
                          f"{n}"))
        for f, args, exc, msg in cases:
            if exc is None:  # not an error with this many ranks
                continue
            with self.subTest(msg=msg):
                with self.assertRaises(exc) as cm:
                    f(*args)
                self.assertEqual(str(cm.exception), msg)


class TestGroups(unittest.TestCase):
    """new_group(): comm_split of the world; ops with group= name world ranks."""

    def test_all_ranks(self):
        g = commd.new_group(reversed(range(size())))  # sorted, as torch's
        self.assertEqual((commd.get_rank(g), commd.get_world_size(g)), (rank(), size()))
        a = np.arange(5, dtype=np.int64) * (rank() + 1)
        commd.all_reduce(a, group=g)
        np.testing.assert_array_equal(a, np.arange(5) * (size() * (size() + 1) // 2))
        b = np.full(3, float(rank()))
        commd.broadcast(b, src=size() - 1, group=g)
        np.testing.assert_array_equal(b, np.full(3, float(size() - 1)))
        commd.destroy_process_group(g)

    def test_some_ranks(self):
        two_ranks(self)
        last = size() - 1
        g = commd.new_group([last])
        if rank() != last:
            # as torch's non-member group: -1, and ops that do nothing
            self.assertEqual((commd.get_rank(g), commd.get_world_size(g)), (-1, -1))
            a = np.ones(2)
            self.assertIsNone(commd.all_reduce(a, group=g, async_op=True))
            self.assertIsNone(commd.broadcast(a, src=last, group=g))
            np.testing.assert_array_equal(a, np.ones(2))
            commd.destroy_process_group(g)
            return
        self.assertEqual((commd.get_rank(g), commd.get_world_size(g)), (0, 1))
        a = np.array([rank() + 0.5])
        commd.all_reduce(a, group=g)
        np.testing.assert_array_equal(a, [rank() + 0.5])
        with self.assertRaisesRegex(ValueError, r"src 0 is not in the group \(world ranks "):
            commd.broadcast(a, src=0, group=g)
        commd.destroy_process_group(g)

    def test_send_recv_and_world_memory(self):
        two_ranks(self)
        g = commd.new_group([size() - 1, 0])
        if commd.get_rank(g) < 0:
            return
        a = commd.zeros(6, dtype="int32")  # the world's memory, in place in the group
        if rank() == 0:
            a[:] = np.arange(6) + 40
            commd.send(a, dst=size() - 1, group=g)
        else:
            commd.recv(a, src=0, group=g)
            np.testing.assert_array_equal(a, np.arange(6) + 40)
        a[:] = rank() + 1
        commd.all_reduce(a, group=g)
        np.testing.assert_array_equal(a, np.full(6, size() + 1))
        del a
        commd.destroy_process_group(g)

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "new_group: rank .* is not a rank of"):
            commd.new_group([size()])
        with self.assertRaisesRegex(ValueError, "new_group: no ranks"):
            commd.new_group([])
        with self.assertRaisesRegex(TypeError, "want a commd.Group"):
            commd.barrier(group="world")
        g = commd.new_group(range(size()))
        commd.destroy_process_group(g)
        with self.assertRaisesRegex(RuntimeError, "the group was destroyed"):
            commd.barrier(group=g)
        # nothing went out: the world's next op matches on every rank
        a = np.ones(2)
        commd.all_reduce(a)
        np.testing.assert_array_equal(a, np.full(2, float(size())))


class TestLifecycle(unittest.TestCase):
    def test_one_rank_job(self):
        # finalize waits for what was not waited for, keeps the live arrays
        # valid (no warning) and ends the module's ops
        code = ("import warnings, numpy as np, commd\n"
                f"commd.init(job='{JOB}-solo-{rank()}', rank=0, world_size=1)\n"
                "print(commd.get_rank(), commd.get_world_size())\n"
                "z = commd.zeros(4, 'float32'); z += 2\n"
                "w = commd.all_reduce(z, op=commd.ReduceOp.PRODUCT, async_op=True)\n"
                "with warnings.catch_warnings(record=True) as ws:\n"
                "    warnings.simplefilter('always')\n"
                "    commd.destroy_process_group()\n"
                "print([str(x.message) for x in ws])\n"
                "print(w.wait(), commd.is_initialized(), z.tolist())\n"
                "try:\n"
                "    commd.barrier()\n"
                "except RuntimeError as e:\n"
                "    print(e)\n")
        rc, out, err = child(code)
        self.assertEqual(rc, 0, err)
        self.assertEqual(out.splitlines(), [
            "0 1",
            "[]",
            "True False [2.0, 2.0, 2.0, 2.0]",
            "barrier: commd is not initialized; call commd.init() first"])

    def test_without_numpy_or_torch(self):
        code = ("import sys\n"
                "sys.modules['numpy'] = sys.modules['torch'] = None\n"
                "import commd\n"
                f"commd.init(job='{JOB}-bare-{rank()}', rank=0, world_size=1)\n"
                "for f, args in [(commd.all_reduce, ([1.0],)), (commd.empty, (2, 'float32'))]:\n"
                "    try:\n"
                "        f(*args)\n"
                "    except (TypeError, ImportError) as e:\n"
                "        print(type(e).__name__, e)\n"
                "commd.finalize()\n")
        rc, out, err = child(code)
        self.assertEqual(rc, 0, err)
        self.assertEqual(out.splitlines(), [
            "TypeError all_reduce: t is a list; want a numpy array or a torch tensor",
            "ImportError empty: like='numpy' needs numpy, which is not installed"])

    def test_arrays_outlive_the_communicator(self):
        # arrays of empty()/zeros() still referenced after finalize() or
        # abort() keep their values and stay writable (they crashed the
        # process with SIGSEGV once libcomm had unmapped its segments); a
        # later communicator takes them as any memory of the process
        kinds = "'numpy'" + (", 'torch'" if torch is not None else "")
        code = ("import gc, warnings, numpy as np, commd\n"
                "warnings.simplefilter('error', RuntimeWarning)\n"
                f"for end in ('finalize', 'abort'):\n"
                f"    commd.init(job='{JOB}-outlive-' + end + '-{rank()}', rank=0, world_size=1)\n"
                f"    zs = [commd.zeros(4, 'float32', like=k) for k in ({kinds},)]\n"
                "    big = commd.zeros(1 << 20, 'uint8'); big[-1] = 9\n"
                "    for z in zs:\n"
                "        z += 3; commd.all_reduce(z)\n"
                "    tail = zs[0][2:]\n"
                "    getattr(commd, end)()\n"
                "    for z in zs:\n"
                "        z += 1\n"
                "        print(end, float(z.sum()), int(big[-1]), tail.tolist())\n"
                "commd.init(job='" + JOB + f"-outlive-again-{rank()}', rank=0, world_size=1)\n"
                "commd.all_reduce(tail, op=commd.ReduceOp.PRODUCT)\n"
                "print(tail.tolist())\n"
                "del zs, big, tail, z; gc.collect()\n"
                "commd.finalize()\n")
        rc, out, err = child(code)
        self.assertEqual(rc, 0, err)
        want = []
        for end in ("finalize", "abort"):
            want += [f"{end} 16.0 9 [4.0, 4.0]"] * (2 if torch is not None else 1)
        self.assertEqual(out.splitlines(), want + ["[4.0, 4.0]"])

    def test_alias_cap(self):
        # one mapping (a VMA) per array, at most ALIAS_CAP of them: 66000
        # arrays once ran out of vm.max_map_count, and then no thread could
        # start; the arrays past it are libcomm's blocks themselves, which
        # work but do not outlive finalize() (its RuntimeWarning counts them)
        code = ("import warnings, commd\n"
                "from commd import _comm\n"
                "cap = getattr(_comm, 'ALIAS_CAP', 4096)\n"
                f"commd.init(job='{JOB}-cap-{rank()}', rank=0, world_size=1)\n"
                "def vmas():\n"
                "    with open('/proc/self/maps') as f:\n"
                "        return len(f.readlines())\n"
                "before = vmas()\n"
                "zs = [commd.zeros(4, 'float32') for _ in range(2 * cap)]\n"
                "print('bounded', vmas() - before < cap * 3 // 2)\n"
                "print('aliased', sum(_comm.libcomm_ptr(z.ctypes.data) != z.ctypes.data "
                "for z in zs) == cap)\n"
                "keep, late = zs[:10], zs[-3:]\n"
                "for z in keep + late:\n"
                "    z += 2; commd.all_reduce(z)\n"
                "del zs, z\n"
                "z = commd.zeros(4, 'float32')\n"
                "print('again', _comm.libcomm_ptr(z.ctypes.data) != z.ctypes.data)\n"
                "print([float(z.sum()) for z in late])\n"
                "del z\n"
                "with warnings.catch_warnings(record=True) as ws:\n"
                "    warnings.simplefilter('always')\n"
                "    commd.finalize()\n"
                "print([str(w.message).split(' from ')[0] for w in ws])\n"
                "print(sum(float(k.sum()) for k in keep))\n")
        rc, out, err = child(code)
        self.assertEqual(rc, 0, err)
        self.assertEqual(out.splitlines(), [
            "bounded True", "aliased True", "again True", "[8.0, 8.0, 8.0]",
            "['finalize: 3 arrays']", "80.0"])

    def test_arrays_let_go_during_finalize(self):
        # an array whose last reference goes while finalize() detaches the
        # blocks, in another thread (which finds the lock held) or in this
        # one (a collection), once leaked its mapping and so the segment's
        # memfd, or broke the loop over the blocks
        code = ("import gc, threading, commd\n"
                "from commd import _comm\n"
                "class Hook:\n"
                "    def __init__(self, fin, then):\n"
                "        self.fin, self.then = fin, then\n"
                "    def detach(self):\n"
                "        self.then()\n"
                "        return self.fin.detach()\n"
                "def in_a_thread():\n"
                "    t = threading.Thread(target=held.pop); t.start(); t.join()\n"
                "for how, then in (('thread', in_a_thread), ('here', lambda: held.pop())):\n"
                f"    commd.init(job='{JOB}-letgo-' + how + '-{rank()}', rank=0, world_size=1)\n"
                "    kept = commd.zeros(4, 'float32'); kept += 1\n"
                "    held = [commd.zeros(4, 'float32') for _ in range(2)]\n"
                "    c = _comm.current\n"
                "    first = next(iter(c.blocks))\n"
                "    c.blocks[first] = Hook(c.blocks[first], then)\n"
                "    commd.finalize()\n"
                "    print(how, len(held), float(kept.sum()))\n"
                "    del kept, held, c; gc.collect()\n"
                "    with open('/proc/self/maps') as f:\n"
                "        print(how, 'segments mapped', f.read().count('comm-segment'))\n")
        rc, out, err = child(code)
        self.assertEqual(rc, 0, err)
        self.assertEqual(out.splitlines(), [
            "thread 1 4.0", "thread segments mapped 0", "here 1 4.0", "here segments mapped 0"])

    def test_alias_table_two_comms(self):
        # two communicators' blocks made and let go in two threads: no
        # entry of the shared table lost (it was changed under each
        # communicator's own lock)
        code = ("import ctypes, sys, threading, commd\n"
                "from commd import _comm\n"
                "sys.setswitchinterval(1e-6)\n"
                f"commd.init(job='{JOB}-table-{rank()}', rank=0, world_size=1)\n"
                "comms = [_comm.current, commd.new_group([0])._comm]\n"
                "most = min(1000, getattr(_comm, 'ALIAS_CAP', 4096) // 4)\n"
                "seen, lost = set(), []\n"
                "def churn(c):\n"
                "    live = []\n"
                "    for k in range(15000):\n"
                "        live.append(c.alloc('empty', 64))\n"
                "        a = ctypes.addressof(live[-1])\n"
                "        seen.add(a)\n"
                "        if _comm.libcomm_ptr(a) == a:\n"
                "            lost.append(a)\n"
                "        if len(live) > most:\n"
                "            del live[:most // 2 + 1]\n"
                "ts = [threading.Thread(target=churn, args=(c,)) for c in comms]\n"
                "for t in ts: t.start()\n"
                "for t in ts: t.join()\n"
                "commd.finalize()\n"
                "print(len(seen) > 100, len(lost), sum(_comm.libcomm_ptr(a) != a for a in seen))\n")
        rc, out, err = child(code)
        self.assertEqual(rc, 0, err)
        self.assertEqual(out, "True 0 0\n")

    def test_finalize_shows_no_zeros(self):
        # finalize() turns an array's pages private in one step: a thread
        # reading it meanwhile sees its values throughout (there was a
        # window in which it read zeros)
        code = ("import threading, numpy as np, commd\n"
                f"commd.init(job='{JOB}-nozeros-{rank()}', rank=0, world_size=1)\n"
                "big = commd.empty(64 << 20, 'uint8'); big[:] = 7\n"
                "stop, odd, reads = False, 0, 0\n"
                "def watch():\n"
                "    global odd, reads\n"
                "    while not stop:\n"
                "        odd += int(big[-1]) != 7; reads += 1\n"
                "t = threading.Thread(target=watch); t.start()\n"
                "while reads < 100:\n"
                "    pass\n"
                "commd.finalize()\n"
                "stop = True; t.join()\n"
                "print(odd, int(big.min()), int(big.max()))\n")
        rc, out, err = child(code)
        self.assertEqual(rc, 0, err)
        self.assertEqual(out, "0 7 7\n")

    def test_abort(self):
        code = ("import numpy as np, commd\n"
                f"commd.init(job='{JOB}-abort-{rank()}', rank=0, world_size=1)\n"
                "commd.abort()\n"
                "print(commd.is_initialized())\n")
        rc, out, err = child(code)
        self.assertEqual(rc, 0, err)
        self.assertEqual(out, "False\n")


class TestOps(unittest.TestCase):
    def test_numpy(self):
        n, r = size(), rank()
        out = np.zeros(2, np.float32)
        commd.reduce_scatter(out, np.arange(2 * n, dtype=np.float32) * (r + 1))
        k = n * (n + 1) // 2
        np.testing.assert_array_equal(out, np.array([2 * r, 2 * r + 1]) * k)

        out = np.full(3 * n, -1, np.int64)
        commd.all_gather(out, np.array([r, 10 * r, 100 * r]))
        np.testing.assert_array_equal(out, np.concatenate([[q, 10 * q, 100 * q]
                                                           for q in range(n)]))
        outs = [np.zeros((2, 1), np.uint32) for _ in range(n)]
        commd.all_gather(outs, np.array([r, r + 7], np.uint32))
        for q in range(n):
            np.testing.assert_array_equal(outs[q], [[q], [q + 7]])
        # a list of views that are not contiguous (columns of one array) is filled
        big = np.zeros((2, n), np.uint32)
        commd.all_gather([big[:, q] for q in range(n)], np.array([r, r + 7], np.uint32))
        np.testing.assert_array_equal(big, [list(range(n)), [q + 7 for q in range(n)]])

        t = np.full(5, r, np.float64)
        commd.broadcast(t, n - 1)
        np.testing.assert_array_equal(t, np.full(5, n - 1))

        t = np.full(3, r + 1, np.int32)
        commd.reduce(t, 0, commd.ReduceOp.MAX)
        np.testing.assert_array_equal(t, np.full(3, n if r == 0 else r + 1))

        inp = np.arange(2 * n, dtype=np.int8) + 20 * r
        out = np.zeros(2 * n, np.int8)
        commd.all_to_all(out, inp)
        np.testing.assert_array_equal(out, np.concatenate([[2 * r + 20 * q, 2 * r + 1 + 20 * q]
                                                           for q in range(n)]))

    @unittest.skipIf(torch is None, "no torch")
    def test_torch(self):
        n, r = size(), rank()
        outs = [torch.zeros(3, dtype=torch.bfloat16, requires_grad=True) for _ in range(n)]
        commd.all_gather(outs, torch.full((3,), r + 0.5, dtype=torch.bfloat16))
        for q in range(n):
            self.assertTrue(torch.equal(outs[q].detach(), torch.full((3,), q + 0.5,
                                                                     dtype=torch.bfloat16)))
        t = torch.full((2, 2), float(r), dtype=torch.float16)
        w = commd.broadcast(t, 0, async_op=True)
        self.assertTrue(w.wait())
        self.assertTrue(torch.equal(t, torch.zeros(2, 2, dtype=torch.float16)))
        out = torch.zeros(1, dtype=torch.int64)
        commd.reduce_scatter(out, torch.arange(n, dtype=torch.int64) + r, commd.ReduceOp.MIN)
        self.assertEqual(out.item(), r)

    def test_all_to_all_single(self):
        """Rank i sends (i + 2 j) % 3 rows of 2 to rank j (some none), in
        numpy and zero-copy arrays, blocking and async; then equal parts."""
        n, r = size(), rank()

        def rows(i, j):
            return (i + 2 * j) % 3

        def block(i, j):
            return np.full((rows(i, j), 2), 100 * i + j, np.int32)
        want = np.concatenate([block(i, r) for i in range(n)])
        for zc in (False, True):
            for async_op in (False, True):
                with self.subTest(zero_copy=zc, async_op=async_op):
                    inp = np.concatenate([block(r, j) for j in range(n)])
                    out = np.full(want.shape, -1, np.int32)
                    if zc:
                        inp_zc = commd.empty(inp.shape, np.int32)
                        inp_zc[...] = inp
                        inp, out = inp_zc, commd.zeros(want.shape, np.int32)
                    # split sizes as a list and as a numpy array
                    w = commd.all_to_all_single(out, inp, [rows(i, r) for i in range(n)],
                                                np.array([rows(r, j) for j in range(n)]),
                                                async_op=async_op)
                    if async_op:
                        self.assertTrue(w.wait())
                    np.testing.assert_array_equal(out, want)
        inp = np.arange(3 * n, dtype=np.float64) + 10 * r
        out = np.zeros(3 * n, np.float64)
        commd.all_to_all_single(out, inp)
        np.testing.assert_array_equal(out, np.concatenate(
            [np.arange(3 * r, 3 * r + 3) + 10 * q for q in range(n)]))
        # rows of 2 in, rows of 1 out: each cut by its own rows, as torch's
        inp = np.arange(2 * n, dtype=np.int64).reshape(n, 2) + 10 * r
        out = np.zeros(2 * n, np.int64)
        commd.all_to_all_single(out, inp)
        np.testing.assert_array_equal(out, np.concatenate(
            [[2 * r + 10 * q, 2 * r + 1 + 10 * q] for q in range(n)]))

    def test_reduce_ops(self):
        n, r = size(), rank()
        for dt in ["float32", "int32"]:
            integer = dt == "int32"
            vals = [[3 * (q + 1) - 7, q + 1, -2 * q - 1, 5 - q] for q in range(n)]
            if not integer:
                vals = [[v + 0.5 for v in row] for row in vals]
            for op in commd.ReduceOp:
                with self.subTest(dtype=dt, op=op.name):
                    x = np.array(vals[r], dtype=dt)
                    commd.all_reduce(x, op=op)
                    want = np.array(reduced(op, zip(*vals), integer), dtype=dt)
                    if op == commd.ReduceOp.AVG and not integer:
                        np.testing.assert_allclose(x, want, rtol=1e-6)
                    else:
                        np.testing.assert_array_equal(x, want)
        self.assertEqual([int(op) for op in commd.ReduceOp], [0, 1, 2, 3, 4])


class TestZeroCopy(unittest.TestCase):
    def blocks(self):
        return commd._comm.current.blocks

    def test_all_reduce(self):
        kinds = ["numpy"] + (["torch"] if torch is not None else [])
        for like in kinds:
            with self.subTest(like=like):
                z = commd.zeros((2, 3), "float32", like=like)
                self.assertEqual(tuple(z.shape), (2, 3))
                self.assertEqual(float(z.sum()), 0)
                ptr = z.ctypes.data if like == "numpy" else z.data_ptr()
                self.assertIn(ptr, self.blocks())
                self.assertEqual(ptr % 256, 0)
                z += rank() + 1
                commd.all_reduce(z)
                self.assertEqual(float(z.sum()), 6 * size() * (size() + 1) // 2)
                del z
                self.assertNotIn(ptr, self.blocks())

    def test_dtypes(self):
        self.assertEqual(commd.empty(3, np.uint64).dtype, np.uint64)
        self.assertEqual(commd.empty((1, 2), "int8").shape, (1, 2))
        self.assertRaisesRegex(TypeError, r"^empty: the new array has dtype bfloat16, which "
                               "commd does not support; numpy dtypes", commd.empty, 1, "bfloat16")
        self.assertRaisesRegex(TypeError, r"^empty: the new array has dtype int16", commd.empty,
                               1, np.int16)
        self.assertRaisesRegex(ValueError, "like='cupy'", commd.empty, 1, "int8", like="cupy")
        if torch is not None:
            self.assertIsInstance(commd.empty(2, torch.bfloat16), torch.Tensor)
            self.assertEqual(commd.zeros(2, "bfloat16", like="torch").dtype, torch.bfloat16)
            self.assertEqual(commd.zeros(2, np.float16, like="torch").dtype, torch.float16)

    def test_views_keep_the_block(self):
        z = commd.empty(8, "int32")
        tail = z[4:]
        ptr = z.ctypes.data
        del z
        self.assertIn(ptr, self.blocks())
        tail[:] = rank()
        commd.all_reduce(tail)
        np.testing.assert_array_equal(tail, np.full(4, size() * (size() - 1) // 2))
        del tail
        self.assertNotIn(ptr, self.blocks())

    def test_cycles(self):
        before = len(self.blocks())
        for i in range(1000):
            like = "torch" if torch is not None and i % 2 else "numpy"
            z = commd.empty(1 << 20, "uint8", like=like)
            z[-1] = 1
            del z
        self.assertEqual(len(self.blocks()), before)
        z = commd.zeros(1 << 18, "float32")
        z[:] = 1
        commd.all_reduce(z)
        self.assertEqual(float(z[-1]), size())


def main():
    # the ranks share stdout: each writes its report at once, at the end
    report = io.StringIO()
    runner = unittest.TextTestRunner(stream=report, verbosity=2)
    res = unittest.main(testRunner=runner, exit=False).result
    failed = len(res.failures) + len(res.errors) + len(res.unexpectedSuccesses)
    r = os.environ.get("COMM_RANK", "?")
    sys.stdout.write(f"--- rank {r}\n{report.getvalue()}rank {r}: {res.testsRun} tests, "
                     f"{failed} failed, {len(res.skipped)} skipped\n")
    sys.stdout.flush()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
