"""The report's sections, in page order: the run, the latency/accuracy trade-off, the summary per device, latency
distributions, power and energy, accuracy, warnings and provenance; :func:`page` joins them into the document.

Contract: each section takes the :class:`~host.results.report.data.ReportData` and returns HTML text; a section
without data says so (``no data: ...``) instead of drawing an empty figure.
"""
from __future__ import annotations

from host.fmt import NA, fixed, pct
from host.results.report.data import (EMU_MARK, EMULATED_NOTE, MODELLED_NOTE, ReportData, device_identity,
                                      device_verdicts, warnings_of)
from host.results.report.figures import bars_fig, figure, latency_fig, tradeoff_fig
from host.results.report.markup import (CSS, cell_text, clip, date_text, dev_chip, duration_text, energy_cell, esc,
                                        json_text, kv_table, nodata, power_cell, redact, table)
from host.results.tables import dig


# per-measurement keys of the timing protocol (they differ by nature; the others are the protocol proper)
_PER_RUN_PROTOCOL_KEYS = ("stop_reason", "samples_kept", "samples_subsampled")


def _header(ctx: ReportData) -> str:
    run = ctx.run
    n_ok = sum(1 for r in ctx.rows if r.ok)
    n_fail = len(ctx.rows) - n_ok
    n_warn = len(warnings_of(ctx))
    status = str(run.get("status"))
    facts = [("kind", esc(run.get("kind"))),
             ("status", f'<span class="badge b-{esc(status)}">{esc(status)}</span>'),
             ("started", esc(date_text(run.get("started_at")))),
             ("finished", esc(date_text(run.get("finished_at")))),
             ("took", esc(duration_text(run.get("started_at"), run.get("finished_at")))),
             ("host", f"<code>{esc(run.get('host'))}</code>"),
             ("devices", str(len(ctx.order))),
             ("measured", f"{n_ok} ok" + (f', <span class="err">{n_fail} failed</span>' if n_fail else "")),
             ("warnings", f'<a href="#warnings">{n_warn}</a>')]
    err = f'<p class="err">run error: {esc(run.get("error"))}</p>' if run.get("error") else ""
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in (
        ("tradeoff", "trade-off"), ("summary", "summary"), ("latency", "latency"), ("power", "power &amp; energy"),
        ("accuracy", "accuracy"), ("warnings", "warnings"), ("provenance", "provenance")))
    return (f'<section id="run"><h1>edgeprune report &mdash; run <code>{esc(run.get("run_id"))}</code></h1>'
            '<div class="facts">' + "".join(f"<div><b>{k}</b>{v}</div>" for k, v in facts) + "</div>" + err +
            f"<nav>{nav}</nav></section>")


def _tradeoff(ctx: ReportData) -> str:
    out = ['<section id="tradeoff"><h2>Latency / accuracy trade-off</h2>']
    pts = [r for r in ctx.rows if r.ok and r.p50 is not None and r.top1 is not None]
    if not pts:
        why = ("this run recorded no measurements" if not ctx.rows else
               "no successful measurement has both a latency and a top-1 (accuracy was not measured, or every "
               "measurement failed)")
        out.append(nodata(why) + "</section>")
        return "".join(out)
    panels = [("p50", "front", "latency p50 (ms, on the device)")]
    if any(r.ok and r.energy is not None and r.top1 is not None for r in ctx.rows):
        panels.append(("energy", "front_energy", "energy per inference (mJ)"))
    out.append(figure(lambda: tradeoff_fig(ctx, panels), "latency p50 vs top-1 per device"
                       + (", and energy per inference vs top-1" if len(panels) > 1 else "")))
    notes = ["Each point is one measured artifact (labelled by its pruning ratio, or its label), one colour per "
             "device; the dashed staircase is the device's Pareto front (no other point is both faster and more "
             "accurate)."]
    if ctx.run.get("kind") == "search":
        if any(r.chosen for r in ctx.rows):
            notes.append(f"The star is the search's chosen candidate per device (from {esc(ctx.chosen_how)}).")
        if any(r.closest for r in ctx.rows):
            notes.append("A hollow star: no candidate met that device's targets; the one closest to them.")
        if not any(r.chosen or r.closest for r in ctx.rows):
            notes.append("No candidate met the targets: nothing was chosen.")
    if any(r.modelled for r in pts) and len(panels) > 1:
        notes.append(f"Energy is computed from modelled power ({MODELLED_NOTE}).")
    left = [r for r in ctx.rows if r.ok and (r.p50 is None or r.top1 is None)]
    if left:
        notes.append(f"{len(left)} successful measurement(s) lack latency or accuracy and are not plotted.")
    out.append(f'<p class="note">{" ".join(notes)}</p></section>')
    return "".join(out)


