"""Build the job spec a device runs, from its config and an exported artifact — one place for demo and bench."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

from agent import schema

from edgeprune.errors import DeviceError
from edgeprune.export import Manifest
from host.devices import DeviceConfig, auto_affinity

# artifact formats each agent runtime can load
RUNTIME_FORMATS: Dict[str, Tuple[str, ...]] = {
    "onnxruntime": ("onnx",), "openvino": ("onnx", "openvino-ir"), "tensorrt": ("onnx",),
    "tflite": ("tflite",), "torch": ("torchscript",),
}


def timing_spec(dev: DeviceConfig, quick: bool = False, seed: int = 0,
                threads: Optional[int] = None) -> schema.TimingSpec:
    t = dev.timing
    n = dev.runtime.threads if threads is None else threads
    if t.cpu_affinity == "auto":  # only where the host can see the device's CPUs
        affinity = auto_affinity(n) if dev.transport == "local" else None
    else:
        affinity = t.cpu_affinity
    spec = schema.TimingSpec(
        warmup_iters=t.warmup_iters, warmup_s=t.warmup_s, min_iters=t.min_iters, min_duration_s=t.min_duration_s,
        max_iters=t.max_iters, max_duration_s=t.max_duration_s, batch_size=t.batch_size, seed=seed,
        cv_warn=t.cv_warn, cpu_affinity=affinity, cooldown_s=t.cooldown_s)
    if quick:  # shorter windows, still past both a minimum count and a minimum duration
        spec.min_iters, spec.min_duration_s, spec.warmup_s = min(spec.min_iters, 100), min(spec.min_duration_s, 1.0), 0.2
    return spec


def power_spec(dev: DeviceConfig) -> Optional[schema.PowerSpec]:
    p = dev.power
    if p is None:
        return None
    return schema.PowerSpec(sensor=p.sensor, sample_hz=p.sample_hz, idle_w=p.idle_w, max_w=p.max_w,
                            options=dict(p.options))


def build_job(dev: DeviceConfig, job_id: str, artifact: Path, manifest: Manifest, eval_shard: Optional[Path],
              eval_sha256: str = "", eval_split: str = "eval", *, quick: bool = False, seed: int = 0,
              threads: Optional[int] = None) -> schema.JobSpec:
    """The job for ``dev``; DeviceError when the device's runtime cannot load this artifact's format."""
    formats = RUNTIME_FORMATS.get(dev.runtime.name, ())
    if manifest.format not in formats:
        raise DeviceError(f"{dev.id}: runtime {dev.runtime.name} loads {', '.join(formats) or 'no known format'}; "
                          f"this artifact is {manifest.format}")
    n_threads = dev.runtime.threads if threads is None else threads
    return schema.JobSpec(
        job_id=job_id, device_id=dev.id,
        artifact=schema.ArtifactSpec(path=str(Path(artifact).resolve()), sha256=manifest.sha256, format=manifest.format,
                                     input_name=manifest.input_name, input_shape=list(manifest.input_shape),
                                     input_dtype=manifest.input_dtype, layout=manifest.layout),
        preprocess=schema.PreprocessSpec(scale=float(manifest.preprocess["scale"]),
                                         mean=list(manifest.preprocess["mean"]), std=list(manifest.preprocess["std"])),
        runtime=schema.RuntimeSpec(name=dev.runtime.name, threads=n_threads, options=dict(dev.runtime.options)),
        timing=timing_spec(dev, quick, seed, n_threads), power=power_spec(dev),
        eval=(schema.EvalSpec(path=str(Path(eval_shard).resolve()), sha256=eval_sha256, split=eval_split,
                              batch_size=100) if eval_shard is not None else None),
    ).validate()
