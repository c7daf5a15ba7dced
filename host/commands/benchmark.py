"""``edgeprune bench``: one artifact (or a reference model, exported on the fly) measured on many devices at
once, one row per device, recorded under a run id in ``--out`` (default ``results/runs/<run id>/``).

Accuracy is measured by each device's agent on an eval set: the CIFAR-10 eval split by default, or every image of
``--data`` (an image folder, npz or ``MODULE:CALLABLE``; :mod:`edgeprune.datasets`) brought to the artifact's input
size with the preprocessing its manifest recorded (``--resize``/``--center-crop``/``--mean``/``--std`` override
it). ``--reference ARTIFACT`` (a dense model's artifact or manifest) is run here on the same images and its outputs
ship with the shards, so the agents also report label-free fidelity: top-1 agreement, SNR and max abs error."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

import numpy as np

import torch

from agent import schema
from edgeprune import data, datasets, export, models, shards
from edgeprune.errors import ExportError, UsageError
from host.fleet import state
from host.fleet.devices import DeviceConfig
from host.fleet.runner import DeviceOutcome, Events, run_on_devices
from host.fleet.jobs import build_job, repetition_job
from host.files import write_text_atomic
from host.results.store import check_run_id, new_run_id

if TYPE_CHECKING:  # pragma: no cover
    from host.results.store import RunRecorder

COLUMNS = ["device", "machine", "emulated", "runtime", "threads", "repetitions", "latency_p50_ms", "run_spread",
           "latency_p90_ms", "throughput_ips", "accuracy_top1",
           "accuracy_top5", "agreement", "snr_db", "max_abs_err", "eval_n", "power_w", "power_source", "energy_mj", "status", "error", "attempts", "seconds", "report"]


def artifact_from(model: str, workdir: Path) -> Tuple[Path, export.Manifest]:
    """The artifact ``--model`` names and its manifest, every file of it verified against the manifest.

    ``model``: a reference model name (exported dense to ONNX here, verified); a manifest file
    (``r20.openvino.manifest.json``); an artifact file with its manifest beside it (:func:`export.find_manifest`);
    or a folder holding exactly one ``*.manifest.json`` (a folder with several, as :func:`export.export` writes
    the formats of one tag, needs the manifest named). UsageError when it is none of these, when a manifest is
    not one, or when a file it lists is missing or differs from its sha256."""
    if model in models.MODELS:
        net, meta = models.pretrained(model)
        path = workdir / f"{model}.onnx"
        check = data.to_tensor_batch(data.eval_split(2).images)
        man = export.export_onnx(net, path, check_inputs=check, model_name=model,
                                 source_checkpoint_sha256=str(meta["sha256"]), pruning_plan_sha256="")
        man.write(workdir / f"{model}.manifest.json")
        return path, man
    given = Path(model)
    if given.is_dir():
        manifests = sorted(given.glob("*.manifest.json"))
        if not manifests:
            raise UsageError(f"--model: {given} holds no *.manifest.json (an exported artifact's folder has one per "
                             "format)")
        if len(manifests) > 1:
            names = ", ".join(m.name for m in manifests)
            raise UsageError(f"--model: {given} holds {len(manifests)} manifests ({names}); name one: "
                             f"--model {manifests[0]}")
        manifest = manifests[0]
    elif given.is_file() and given.name.endswith(".json"):
        manifest = given
    elif given.is_file():
        found = export.find_manifest(given)
        if found is None:
            raise UsageError(f"--model: {given} has no manifest beside it (*.manifest.json naming {given.name})")
        manifest = found
    else:
        raise UsageError(f"--model: {model!r} is neither a reference model ({', '.join(sorted(models.MODELS))}) nor "
                         "a manifest, an artifact or a folder with an artifact and its .manifest.json")
    man = export.Manifest.read(manifest)
    try:
        man.check_files(manifest.parent)
    except ExportError as e:
        raise UsageError(f"{e} (manifest {manifest})") from None
    export.check_artifact(manifest.parent / man.file, man, str(manifest))
    return manifest.parent / man.file, man


@dataclass
class BenchData:
    """``--data`` for a bench: every sample of a user's source, and optionally a reference artifact."""

    source: datasets.DataSource
    reference: Optional[Tuple[Path, export.Manifest]] = None

    @property
    def name(self) -> str:
        return "data"

    def __len__(self) -> int:
        return len(self.source)