def _summary(ctx: ReportData) -> str:
    out = ['<section id="summary"><h2>Summary per device</h2>']
    if not ctx.order:
        return out[0] + nodata("this run recorded no devices and no measurements") + "</section>"
    search = ctx.run.get("kind") == "search"
    verdicts = device_verdicts(ctx)
    for d in ctx.order:
        dev = ctx.devices.get(d) or {}
        ident = dev.get("identity") if isinstance(dev.get("identity"), dict) else {}
        rows = [r for r in ctx.rows if r.device == d]
        bits = [f"class {esc(dev.get('device_class'))}" if dev.get("device_class") else "",
                (f"runtime {esc(ident.get('runtime'))} {esc(ident.get('runtime_version'))}" if ident.get("runtime")
                 else ""),
                f"host <code>{esc(ident.get('hostname'))}</code>" if ident.get("hostname") else ""]
        v = verdicts.get(d)
        if v:
            bits.append(f'verdict <span class="badge b-{esc(v)}">{esc(v)}</span>')
        out.append(f"<h3>{dev_chip(ctx, d)} <span class=\"note\">{' &middot; '.join(b for b in bits if b)}"
                   "</span></h3>")
        if not rows:
            out.append(nodata("no measurement on this device"))
            continue
        head = ["measurement", "model", "status", "#p50 ms", "#p90 ms", "#p99 ms", "#CV", "#throughput /s",
                "#top-1", "#power W", "#energy mJ/inf", "#memory MB"] + (["meets targets"] if search else [])
        body = []
        for r in rows:
            label = esc(r.label) + (' <span class="badge b-met">chosen</span>' if r.chosen else
                                   ' <span class="badge b-infeasible">closest</span>' if r.closest else "")
            status = ('<span class="badge b-ok">ok</span>' if r.ok else
                      f'<span class="badge b-error">error</span> <span class="err">{esc(clip(r.error, 90))}</span>')
            if r.throttled:
                status += ' <span class="badge b-warn">throttled</span>'
            cv = fixed(r.cv, ".3f")
            if r.cv is not None and r.cv > (r.cv_warn if r.cv_warn is not None else 0.10):
                cv = f'<span class="err">{cv}</span>'
            if r.emulated:
                status += f' <span class="badge b-warn" title="{EMULATED_NOTE}">emulated</span>'
            emu = (lambda cell: cell + EMU_MARK) if r.emulated else (lambda cell: cell)
            cells = [label, esc(r.model or NA), status, emu(fixed(r.p50)), emu(fixed(r.p90)), emu(fixed(r.p99)), cv,
                     emu(fixed(r.throughput, ".1f")), pct(r.top1), emu(power_cell(r)), emu(energy_cell(r)),
                     fixed(r.memory, ".1f")]
            if search:
                cells.append(NA if r.meets is None else ("yes" if r.meets else "no"))
            body.append(cells)
        out.append(table(head, body, row_cls=["failed" if not r.ok else "chosen" if r.chosen else ""
                                               for r in rows]))
    notes = []
    if any(r.emulated for r in ctx.rows):
        notes.append(f"{EMU_MARK} <b>{EMULATED_NOTE}</b>: that device ran under user-mode emulation (qemu-user), so "
                     "its latency, throughput, power and energy are the emulator's; its top-1 is real (the outputs are "
                     "its own CPU architecture's).")
    if any(r.modelled for r in ctx.rows):
        notes.append('<span class="mod">*</span> power (and the energy computed from it) is '
                     f"<b>{MODELLED_NOTE}</b>: the device has no power sensor, so the agent estimated it from the "
                     "device config's idle/max watts and CPU utilisation.")
    notes.append("Latency in milliseconds per inference, measured by the agent on the device (median = p50); CV = "
                 "standard deviation / mean of the timed samples (red: above the job's cv_warn); top-1 measured "
                 "on the device on its eval shard; memory = the agent's peak RSS.")
    out.append("".join(f'<p class="note">{n}</p>' for n in notes) + "</section>")
    return "".join(out)


