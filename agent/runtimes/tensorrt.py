"""Runtime ``tensorrt``: NVIDIA TensorRT (8.5+ and 10); the engine is built on the device from the ONNX artifact and
cached, device memory goes through cuda-python's ``cudart``.

Written against TensorRT's documented Python API (``Builder``, ``OnnxParser``, ``IInt8EntropyCalibrator2``,
``execute_async_v3``) and cuda-python's runtime bindings; both are imported inside the backend's methods only.
Never run: no GPU was available to this work. What is tested runs without TensorRT: option checking
(:func:`trt_options`), the builder flags, the engine cache key and file name, the calibration batches, and the
errors for a missing TensorRT or cuda-python.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from agent import RuntimeBackendError
from agent.accuracy import load_inputs
from agent.runtimes.base import Runtime, Session, check_input
from agent.schema import ArtifactSpec


_TRT_OPTIONS = ("precision", "sparsity", "cache_dir", "calibration_data", "calibration_cache", "workspace_mb",
                "max_batch", "device")
# precision -> (BuilderFlag names set, BuilderFlag names cleared). "fp32" clears TF32 (on by default on Ampere
# and later, Jetson Orin included) so that fp32 means fp32; "int8" alone lets layers TensorRT cannot run in int8
# fall back to fp32, "int8+fp16" to fp16.
TRT_PRECISIONS: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
    "fp32": ((), ("TF32",)),
    "fp16": (("FP16",), ()),
    "int8": (("INT8",), ()),
    "int8+fp16": (("INT8", "FP16"), ()),
}
TRT_DEFAULT_CACHE = "~/.cache/edgeprune/trt"
TRT_MISSING = ("runtime 'tensorrt' needs NVIDIA TensorRT's Python bindings (JetPack ships them; "
               "on x86: pip install tensorrt)")


@dataclass
class TrtOptions:
    """``runtime.options`` for tensorrt, checked and with relative paths resolved against the artifact's folder."""

    precision: str = "fp32"
    sparsity: bool = False
    cache_dir: Path = Path(TRT_DEFAULT_CACHE).expanduser()
    calibration_data: Optional[Path] = None
    calibration_cache: Optional[Path] = None
    workspace_mb: int = 1024
    max_batch: Optional[int] = None
    device: int = 0


def trt_options(options: Dict[str, Any], artifact_dir: Path) -> TrtOptions:
    """Check tensorrt's ``runtime.options`` without importing TensorRT (so a bad job fails the same everywhere)."""
    unknown = sorted(set(options) - set(_TRT_OPTIONS))
    if unknown:
        raise RuntimeBackendError("runtime.options.%s: unknown option for tensorrt (knows: %s)"
                                  % (unknown[0], ", ".join(_TRT_OPTIONS)))
    precision = options.get("precision", "fp32")
    if precision not in TRT_PRECISIONS:
        raise RuntimeBackendError("runtime.options.precision: %r is not one of %s"
                                  % (precision, ", ".join(TRT_PRECISIONS)))
    sparsity = options.get("sparsity", False)
    if not isinstance(sparsity, bool):
        raise RuntimeBackendError("runtime.options.sparsity: must be true or false")
    for key in ("workspace_mb", "max_batch", "device"):
        value = options.get(key)
        least = 0 if key == "device" else 1
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
            raise RuntimeBackendError("runtime.options.%s: must be an integer >= %d" % (key, least))
    paths: Dict[str, Optional[Path]] = {}
    for key in ("cache_dir", "calibration_data", "calibration_cache"):
        value = options.get(key)
        if value is not None and not (isinstance(value, str) and value):
            raise RuntimeBackendError("runtime.options.%s: must be a path" % key)
        p = Path(value).expanduser() if value else None
        paths[key] = p if p is None or p.is_absolute() else artifact_dir / p
    if paths["calibration_data"] is not None and not paths["calibration_data"].is_file():
        raise RuntimeBackendError("runtime.options.calibration_data: %s does not exist" % paths["calibration_data"])
    if "INT8" in TRT_PRECISIONS[precision][0]:
        cache = paths["calibration_cache"]
        if paths["calibration_data"] is None and (cache is None or not cache.is_file()):
            raise RuntimeBackendError("runtime.options.precision: %s needs runtime.options.calibration_data (an npz "
                                      "with float32 'inputs' in the artifact's layout) or an existing "
                                      "runtime.options.calibration_cache" % precision)
    elif paths["calibration_data"] is not None or paths["calibration_cache"] is not None:
        raise RuntimeBackendError("runtime.options.calibration_data: calibration is for int8 precisions only; "
                                  "leave it unset for %s" % precision)
    return TrtOptions(precision=precision, sparsity=sparsity,
                      cache_dir=paths["cache_dir"] or Path(TRT_DEFAULT_CACHE).expanduser(),
                      calibration_data=paths["calibration_data"], calibration_cache=paths["calibration_cache"],
                      workspace_mb=options.get("workspace_mb", 1024), max_batch=options.get("max_batch"),
                      device=options.get("device", 0))


