"""The release gate (``edgeprune regress``). Compare a candidate run with a baseline run from the results store.

Pairing
-------
Results are paired by identity ``(device_id, model, label)``. Several measurements with the same identity in one
run (repetitions, trials) are judged over runs when both sides have several (below); otherwise their samples are
pooled; accuracies are averaged over the trials that scored the eval data. A result only
in the baseline is a failure (``missing``); one only in the candidate is a note. A failed measurement (``status``
error) in the candidate is a failure (``failed``); when every baseline trial of a pair failed, the pair cannot be
judged (incomparable).

A pair is *comparable* when both sides ran the same thing: the same ``artifact_sha256``, runtime name, format and
batch size. If one of those differs the pair is incomparable (the message names the field, baseline → candidate)
and the gate exits 2, unless ``--compare-anyway``, which compares it and lists the differences. What a release
gate exists to catch is *not* a refusal: runtime version, threads, OS, kernel, firmware, agent version, CPU,
runtime options and timing protocol are listed per pair as ``changed: threads 2 → 1, firmware.l4t 36.2 → 36.3``.

Decision rule over repetitions (latency and energy)
---------------------------------------------------
When both sides of a pair hold at least two repetitions (``bench --repeat N``, default 5: one measurement row
each), latency and energy are judged on one value per run (its median latency; its median latency × mean power /
batch) by :mod:`.runs`: the effect is the median of the candidate's run values over the baseline's, minus 1; the
threshold is the larger of the tolerance and the *noise floor* (the largest distance of a baseline run value from
their median, and for latency the effects of up to ten earlier runs in the store of the same identity in the same
environment, recorded before the baseline: A/A history); ``regression`` iff the effect exceeds the threshold and a
one-sided exact Mann–Whitney test over the run values gives p < ``alpha``, ``improved`` the mirror image, ``pass``
within the threshold, and ``inconclusive`` otherwise: too few runs for the test to reach alpha, an effect beyond
the threshold without confidence, or a would-be regression in windows that reported contention (the agent's CV or
drift warning). Inconclusive is neither pass nor fail (exit 3).

Decision rule with one window on a side (latency and energy)
------------------------------------------------------------
A metric *regressed* iff both

1. a one-sided Mann–Whitney U test says the candidate is slower (costs more) at significance ``alpha``
   (p < alpha; ``scipy.stats.mannwhitneyu(..., method="asymptotic")``: normal approximation with tie and
   continuity correction), **and**
2. the effect, candidate median / baseline median − 1 over all pooled samples, exceeds the tolerance
   (``--latency-tol`` / ``--energy-tol``, default 5 %).

It *improved* iff the mirror image holds (significantly lower, by more than the tolerance); otherwise it passes.
Why both: per-inference latency samples are numerous (thousands) and autocorrelated (frequency scaling, thermal
state and background load drift over seconds), so the test's independence assumption is false and with
thousands of samples it calls trivial shifts (a 1 % run-to-run wobble) "significant". The tolerance is the
minimum effect worth failing a release for; the test only keeps noise from failing one when the medians differ by
more than the tolerance by chance. To weaken the autocorrelation and the sample-size inflation, each side is
thinned to at most 1000 evenly spaced samples before the test. A bootstrap 95 % CI of the median ratio (2000
resamples of the thinned samples, fixed seed) is reported for reading, not used in the decision; being an i.i.d.
bootstrap of still somewhat correlated samples it is, if anything, too narrow. When a side has no stored samples
(fewer than 2), the decision uses the stored medians alone (no test; p shown as —).

Energy samples: each latency sample × that measurement's mean power (``power_w``) / batch size, in mJ per
inference. They carry the latency variation and each run's mean power, not within-run power noise (the agent
reports one mean power per window), and their median is the median latency's energy, not the agent's
mean-based ``energy_mj``. Energy from modelled power (no sensor) on either side is computed and shown, marked
``modelled``, but not gated (``not measured``: skipped in JUnit) unless ``--gate-modelled-energy``: the model is
idle/max watts × whole-machine CPU utilisation, so it follows whatever else the machine runs (A/A runs on a busy
2-core VM differed by up to 18 % in modelled energy with latency within 2 %).
No power on either side: the energy check is ``not measured`` (skipped, not a failure).

Accuracy: fails iff candidate top-1 < baseline top-1 − ``--accuracy-tol`` (percentage points; top-1 is a fraction
in the store); a different number of evaluated images is noted. Top-1 null on either side (report schema 2 on
unlabelled eval data) makes the check ``not measured``; its message says why, and which fidelity the agent
measured instead.

Label-free fidelity (report schema 2, ``accuracy.agreement`` and ``accuracy.snr_db`` of the stored report JSON,
see :mod:`agent.schema`): only with ``--min-agreement F`` (a fraction in (0, 1]: top-1 agreement with the dense
model's outputs) and/or ``--min-snr-db DB`` (min over the model's outputs of the SNR against the dense model's
outputs), each adding a check per pair (metrics ``agreement`` and ``snr``). These are *absolute* floors on the
candidate, not comparisons with the baseline: agreement is already relative to the dense model, and a baseline at
99.9 % does not make 99.5 % a regression nor 97 % a pass. The check fails (``regression``) iff the candidate's
worst trial is below the floor, and passes otherwise (never ``improved``); the baseline's value is shown for
reading only. A candidate whose reports carry no such value (no eval data, a version-1 report, shards without
reference outputs, no logit-like output for agreement) is ``not measured`` (skipped in JUnit, not a failure),
the reason given. A missing, failed or incomparable pair gives these checks that verdict too, as for the others.

Exit codes: 0 pass; 1 at least one regression or a missing/failed candidate result; 2 usage error, no pairs at all,
or an incomparable pair not overridden by ``--compare-anyway`` (2 wins over 1: the comparison itself is invalid);
3 no failure but at least one inconclusive check.

The package: :mod:`.stats` (the sample-level test, the bootstrap, thinning), :mod:`.runs` (decisions over runs), :mod:`.options` (the settings as written on a
command line), :mod:`.model` (checks and the comparison), :mod:`.checks` (:func:`compare`), :mod:`.output` (console
summary, JUnit); the public names are importable from here.
"""
from host.results.regress.checks import compare
from host.results.regress.model import (ARROW, COMPARABLE, FAILING, METRICS, VERDICTS, Check, Comparison,
                                        Incomparable)
from host.results.regress.options import parse_alpha, parse_db, parse_fraction, parse_pp, parse_percent
from host.results.regress.output import print_summary, write_junit
from host.results.regress.stats import MAX_TEST_SAMPLES, N_BOOT, mann_whitney_greater, median_ratio_ci, thin

__all__ = ["ARROW", "COMPARABLE", "FAILING", "MAX_TEST_SAMPLES", "METRICS", "N_BOOT", "VERDICTS", "Check",
           "Comparison", "Incomparable", "compare", "mann_whitney_greater", "median_ratio_ci", "parse_alpha",
           "parse_db", "parse_fraction", "parse_percent", "parse_pp", "print_summary", "thin", "write_junit"]
