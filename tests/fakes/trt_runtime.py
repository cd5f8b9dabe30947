"""FAKE TensorRT runtime for tests (NOT NVIDIA's): `tensorrt` and `pycuda` packages over numpy.

`write_fake_tensorrt_lib(lib)` writes them under `lib` for a child process's `PYTHONPATH`. The
FAKE `tensorrt` implements the TensorRT >= 8.5 name-based API the runner and a bundle's infer.py
use; its "engine" file is JSON (`{"w": [[...]], "chw": [C, H, W], "max_batch": N}`) and it computes
logits = global-average-pool(x) @ w.T. The FAKE `pycuda.driver` keeps "device memory" in host
arrays. Nothing run against them says anything about real TensorRT or a real GPU.

CUDA contexts: the FAKE `pycuda.driver` keeps pycuda's context stack (`Device.make_context`,
`Device.retain_primary_context`, `Context.push` / `Context.pop` / `detach`) and records in `LOG`
(operation, handle of the current context, tag) for every call. Like CUDA, a call with no current
context, or on a stream / buffer / engine made in another context than the current one, raises
`LogicError`; a context whose last reference is detached loses its memory; an object freed after
its pycuda context was detached is recorded in `WARNINGS` (pycuda prints it at clean-up). An engine
file may carry a "name", the tag of its execute calls in `LOG`.
"""

from __future__ import annotations

from pathlib import Path

from tests.fakes import write_text

FAKE_TENSORRT = '''
"""FAKE tensorrt for tests (NOT NVIDIA's): the TRT >= 8.5 name-based API over numpy.
The 'engine' file is JSON: logits = global-average-pool(x) @ w.T, input (-1, C, H, W)."""
import json
import numpy as np
import pycuda.driver as _cuda

__version__ = "0.0+fake"

class Logger:
    WARNING = 2
    def __init__(self, level):
        self.level = level

class TensorIOMode:
    INPUT = "INPUT"
    OUTPUT = "OUTPUT"

def nptype(dtype):
    return np.dtype(dtype).type

class Runtime:
    def __init__(self, logger):
        pass
    def deserialize_cuda_engine(self, blob):
        owner = _cuda._use("deserialize_cuda_engine")  # TensorRT loads into the current context
        try:
            return _Engine(json.loads(blob), owner)
        except ValueError:
            return None

class _Engine:
    num_io_tensors = 2
    num_optimization_profiles = 1
    def __init__(self, spec, owner):
        self.owner, self.tag = owner, spec.get("name")
        self.w = np.asarray(spec["w"], np.float32)
        self.chw = tuple(spec["chw"])
        self.max_batch = spec["max_batch"]
    def get_tensor_name(self, i):
        return ("input", "logits")[i]
    def get_tensor_mode(self, name):
        return TensorIOMode.INPUT if name == "input" else TensorIOMode.OUTPUT
    def get_tensor_shape(self, name):
        return (-1, *self.chw) if name == "input" else (-1, self.w.shape[0])
    def get_tensor_dtype(self, name):
        return "float32"
    def get_tensor_profile_shape(self, name, profile):
        return [(1, *self.chw), (1, *self.chw), (self.max_batch, *self.chw)]
    def create_execution_context(self):
        return _Context(self)

class _Context:
    def __init__(self, engine):
        _cuda._use("create_execution_context", engine.owner, engine.tag)
        self.engine, self.shape, self.addr = engine, None, {}
    def set_input_shape(self, name, shape):
        if shape[0] > self.engine.max_batch or tuple(shape[1:]) != self.engine.chw:
            return False
        self.shape = tuple(shape)
        return True
    def get_tensor_shape(self, name):
        return (self.shape[0], self.engine.w.shape[0])
    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr
    def execute_async_v3(self, stream_handle):
        _cuda._use("execute_async_v3", self.engine.owner, self.engine.tag)
        for ptr in self.addr.values():
            _cuda._device_memory(ptr, "execute_async_v3 (tensor address)")
        x = _cuda._MEM[self.addr["input"]].view(np.float32).reshape(self.shape)
        logits = x.mean(axis=(2, 3)) @ self.engine.w.T
        _cuda._MEM[self.addr["logits"]][:] = logits.astype(np.float32).reshape(-1).view(np.uint8)
        return True
'''