def trt_builder_flags(precision: str, sparsity: bool) -> Tuple[List[str], List[str]]:
    """(``trt.BuilderFlag`` names to set, names to clear) for a precision and the 2:4 sparsity switch."""
    on, off = TRT_PRECISIONS[precision]
    return list(on) + (["SPARSE_WEIGHTS"] if sparsity else []), list(off)


def trt_cache_key(artifact_sha256: str, tensorrt_version: str, gpu_name: str, compute_capability: str,
                  flags: Tuple[List[str], List[str]], profile: Sequence[Sequence[int]], workspace_mb: int,
                  calibration_sha256: Optional[str]) -> str:
    """The engine cache key: a sha256 over everything that changes the engine TensorRT builds."""
    doc = {"artifact_sha256": artifact_sha256, "tensorrt": tensorrt_version, "gpu": gpu_name,
           "compute_capability": compute_capability, "flags_set": sorted(flags[0]), "flags_cleared": sorted(flags[1]),
           "profile": [list(map(int, s)) for s in profile], "workspace_mb": workspace_mb,
           "calibration_sha256": calibration_sha256}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def trt_engine_path(cache_dir: Path, artifact_sha256: str, key: str) -> Path:
    return cache_dir / ("%s-%s.engine" % (artifact_sha256[:16], key[:24]))


class CalibrationBatches:
    """Fixed-size batches over a float32 array for TensorRT's int8 calibrator: ``len(array) // batch`` full
    batches in order (a last partial batch is left out, since the calibration profile has a fixed shape)."""

    def __init__(self, array: np.ndarray, batch: int) -> None:
        if array.ndim < 2 or len(array) < batch:
            raise RuntimeBackendError("calibration data has %d samples; needs at least one batch of %d"
                                      % (len(array), batch))
        self.array = np.ascontiguousarray(array, dtype=np.float32)
        self.batch = batch
        self.count = len(array) // batch
        self.served = 0

    def next(self) -> Optional[np.ndarray]:
        if self.served >= self.count:
            return None
        i = self.served * self.batch
        self.served += 1
        return self.array[i:i + self.batch]

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            b = self.next()
            if b is None:
                return
            yield b


