"""A small test double of the parts of ``tensorrt`` and ``cuda.bindings`` this project uses.

Names, shapes and return conventions follow NVIDIA's documentation and binding sources
(TensorRT ``python/src/infer/pyCore.cpp``; cuda-python ``cuda.bindings.runtime``):

- cudart calls return tuples, ``(err,)`` or ``(err, value)``; ``cudaError_t`` is an enum;
  pointers are ints; ``cudaStreamCreate`` returns a ``cudaStream_t`` object whose address
  ``cuda.bindings.utils.get_cuda_native_handle`` gives as an int.
- TensorRT returns ``None`` where C++ returns nullptr (a plan it cannot deserialize, an
  unreadable timing cache, a failed build) and ``bool`` from ``set_input_shape``,
  ``set_tensor_address``, ``set_timing_cache`` and ``execute_async_v3``; engines expose
  I/O by name (``num_io_tensors``, ``get_tensor_name``, ``get_tensor_mode``...).

Host and device memory are real (ctypes buffers), so copies move real bytes, and an
"engine" is the FP16 ONNX file run by ONNX Runtime on what its input buffer holds.
The plan and timing-cache bytes carry the TensorRT version and GPU they were made for,
so staleness and cache rejection behave as on a real machine. ``install()`` puts the
modules into ``sys.modules``; a fixture does it and undoes it.
"""
from __future__ import annotations

import ctypes
import enum
import importlib.machinery
import json
import sys
import threading
import time
import types
import warnings
from dataclasses import dataclass, field

import numpy as np

PLAN_MAGIC, CACHE_MAGIC = b"FAKEPLAN", b"FAKECACHE"


@dataclass
class Machine:
    """What the double pretends this machine is, and what happened on it."""

    tensorrt: str = "10.13.0.35"
    cuda_bindings: str = "13.0.1"          # cuda.bindings.__version__: the CUDA major the wheels need
    gpu: str = "NVIDIA H200"
    capability: tuple[int, int] = (9, 0)
    driver: int = 13000
    devices: int = 1
    execute_delay_s: float = 0.0
    fail_malloc_after: int | None = None     # cudaMalloc fails once this many are live
    memory: dict[int, ctypes.Array] = field(default_factory=dict)      # device
    pinned: dict[int, ctypes.Array] = field(default_factory=dict)      # host
    streams: set[int] = field(default_factory=set)
    uploads: list[int] = field(default_factory=list)                   # host address of each copy to the device
    loggers: int = 0
    builds: list[dict] = field(default_factory=list)
    running: int = 0
    max_running: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


M = Machine()


# ---------------------------------------------------------------- cuda.bindings.runtime
class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorInvalidResourceHandle = 400


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class cudaStream_t:
    _next = 0x7000

    def __init__(self) -> None:
        cudaStream_t._next += 0x10
        self._ptr = cudaStream_t._next

    def getPtr(self) -> int:
        return self._ptr

    def __int__(self) -> int:
        warnings.warn("int(cuda_obj) is deprecated; use cuda.bindings.utils.get_cuda_native_handle",
                      DeprecationWarning, stacklevel=2)
        return self._ptr


@dataclass
class cudaDeviceProp:
    name: bytes
    major: int
    minor: int


def _alloc(table: dict) -> tuple:
    def malloc(size: int) -> tuple:
        if M.fail_malloc_after is not None and len(M.memory) >= M.fail_malloc_after and table is M.memory:
            return (cudaError_t.cudaErrorMemoryAllocation, 0)
        buffer = (ctypes.c_byte * size)()
        table[ctypes.addressof(buffer)] = buffer
        return (cudaError_t.cudaSuccess, ctypes.addressof(buffer))
    return malloc


def _free(table: dict):
    def free(ptr: int) -> tuple:
        if table.pop(int(ptr), None) is None:
            return (cudaError_t.cudaErrorInvalidValue,)
        return (cudaError_t.cudaSuccess,)
    return free


def _size(ptr: int) -> int | None:
    for table in (M.memory, M.pinned):
        if ptr in table:
            return ctypes.sizeof(table[ptr])
    return None


