"""Buffers: a numpy array or a torch tensor as what libcomm takes (a pointer,
an element count, a comm dtype), checked first. Neither numpy nor torch is
imported here: an object can only be an array of a module already loaded.
"""
import sys

from ._comm import libcomm_ptr
from ._lib import DType

NUMPY_DTYPES = {
    "int8": DType.INT8, "uint8": DType.UINT8, "int32": DType.INT32, "uint32": DType.UINT32,
    "int64": DType.INT64, "uint64": DType.UINT64, "float16": DType.FLOAT16,
    "float32": DType.FLOAT32, "float64": DType.FLOAT64,
}
TORCH_DTYPES = {
    "int8": DType.INT8, "uint8": DType.UINT8, "int32": DType.INT32, "int64": DType.INT64,
    "float16": DType.FLOAT16, "bfloat16": DType.BFLOAT16, "float32": DType.FLOAT32,
    "float64": DType.FLOAT64,
}


class Buf:
    """One checked buffer: obj (kept alive while an op uses it), ptr (the
    address libcomm knows: see _comm.libcomm_ptr), count,
    dtype (a DType), dtype_name ("float32"), kind ("numpy" or "torch") and
    cuda (a tensor in device memory)."""
    __slots__ = ("obj", "ptr", "count", "dtype", "dtype_name", "kind", "cuda")


def is_torch(obj):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def is_numpy(obj):
    np = sys.modules.get("numpy")
    return np is not None and isinstance(obj, np.ndarray)


def unsupported(op, what, name, kind):
    table = NUMPY_DTYPES if kind == "numpy" else TORCH_DTYPES
    return TypeError(f"{op}: {what} has dtype {name}, which commd does not support; "
                     f"{kind} dtypes supported: {', '.join(table)}")


def buf(op, what, obj, writable=False, contiguous=True):
    """Check obj (named what in messages) for op and describe it as a Buf.
    writable: the op writes into obj. contiguous=False: obj is only copied
    into (an all_gather's list of outputs), so any layout does, and ptr is
    None."""
    b = Buf()
    b.obj = obj
    if is_numpy(obj):
        dt = obj.dtype
        b.kind = "numpy"
        b.dtype_name = dt.name if dt.isnative else dt.str
        if b.dtype_name not in NUMPY_DTYPES:
            raise unsupported(op, what, b.dtype_name, b.kind)
        if contiguous and not obj.flags.c_contiguous:
            raise ValueError(f"{op}: {what} is not contiguous; "
                             f"pass np.ascontiguousarray({what})")
        if writable and not obj.flags.writeable:
            raise ValueError(f"{op}: {what} is read-only, and the op writes into it")
        b.dtype = NUMPY_DTYPES[b.dtype_name]
        b.ptr = libcomm_ptr(obj.ctypes.data) if contiguous else None
        b.count = obj.size
        b.cuda = False
    elif is_torch(obj):
        torch = sys.modules["torch"]
        b.kind = "torch"
        b.dtype_name = str(obj.dtype).replace("torch.", "")
        if b.dtype_name not in TORCH_DTYPES:
            raise unsupported(op, what, b.dtype_name, b.kind)
        if obj.layout != torch.strided:
            raise TypeError(f"{op}: {what} has layout {obj.layout}; commd takes dense tensors")
        if contiguous and not obj.is_contiguous():
            raise ValueError(f"{op}: {what} is not contiguous; pass {what}.contiguous()")
        b.dtype = TORCH_DTYPES[b.dtype_name]
        b.cuda = obj.is_cuda
        b.ptr = None if not contiguous else obj.data_ptr() if b.cuda else libcomm_ptr(
            obj.data_ptr())
        b.count = obj.numel()
    else:
        raise TypeError(f"{op}: {what} is a {type(obj).__name__}; "
                        "want a numpy array or a torch tensor")
    return b


def same_dtype(op, a, a_name, b, b_name):
    """Raise unless Bufs a and b hold one element type."""
    if a.dtype != b.dtype:
        raise TypeError(f"{op}: {a_name} is {a.dtype_name} and {b_name} {b.dtype_name}; "
                        "use one dtype")
