"""Emulated devices and device setup, without running an emulator: detection on captured trees, the recipe and its
errors, the known-good pins, the device-file edits, and how tables and reports mark an emulated device's figures.

The end-to-end run (a real arm64 root under qemu-user, its sshd, setup, bench and search) is
``tests/test_emulated_pi.py``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from agent import emulation, probe
from agent.runner import EMULATED_WARNING
from edgeprune.errors import ConfigError, EmulationError, UsageError
from host.cli import main as cli_main
from host.emulate import binfmt, instance, recipe, root as emu_root
from host.fleet import setup as fsetup
from host.fleet.devices import SetupConfig, load_fleet
from host.fleet.edit import set_value

DATA = Path(__file__).parent / "agent" / "data"
# captured on this project's x86-64 machine, from inside the emulated arm64 root (`cat /proc/cpuinfo` run by the
# root's aarch64 cat under qemu-aarch64 7.2) and from the host's binfmt_misc (tests/agent/data/README.md)
X86_CPUINFO_UNDER_QEMU = (DATA / "cpuinfo_x86_seen_by_qemu_aarch64_7.2.txt").read_text()
BINFMT_ENTRY = (DATA / "binfmt_misc_qemu-aarch64_debian12.txt").read_text()
# the Raspberry Pi 4 cpuinfo layout tests/agent/test_probe.py uses (written for a test, not a capture)
from tests.agent.test_probe import PI_CPUINFO  # noqa: E402


def tree(tmp_path: Path, cpuinfo: str = "", binfmt_entry: str = "") -> Path:
    r = tmp_path / "root"
    (r / "proc").mkdir(parents=True)
    (r / "proc/cpuinfo").write_text(cpuinfo)
    if binfmt_entry:
        (r / "proc/sys/fs/binfmt_misc").mkdir(parents=True)
        (r / "proc/sys/fs/binfmt_misc/qemu-aarch64").write_text(binfmt_entry)
        (r / "proc/sys/fs/binfmt_misc/status").write_text("enabled\n")
    return r


# ---- detection ------------------------------------------------------------------------------------------------

def test_cpuinfo_arch_on_captured_texts():
    assert emulation.cpuinfo_arch(X86_CPUINFO_UNDER_QEMU) == "x86"
    assert emulation.cpuinfo_arch(PI_CPUINFO) == "arm"
    assert emulation.cpuinfo_arch("") is None


def test_an_aarch64_process_reading_an_x86_cpuinfo_is_emulated(tmp_path):
    r = tree(tmp_path, X86_CPUINFO_UNDER_QEMU)
    got = emulation.detect(str(r), machine="aarch64", thread_exe="")
    assert got["emulated"] and got["by"] == "qemu-user"
    assert got["evidence"] == ["cpuinfo: /proc/cpuinfo describes an x86 CPU, this process's machine is aarch64"]
    # the same tree read by an x86 process, and a Pi's own cpuinfo read by an aarch64 one: not emulated
    assert emulation.detect(str(r), machine="x86_64", thread_exe="")["emulated"] is False
    assert emulation.detect(str(tree(tmp_path / "pi", PI_CPUINFO)), machine="aarch64", thread_exe="") == \
        {"emulated": False, "by": None, "evidence": []}


def test_the_thread_exe_and_the_binfmt_handler_are_signs_of_their_own(tmp_path):
    # a qemu release that writes an arm cpuinfo: the other two signs still say so
    r = tree(tmp_path, PI_CPUINFO, BINFMT_ENTRY)
    got = emulation.detect(str(r), machine="aarch64", thread_exe="/usr/bin/qemu-aarch64-static")
    assert got["emulated"]
    assert [e.split(":")[0] for e in got["evidence"]] == ["exe", "binfmt"]
    assert "/usr/libexec/qemu-binfmt/aarch64-binfmt-P" in got["evidence"][1]
    # the host itself (x86-64, the aarch64 handler registered) is not emulated: the handler takes other ELF files
    assert emulation.detect(str(tree(tmp_path / "host", X86_CPUINFO_UNDER_QEMU, BINFMT_ENTRY)),
                            machine="x86_64", thread_exe="/usr/bin/python3.11")["emulated"] is False
    # a disabled handler is no sign
    assert emulation.detect(str(tree(tmp_path / "off", PI_CPUINFO, BINFMT_ENTRY.replace("enabled", "disabled"))),
                            machine="aarch64", thread_exe="")["emulated"] is False


def test_this_machine_is_not_emulated_and_the_probe_says_so():
    got = probe.probe()
    assert got["emulation"] == {"emulated": False, "by": None, "evidence": []}


def test_the_report_identity_and_warning_of_an_emulated_agent(tmp_path, monkeypatch):
    monkeypatch.setattr(emulation, "detect", lambda root="/": {"emulated": True, "by": "qemu-user",
                                                               "evidence": ["cpuinfo: ..."]})
    ident = probe.identity("pi", "onnxruntime", "1.27.0", "0" * 64)
    assert ident.extra["emulation"]["emulated"] is True
    assert EMULATED_WARNING.startswith("emulated: ")


def test_the_setup_record_goes_into_the_identity(tmp_path, monkeypatch):
    (tmp_path / probe.SETUP_RECORD).write_text(json.dumps({"versions": {"onnxruntime": "1.27.0"}}))
    monkeypatch.setattr("sys.prefix", str(tmp_path))
    assert probe.identity("pi", "onnxruntime", "1.27.0", "0" * 64).extra["setup"]["versions"] == \
        {"onnxruntime": "1.27.0"}
    (tmp_path / probe.SETUP_RECORD).write_text("[not a record")
    assert probe.setup_record() is None


# ---- the recipe and the steps that need root, tools and a mirror -------------------------------------------------

def test_recipe_of_the_pi_classes_and_its_cache_key():
    r4, r5 = recipe.recipe_for("rpi4"), recipe.recipe_for("rpi5")
    assert (r4.arch, r4.suite, r4.qemu, r4.user) == ("arm64", "bookworm", "aarch64", "pi")
    assert r4.key() == r5.key() and r4.key().startswith("bookworm-arm64-")      # one cached root serves both
    assert recipe.recipe_for("rpi4", mirror="http://mirror.example/debian").key() != r4.key()
    assert set(recipe.emulatable_classes()) >= {"rpi4", "rpi5"}


def test_recipe_errors_name_the_class_and_field(monkeypatch):
    with pytest.raises(UsageError, match=r"CLASS: unknown device class 'pi9'"):
        recipe.recipe_for("pi9")
    with pytest.raises(UsageError, match=r"cannot be emulated \(no 'emulate:' section in .*jetson"):
        recipe.recipe_for(next(c for c in recipe.class_names() if c.startswith("jetson")))
    with pytest.raises(UsageError, match=r"--mirror: expected an http"):
        recipe.recipe_for("rpi4", mirror="deb.debian.org")
    base = recipe.load_class("rpi4")
    for section, match in (({**base["emulate"], "packages": ["python3"]}, r"rpi4.yaml: emulate.packages: needs "
                                                                          r"python3-venv"),
                           ({**base["emulate"], "user": "Pi User"}, r"rpi4.yaml: emulate.user: expected a name"),
                           ({**base["emulate"], "kernel": "6.1"}, r"rpi4.yaml: emulate.kernel: unknown field")):
        monkeypatch.setattr(recipe, "load_class", lambda name, s=section: {**base, "emulate": s})
        with pytest.raises(ConfigError, match=match):
            recipe.recipe_for("rpi4")


def test_emulate_needs_root_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(instance.os, "geteuid", lambda: 1000)
    for call in (lambda: instance.emulate("rpi4", tmp_path), lambda: instance.stop(tmp_path)):
        with pytest.raises(EmulationError, match=r"needs root.*sudo edgeprune devices emulate"):
            call()


def test_missing_tools_and_binfmt_are_one_error_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(emu_root.shutil, "which", lambda name: None)
    with pytest.raises(EmulationError, match=r"mmdebstrap is not installed.*apt-get install mmdebstrap"):
        emu_root.ensure_root(recipe.recipe_for("rpi4"), cache=tmp_path)
    monkeypatch.setattr(binfmt.shutil, "which", lambda name: None)
    monkeypatch.setattr(binfmt, "CONF_DIRS", (tmp_path / "no-binfmt.d",))
    with pytest.raises(EmulationError, match=r"qemu-user for aarch64 is not installed.*apt-get install "
                                             r"qemu-user-static"):
        binfmt.ensure("aarch64", binfmt=tmp_path)


def test_binfmt_registers_a_missing_target_with_the_F_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(binfmt, "CONF_DIRS", (tmp_path / "none",))
    monkeypatch.setattr(binfmt, "qemu_binary", lambda target: "/usr/bin/qemu-aarch64-static")
    line = binfmt.registration_line("aarch64")
    assert line.startswith(":qemu-aarch64:M::\\x7fELF\\x02") and line.endswith(":/usr/bin/qemu-aarch64-static:F")
    fake = tmp_path / "binfmt_misc"
    fake.mkdir()
    (fake / "register").write_text("")
    # the kernel makes the entry when a line is written to register; here the captured entry stands in for it
    real_write = Path.write_text

    def kernel(self, text, *a, **k):
        if self == fake / "register":
            real_write(fake / "qemu-aarch64", BINFMT_ENTRY)
            return len(text)
        return real_write(self, text, *a, **k)

    monkeypatch.setattr(Path, "write_text", kernel)
    events = []
    entry = binfmt.ensure("aarch64", events.append, binfmt=fake)
    assert entry == {"enabled": "enabled", "interpreter": "/usr/libexec/qemu-binfmt/aarch64-binfmt-P", "flags": "POF"}
    assert events == ["registered qemu-aarch64 with binfmt_misc"]


def test_the_root_build_names_an_unreachable_mirror(tmp_path, monkeypatch):
    fake = tmp_path / "mmdebstrap"
    fake.write_text("#!/bin/sh\necho 'E: Failed to fetch http://nowhere.invalid/debian/dists/bookworm/InRelease  "
                    "Could not resolve nowhere.invalid'\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(emu_root.shutil, "which", lambda name: str(fake) if name == "mmdebstrap" else None)
    r = recipe.recipe_for("rpi4", mirror="http://nowhere.invalid/debian")
    with pytest.raises(EmulationError, match=r"cannot fetch the bookworm arm64 packages from the Debian mirror "
                                             r"http://nowhere.invalid/debian: pass --mirror"):
        emu_root.ensure_root(r, cache=tmp_path / "cache")
    assert list((tmp_path / "cache" / "roots").iterdir()) == [tmp_path / "cache/roots" / f"{r.key()}.lock"]


def test_the_cli_error_for_a_user_without_root(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(instance.os, "geteuid", lambda: 1000)
    assert cli_main(["devices", "emulate", "rpi4", "--dir", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "needs root" in err and err.count("\n") <= 3
    assert not list(tmp_path.iterdir())


# ---- setup: requirements, known-good pins, the device file's python ---------------------------------------------

def test_known_good_pins_apply_only_where_measured():
    cfg = load_fleet_one("rpi4").setup
    emulated = {"machine": "aarch64", "python": "3.11.2", "emulated": True}
    reqs, note = fsetup.requirements(cfg, ["onnxruntime", "tflite"], emulated)
    assert reqs == ["numpy>=1.21", "psutil>=5.8", "onnxruntime==1.27.0", "ai-edge-litert==2.1.6"]
    assert "qemu-aarch64 7.2" in note
    # a real board (not emulated), or another Python: nothing measured there, nothing pinned
    for facts in ({**emulated, "emulated": False}, {**emulated, "python": "3.12.1"}):
        assert fsetup.requirements(cfg, ["onnxruntime"], facts) == (["numpy>=1.21", "psutil>=5.8", "onnxruntime"],
                                                                    None)
    with pytest.raises(UsageError, match=r"rpi4.yaml: setup.runtimes has no packages for runtime 'tensorrt'"):
        fsetup.requirements(cfg, ["tensorrt"], emulated, where="rpi4.yaml")


def load_fleet_one(cls: str):
    from host.fleet.devices import device_from_mapping

    return device_from_mapping({"id": f"{cls}-1", "class": cls, "transport": "ssh",
                                "ssh": {"host": "127.0.0.1", "user": "pi", "known_hosts": "kh"}}, Path("fleet.yaml"))


def test_setup_section_errors_name_the_field(tmp_path):
    f = tmp_path / "pi.yaml"
    f.write_text("id: pi\nclass: rpi4\ntransport: ssh\nssh: {host: 127.0.0.1, user: pi, known_hosts: kh}\n"
                 "setup:\n  known_good:\n    - when: {board: pi4}\n      pins: {onnxruntime: '1.19.2'}\n")
    with pytest.raises(ConfigError, match=r"pi.yaml.*setup.known_good.0.when.*unknown condition 'board'"):
        load_fleet(str(f))
    assert SetupConfig().venv == "~/.local/share/edgeprune/venv"


def test_wheel_platform_tags_follow_the_device_glibc():
    tags = fsetup.wheel_platforms("aarch64", "2.36")
    assert tags[0] == "manylinux_2_36_aarch64" and "manylinux_2_17_aarch64" in tags
    assert tags[-2:] == ["manylinux2014_aarch64", "linux_aarch64"]


def test_signal_deaths_are_named():
    assert fsetup._rc(-11) == "with signal SIGSEGV" and fsetup._rc(139) == "with signal SIGSEGV"
    assert fsetup._rc(1) == "1" and fsetup._rc(-1) == "killed by a signal"


def test_set_value_keeps_comments_and_edits_only_that_device(tmp_path):
    one = tmp_path / "pi.yaml"
    one.write_text("# my Pi\nid: pi\nclass: rpi4   # the 4 GB one\nssh:\n  host: 127.0.0.1\n  port: 2222  # sshd\n")
    assert set_value(one, "pi", ("ssh", "port"), 40123) is True
    assert set_value(one, "pi", ("python",), "/home/pi/.local/share/edgeprune/venv/bin/python") is True
    assert one.read_text() == ("# my Pi\nid: pi\npython: /home/pi/.local/share/edgeprune/venv/bin/python\n"
                               "class: rpi4   # the 4 GB one\nssh:\n  host: 127.0.0.1\n  port: 40123  # sshd\n")
    assert set_value(one, "pi", ("ssh", "port"), 40123) is False
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("devices:\n  - id: a\n    python: /usr/bin/python3   # system\n  - id: b\n    python: /usr/bin/python3\n")
    set_value(fleet, "b", ("python",), "/opt/venv/bin/python")
    assert fleet.read_text() == ("devices:\n  - id: a\n    python: /usr/bin/python3   # system\n  - id: b\n"
                                 "    python: /opt/venv/bin/python\n")
    with pytest.raises(ConfigError, match=r"fleet.yaml.*'c'"):
        set_value(fleet, "c", ("python",), "x")


# ---- marks in tables and reports ----------------------------------------------------------------------------------

def _emulated_report(job_id: str, device_id: str, **kw):
    from tests.test_report import agent_report

    rep = agent_report(job_id, device_id, **kw)
    rep["identity"]["extra"] = {"emulation": {"emulated": True, "by": "qemu-user", "evidence": ["cpuinfo: x86"]}}
    rep["warnings"] = [EMULATED_WARNING % ("aarch64", "qemu-user")]
    return rep


def test_the_html_report_marks_an_emulated_device(tmp_path):
    from host.results import report
    from host.results.report.data import EMULATED_NOTE
    from host.results.store import Store
    from tests.test_report import agent_report

    st = Store(str(tmp_path / "r.db"))
    st.start_run("b-1", "bench", command={}, provenance={})
    st.record_measurement("b-1", "pi", device_id="rpi4-emu", label="emulated pi",
                          report=_emulated_report("e", "rpi4-emu", p50=1394.0, top1=0.93, power_w=5.1))
    st.record_measurement("b-1", "local", device_id="local", label="local",
                          report=agent_report("l", "local", p50=1.4, top1=0.93))
    st.finish_run("b-1", "complete")
    html = report.render(st, "b-1")
    st.close()
    note = EMULATED_NOTE.replace("\u2014", "&#8212;")
    assert f"<b>{note}</b>" in html and '<span class="kind k-emulated">emulated</span>' in html
    summary = html[html.index('<section id="summary">'):]
    rows = summary[:summary.index("</section>")].split("<tr")
    pi_row = next(row for row in rows if "<td>emulated pi</td>" in row).split("</tr>")[0]
    local_row = next(row for row in rows if "<td>local</td>" in row).split("</tr>")[0]
    # p50, p90, p99, throughput, power and energy marked on the emulated row; nothing on the other
    assert pi_row.count("&#8224;") == 6 and "&#8224;" not in local_row and "93.00%</td>" in pi_row


def test_bench_rows_and_table_mark_an_emulated_device(tmp_path, capsys):
    from rich.console import Console

    from agent import schema
    from host.cli import bench as cli_bench
    from host.commands.benchmark import COLUMNS

    assert COLUMNS.index("machine") < COLUMNS.index("emulated") < COLUMNS.index("accuracy_top1")
    rows = [{**{c: "" for c in COLUMNS}, "device": "rpi4-emu", "machine": "aarch64", "emulated": True,
             "runtime": "onnxruntime", "threads": 2, "latency_p50_ms": 1394.0, "latency_p90_ms": 1500.0,
             "accuracy_top1": 0.93, "status": "ok"},
            {**{c: "" for c in COLUMNS}, "device": "local", "machine": "x86_64", "emulated": False,
             "runtime": "onnxruntime", "threads": 1, "latency_p50_ms": 1.4, "latency_p90_ms": 1.5,
             "accuracy_top1": 0.93, "status": "ok"}]
    console = Console(width=200, record=True)
    cli_bench.print_rows(rows, console)
    text = console.export_text()
    assert "1394.000†" in text and "1.400†" not in text and "1.400" in text
    assert "† emulated — not a device measurement" in text
    assert schema  # the agent's schema carries identity.extra.emulation unchanged (test_the_report_identity...)


# ---- search: an emulated device gets accuracy bounds only --------------------------------------------------------

EMULATED = {"emulated": True, "by": "qemu-user", "evidence": ["cpuinfo: x86"]}


def test_a_resource_target_on_an_emulated_device_is_refused():
    from host.fleet import targets as tg
    from tests.test_search import device, targets_for

    x86, pi = device("x86"), device("rpi4-emu")
    asked = []

    def emulation_of(dev):
        asked.append(dev.id)
        return EMULATED if dev.id == "rpi4-emu" else {"emulated": False}

    for spec, metric in (("latency_p50_ms=0.8x", "p50 latency"), ("rpi4-emu:energy_mj=5", "energy per inference"),
                         ("rpi4-emu:memory_mb=300", "peak memory")):
        ts = targets_for([x86, pi], "x86:latency_p50_ms=0.8x", spec)
        with pytest.raises(UsageError, match=rf"--target {re.escape(spec)}: device rpi4-emu runs under user-mode emulation "
                                             rf"\(qemu-user\): its {metric}.* is the emulator's, not a device "
                                             rf"measurement.*accuracy bounds only"):
            tg.refuse_emulated([x86, pi], ts, emulation_of)
    # accuracy bounds only on the emulated device (agreement here): nothing refused, and it is not even asked
    asked.clear()
    ts = targets_for([x86, pi], "x86:latency_p50_ms=0.8x", "rpi4-emu:agreement=0.95")
    tg.refuse_emulated([x86, pi], ts, emulation_of)
    assert asked == ["x86"] and not ts["rpi4-emu"].targets and ts["rpi4-emu"].min_agreement == 0.95


def test_a_device_with_accuracy_bounds_only_is_checked_with_the_dense_model(tmp_path):
    from tests.test_search import FakeEvaluator, device, resnet_like_space, run, targets_for

    space = resnet_like_space()
    x86, pi = device("x86"), device("rpi4-emu", round_to=4)
    tset = targets_for([x86, pi], "x86:latency_p50_ms=0.6x", drop=5.0)
    ev = FakeEvaluator(space, dense_ms={"x86": 2.0, "rpi4-emu": 1400.0})
    rl, rp = run(tmp_path, [x86, pi], tset, ev, space).devices
    assert rl.verdict == rp.verdict == "met", (rl.reason, rp.reason)
    assert rp.device_evals == 1 and rp.reason.startswith("accuracy only (no resource target on this device)")
    assert rp.chosen["ratio"] == 0.0 and rl.chosen["ratio"] > 0.0     # dense there, pruned here
    # no device with a resource target at all: still the error it was
    with pytest.raises(UsageError, match=r"no latency, throughput, power, energy or memory target for device "
                                         r"x86, rpi4-emu"):
        targets_for([x86, pi], drop=1.0)


def test_emulate_arguments_are_checked(tmp_path, capsys):
    assert cli_main(["devices", "emulate", "--dir", str(tmp_path)]) != 0
    assert "give the CLASS to emulate (e.g. rpi4), or --stop / --status" in capsys.readouterr().err
    assert cli_main(["devices", "emulate", "rpi4"]) != 0
    assert "devices emulate: --dir is required" in capsys.readouterr().err
    assert cli_main(["devices", "emulate", "--build-only"]) != 0
    assert "--build-only: give the CLASS whose root to build" in capsys.readouterr().err
    assert cli_main(["devices", "emulate", "--status", "--dir", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