FAKE_PYCUDA_DRIVER = '''
"""FAKE pycuda.driver for tests (NOT the real pycuda): host arrays pretend to be GPU memory,
and pycuda's context stack is kept and checked (tests/fakes/trt_runtime.py: what it checks)."""
import collections
import itertools
import time
import numpy as np

_MEM = {}  # pointer -> bytes of "device memory"
_MEM_CTX = {}  # pointer -> handle of the context it was allocated in
_IDS = itertools.count(4096, 4096)
_OWN = itertools.count(1)
_STACK = []  # the thread's pycuda context stack, current last
_REFS = {}  # context handle -> live references (retains of a primary one; 1 for an own one)
LOG = collections.deque(maxlen=200000)  # (operation, current context handle or None, tag)
WARNINGS = []  # what pycuda would print at clean-up

class LogicError(RuntimeError):
    """pycuda.driver.LogicError: invalid context, invalid resource handle, ..."""

def _current():
    return _STACK[-1].handle if _STACK else None

def _use(op, owner=None, tag=None):
    """Record `op` and the current context; refuse it, as CUDA does, with no live current
    context or when its object was made in another context (`owner`)."""
    cur = _current()
    LOG.append((op, cur, tag))
    if cur is None:
        raise LogicError(f"{op} failed: invalid device context (no current context)")
    if cur not in _REFS:
        raise LogicError(f"{op} failed: context {cur} was destroyed")
    if owner is not None and owner != cur:
        raise LogicError(f"{op} failed: invalid resource handle (made in {owner}, current is {cur})")
    return cur

def _device_memory(ptr, op):
    ptr = int(ptr)
    if ptr not in _MEM:
        raise LogicError(f"{op} failed: invalid device pointer {ptr} (freed, or its context is gone)")
    _use(op, _MEM_CTX[ptr])
    return _MEM[ptr]

def init():
    pass

def get_driver_version():
    return 12040

class Context:
    def __init__(self, handle):
        self.handle, self.valid = handle, True
    def push(self):
        if not self.valid:
            raise LogicError("cannot push a detached context")
        _STACK.append(self)
        LOG.append(("push", self.handle, None))
    @staticmethod
    def pop():
        if not _STACK:
            raise LogicError("context::pop failed: cannot pop non-current context")
        LOG.append(("pop", _STACK.pop().handle, None))
    @staticmethod
    def get_current():
        return _STACK[-1] if _STACK else None
    def detach(self):
        if not self.valid:
            raise LogicError("context::detach failed: cannot detach from invalid context")
        self.valid = False
        while self in _STACK:
            _STACK.remove(self)
        LOG.append(("detach", self.handle, None))
        _REFS[self.handle] -= 1
        if _REFS[self.handle] == 0:  # destroyed (own) or reset (primary): its memory is gone
            del _REFS[self.handle]
            for ptr in [p for p, h in _MEM_CTX.items() if h == self.handle]:
                _MEM.pop(ptr, None)
                _MEM_CTX.pop(ptr, None)

class Device:
    def __init__(self, index):
        self.index = index
    def make_context(self):
        ctx = Context(f"own:{next(_OWN)}")
        _REFS[ctx.handle] = 1
        ctx.push()
        return ctx
    def retain_primary_context(self):
        handle = f"primary:{self.index}"
        _REFS[handle] = _REFS.get(handle, 0) + 1
        LOG.append(("retain", handle, None))
        return Context(handle)
    def name(self):
        return "FAKE GPU"
    def compute_capability(self):
        return (8, 7)

class _Ward:
    """An object of one pycuda context: pycuda activates that context to free it."""
    def __init__(self, op):
        self.owner = _use(op)
        self.ward = _STACK[-1]
    def __del__(self):
        ward = getattr(self, "ward", None)  # None: made with no current context (it raised)
        if ward is not None and not ward.valid:
            WARNINGS.append(f"{type(self).__name__} outlived its context {self.owner}")

class Stream(_Ward):
    handle = 0
    def __init__(self):
        super().__init__("cuStreamCreate")
    def synchronize(self):
        _use("cuStreamSynchronize", self.owner)

class Event(_Ward):
    def __init__(self):
        super().__init__("cuEventCreate")
    def record(self, stream=None):
        _use("cuEventRecord", self.owner)
        if stream is not None:
            _use("cuEventRecord", stream.owner)
        self.t = time.perf_counter()
    def time_till(self, other):
        _use("cuEventElapsedTime", self.owner)
        return (other.t - self.t) * 1e3

class _Alloc:
    def __init__(self, nbytes):
        self.owner = _use("cuMemAlloc")
        self.ward = _STACK[-1]
        self.ptr = next(_IDS)
        _MEM[self.ptr] = np.zeros(nbytes, np.uint8)
        _MEM_CTX[self.ptr] = self.owner
    def __int__(self):
        return self.ptr
    def free(self):
        if not self.ward.valid:  # pycuda: "cannot activate dead context", printed, memory leaked
            WARNINGS.append(f"buffer {self.ptr} freed after its context {self.owner} was detached")
        LOG.append(("cuMemFree", self.owner, None))
        _MEM.pop(self.ptr, None)
        _MEM_CTX.pop(self.ptr, None)

def pagelocked_empty(shape, dtype):
    _use("cuMemHostAlloc")
    return np.empty(shape, dtype)

def mem_alloc(nbytes):
    return _Alloc(nbytes)

def memcpy_htod_async(dst, src, stream=None):
    if stream is not None:
        _use("cuMemcpyHtoDAsync", stream.owner)
    _device_memory(dst, "cuMemcpyHtoDAsync")[:] = np.ascontiguousarray(src).reshape(-1).view(np.uint8)

def memcpy_dtoh_async(dst, src, stream=None):
    if stream is not None:
        _use("cuMemcpyDtoHAsync", stream.owner)
    dst.reshape(-1).view(np.uint8)[:] = _device_memory(src, "cuMemcpyDtoHAsync")
'''

FAKE_PYCUDA_AUTOINIT = '''"""FAKE pycuda.autoinit for tests (NOT the real pycuda): like the real one,
a context of device 0 made current for the rest of the process."""
import pycuda.driver as cuda

cuda.init()
device = cuda.Device(0)
context = device.make_context()
'''


def write_fake_tensorrt_lib(lib: Path) -> Path:
    """A PYTHONPATH folder with the FAKE `tensorrt` and `pycuda` (driver, autoinit) packages."""
    write_text(lib / "tensorrt" / "__init__.py", FAKE_TENSORRT)
    write_text(lib / "pycuda" / "__init__.py", '"""FAKE pycuda package for tests."""\n')
    write_text(lib / "pycuda" / "driver.py", FAKE_PYCUDA_DRIVER)
    write_text(lib / "pycuda" / "autoinit.py", FAKE_PYCUDA_AUTOINIT)
    return lib