@dataclass
class BenchInputs:
    """What ``--model`` names and the eval data, checked before a run starts (:func:`check_inputs`)."""

    artifact: Optional[Tuple[Path, export.Manifest]]   # None: a reference model, exported when the run starts
    eval: Union[data.Split, BenchData]


def input_hw(man: export.Manifest) -> Tuple[int, int]:
    shape = [int(d) for d in man.input_shape]
    return (shape[2], shape[3]) if man.layout == "NCHW" else (shape[1], shape[2])


def bench_preprocess(man: export.Manifest, resize: Optional[str] = None, center_crop: Optional[str] = None,
                     mean: Optional[str] = None, std: Optional[str] = None) -> datasets.Preprocess:
    """The preprocessing the manifest recorded (what the model was exported with), each flag given overriding it."""
    h, w = input_hw(man)
    channels = int(man.input_shape[1] if man.layout == "NCHW" else man.input_shape[3])
    rec = dict(man.preprocess or {})

    def joined(v: Any) -> Optional[str]:
        return None if v is None else ",".join(str(x) for x in v)

    flags = datasets.parse_preprocess(resize, center_crop, mean or joined(rec.get("mean")),
                                      std or joined(rec.get("std")), (h, w), channels=channels)
    base = datasets.Preprocess.default((h, w))
    if "resize" in rec or "center_crop" in rec:   # recorded by edgeprune >= issue 15: the host's resize and crop
        base.resize = None if rec.get("resize") is None else int(rec["resize"])
        crop = rec.get("center_crop")
        base.center_crop = None if crop is None else (int(crop[0]), int(crop[1]))
    if rec.get("mean") is not None:
        base.mean, base.std = tuple(float(v) for v in rec["mean"]), tuple(float(v) for v in rec["std"])
    base.scale = float(rec.get("scale", base.scale))
    for attr, flag in (("resize", resize), ("center_crop", center_crop), ("mean", mean), ("std", std)):
        if flag is not None:
            setattr(base, attr, getattr(flags, attr))
    return base


def check_inputs(model: str, eval_per_class: Optional[int] = data.DEFAULT_EVAL_PER_CLASS, *,
                 data_path: Optional[str] = None, reference: Optional[str] = None, resize: Optional[str] = None,
                 center_crop: Optional[str] = None, mean: Optional[str] = None,
                 std: Optional[str] = None) -> BenchInputs:
    """Every input of a bench run, checked before anything is recorded or built: the artifact (its files against the
    manifest, and that the primary file is the model the manifest describes) and the eval data (``data_path``, else
    the CIFAR-10 eval split: the test file of ``EDGEPRUNE_DATA`` when there is one). UsageError naming the
    argument, file and field."""
    artifact = None if model in models.MODELS else artifact_from(model, Path("."))
    if data_path is None:
        if reference is not None:
            raise UsageError("--reference: needs --data (the images both artifacts are run on)")
        return BenchInputs(artifact, data.eval_split(eval_per_class))
    if artifact is None:
        raise UsageError(f"--data: give --model an exported artifact or manifest (a built-in name like {model} is "
                         "exported at its own input size with the CIFAR preprocessing)")
    art, man = artifact
    src = datasets.open_source(data_path, input_hw=input_hw(man), preprocess=bench_preprocess(
        man, resize, center_crop, mean, std), arg="--data")
    if len(src) == 0:
        raise UsageError(f"--data: {data_path}: holds no samples")
    if src.labels() is None and reference is None:
        raise UsageError(f"--data: {data_path}: has no labels; give --reference DENSE_ARTIFACT to measure label-free "
                         "fidelity (agreement, SNR) against it")
    ref = None
    if reference is not None:
        if reference in models.MODELS:
            raise UsageError(f"--reference: give an exported artifact or manifest, not a built-in name ({reference})")
        try:
            ref = artifact_from(reference, Path("."))
        except UsageError as e:
            raise UsageError(str(e).replace("--model: ", "--reference: ", 1)) from None
        if input_hw(ref[1]) != input_hw(man):
            raise UsageError(f"--reference: {reference} takes input {ref[1].input_shape}, --model "
                             f"{man.input_shape}; they must take the same images")
    return BenchInputs(artifact, BenchData(src, ref))


def _shard_batches(bd: BenchData, batch_size: int = 256):  # -> Iterator[shards.Batch]
    """(data, labels, reference outputs) for every sample of ``bd``; the reference artifact run here, 1 thread."""
    for batch, labels in bd.source.batches(np.arange(len(bd.source)), batch_size):
        refs = None
        if bd.reference is not None:
            x = bd.source.to_tensor(batch)
            refs = [np.asarray(o, dtype=np.float32) for o in
                    export.run_artifact_outputs(bd.reference[0].parent / (bd.reference[1].file), x)]
        yield batch, labels, refs


