"""FAKE TensorRT runtime for tests (NOT NVIDIA's): `tensorrt` and `pycuda` packages over numpy.

`write_fake_tensorrt_lib(lib)` writes them under `lib` for a child process's `PYTHONPATH`. The
FAKE `tensorrt` implements the TensorRT >= 8.5 name-based API the runner and a bundle's infer.py
use; its "engine" file is JSON (`{"w": [[...]], "chw": [C, H, W], "max_batch": N}`) and it computes
logits = global-average-pool(x) @ w.T. The FAKE `pycuda.driver` keeps "device memory" in host
arrays. Nothing run against them says anything about real TensorRT or a real GPU.
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
        try:
            return _Engine(json.loads(blob))
        except ValueError:
            return None

class _Engine:
    num_io_tensors = 2
    num_optimization_profiles = 1
    def __init__(self, spec):
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
        x = _cuda._MEM[self.addr["input"]].view(np.float32).reshape(self.shape)
        logits = x.mean(axis=(2, 3)) @ self.engine.w.T
        _cuda._MEM[self.addr["logits"]][:] = logits.astype(np.float32).reshape(-1).view(np.uint8)
        return True
'''

FAKE_PYCUDA_DRIVER = '''
"""FAKE pycuda.driver for tests (NOT the real pycuda): host arrays pretend to be GPU memory."""
import itertools
import time
import numpy as np

_MEM = {}
_IDS = itertools.count(4096, 4096)

def init():
    pass

def get_driver_version():
    return 12040

class _Ctx:
    def pop(self):
        pass

class Device:
    def __init__(self, index):
        self.index = index
    def make_context(self):
        return _Ctx()
    def name(self):
        return "FAKE GPU"
    def compute_capability(self):
        return (8, 7)

class Stream:
    handle = 0
    def synchronize(self):
        pass

class Event:
    def record(self, stream=None):
        self.t = time.perf_counter()
    def time_till(self, other):
        return (other.t - self.t) * 1e3

class _Alloc:
    def __init__(self, nbytes):
        self.ptr = next(_IDS)
        _MEM[self.ptr] = np.zeros(nbytes, np.uint8)
    def __int__(self):
        return self.ptr
    def free(self):
        _MEM.pop(self.ptr, None)

def pagelocked_empty(shape, dtype):
    return np.empty(shape, dtype)

def mem_alloc(nbytes):
    return _Alloc(nbytes)

def memcpy_htod_async(dst, src, stream=None):
    _MEM[int(dst)][:] = np.ascontiguousarray(src).reshape(-1).view(np.uint8)

def memcpy_dtoh_async(dst, src, stream=None):
    dst.reshape(-1).view(np.uint8)[:] = _MEM[int(src)]
'''

FAKE_PYCUDA_AUTOINIT = '"""FAKE pycuda.autoinit for tests (NOT the real pycuda)."""\n'


def write_fake_tensorrt_lib(lib: Path) -> Path:
    """A PYTHONPATH folder with the FAKE `tensorrt` and `pycuda` (driver, autoinit) packages."""
    write_text(lib / "tensorrt" / "__init__.py", FAKE_TENSORRT)
    write_text(lib / "pycuda" / "__init__.py", '"""FAKE pycuda package for tests."""\n')
    write_text(lib / "pycuda" / "driver.py", FAKE_PYCUDA_DRIVER)
    write_text(lib / "pycuda" / "autoinit.py", FAKE_PYCUDA_AUTOINIT)
    return lib