def _latency(ctx: ReportData) -> str:
    out = ['<section id="latency"><h2>Latency distributions</h2>']
    devs = [d for d in ctx.order if any(r.device == d and r.samples for r in ctx.rows)]
    if not devs:
        out.append(nodata("no latency samples in this run" + (" (every measurement failed)"
                                                                 if ctx.rows and not any(r.ok for r in ctx.rows)
                                                                 else "")))
        return "".join(out) + "</section>"
    out.append(figure(lambda: latency_fig(ctx, devs), "latency samples per measurement, per device"))
    missing = [r for r in ctx.rows if r.ok and not r.samples]
    note = ("Box: the middle half of the timed samples, black line: median, whiskers: 1st and 99th percentile, "
            "dots: beyond them. Each measurement on its own row; one panel per device. The axis spans the 0.5th to "
            "99.5th percentile; samples beyond it are counted at the right edge.")
    if missing:
        note += f" {len(missing)} successful measurement(s) kept no samples and are not drawn."
    return "".join(out) + f'<p class="note">{note}</p></section>'


def _power(ctx: ReportData) -> str:
    out = ['<section id="power"><h2>Power and energy</h2>']
    panels = [(m, t) for m, t in (("power", "mean power (W)"), ("energy", "energy per inference (mJ)"))
              if any(getattr(r, m) is not None for r in ctx.rows)]
    if not panels:
        out.append(nodata("no power was reported in this run (no sensor configured, or it failed: see the "
                           "warnings)"))
        return "".join(out) + "</section>"
    out.append(figure(lambda: bars_fig(ctx, panels), "power and energy per inference per measurement"))
    body = [[dev_chip(ctx, r.device), esc(r.label), esc(r.power_source or NA),
             ('<span class="mod">yes*</span>' if r.modelled else "no" if r.modelled is not None else NA),
             power_cell(r), energy_cell(r), esc(dig(r.report, "power", "samples") or NA),
             fixed(dig(r.report, "power", "sample_hz"), ".1f")]
            for r in ctx.rows if r.power is not None or r.energy is not None]
    out.append(table(["device", "measurement", "source", "modelled", "#power W", "#energy mJ/inf", "#samples",
                       "#sample Hz"], body))
    if any(r.modelled for r in ctx.rows):
        out.append(f'<p class="note"><span class="mod">*</span> hatched / starred: {MODELLED_NOTE} (an estimate '
                   "from the device config and CPU utilisation; no power sensor).</p>")
    return "".join(out) + "</section>"


def _accuracy(ctx: ReportData) -> str:
    out = ['<section id="accuracy"><h2>Accuracy</h2>']
    rows = [r for r in ctx.rows if r.top1 is not None]
    if not rows:
        out.append(nodata("no accuracy was measured in this run (no eval shard in the jobs, or the measurements "
                           "failed)"))
        return "".join(out) + "</section>"
    out.append(figure(lambda: bars_fig(ctx, [("top1", "top-1 accuracy (measured on the device)")], pct=True),
                       "top-1 accuracy per measurement"))
    body = [[dev_chip(ctx, r.device), esc(r.label), esc(dig(r.report, "accuracy", "split") or NA),
             esc(dig(r.report, "accuracy", "n") or NA), pct(r.top1), pct(r.top5),
             f"<code>{esc(clip(dig(r.report, 'accuracy', 'eval_sha256'), 17) or NA)}</code>"] for r in rows]
    out.append(table(["device", "measurement", "split", "#images", "#top-1", "#top-5", "eval shard sha256"], body))
    missing = [r for r in ctx.rows if r.ok and r.top1 is None]
    if missing:
        out.append(nodata(f"{len(missing)} successful measurement(s) without accuracy: "
                           + ", ".join(f"{r.device} {r.label}" for r in missing)))
    return "".join(out) + "</section>"