class _Cuda:
    """cudart from cuda-python: error-checked calls (each returns ``(err, *values)``)."""

    def __init__(self, cudart: Any) -> None:
        self.rt = cudart

    def call(self, what: str, result: Any) -> Any:
        err = result[0] if isinstance(result, tuple) else result
        if err != self.rt.cudaError_t.cudaSuccess:
            name = self.rt.cudaGetErrorName(err)
            raise RuntimeBackendError("CUDA %s failed: %s" % (what, name[1].decode() if isinstance(name, tuple)
                                                                 and isinstance(name[1], bytes) else err))
        values = result[1:] if isinstance(result, tuple) else ()
        return values[0] if len(values) == 1 else values

    def malloc(self, nbytes: int) -> int:
        return int(self.call("cudaMalloc", self.rt.cudaMalloc(max(1, nbytes))))

    def to_device(self, ptr: int, host: np.ndarray, stream: Any) -> None:
        self.call("cudaMemcpyAsync (host to device)", self.rt.cudaMemcpyAsync(
            ptr, host.ctypes.data, host.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def to_host(self, host: np.ndarray, ptr: int, stream: Any) -> None:
        self.call("cudaMemcpyAsync (device to host)", self.rt.cudaMemcpyAsync(
            host.ctypes.data, ptr, host.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))


class TrtSession(Session):
    """A deserialized engine with one execution context, one CUDA stream and device buffers for every I/O tensor
    at the profile's max batch (freed when the agent process exits: one job per process). ``run`` copies the
    input to the device, runs ``execute_async_v3`` (which computes every output) and copies output 0 back, then
    synchronizes the stream: the time the runner measures is host to host. ``run_all`` copies every output
    back, in the engine's I/O tensor order (``get_tensor_name(i)``, which follows the ONNX network's outputs). A
    dynamic-batch engine takes any batch; batches above its max are run in chunks."""

    def __init__(self, trt: Any, cuda: _Cuda, runtime: Any, engine: Any, input_name: str,
                 input_shape: List[Optional[int]], spec_shape: List[int], max_batch: int) -> None:
        self._trt = trt
        self._cuda = cuda
        self._runtime = runtime  # the runtime must outlive its engine
        self._engine = engine
        self._context = engine.create_execution_context()
        self._stream = cuda.call("cudaStreamCreate", cuda.rt.cudaStreamCreate())
        self._max_batch = max_batch
        self._rest = list(spec_shape[1:])
        self._batch = -1
        self._buffers: Dict[str, int] = {}
        self._outputs: List[str] = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            if is_input:
                shape = [max_batch] + self._rest
            else:
                shape = [max_batch if d < 0 else d for d in engine.get_tensor_shape(name)]
                self._outputs.append(name)
            nbytes = int(np.prod(shape)) * np.dtype(trt.nptype(engine.get_tensor_dtype(name))).itemsize
            self._buffers[name] = cuda.malloc(nbytes)
            self._context.set_tensor_address(name, self._buffers[name])
        self._in_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(input_name)))
        self._output = self._outputs[0]
        self._out_dtypes = {name: np.dtype(trt.nptype(engine.get_tensor_dtype(name))) for name in self._outputs}
        self.input_name = input_name
        self.input_shape = input_shape
        self.info: Dict[str, Any] = {}

    def run(self, inputs: np.ndarray) -> np.ndarray:
        return self._run(inputs, self._outputs[:1])[0]

    def run_all(self, inputs: np.ndarray) -> List[np.ndarray]:
        return self._run(inputs, self._outputs)

    def _run(self, inputs: np.ndarray, names: List[str]) -> List[np.ndarray]:
        n = inputs.shape[0]
        if self.input_shape[0] is not None and n != self.input_shape[0]:
            raise RuntimeBackendError("model input %r has a fixed batch of %d; cannot run a batch of %d"
                                      % (self.input_name, self.input_shape[0], n))
        if n > self._max_batch:
            parts = [self._run(inputs[i:i + self._max_batch], names) for i in range(0, n, self._max_batch)]
            return [np.concatenate([p[k] for p in parts]) for k in range(len(names))]
        x = np.ascontiguousarray(inputs, dtype=self._in_dtype)
        if n != self._batch:
            if not self._context.set_input_shape(self.input_name, [n] + self._rest):
                raise RuntimeBackendError("tensorrt refused input shape %s" % ([n] + self._rest))
            self._batch = n
        outs = [np.empty(tuple(self._context.get_tensor_shape(name)), dtype=self._out_dtypes[name]) for name in names]
        self._cuda.to_device(self._buffers[self.input_name], x, self._stream)
        if not self._context.execute_async_v3(int(self._stream)):
            raise RuntimeBackendError("tensorrt execute_async_v3 failed")
        for name, out in zip(names, outs):
            self._cuda.to_host(out, self._buffers[name], self._stream)
        self._cuda.call("cudaStreamSynchronize", self._cuda.rt.cudaStreamSynchronize(self._stream))
        return [out.astype(np.float32, copy=False) for out in outs]


