"""libcomm through ctypes: loading it, the types of comm.h and the result codes.

Every function used is declared here with its argument and result types, so a
wrong call fails in ctypes instead of in libcomm.
"""
import ctypes
import enum
import os


def _load():
    path = os.environ.get("COMMD_LIBCOMM")
    try:
        return ctypes.CDLL(path or "libcomm.so.0")
    except OSError as e:
        if path:
            raise ImportError(f"commd: cannot load libcomm from COMMD_LIBCOMM={path}: "
                              f"{e}") from None
        raise ImportError(f"commd: cannot load libcomm.so.0 ({e}); install libcomm, or set "
                          "COMMD_LIBCOMM to the path of libcomm.so.0") from None


lib = _load()


class CommConfig(ctypes.Structure):
    """comm_config_t, field for field."""
    _fields_ = [
        ("socket", ctypes.c_char_p),
        ("job", ctypes.c_char_p),
        ("token", ctypes.c_char_p),
        ("rank", ctypes.c_int),
        ("world_size", ctypes.c_int),
        ("timeout_ms", ctypes.c_int),
        ("root", ctypes.c_char_p),
    ]


class Result(enum.IntEnum):
    """comm_result_t, the names without their COMM_ prefix."""
    OK = 0
    ERR_INVALID_ARG = 1
    ERR_DAEMON_UNREACHABLE = 2
    ERR_PROTOCOL = 3
    ERR_PEER_LOST = 4
    ERR_TIMEOUT = 5
    ERR_MISMATCH = 6
    ERR_PERMISSION = 7
    ERR_NO_MEMORY = 8
    ERR_UNSUPPORTED = 9
    ERR_ABORTED = 10
    ERR_INTERNAL = 11
    ERR_NOT_FOUND = 12
    ERR_BUSY = 13
    ERR_VERSION = 14
    ERR_SHUTDOWN = 15
    INPROGRESS = 16


class DType(enum.IntEnum):
    """comm_dtype_t."""
    INT8 = 0
    UINT8 = 1
    INT32 = 2
    UINT32 = 3
    INT64 = 4
    UINT64 = 5
    FLOAT16 = 6
    BFLOAT16 = 7
    FLOAT32 = 8
    FLOAT64 = 9


_p = ctypes.c_void_p
_preq = ctypes.POINTER(ctypes.c_void_p)
_size = ctypes.c_size_t
_int = ctypes.c_int
_res = ctypes.c_int


def _declare(name, restype, *argtypes):
    f = getattr(lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)


_declare("comm_config_default", CommConfig)
_declare("comm_init", _res, ctypes.POINTER(_p), ctypes.POINTER(CommConfig))
_declare("comm_finalize", _res, _p)
_declare("comm_abort", _res, _p)
_declare("comm_rank", _int, _p)
_declare("comm_size", _int, _p)
_declare("comm_split", _res, _p, _int, _int, ctypes.POINTER(_p))
_declare("comm_mem_alloc", _p, _p, _size)
_declare("comm_mem_free", _res, _p, _p)
_declare("comm_allreduce", _res, _p, _p, _p, _size, _int, _int, _preq)
_declare("comm_reduce_scatter", _res, _p, _p, _p, _size, _int, _int, _preq)
_declare("comm_allgather", _res, _p, _p, _p, _size, _int, _preq)
_declare("comm_broadcast", _res, _p, _p, _p, _size, _int, _int, _preq)
_declare("comm_reduce", _res, _p, _p, _p, _size, _int, _int, _int, _preq)
_declare("comm_alltoall", _res, _p, _p, _p, _size, _int, _preq)
_sizes = ctypes.POINTER(_size)
_declare("comm_alltoallv", _res, _p, _p, _sizes, _sizes, _p, _sizes, _sizes, _int, _preq)
_declare("comm_send", _res, _p, _p, _size, _int, _int, _preq)
_declare("comm_recv", _res, _p, _p, _size, _int, _int, _preq)
_declare("comm_barrier", _res, _p, _preq)
_declare("comm_set_stream", _res, _p, _p)
_declare("comm_wait", _res, _p, _int)
_declare("comm_test", _res, _p, ctypes.POINTER(_int))
_declare("comm_strerror", ctypes.c_char_p, _res)
_declare("comm_result_name", ctypes.c_char_p, _res)
_declare("comm_last_error", ctypes.c_char_p, _p)
_declare("comm_dtype_size", _size, _int)


def _text(b):
    return b.decode("utf-8", "replace") if b else ""


class CommError(RuntimeError):
    """A libcomm call failed: code (a Result where known), name such as
    "COMM_ERR_MISMATCH", and the library's detail ("" when it gave none)."""

    def __init__(self, op, code, detail):
        try:
            code = Result(code)
        except ValueError:
            pass
        self.op = op
        self.code = code
        self.name = _text(lib.comm_result_name(code)) or f"result {int(code)}"
        self.detail = detail
        super().__init__(f"{op}: {self.name}: {detail or _text(lib.comm_strerror(code))}")


def last_error(handle):
    """comm_last_error of a communicator handle (None: the last comm_init's)."""
    return _text(lib.comm_last_error(handle))
