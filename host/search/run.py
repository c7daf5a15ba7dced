"""``edgeprune search``: prune until every device of a fleet meets its own targets, measured on the devices.

One search runs one algorithm (:mod:`host.search.algos`: ``bisect`` or ``netadapt``) per device, side by side:
each device gets its own candidates, pruned with its own channel alignment (``round_to``) and exported in its
runtime's format and precision (:func:`~host.search.options.profile_for`); devices with the same alignment and
format share the built artifacts. Device evaluations of one round run on all devices in parallel
(:func:`host.fleet.runner.run_on_device`, under each device's lease); host work (pruning, recovery, export) runs
before them, so it never competes with a measurement on this machine.

Run folder (``--out DIR``, default ``results/search/<run id>``)::

    search.json               run id, options, devices, targets: what --resume continues with
    evaluations.jsonl         one line per completed evaluation, appended and fsync'ed as each completes:
                              device evaluations (candidate, key, plan and artifact sha256, the agent's report)
                              and host evaluations (netadapt proposals: top-1 on the calib split)
    summary.json, summary.csv one row per device: verdict, targets, achieved, accuracy drop, evaluations
    <device>/chosen/          the chosen artifact (all its files), its manifest, report.json, candidate.json
    <device>/closest/         instead of chosen/ when the targets cannot be met: the closest candidate
    <device>/pareto.json|csv  every candidate evaluated on the device, with the latency-vs-accuracy and
                              energy-vs-accuracy Pareto fronts marked
    <device>/result.json      the verdict, why the search stopped, the bounds, the counts
    work/                     built artifacts (work/artifacts/<key>), agent job folders, the eval shards
                              (work/eval/, with the dense model's outputs: see host.search.data)

The model and data are any :mod:`edgeprune.sources` / :mod:`edgeprune.workload` accept (the options' model-source
and data fields, stored with the run); :mod:`host.search.data` opens them once per run. On unlabelled eval data the
accuracy targets are label-free (``agreement``, ``snr_db`` against the dense model, measured by the agent), and
candidates are ranked, and host-side proposals and sensitivities scored, by agreement instead of top-1.

The cache folder (``results/search/cache`` unless given) holds what outlives a run: the per-model sensitivity
table and each device's layer-latency table (netadapt).

A candidate's *key* is the sha256 of everything that determines its artifact: the model and checkpoint, the
channels kept per group (which, with the importance criterion, alignment and ``min_channels``, fix the pruning plan
exactly), the recovery options and the export format. ``--resume RUN_ID`` re-reads ``search.json``, replays the
deterministic algorithms and serves every evaluation already in ``evaluations.jsonl`` from there: nothing completed
is built or measured again (an artifact built but not measured is reused when its files still match its manifest,
and an interrupted fine-tune resumes from its checkpoint).

This module holds the entry points (:func:`start`, :func:`resume`); it returns plain data and reports progress
through a callback; the CLI does the printing. The modules behind it:

* :mod:`host.search.options` — :class:`SearchOptions`, device profiles, candidate keys, the run folder's names;
* :mod:`host.search.state` — ``search.json`` and ``evaluations.jsonl`` (:class:`~host.search.state.EvaluationLog`);
* :mod:`host.search.space` — the model space and the sensitivity table, read from torch;
* :mod:`host.search.evaluator` — building (prune → :func:`edgeprune.recovery.recover` → export) and measuring;
* :mod:`host.search.driver` — the loop over the algorithms' work, verdicts and output files;
* :mod:`host.search.outcome` — results, rows, :func:`result_document`;
* :mod:`host.search.algos` — the algorithms, one module each; :mod:`host.search.data` — the run's model and data.

The names the CLI uses (:class:`SearchOptions`, :data:`EVALUATIONS`, :func:`run_dir`, :func:`read_run`,
:func:`open_resumed_workload`, :func:`start`, :func:`resume`, :func:`result_document`) are importable from here.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional, Sequence

from edgeprune.errors import UsageError
from host.fleet.devices import DeviceConfig
from host.fleet.targets import TargetSet
from host.search.algos.base import ModelSpace
from host.search.driver import Search
from host.search.evaluator import Evaluator, FleetEvaluator
from host.search.options import EVALUATIONS, RUN_FILE, Events, SearchOptions, check_devices, run_dir
from host.search.outcome import SearchResult, result_document
from host.search.space import build_space, sensitivity_table
from host.search.state import read_run, stored_workload, write_run

if TYPE_CHECKING:  # pragma: no cover
    from edgeprune.workload import Workload
    from host.executors import Executor
    from host.results.store import RunRecorder

__all__ = ["EVALUATIONS", "SearchOptions", "SearchResult", "open_resumed_workload", "read_run", "result_document",
           "resume", "run_dir", "start"]


def start(opts: SearchOptions, devices: Sequence[DeviceConfig], targets: Mapping[str, TargetSet], *,
          out: Optional[Path] = None, run_id: Optional[str] = None, events: Optional[Events] = None,
          space: Optional[ModelSpace] = None, evaluator: Optional[Evaluator] = None,
          recorder: Optional["RunRecorder"] = None, workload: Optional["Workload"] = None,
          clock: Optional[Callable[[], float]] = None, executor: Optional["Executor"] = None) -> SearchResult:
    """A new search. ``executor``: where candidates are built (:mod:`host.executors`; default in this process,
    and the caller closes it). ``space``/``evaluator``/``clock`` replace the real ones (tests); ``workload``: the run's model
    and data when the caller opened them already (:func:`host.search.data.open_search_workload` of ``opts``). UsageError
    before anything runs for bad options, devices, model or data, targets the data cannot judge, or a run folder
    that already holds a search."""
    from host.search import data as search_data
    from host.results.store import check_run_id, new_run_id

    started = (clock or time.monotonic)()   # a budget counts everything from here
    opts.validate()
    check_devices(devices)
    missing = [d.id for d in devices if d.id not in targets]
    if missing:
        raise UsageError(f"--target: no targets for {', '.join(missing)}")
    run_id = check_run_id(run_id) if run_id else new_run_id()
    folder = run_dir(run_id, out)
    if (folder / RUN_FILE).exists():
        prev = json.loads((folder / RUN_FILE).read_text()).get("run_id", "?")
        raise UsageError(f"--out: {folder} already holds search run {prev}; continue it with --resume {prev}"
                         f"{f' --out {folder}' if out is not None else ''}, or choose another folder")
    if space is None or evaluator is None:
        from host.fleet.health import emulation_of
        from host.fleet.targets import refuse_emulated

        refuse_emulated(devices, targets, emulation_of)     # asks each device with a resource target
        workload = workload if workload is not None else search_data.open_search_workload(opts)
        search_data.check_workload(workload, targets)
    write_run(folder, run_id, opts, devices, targets,
               search_data.fingerprint(workload) if workload is not None else None)
    return _execute(folder, run_id, opts, list(devices), dict(targets), events, space, evaluator, recorder,
                    workload, clock, started, executor)


def resume(run_id: str, *, out: Optional[Path] = None, events: Optional[Events] = None,
           space: Optional[ModelSpace] = None, evaluator: Optional[Evaluator] = None,
           recorder: Optional["RunRecorder"] = None, workload: Optional["Workload"] = None,
           clock: Optional[Callable[[], float]] = None, executor: Optional["Executor"] = None) -> SearchResult:
    """Continue a search after a crash or Ctrl-C, with its stored options; completed evaluations are not repeated
    (a budget continues from the time the run had spent)."""
    from host.results.store import check_run_id

    started = (clock or time.monotonic)()
    check_run_id(run_id)
    folder = run_dir(run_id, out)
    stored_id, opts, devices, targets = read_run(folder)
    if stored_id != run_id:
        raise UsageError(f"--resume: {folder} holds run {stored_id}, not {run_id}")
    opts.validate()
    if workload is None and (space is None or evaluator is None):
        workload = open_resumed_workload(folder, opts)
    return _execute(folder, run_id, opts, devices, targets, events, space, evaluator, recorder, workload, clock,
                    started, executor)


def open_resumed_workload(folder: Path, opts: SearchOptions) -> "Workload":
    """The stored run's model and data, reopened from its options; UsageError when the data is not what the run
    started with (another --data under the same path, another input shape)."""
    from host.search import data as search_data

    wl = search_data.open_search_workload(opts)
    stored = stored_workload(folder)
    now = search_data.fingerprint(wl)
    if stored is not None:
        for part in ("input_shape", "eval"):
            if json.loads(json.dumps(stored.get(part))) != json.loads(json.dumps(now.get(part))):
                raise UsageError(f"--resume: the run's {'eval data' if part == 'eval' else part.replace('_', ' ')} "
                                 f"changed since it started ({stored.get(part)} then, {now.get(part)} now); start a "
                                 "new search instead")
    return wl


def _execute(folder: Path, run_id: str, opts: SearchOptions, devices: List[DeviceConfig],
             targets: Dict[str, TargetSet], events: Optional[Events], space: Optional[ModelSpace],
             evaluator: Optional[Evaluator], recorder: Optional["RunRecorder"] = None,
             workload: Optional["Workload"] = None, clock: Optional[Callable[[], float]] = None,
             started: Optional[float] = None, executor: Optional["Executor"] = None) -> SearchResult:
    emit = events or (lambda *a: None)
    if space is None or evaluator is None:
        import torch

        from host.search import data as search_data

        torch.manual_seed(opts.seed)
        wl = workload if workload is not None else search_data.open_search_workload(opts)
        search_data.check_workload(wl, targets)
        for note in wl.notes:
            emit("info", "", note)
        if not wl.has_finetune_data and any(r.finetune_epochs > 0 for r in (opts.recovery, opts.short_recovery)):
            emit("info", "", "recovery: BatchNorm recalibration only (no --finetune-data: fine-tuning needs labelled "
                             "training images)")
        if not search_data.eval_labelled(wl):
            emit("info", "", "eval data has no labels: candidates are judged and ranked by top-1 agreement / SNR "
                             "against the dense model's outputs, measured on the device")
        loaded = wl.model
        name, model, meta = loaded.name, loaded.model, dict(loaded.meta)
        keep = loaded.ignored_modules()
        sens = None
        ao = opts.algo_options
        if (opts.algo == "bisect" and ao.allocation in ("sensitivity", "latency")) or \
                (opts.algo == "netadapt" and ao.netadapt_max_proposals is not None):
            sens = sensitivity_table(model, name, meta, opts, emit, workload=wl, extra_ignored=keep,
                                     executor=executor)
        if space is None:
            space = build_space(name, model, meta, prune_residual=opts.prune_residual,
                                min_channels=opts.min_channels, sensitivities=sens, example=wl.example,
                                extra_ignored=keep)
        if evaluator is None:
            evaluator = FleetEvaluator(folder, run_id, opts, name, model, meta, space, emit, workload=wl,
                                       executor=executor)
    emit("info", "", f"search run {run_id} ({opts.algo}) in {folder}: {len(devices)} device(s), "
                     f"{len(space.groups)} prunable groups, {space.dense_macs / 1e6:.1f} MMACs dense")
    try:
        return Search(folder, run_id, opts, devices, targets, space, evaluator, emit, recorder, clock, started).run()
    finally:
        close = getattr(evaluator, "close", None)
        if close is not None:
            close()          # the devices' agent sessions end with the search
