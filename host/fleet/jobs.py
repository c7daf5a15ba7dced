"""Build the job spec a device runs, from its config and an exported artifact — one place for demo and bench."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from agent import schema

from edgeprune.errors import DeviceError
from edgeprune.export import Manifest
from host.fleet.devices import DeviceConfig, auto_affinity

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


def runtime_options(dev: DeviceConfig, manifest: Manifest) -> Dict[str, Any]:
    """The device's ``runtime.options`` with the manifest's ``runtime_options`` merged in (what this artifact must
    run with: tensorrt's ``precision``, an Edge TPU model's ``delegate``). DeviceError when the device config
    sets one of them to something else: the artifact was exported for that setting and the device's would win
    silently, or measure a different thing."""
    options = dict(dev.runtime.options)
    for key, value in sorted(manifest.runtime_options.items()):
        if key in options and options[key] != value:
            raise DeviceError(f"{dev.id}: runtime.options.{key} is {options[key]!r} in the device config but this "
                              f"artifact ({manifest.file}, {manifest.export_format}) must run with {value!r}; "
                              "remove it from the device config or export for that setting")
        options[key] = value
    return options


EvalShards = Union[None, str, Path, Sequence[Any]]


def eval_shards(eval_shard: EvalShards, eval_sha256: str = "") -> Optional[list]:
    """``[ShardSpec]`` (absolute paths) for ``build_job``'s ``eval_shard``: None; one path (with ``eval_sha256``);
    or a list of ``edgeprune.shards.ShardInfo``, ``schema.ShardSpec`` or ``(path, sha256)`` pairs, in order."""
    if eval_shard is None:
        return None
    if isinstance(eval_shard, (str, Path)):
        items = [(eval_shard, eval_sha256)]
    else:
        if eval_sha256:
            raise DeviceError("eval_sha256: give it for a single eval shard only; a list of shards carries each "
                              "shard's own sha256")
        items = [(s.path, s.sha256) if hasattr(s, "sha256") else tuple(s) for s in eval_shard]
        if not items:
            raise DeviceError("eval_shard: an empty list of eval shards; pass None for no accuracy")
    return [schema.ShardSpec(path=str(Path(path).resolve()), sha256=str(sha)) for path, sha in items]


def build_job(dev: DeviceConfig, job_id: str, artifact: Path, manifest: Manifest, eval_shard: EvalShards,
              eval_sha256: str = "", eval_split: str = "eval", *, quick: bool = False, seed: int = 0,
              threads: Optional[int] = None) -> schema.JobSpec:
    """The job for ``dev``; DeviceError when the device's runtime cannot load this artifact's format, is not the
    runtime it was exported for (``manifest.target_runtime``), or is configured against its ``runtime_options``.

    ``artifact`` is the primary file (``manifest.file``); the manifest's other files (``files``) go into the job's
    ``artifact.files``, expected beside it (the transports ship and link them so). ``eval_shard`` is None (no
    accuracy), one shard's path with its ``eval_sha256``, or a list of shards (``edgeprune.shards.write_shards``'s
    ``ShardInfo`` list, or ``(path, sha256)`` pairs): the job (spec version 3) lists them in ``eval.shards``."""
    formats = RUNTIME_FORMATS.get(dev.runtime.name, ())
    if manifest.format not in formats:
        raise DeviceError(f"{dev.id}: runtime {dev.runtime.name} loads {', '.join(formats) or 'no known format'}; "
                          f"this artifact is {manifest.format}")
    if manifest.target_runtime and manifest.target_runtime != dev.runtime.name:
        raise DeviceError(f"{dev.id}: this artifact ({manifest.file}, {manifest.export_format}) was exported for "
                          f"runtime {manifest.target_runtime}, but the device runs {dev.runtime.name}")
    options = runtime_options(dev, manifest)
    shards = eval_shards(eval_shard, eval_sha256)
    n_threads = dev.runtime.threads if threads is None else threads
    artifact = Path(os.path.abspath(artifact))  # not resolve(): a symlink keeps its name, its files stay beside it
    extra = {name: digest for name, digest in manifest.files.items() if name != manifest.file}
    job = schema.JobSpec(
        job_id=job_id, device_id=dev.id,
        artifact=schema.ArtifactSpec(path=str(artifact), sha256=manifest.sha256, format=manifest.format,
                                     input_name=manifest.input_name, input_shape=list(manifest.input_shape),
                                     input_dtype=manifest.input_dtype, layout=manifest.layout, files=extra),
        preprocess=schema.PreprocessSpec(scale=float(manifest.preprocess["scale"]),
                                         mean=list(manifest.preprocess["mean"]), std=list(manifest.preprocess["std"])),
        runtime=schema.RuntimeSpec(name=dev.runtime.name, threads=n_threads, options=options),
        timing=timing_spec(dev, quick, seed, n_threads), power=power_spec(dev),
        eval=(schema.EvalSpec(shards=shards, split=eval_split, batch_size=100) if shards is not None else None))
    try:
        return job.validate()
    except schema.SchemaError as e:  # a manifest this agent cannot take (a file name it refuses, ...)
        raise DeviceError(f"{dev.id}: cannot build job {job_id} for {artifact}: {e}") from None


def repetition_job(job: schema.JobSpec, rep: int, repeat: int) -> schema.JobSpec:
    """Repetition ``rep`` of ``repeat``: a job of its own (a fresh agent process and runtime session, its own
    warm-up and timed window). The device's timed window (``min_iters``, ``min_duration_s``) is shared out among
    the repetitions, so ``repeat`` of them cost about what one window did, plus a load and a warm-up each."""
    if repeat > 1:
        t = job.timing
        t.min_iters = max(10, t.min_iters // repeat)
        t.min_duration_s = max(0.2, t.min_duration_s / repeat)
        t.seed = t.seed + rep - 1
    return job