def _warnings_section(ctx: ReportData) -> str:
    ws = warnings_of(ctx)
    out = [f'<section id="warnings"><h2>Warnings ({len(ws)})</h2>']
    if not ws:
        out.append('<p class="note">No warning: every measurement succeeded and no report carried a warning.</p>')
        return "".join(out) + "</section>"
    body = [[dev_chip(ctx, d) if d else NA, esc(what), f'<span class="kind k-{esc(k)}">{esc(k)}</span>', esc(msg)]
            for d, what, k, msg in ws]
    out.append(table(["device", "measurement", "kind", "message"], body, cls="warnings"))
    return "".join(out) + "</section>"


def _provenance(ctx: ReportData) -> str:
    run = ctx.run
    prov = run.get("provenance") if isinstance(run.get("provenance"), dict) else {}
    out = ['<section id="provenance"><h2>Provenance</h2><h3>Host</h3>']
    git = prov.get("git") if isinstance(prov.get("git"), dict) else {}
    git_s = (f"<code>{esc(git.get('sha'))}</code>" + (' <span class="badge b-warn">dirty</span>' if git.get("dirty")
                                                      else " clean" if git.get("dirty") is False else "")
             if git.get("sha") else "not a git checkout (or git unavailable)" if "git" in prov else NA)
    host = prov.get("host") if isinstance(prov.get("host"), dict) else {}
    pkgs = prov.get("packages") if isinstance(prov.get("packages"), dict) else {}
    argv = prov.get("argv")
    pairs = [("edgeprune", esc(prov.get("edgeprune_version") or NA)), ("git commit", git_s),
             ("host", esc(", ".join(f"{k} {v}" for k, v in sorted(host.items())) or NA)),
             ("packages", esc(", ".join(f"{k} {v}" for k, v in sorted(pkgs.items())) or NA)),
             ("command line", f"<code>{esc(redact(' '.join(map(str, argv))))}</code>" if isinstance(argv, list)
              else NA),
             ("seeds", esc(", ".join(f"{k}={v}" for k, v in sorted((prov.get("seeds") or {}).items())) or NA))]
    known = {"edgeprune_version", "git", "host", "packages", "argv", "seeds"}
    for k in sorted(set(prov) - known):
        pairs.append((k, f"<pre>{esc(redact(json_text(prov[k])))}</pre>"))
    pairs.append(("options", f"<pre>{esc(redact(json_text(run.get('command'))))}</pre>"))
    out.append(kv_table(pairs))

    out.append("<h3>Devices</h3>")
    if not ctx.order:
        out.append(nodata("no device"))
    else:
        body = []
        for d in ctx.order:
            ident = device_identity(ctx, d)
            fw = ident.get("firmware") if isinstance(ident.get("firmware"), dict) else {}
            rts = sorted({f"{r.meas.get('runtime')} {r.meas.get('runtime_version') or ''}".strip()
                          for r in ctx.rows if r.device == d and r.meas and r.meas.get("runtime")})
            rt = ", ".join(rts) or " ".join(str(ident.get(k) or "") for k in ("runtime", "runtime_version")).strip()
            body.append([dev_chip(ctx, d), esc((ctx.devices.get(d) or {}).get("device_class") or NA),
                         esc(ident.get("hostname") or NA), esc(ident.get("os") or NA), esc(ident.get("kernel") or NA),
                         esc(" / ".join(str(ident.get(k)) for k in ("machine", "cpu_model") if ident.get(k)) or NA),
                         esc(", ".join(f"{k} {v}" for k, v in sorted(fw.items())) or NA),
                         esc(rt or NA), esc(ident.get("agent_version") or NA), esc(ident.get("serial") or NA)])
        out.append(table(["device", "class", "hostname", "OS", "kernel", "machine / CPU", "firmware",
                           "runtime", "agent", "serial"], body))

    out.append("<h3>Artifacts</h3>")
    if not ctx.artifacts:
        out.append(nodata("no artifact recorded"))
    else:
        body = []
        for sha, art in ctx.artifacts.items():
            man = (art or {}).get("manifest") if isinstance((art or {}).get("manifest"), dict) else {}
            ver = man.get("verification") if isinstance(man.get("verification"), dict) else {}
            check = (f"{'passed' if ver.get('passed') else 'FAILED'}: "
                     f"max |err| {fixed(ver.get('max_abs_err'), '.1e')}, cosine {fixed(ver.get('cosine'), '.6f')}, "
                     f"top-1 agreement {fixed(ver.get('top1_agreement'), '.0%')} "
                     f"({ver.get('n')} images, {ver.get('checked_with') or '?'})") if ver else NA
            shape = man.get("input_shape")
            shape_s = "\u00d7".join(map(str, shape)) if isinstance(shape, list) else (shape or NA)
            used = sorted({f"{r.device} {r.label}" for r in ctx.rows if r.sha == sha})
            body.append([f'<code class="sha">{esc(sha)}</code>',
                         esc((art or {}).get("model") or man.get("model") or NA),
                         esc(" / ".join(dict.fromkeys(str(x) for x in (
                             (art or {}).get("format") or man.get("format"), man.get("export_format"),
                             man.get("precision")) if x)) or NA),
                         esc(shape_s), esc(clip(man.get("pruning_plan_sha256"), 17) or NA),
                         esc(clip(man.get("source_checkpoint_sha256"), 17) or NA), esc(check),
                         esc(", ".join(used))])
        out.append(table(["sha256", "model", "format", "input", "pruning plan", "checkpoint", "export check",
                           "measured as"], body))
        if any(a is None for a in ctx.artifacts.values()):
            out.append('<p class="note">An artifact without a manifest in the store shows only its hash.</p>')

    out.append("<h3>Timing protocol</h3>")
    out.append(_protocol(ctx))
    if run.get("summary") is not None:
        out.append(f"<details><summary>the run's summary as recorded</summary><pre>{esc(json_text(run['summary']))}"
                   "</pre></details>")
    return "".join(out) + "</section>"


