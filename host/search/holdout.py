"""The hold-out re-check: the search chooses on its eval split, then scores its choice again, on the device, on test
images it never chose on.

A search's candidates are compared and chosen on the eval split (the 1,000 CIFAR-10 test images of
``--eval-per-class 100``); choosing the best of several candidates on one split flatters the winner. So after the
verdicts, each device's chosen (or closest) candidate and its dense model are measured once more by the agent on
the **hold-out split** (the rest of the test set: 9,000 images when the full CIFAR-10 test set is in the data
folder), and the report says both: the accuracy drop the choice was made on and the drop on the hold-out, and the
top-1 over the whole test set (eval and hold-out together). The fine-tune data never overlaps either: it comes from
the training set (:func:`edgeprune.data.finetune_split`).

Hold-out measurements are records of kind ``holdout`` in ``evaluations.jsonl`` (keyed like the device evaluation
of the same artifact), so ``--resume`` does not measure them again. The user path (``--data``) has no hold-out:
its eval data is all the search is given (the result says so). ``--no-holdout`` turns the re-check off.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence

from host.search.algos.base import Candidate, DeviceMeasurement
from host.search.evaluator import Request
from host.search.options import RECORD_VERSION, RecoveryOptions
from host.search.outcome import DeviceResult
from host.search.state import now

KIND = "holdout"


def _candidate(rec: Dict[str, Any]) -> Candidate:
    c = rec["candidate"]
    return Candidate(tuple((k, int(v)) for k, v in (c.get("kept") or {}).items()), c.get("recovery") or "none",
                     float(c.get("ratio") or 0.0), c.get("note") or "")


def _final_recovery(search: Any, device_id: str, rec: Dict[str, Any]) -> Optional[RecoveryOptions]:
    """The sized recovery a budget's final was built with (only needed if its artifact must be rebuilt)."""
    if search.budget is None or not rec["candidate"].get("kept") or rec["candidate"].get("recovery") != "full":
        return None
    doc = dict(search.budget.finals.get(device_id) or {})
    doc.pop("sizing", None)
    return RecoveryOptions(**doc) if doc else None


def recheck(search: Any, devs: Sequence[Any], results: Sequence[DeviceResult]) -> None:
    """Measure each device's pick and its dense model on the hold-out split (or serve them from the log) and put
    the figures into ``results[i].holdout``; ``search`` is the :class:`host.search.driver.Search`, ``devs`` its
    per-device states."""
    name = getattr(search.evaluator, "holdout_name", None)
    if not search.opts.holdout:
        return
    if not name:
        for r in results:
            if r.chosen or r.closest:
                r.holdout = {"split": None, "reason": "no hold-out: the eval data is all the test data the search "
                                                      "was given (the choice was made on it)"}
        return
    wanted: Dict[str, List[Dict[str, Any]]] = {}
    requests: List[Request] = []
    for d, r in zip(devs, results):
        pick = r.chosen or r.closest
        dense = next((x for x in d.records if not x["candidate"]["kept"]), None)
        if pick is None or dense is None:
            continue
        recs = [dense] + [x for x in d.records if x["key"] == pick["key"] and x is not dense][:1]
        wanted[d.dev.id] = recs
        for rec in recs:
            if search.log.get(KIND, d.dev.id, rec["key"]) is None:
                search.emit("eval", d.dev.id, f"hold-out re-check ({name}): "
                                              f"{'dense' if rec is dense else 'the chosen candidate'}")
                requests.append(Request(d.dev, d.profile, _candidate(rec), rec["key"],
                                        _final_recovery(search, d.dev.id, rec), split="holdout"))
    errors: Dict[str, str] = {}

    def done(req: Request, m: DeviceMeasurement, extra: Dict[str, Any]) -> None:
        if not m.ok:
            errors[req.device.id] = str(m.error)
            return
        report = extra.get("report") or {}
        search.log.put({"v": RECORD_VERSION, "kind": KIND, "device": req.device.id, "key": req.key, "at": now(),
                        "t": round(time.time(), 3), "split": name, "metrics": m.metrics,
                        "accuracy": report.get("accuracy")})

    if requests:
        search.evaluator.measure(requests, done)
    for d, r in zip(devs, results):
        recs = wanted.get(d.dev.id)
        if not recs:
            continue
        got = [search.log.get(KIND, d.dev.id, x["key"]) for x in recs]
        if any(g is None for g in got):
            r.holdout = {"split": name, "error": errors.get(d.dev.id, "not measured")}
            continue
        r.holdout = summarise(name, recs, got, r.bounds)  # type: ignore[arg-type]


def summarise(name: str, recs: Sequence[Dict[str, Any]], got: Sequence[Dict[str, Any]],
              bounds: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The hold-out figures of a pick: its top-1 and drop against dense there, and over eval + hold-out."""
    dense_eval, pick_eval = recs[0]["metrics"], recs[-1]["metrics"]
    dense_ho, pick_ho = got[0]["metrics"], got[-1]["metrics"]
    n_eval = _images(recs[-1])
    n_ho = _images(got[-1])
    out: Dict[str, Any] = {"split": name, "images": n_ho}
    for metric in ("top1", "agreement"):
        if pick_ho.get(metric) is None:
            continue
        out[metric] = pick_ho[metric]
        if metric == "top1" and dense_ho.get("top1") is not None:
            out["dense_top1"] = dense_ho["top1"]
            out["drop_pp"] = round((dense_ho["top1"] - pick_ho["top1"]) * 100.0, 3)
            if n_eval and n_ho and pick_eval.get("top1") is not None and dense_eval.get("top1") is not None:
                n = n_eval + n_ho
                full = (pick_eval["top1"] * n_eval + pick_ho["top1"] * n_ho) / n
                full_dense = (dense_eval["top1"] * n_eval + dense_ho["top1"] * n_ho) / n
                out.update(test_images=n, test_top1=round(full, 6), test_dense_top1=round(full_dense, 6),
                           test_drop_pp=round((full_dense - full) * 100.0, 3))
    limit = (bounds or {}).get("max_drop_pp")
    if limit is not None and out.get("drop_pp") is not None:
        out["meets_accuracy"] = out["drop_pp"] <= float(limit)
    return out


def _images(rec: Dict[str, Any]) -> Optional[int]:
    acc = rec.get("accuracy") or ((rec.get("report") or {}).get("accuracy")) or {}
    n = acc.get("n")
    return int(n) if n else None