def _pinned_base(ptr: int) -> int | None:
    """The page-locked allocation ``ptr`` points into (real CUDA copies from any address inside one)."""
    return next((base for base, buffer in M.pinned.items() if base <= ptr < base + ctypes.sizeof(buffer)), None)


def _room(ptr: int) -> int:
    """Bytes from ``ptr`` to the end of its allocation."""
    if ptr in M.memory:
        return ctypes.sizeof(M.memory[ptr])
    base = _pinned_base(ptr)
    return 0 if base is None else base + ctypes.sizeof(M.pinned[base]) - ptr


def cudaMemcpyAsync(dst: int, src: int, count: int, kind: cudaMemcpyKind, stream: cudaStream_t) -> tuple:
    if not isinstance(stream, cudaStream_t) or stream.getPtr() not in M.streams:
        return (cudaError_t.cudaErrorInvalidResourceHandle,)
    if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
        ok = _pinned_base(int(src)) is not None and int(dst) in M.memory
        if ok:
            M.uploads.append(int(src))
    elif kind == cudaMemcpyKind.cudaMemcpyDeviceToHost:
        ok = int(src) in M.memory and int(dst) in M.pinned
    else:
        ok = False
    if not ok or count > min(_size(int(dst)), _room(int(src))):
        return (cudaError_t.cudaErrorInvalidValue,)
    ctypes.memmove(int(dst), int(src), count)
    return (cudaError_t.cudaSuccess,)


def cudaStreamCreate() -> tuple:
    stream = cudaStream_t()
    M.streams.add(stream.getPtr())
    return (cudaError_t.cudaSuccess, stream)


def cudaStreamDestroy(stream: cudaStream_t) -> tuple:
    if stream.getPtr() not in M.streams:
        return (cudaError_t.cudaErrorInvalidResourceHandle,)
    M.streams.discard(stream.getPtr())
    return (cudaError_t.cudaSuccess,)


def cudaStreamSynchronize(stream: cudaStream_t) -> tuple:
    ok = stream.getPtr() in M.streams
    return (cudaError_t.cudaSuccess if ok else cudaError_t.cudaErrorInvalidResourceHandle,)


def cudaGetDeviceCount() -> tuple:
    if M.driver == 0:
        return (cudaError_t.cudaErrorInsufficientDriver, 0)
    return (cudaError_t.cudaSuccess, M.devices) if M.devices else (cudaError_t.cudaErrorNoDevice, 0)


def cudaGetDeviceProperties(device: int) -> tuple:
    if device >= M.devices:
        return (cudaError_t.cudaErrorInvalidValue, None)
    return (cudaError_t.cudaSuccess, cudaDeviceProp(M.gpu.encode() + b"\x00" * 8, *M.capability))


def cudaDriverGetVersion() -> tuple:
    return (cudaError_t.cudaSuccess, M.driver)


def cudaRuntimeGetVersion() -> tuple:
    return (cudaError_t.cudaSuccess, 13000)


def cudaGetErrorName(err: cudaError_t) -> tuple:
    return (cudaError_t.cudaSuccess, cudaError_t(err).name.encode())


def _runtime_module() -> types.ModuleType:
    rt = types.ModuleType("cuda.bindings.runtime")
    for name in ("cudaError_t", "cudaMemcpyKind", "cudaStream_t", "cudaMemcpyAsync", "cudaStreamCreate",
                 "cudaStreamDestroy", "cudaStreamSynchronize", "cudaGetDeviceCount", "cudaGetDeviceProperties",
                 "cudaDriverGetVersion", "cudaRuntimeGetVersion", "cudaGetErrorName"):
        setattr(rt, name, globals()[name])
    rt.cudaMalloc, rt.cudaFree = _alloc(M.memory), _free(M.memory)
    rt.cudaMallocHost, rt.cudaFreeHost = _alloc(M.pinned), _free(M.pinned)
    return rt


def get_cuda_native_handle(obj: object) -> int:
    if isinstance(obj, cudaStream_t):
        return obj.getPtr()
    raise TypeError("Unknown type: " + str(type(obj)))