def _protocol(ctx: ReportData) -> str:
    timed = [r for r in ctx.rows if isinstance(dig(r.report, "timing", "protocol"), dict)]
    if not timed:
        return nodata("no measurement reported a timing protocol")
    protos = [dict(r.report["timing"]["protocol"]) for r in timed]
    keys = sorted({k for p in protos for k in p})
    same = [k for k in keys if k not in _PER_RUN_PROTOCOL_KEYS and
            all(k in p and json_text(p[k]) == json_text(protos[0][k]) for p in protos)]
    varying = [k for k in keys if k not in same]
    out = [kv_table([(k, esc(cell_text(protos[0][k]))) for k in same], per_row=3)] if same else []
    body = []
    for r, p in zip(timed, protos):
        t = r.report["timing"]
        body.append([dev_chip(ctx, r.device), esc(r.label), esc(t.get("iterations")), fixed(t.get("duration_s"), ".2f"),
                     esc(t.get("warmup_iters_done")), fixed(t.get("load_time_ms"), ".1f"),
                     fixed(t.get("first_inference_ms"), ".2f")] + [esc(cell_text(p.get(k)) if k in p else NA)
                                                                 for k in varying])
    out.append(table(["device", "measurement", "#iterations", "#duration s", "#warm-up iters", "#load ms",
                       "#first inference ms"] + varying, body))
    out.append('<p class="note">The table above the per-measurement one holds the protocol settings shared by '
               "every measurement of the run.</p>")
    return "".join(out)


def page(ctx: ReportData) -> str:
    title = f"edgeprune report: {ctx.run.get('run_id')}"
    parts = [_header(ctx), _tradeoff(ctx), _summary(ctx), _latency(ctx), _power(ctx), _accuracy(ctx),
             _warnings_section(ctx), _provenance(ctx)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body><main>\n"
            + "\n".join(parts) +
            f"\n<footer class=\"note\">written by edgeprune report from the results store; "
            f"{len(ctx.rows)} measurement(s) of run <code>{esc(ctx.run.get('run_id'))}</code>.</footer>"
            "\n</main></body></html>\n")
