"""A search candidate's build, or a share of its sensitivity table, on another machine (a Ray worker:
:mod:`host.executors.ray_cluster`).

:func:`build_candidate` gets the candidate as JSON (the run's stored options, the device profile, the kept channels,
the recovery) and rebuilds what the host had open from the options alone, as ``--resume`` does: the model from its
recipe (model source, arguments, weights), the data from its paths, the model space. That context is opened once
per worker process and run, then reused by every later build there. The build itself is the host's own
(:meth:`host.search.evaluator.FleetEvaluator.build_into`), so its artifact is the same bytes.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping

from host.executors.base import worker_context
from host.fleet.formats import Profile
from host.search.algos.base import Candidate
from host.search.options import RecoveryOptions, SearchOptions



def build_candidate(payload: Mapping[str, Any], dest: Path) -> Dict[str, Any]:
    """Build the payload's candidate into ``dest``; its record (as :meth:`FleetEvaluator.build_into` returns)."""
    ev = _evaluator(payload)
    prof = payload["profile"]
    profile = Profile(int(prof["round_to"]), str(prof["fmt"]),
                      tuple((str(k), v) for k, v in prof.get("export_options") or ()))
    c = payload["candidate"]
    cand = Candidate(tuple((str(n), int(k)) for n, k in c["kept"]), str(c["recovery"]), float(c.get("ratio", 0.0)),
                     str(c.get("note", "")))
    rec = RecoveryOptions(**payload["recovery"]) if payload.get("recovery") else None
    return ev.build_into(profile, cand, str(payload["key"]), rec, payload.get("max_seconds"), Path(dest))


def sensitivity_chunk(payload: Mapping[str, Any], dest: Path) -> Dict[str, Any]:
    """A Ray task's share of the sensitivity table: ``payload["groups"]`` each pruned alone, scored as
    :func:`host.search.space.sensitivity_table` scores them."""
    from host.search import data as search_data
    from host.search.space import sensitivity_rows, sensitivity_split

    opts = SearchOptions.from_dict(payload["options"], "the task's payload")
    wl = worker_context("sensitivity:" + json.dumps(payload["options"], sort_keys=True),   # once per process
                        lambda: search_data.open_search_workload(opts))
    cal, example, metric = sensitivity_split(opts, wl)
    rows = sensitivity_rows(wl.model.model, opts, cal, example, metric, list(payload["groups"]),
                            wl.model.ignored_modules())
    return {"drop_pp": rows}


def _evaluator(payload: Mapping[str, Any]) -> Any:
    """The run's build context in this process (opened on first use): a FleetEvaluator over a work folder of this
    worker's own."""
    doc = json.dumps(payload["options"], sort_keys=True)
    ident = hashlib.sha256((str(payload["run_id"]) + doc).encode()).hexdigest()[:16]

    def close(ev: Any) -> None:
        ev.close()
        shutil.rmtree(ev.out, ignore_errors=True)

    return worker_context("search:" + ident, lambda: _open(str(payload["run_id"]), SearchOptions.from_dict(
        payload["options"], "the build's payload"), ident), close)


def _open(run_id: str, opts: SearchOptions, ident: str) -> Any:
    import torch

    from host.search import data as search_data
    from host.search.evaluator import FleetEvaluator
    from host.search.space import build_space

    torch.manual_seed(opts.seed)
    wl = search_data.open_search_workload(opts)
    loaded = wl.model
    keep = loaded.ignored_modules()
    space = build_space(loaded.name, loaded.model, dict(loaded.meta), prune_residual=opts.prune_residual,
                        min_channels=opts.min_channels, example=wl.example, extra_ignored=keep)
    # this process's own folder (its eval shards, teacher cache), removed when the process or the run ends
    out = Path(tempfile.gettempdir()) / "edgeprune-builds" / f"{run_id}-{ident}-{os.getpid()}"
    atexit.register(shutil.rmtree, str(out), True)
    return FleetEvaluator(out, run_id, opts, loaded.name, loaded.model, dict(loaded.meta), space, workload=wl)