class TensorRt(Runtime):
    """NVIDIA TensorRT (8.5+ and 10): builds an engine on the device from the ONNX artifact and caches it.

    Options: ``precision`` ("fp32" default, "fp16", "int8", "int8+fp16"; see :data:`TRT_PRECISIONS`),
    ``sparsity`` (true: ``SPARSE_WEIGHTS``, 2:4 sparse kernels where the weights allow), ``cache_dir`` (default
    ``~/.cache/edgeprune/trt``), ``calibration_data`` (int8: an npz with float32 ``inputs`` in the artifact's
    layout, fed to an entropy calibrator), ``calibration_cache`` (int8: read when it exists, else written after
    calibrating), ``workspace_mb`` (builder workspace, default 1024), ``max_batch`` (dynamic-batch models: the
    profile's max, default max(artifact batch, 32)), ``device`` (CUDA device index, default 0). Relative paths are
    relative to the artifact's folder. The engine is cached under :func:`trt_cache_key` (artifact sha256,
    TensorRT version, GPU name and compute capability, flags, shape profile, workspace, calibration data).
    Device memory goes through cuda-python's ``cudart`` (no torch, no pycuda).
    """

    name = "tensorrt"

    def version(self) -> str:
        return str(_import_trt().__version__)

    def load(self, path: Path, input_spec: ArtifactSpec, threads: int, options: Dict[str, Any]) -> Session:
        opts = trt_options(options, path.parent)
        trt = _import_trt()
        cuda = _Cuda(_import_cudart())
        if path.suffix.lower() != ".onnx":
            raise RuntimeBackendError("artifact.path: tensorrt builds its engine from an ONNX artifact; got %s"
                                      % path.name)
        cuda.call("cudaSetDevice", cuda.rt.cudaSetDevice(opts.device))
        props = cuda.call("cudaGetDeviceProperties", cuda.rt.cudaGetDeviceProperties(opts.device))
        raw = props.name
        gpu = (raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)).split("\x00")[0].strip()
        capability = "%d.%d" % (props.major, props.minor)
        log = _trt_logger(trt)
        builder = trt.Builder(log)
        major = int(str(trt.__version__).split(".")[0])
        network = builder.create_network(0 if major >= 10 else
                                         1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
        parser = trt.OnnxParser(network, log)
        if not parser.parse(path.read_bytes()):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise RuntimeBackendError("tensorrt cannot parse %s: %s" % (path.name, "; ".join(errors) or log.last()))
        if network.num_inputs != 1 or network.num_outputs < 1:
            raise RuntimeBackendError("model must have exactly one input and at least one output "
                                      "(has %d inputs, %d outputs)" % (network.num_inputs, network.num_outputs))
        tensor = network.get_input(0)
        shape = [int(d) if d > 0 else None for d in tensor.shape]
        check_input(tensor.name, shape, input_spec)
        have = np.dtype(trt.nptype(tensor.dtype)).name
        if have != input_spec.input_dtype:
            raise RuntimeBackendError("model input %r has type %s but artifact.input_dtype is %r"
                                      % (tensor.name, have, input_spec.input_dtype))
        spec_shape = list(input_spec.input_shape)
        if shape[0] is None:
            max_batch = opts.max_batch or max(spec_shape[0], 32)
            if max_batch < spec_shape[0]:
                raise RuntimeBackendError("runtime.options.max_batch: %d is below the artifact's batch %d"
                                          % (max_batch, spec_shape[0]))
            profile_shapes = [[1] + spec_shape[1:], spec_shape, [max_batch] + spec_shape[1:]]
        else:
            max_batch = shape[0]
            profile_shapes = [spec_shape, spec_shape, spec_shape]
        flags = trt_builder_flags(opts.precision, opts.sparsity)
        calib_sha = None
        if opts.calibration_data is not None:
            calib_sha = hashlib.sha256(opts.calibration_data.read_bytes()).hexdigest()
        elif opts.calibration_cache is not None and "INT8" in flags[0]:
            calib_sha = hashlib.sha256(opts.calibration_cache.read_bytes()).hexdigest()
        key = trt_cache_key(input_spec.sha256, str(trt.__version__), gpu, capability, flags, profile_shapes,
                            opts.workspace_mb, calib_sha)
        engine_path = trt_engine_path(opts.cache_dir, input_spec.sha256, key)
        runtime = trt.Runtime(log)
        engine = None
        cache_hit = False
        build_s = None
        if engine_path.is_file():
            engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
            cache_hit = engine is not None  # an unreadable cached engine is rebuilt and replaced
        calibration: Dict[str, Any] = {"source": None}
        if engine is None:
            t0 = time.perf_counter()
            blob, calibration = _trt_build(trt, cuda, builder, network, log, opts, flags, tensor.name,
                                           profile_shapes, spec_shape)
            build_s = time.perf_counter() - t0
            opts.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = engine_path.with_name(engine_path.name + ".%d.tmp" % os.getpid())
            tmp.write_bytes(blob)
            os.replace(tmp, engine_path)
            engine = runtime.deserialize_cuda_engine(blob)
            if engine is None:
                raise RuntimeBackendError("tensorrt built an engine it cannot deserialize: %s" % log.last())
        session = TrtSession(trt, cuda, runtime, engine, tensor.name, shape, spec_shape, max_batch)
        session.info = {
            "tensorrt_version": str(trt.__version__),
            "gpu_name": gpu,
            "compute_capability": capability,
            "device": opts.device,
            "precision": opts.precision,
            "builder_flags_set": flags[0],
            "builder_flags_cleared": flags[1],
            "sparsity": opts.sparsity,
            "workspace_mb": opts.workspace_mb,
            "profile": profile_shapes,
            "engine_cache": str(engine_path),
            "engine_cache_key": key,
            "cache_hit": cache_hit,
            "engine_build_s": build_s,
            "calibration": calibration,
            "batch_mode": ("fixed %d" % shape[0] if shape[0] is not None else
                           "dynamic: profile 1..%d, optimised for %d" % (max_batch, spec_shape[0])),
            "timed": "host to device copy, execute_async_v3, device to host copy, stream synchronize",
        }
        return session


def _trt_build(trt: Any, cuda: _Cuda, builder: Any, network: Any, log: Any, opts: TrtOptions,
               flags: Tuple[List[str], List[str]], input_name: str, profile_shapes: List[List[int]],
               spec_shape: List[int]) -> Tuple[bytes, Dict[str, Any]]:
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mb << 20)
    for name in flags[0] + flags[1]:
        if not hasattr(trt.BuilderFlag, name):
            raise RuntimeBackendError("runtime.options.precision: TensorRT %s has no BuilderFlag.%s (%s with "
                                      "sparsity=%s needs it)" % (trt.__version__, name, opts.precision, opts.sparsity))
    for name in flags[0]:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in flags[1]:
        config.clear_flag(getattr(trt.BuilderFlag, name))
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, *profile_shapes)
    config.add_optimization_profile(profile)
    calibration: Dict[str, Any] = {"source": None}
    if "INT8" in flags[0]:
        if not hasattr(trt, "IInt8EntropyCalibrator2"):
            raise RuntimeBackendError("runtime.options.precision: TensorRT %s has no int8 calibrator (implicit "
                                      "quantization, which this backend uses for int8); use fp16 or fp32"
                                      % trt.__version__)
        batches = None
        if opts.calibration_data is not None:
            data = load_inputs(opts.calibration_data, spec_shape, "runtime.options.calibration_data")
            batches = CalibrationBatches(data, spec_shape[0])
            cal_profile = builder.create_optimization_profile()
            cal_profile.set_shape(input_name, spec_shape, spec_shape, spec_shape)
            config.set_calibration_profile(cal_profile)
        config.int8_calibrator = _trt_calibrator(trt, cuda, batches, opts.calibration_cache)
        calibration = {"source": "data" if batches is not None else "cache",
                       "data": str(opts.calibration_data) if batches is not None else None,
                       "batches": batches.count if batches is not None else None,
                       "batch": spec_shape[0] if batches is not None else None,
                       "cache": str(opts.calibration_cache) if opts.calibration_cache is not None else None}
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeBackendError("tensorrt could not build an engine: %s" % log.last())
    return bytes(blob), calibration