DEFAULT_REPEAT = 5      # repetitions per device: what `regress` needs to decide over runs at alpha 0.01


def rep_name(device_id: str, rep: int, sep: str = "-r") -> str:
    """The name of a device's repetition ``rep``: the device id for the first, ``ID-r2`` (files) / ``ID#r2``
    (store keys) after."""
    return device_id if rep == 1 else f"{device_id}{sep}{rep}"


def _emulated(report: Optional[schema.Report]) -> bool:
    """Whether the agent ran ``report``'s job under user-mode emulation (agent.emulation)."""
    return report is not None and report.identity is not None and \
        bool((report.identity.extra.get("emulation") or {}).get("emulated"))


def _timed(report: Optional[schema.Report]) -> bool:
    return report is not None and report.status == "ok" and report.timing is not None


@dataclass
class BenchResult:
    run_id: str
    out: Path
    outcomes: List[DeviceOutcome]
    rows: List[Dict[str, object]]


def run_bench(model_or_dir: str, devices: List[DeviceConfig], *, out: Optional[Path] = None,
              run_id: Optional[str] = None, threads: Optional[int] = None, quick: bool = False,
              eval_per_class: Optional[int] = data.DEFAULT_EVAL_PER_CLASS, state_path: Path = state.DEFAULT_PATH,
              events: Optional[Events] = None, recorder: Optional["RunRecorder"] = None,
              inputs: Optional[BenchInputs] = None, repeat: int = DEFAULT_REPEAT, **fleet_kw: object) -> BenchResult:
    """Measure the artifact on every device in parallel, in ``repeat`` repetitions (:func:`repetition_job`: the
    first also scores the eval data; rounds interleave the devices; a device found emulated is measured once). With ``recorder`` (the results store), each
    repetition is recorded in its own transaction as it arrives (keys ``DEVICE``, ``DEVICE#r2``, ...).
    ``inputs``: :func:`check_inputs` of the same ``model_or_dir`` and ``eval_per_class``, when the caller checked
    them already."""
    run_id = check_run_id(run_id) if run_id else new_run_id()
    if not isinstance(repeat, int) or repeat < 1:
        raise UsageError(f"--repeat: must be an integer >= 1, got {repeat!r}")
    if threads is not None and threads < 1:
        raise UsageError("--threads: must be >= 1")
    out = Path(out) if out is not None else Path("results") / "runs" / run_id
    (out / "reports").mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    if inputs is None:
        inputs = check_inputs(model_or_dir, eval_per_class)
    art, man = inputs.artifact if inputs.artifact is not None else artifact_from(model_or_dir, out)
    ev = inputs.eval
    if isinstance(ev, BenchData):
        # the device normalises exactly as the host did (--mean/--std override the manifest's for this run)
        p = ev.source.preprocess
        man = dataclasses.replace(man, preprocess={**dict(man.preprocess or {}), "mean": list(p.mean),
                                                   "std": list(p.std), "scale": float(p.scale)})
        shard_list = shards.write_shards(_shard_batches(ev), out / "eval", prefix=f"data-{len(ev)}")
        shard: Union[Path, List[shards.ShardInfo]] = shard_list
        shard_sha = shard_list[0].sha256 if len(shard_list) == 1 else export.sha256_text(
            ",".join(x.sha256 for x in shard_list))
    else:
        shard = ev.save(out / f"{ev.name}-{len(ev)}.npz")
        shard_sha = models.sha256_file(shard)
    if recorder is not None:
        for dev in devices:
            recorder.device(dev)

    def record(rep: int, dev: DeviceConfig, job: Optional[schema.JobSpec], o: DeviceOutcome) -> None:
        if o.report is not None:
            write_text_atomic(out / "reports" / f"{rep_name(dev.id, rep)}.json", schema.dumps(o.report))
        if recorder is None:
            return
        report = o.report or schema.Report(job_id=job.job_id if job else f"{run_id}-{dev.id}", status="error",
                                           error=schema.ErrorInfo(o.error_type or "DeviceError", o.error or "no report"))
        recorder.measurement(rep_name(dev.id, rep, "#r"), device_id=dev.id, report=schema.to_dict(report),
                             job=schema.to_dict(job) if job is not None else None, label=man.export_format or man.format,
                             model=man.model, manifest=asdict(man),
                             extra={"attempts": o.attempts, "seconds": round(o.seconds, 3), "repetition": rep,
                                    "repetitions": repeat, "eval_sha256": shard_sha if rep == 1 else None,
                                    "eval_split": ev.name if rep == 1 else None})

    def job_for(rep: int, d: DeviceConfig) -> schema.JobSpec:
        return repetition_job(build_job(d, f"{run_id}-{rep_name(d.id, rep)}", art, man, shard if rep == 1 else None,
                                        shard_sha if isinstance(shard, Path) and rep == 1 else "", ev.name,
                                        quick=quick, threads=threads), rep, repeat)

    outcomes = run_on_devices(devices, lambda d: job_for(1, d), out / "jobs", events=events,
                              on_outcome=lambda d, j, o: record(1, d, j, o), **fleet_kw)  # type: ignore[arg-type]
    # the other repetitions, round by round (every device once per round), on the devices whose first one ran;
    # not on an emulated device: its timings are the emulator's, repeating them says nothing about a device
    runs: Dict[str, List[schema.Report]] = {d.id: [o.report] for d, o in zip(devices, outcomes) if _timed(o.report)}
    for rep in range(2, repeat + 1):
        again = [d for d in devices if d.id in runs and not _emulated(runs[d.id][0])]
        if not again:
            break
        more = run_on_devices(again, lambda d, rep=rep: job_for(rep, d), out / "jobs", events=events,
                              on_outcome=lambda d, j, o, rep=rep: record(rep, d, j, o), **fleet_kw)  # type: ignore
        for d, o in zip(again, more):
            if _timed(o.report):
                runs[d.id].append(o.report)
    rows = []
    for dev, o in zip(devices, outcomes):
        # reachable and answering = good (even if the model failed); busy says nothing about health
        health = "good" if o.report is not None else ("unknown" if o.error_type == "DeviceBusy" else "bad")
        state.record(dev.id, health, {"last_run": run_id, "error": o.error}, state_path)
        r = o.report
        row: Dict[str, object] = {"device": dev.id, "runtime": dev.runtime.name,
                                  "threads": threads if threads is not None else dev.runtime.threads,
                                  "status": r.status if r is not None else "error", "error": o.error or "",
                                  "attempts": o.attempts, "seconds": round(o.seconds, 2),
                                  "report": f"reports/{dev.id}.json" if r is not None else ""}
        if r is not None and r.identity is not None:
            # an emulated device's timings are the emulator's: every table marks them (agent.emulation)
            row.update(machine=r.identity.machine, emulated=_emulated(r))
        if r is not None and r.timing is not None:
            timed = runs.get(dev.id) or [r]      # medians over the repetitions' own windows
            meds = [x.timing.latency_ms.median for x in timed]
            row.update(latency_p50_ms=round(float(np.median(meds)), 4),
                       latency_p90_ms=round(float(np.median([x.timing.latency_ms.p90 for x in timed])), 4),
                       throughput_ips=round(float(np.median([x.timing.throughput_ips for x in timed])), 2),
                       repetitions=len(timed),
                       run_spread=round(float(np.max(np.abs(np.asarray(meds) / np.median(meds) - 1.0))), 4))
        if r is not None and r.accuracy is not None:
            acc = r.accuracy
            row["eval_n"] = acc.n
            for key, v in (("accuracy_top1", acc.top1), ("accuracy_top5", acc.top5),
                           ("agreement", getattr(acc, "agreement", None)), ("snr_db", getattr(acc, "snr_db", None)),
                           ("max_abs_err", getattr(acc, "max_abs_err", None))):
                if v is not None:
                    row[key] = round(float(v), 6 if key == "max_abs_err" else 4)
        if r is not None and r.power is not None:
            row.update(power_w=round(r.power.mean_w, 3), power_source=r.power.source,
                       energy_mj=round(r.power.energy_mj_per_inference, 4))
        rows.append(row)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(out / "summary.csv", buf.getvalue())
    write_text_atomic(out / "run.json", json.dumps({
        "run_id": run_id, "artifact": str(art), "manifest": asdict(man), "devices": [d.id for d in devices],
        "threads": threads, "eval": {"split": ev.name, "n": len(ev), "sha256": shard_sha,
                                     "source": (f"{ev.source.kind} {ev.source.name}" if isinstance(ev, BenchData)
                                                else ev.source),
                                     "reference": (str(ev.reference[0]) if isinstance(ev, BenchData)
                                                   and ev.reference else None)},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1, default=str))
    return BenchResult(run_id, out, outcomes, rows)
