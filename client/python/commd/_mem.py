"""empty() and zeros(): numpy arrays and torch tensors over comm_mem_alloc
memory, which commd reads and writes in place (no staging copy)."""
import importlib
import math
import operator
import sys

from . import _comm
from ._buf import NUMPY_DTYPES, TORCH_DTYPES, unsupported
from ._lib import lib


def _module(op, kind):
    try:
        return importlib.import_module(kind)
    except ImportError:
        raise ImportError(f"{op}: like={kind!r} needs {kind}, which is not installed") from None


def _dtype_name(op, dtype, kind):
    """The name ("float32") of dtype, given as a numpy or torch dtype or a
    string, for an array of kind."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(dtype, torch.dtype):
        name = str(dtype).replace("torch.", "")
    elif kind == "torch" and isinstance(dtype, str):
        t = getattr(torch, dtype, None)
        name = str(t).replace("torch.", "") if isinstance(t, torch.dtype) else dtype
    else:
        np = _module(op, "numpy")
        try:
            dt = np.dtype(dtype)
            name = dt.name if dt.isnative else dt.str
        except TypeError:
            name = str(dtype)
    if name not in (NUMPY_DTYPES if kind == "numpy" else TORCH_DTYPES):
        raise unsupported(op, "the new array", name, kind)
    return name


def _shape(op, shape):
    try:
        shape = (operator.index(shape),)
    except TypeError:
        shape = tuple(operator.index(n) for n in shape)
    if any(n < 0 for n in shape):
        raise ValueError(f"{op}: shape {shape} has a negative size")
    return shape


def _new(op, shape, dtype, like):
    c = _comm.need(op)
    if like is None:
        torch = sys.modules.get("torch")
        like = "torch" if torch is not None and isinstance(dtype, torch.dtype) else "numpy"
    if like not in ("numpy", "torch"):
        raise ValueError(f"{op}: like={like!r}; want 'numpy' or 'torch'")
    mod = _module(op, like)
    name = _dtype_name(op, dtype, like)
    shape = _shape(op, shape)
    count = math.prod(shape)
    dt = getattr(mod, name) if like == "torch" else mod.dtype(name)
    if count == 0:
        # no elements, no memory to share
        return mod.empty(shape, dtype=dt)
    table = NUMPY_DTYPES if like == "numpy" else TORCH_DTYPES
    raw = c.alloc(op, count * lib.comm_dtype_size(table[name]))
    if like == "numpy":
        return mod.frombuffer(raw, dtype=dt, count=count).reshape(shape)
    return mod.frombuffer(raw, dtype=dt, count=count).view(shape)


def empty(shape, dtype, like=None):
    """An uninitialized numpy array (like="numpy") or torch tensor
    (like="torch") over memory shared with commd. like None: torch for a
    torch dtype, numpy otherwise. The memory goes back to libcomm with the
    last reference to it. It outlives finalize() and abort(): the values
    stay, in memory of the process no longer shared with commd."""
    return _new("empty", shape, dtype, like)


def zeros(shape, dtype, like=None):
    """As empty(), filled with zeros."""
    a = _new("zeros", shape, dtype, like)
    if hasattr(a, "zero_"):
        a.zero_()
    else:
        a.fill(0)
    return a