def _trt_calibrator(trt: Any, cuda: _Cuda, batches: Optional[CalibrationBatches], cache: Optional[Path]) -> Any:
    """An ``IInt8EntropyCalibrator2`` over :class:`CalibrationBatches` (defined here: it subclasses a TensorRT
    class, and TensorRT is imported only when a job asks for it)."""

    class Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.device_ptr = cuda.malloc(batches.array[:batches.batch].nbytes) if batches is not None else 0

        def get_batch_size(self) -> int:
            return batches.batch if batches is not None else 1

        def get_batch(self, names: List[str]) -> Optional[List[int]]:
            batch = batches.next() if batches is not None else None
            if batch is None:
                return None
            cuda.call("cudaMemcpy (calibration batch)", cuda.rt.cudaMemcpy(
                self.device_ptr, batch.ctypes.data, batch.nbytes, cuda.rt.cudaMemcpyKind.cudaMemcpyHostToDevice))
            return [self.device_ptr]

        def read_calibration_cache(self) -> Optional[bytes]:
            if cache is not None and cache.is_file():
                return cache.read_bytes()
            return None

        def write_calibration_cache(self, data: Any) -> None:
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_bytes(bytes(data))

    return Calibrator()


def _trt_logger(trt: Any) -> Any:
    """A TensorRT logger that keeps its warnings and errors, so a failed build says why."""

    class Logger(trt.ILogger):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: List[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.Severity.WARNING):  # INTERNAL_ERROR, ERROR, WARNING
                self.messages = (self.messages + [str(msg)])[-20:]

        def last(self) -> str:
            return self.messages[-1] if self.messages else "no message from TensorRT"

    return Logger()


def _import_trt() -> Any:
    try:
        import tensorrt
    except ImportError as e:
        raise RuntimeBackendError("%s (%s)" % (TRT_MISSING, e)) from None
    return tensorrt


def _import_cudart() -> Any:
    """cuda-python's runtime bindings: ``cuda.bindings.runtime`` (12.6+ and 13) or ``cuda.cudart`` (11.x, 12.x)."""
    try:
        from cuda.bindings import runtime
        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart
    except ImportError as e:
        raise RuntimeBackendError("runtime 'tensorrt' needs cuda-python for device memory (%s); install it with "
                                  "pip install cuda-python (the release matching the device's CUDA)" % e) from None
    return cudart