# ---------------------------------------------------------------- tensorrt
class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32,
       DataType.BOOL: np.bool_, DataType.UINT8: np.uint8}


def nptype(trt_type: DataType) -> type:
    return _NP[trt_type]


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 1


class Logger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = Severity

    def __init__(self, min_severity: Logger.Severity = Severity.WARNING) -> None:
        M.loggers += 1
        self.min_severity = min_severity


class ParserError:
    def __init__(self, text: str) -> None:
        self.text = text

    def desc(self) -> str:
        return self.text

    def __str__(self) -> str:
        return self.text


class INetworkDefinition:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.onnx: bytes | None = None


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
        self.network, self._errors = network, []

    def parse_from_file(self, model: str) -> bool:
        import onnx
        try:
            proto = onnx.load(model)
        except Exception as exc:
            self._errors = [ParserError(f"cannot read {model}: {exc}")]
            return False
        for node in proto.graph.node:   # TensorRT's LRN takes float32 only
            if node.op_type == "LRN" and _elem_type(proto, node.input[0]) != onnx.TensorProto.FLOAT:
                self._errors = [ParserError(f"LRN node {node.name}: input must be float32")]
                return False
        self.network.onnx = proto.SerializeToString()
        return True

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> ParserError:
        return self._errors[index]


def _elem_type(proto, tensor: str) -> int:
    import onnx
    inferred = onnx.shape_inference.infer_shapes(proto)
    for v in [*inferred.graph.value_info, *inferred.graph.input]:
        if v.name == tensor:
            return v.type.tensor_type.elem_type
    return 0


class ITimingCache:
    def __init__(self, made_for: dict, entries: int = 0) -> None:
        self.made_for, self.entries = made_for, entries

    def serialize(self) -> memoryview:
        return memoryview(CACHE_MAGIC + json.dumps({**self.made_for, "entries": self.entries}).encode())


class IOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, input: str, min: tuple, opt: tuple, max: tuple) -> None:
        self.shapes[input] = (tuple(min), tuple(opt), tuple(max))


def _here() -> dict:
    return {"tensorrt": M.tensorrt, "gpu": M.gpu, "capability": list(M.capability)}


class IBuilderConfig:
    def __init__(self) -> None:
        self.profiles: list[IOptimizationProfile] = []
        self.pools: dict = {}
        self.cache: ITimingCache | None = None

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        self.pools[pool] = pool_size

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache | None:
        data = bytes(serialized_timing_cache)
        if not data:
            return ITimingCache(_here())
        if not data.startswith(CACHE_MAGIC):
            return None   # nullptr: TensorRT logs an error
        record = json.loads(data[len(CACHE_MAGIC):])
        return ITimingCache({k: record[k] for k in ("tensorrt", "gpu", "capability")}, record["entries"])

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if cache.made_for["tensorrt"] != M.tensorrt:
            return False
        if cache.made_for != _here() and not ignore_mismatch:
            return False
        self.cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self.cache


class Builder:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> memoryview | None:
        if network.onnx is None or len(config.profiles) != 1 or "images" not in config.profiles[0].shapes:
            return None
        reused = config.cache.entries if config.cache else 0
        M.builds.append({"cache_entries_before": reused, "flags": network.flags})
        if config.cache is not None:
            config.cache.entries += 1
        header = {**_here(), "profile": config.profiles[0].shapes["images"]}
        return memoryview(PLAN_MAGIC + json.dumps(header).encode() + b"\n" + network.onnx)


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self.addresses: dict[str, int] = {}
        self.input_shape: tuple | None = None

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if name not in self.engine.io or int(memory) not in M.memory:
            return False
        self.addresses[name] = int(memory)
        return True

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        lo, _, hi = self.engine.profile
        shape = tuple(shape)
        if name != "images" or len(shape) != len(hi):
            return False
        if not all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
            return False
        self.input_shape = shape
        return True

    def get_tensor_shape(self, name: str) -> tuple:
        if name == "images":
            return self.input_shape or tuple(self.engine.get_tensor_shape(name))
        return (self.input_shape[0] if self.input_shape else -1, 2)

    def execute_async_v3(self, stream_handle: int) -> bool:
        if stream_handle not in M.streams or self.input_shape is None or set(self.addresses) != set(self.engine.io):
            return False
        with M.lock:
            M.running += 1
            M.max_running = max(M.max_running, M.running)
        try:
            n = self.input_shape[0]
            count = int(np.prod(self.input_shape))
            images = np.frombuffer((ctypes.c_uint8 * count).from_address(self.addresses["images"]),
                                   np.uint8).reshape(self.input_shape)
            outputs = dict(zip(("probs", "logits"), self.engine.session.run(["probs", "logits"], {"images": images}),
                               strict=True))
            for name, value in outputs.items():
                target = (ctypes.c_float * (n * 2)).from_address(self.addresses[name])
                np.frombuffer(target, np.float32)[:] = value.astype(np.float32).reshape(-1)
            time.sleep(M.execute_delay_s)
        finally:
            with M.lock:
                M.running -= 1
        return True


class ICudaEngine:
    # outputs first, logits before probs: the backend must bind by name, not position
    _ORDER = ("logits", "probs", "images")

    def __init__(self, header: dict, onnx_bytes: bytes) -> None:
        import onnxruntime as ort
        self.profile = [tuple(s) for s in header["profile"]]
        self.io = {"logits": TensorIOMode.OUTPUT, "probs": TensorIOMode.OUTPUT, "images": TensorIOMode.INPUT}
        self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])

    @property
    def num_io_tensors(self) -> int:
        return len(self._ORDER)

    def get_tensor_name(self, index: int) -> str:
        return self._ORDER[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self.io.get(name, TensorIOMode.NONE)

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType.UINT8 if name == "images" else DataType.FLOAT

    def get_tensor_shape(self, name: str) -> tuple:
        return (-1, 256, 256, 3) if name == "images" else (-1, 2)

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple]:
        return list(self.profile)

    def create_execution_context(self) -> IExecutionContext:
        return IExecutionContext(self)


class Runtime:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine: bytes) -> ICudaEngine | None:
        data = bytes(serialized_engine)
        if not data.startswith(PLAN_MAGIC):
            return None
        header, onnx_bytes = data[len(PLAN_MAGIC):].split(b"\n", 1)
        header = json.loads(header)
        if header["tensorrt"] != M.tensorrt or header["capability"] != list(M.capability):
            return None   # TensorRT: "The engine plan file is not compatible with this version"
        return ICudaEngine(header, onnx_bytes)


def _tensorrt_module() -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    for name in ("DataType", "nptype", "TensorIOMode", "MemoryPoolType", "NetworkDefinitionCreationFlag", "Logger",
                 "OnnxParser", "Builder", "Runtime", "IBuilderConfig", "ITimingCache"):
        setattr(trt, name, globals()[name])
    trt.__version__ = M.tensorrt
    return trt


# ---------------------------------------------------------------- installing
def _module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
    module.__path__ = []
    return module


def install(machine: Machine | None = None) -> dict[str, types.ModuleType]:
    """Put the double's modules in sys.modules (returns the ones they replaced, for ``uninstall``)."""
    global M
    M = machine or Machine()
    trt = _tensorrt_module()
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", loader=None)
    cuda, bindings, utils = _module("cuda"), _module("cuda.bindings"), _module("cuda.bindings.utils")
    runtime = _runtime_module()
    runtime.__spec__ = importlib.machinery.ModuleSpec("cuda.bindings.runtime", loader=None)
    utils.get_cuda_native_handle = get_cuda_native_handle
    bindings.__version__ = M.cuda_bindings
    cuda.bindings, bindings.runtime, bindings.utils = bindings, runtime, utils
    modules = {"tensorrt": trt, "cuda": cuda, "cuda.bindings": bindings, "cuda.bindings.runtime": runtime,
               "cuda.bindings.utils": utils}
    replaced = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    return replaced


def uninstall(replaced: dict[str, types.ModuleType | None]) -> None:
    for name, module in replaced.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module


def machine() -> Machine:
    return M
