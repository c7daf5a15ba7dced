"""An emulated Raspberry Pi 4 as a real SSH device, driven through the CLI as a user does (README, "Try it on a
virtual Raspberry Pi"): ``devices emulate`` (an arm64 Debian root under qemu-user, its own aarch64 sshd on
loopback), ``devices setup`` (the agent's venv, wheels downloaded here for cp311 aarch64 and pushed over SFTP),
``bench`` of ResNet-20 fp32 ONNX and TFLite int8 on 200 eval images beside this machine's agent, one search over
both with an accuracy-only target on the Pi, a resource target on it refused, ``--stop``.

Needs root, qemu-user-static, mmdebstrap, binfmt_misc, and (for the first build of the root, ~3 minutes, cached
after under ~/.cache/edgeprune/emulate) the Debian mirror, and PyPI for the aarch64 wheels; skipped without the
tools. Everything else here runs in ~3 minutes.
"""
from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgeprune import data
from tests.test_demo import edgeprune

pytestmark = [
    pytest.mark.emulated, pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="devices emulate needs root"),
    pytest.mark.skipif(not (shutil.which("mmdebstrap") and shutil.which("qemu-aarch64-static")),
                       reason="needs mmdebstrap and qemu-user-static (apt-get install mmdebstrap qemu-user-static)"),
]

N_IMAGES = 200


def run(*args, timeout=900):
    r = edgeprune(*args, timeout=timeout)
    assert r.returncode == 0, f"edgeprune {' '.join(args)}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def pi(tmp_path_factory):
    """The emulated rpi4, set up; its device file, and a fleet of it with this machine. Stopped at the end."""
    d = tmp_path_factory.mktemp("emulated")
    r = run("devices", "emulate", "rpi4", "--dir", str(d / "devices"), "--json")
    status = json.loads(r.stdout)[0]
    assert status["running"] and status["class"] == "rpi4" and status["id"] == "rpi4-emu"
    device_file = d / "devices" / "rpi4-emu.yaml"
    try:
        r = run("devices", "setup", "--fleet", str(device_file), "--runtime", "tflite", "--wheels-from-host",
                "--json")
        setup = json.loads(r.stdout)["rpi4-emu"]
        assert setup["status"] == "installed" and setup["machine"] == "aarch64" and setup["emulated"] is True
        assert setup["source"] == "wheels from host" and setup["python"].startswith("3.11")
        fleet = d / "fleet.yaml"
        fleet.write_text(textwrap.dedent("""\
            devices:
              - {id: local, class: local, transport: local}
              - include: devices/rpi4-emu.yaml
            """))
        split = data.eval_split(N_IMAGES // 10)
        eval_npz = d / "eval200.npz"
        np.savez(eval_npz, images=split.images, labels=split.labels)
        yield {"dir": d, "device_file": device_file, "fleet": fleet, "setup": setup, "eval": eval_npz}
    finally:
        r = edgeprune("devices", "emulate", "--stop", "--dir", str(d / "devices"), "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)[0]["running"] is False


def test_setup_pins_known_good_versions_points_python_at_the_venv_and_is_idempotent(pi):
    s = pi["setup"]
    assert s["versions"]["onnxruntime"] == "1.27.0" and s["versions"]["ai-edge-litert"] == "2.1.6"
    assert "qemu-aarch64 7.2" in s["pinned_by"]
    text = pi["device_file"].read_text()
    assert f"python: {s['venv']}/bin/python" in text and "# `edgeprune devices setup` points this" in text
    again = json.loads(run("devices", "setup", "--fleet", str(pi["device_file"]), "--runtime", "tflite",
                           "--json").stdout)["rpi4-emu"]
    assert again["status"] == "up to date" and again["versions"] == s["versions"]
    check = json.loads(run("devices", "check", "--fleet", str(pi["device_file"]), "--json").stdout)["rpi4-emu"]
    assert check["health"] == "good" and "aarch64, emulated (qemu-user, cortex-a72)" in check["details"]["summary"]
    probe = check["details"]["probe"]
    assert probe["machine"] == "aarch64" and probe["emulation"]["emulated"] is True
    assert probe["emulation"]["cpu"] == "cortex-a72" and probe["setup"]["versions"] == s["versions"]


@pytest.fixture(scope="module")
def artifacts(pi):
    out = pi["dir"] / "r20"
    run("prune", "--model", "resnet20", "--ratio", "0", "--formats", "onnx,tflite-int8", "--out", str(out))
    return {"onnx": out / "resnet20-r000.onnx.manifest.json", "int8": out / "resnet20-r000.tflite-int8.manifest.json"}


def bench(pi, model, fleet, *extra):
    r = run("bench", "--model", str(model), "--fleet", str(fleet), "--data", str(pi["eval"]), "--quick", "--json",
            "--db", str(pi["dir"] / "results.db"), *extra)
    doc = json.loads(r.stdout)
    return {row["device"]: row for row in doc["devices"]}, Path(doc["out"])


def test_fp32_onnx_top1_on_the_emulated_pi_equals_this_machine_s(pi, artifacts):
    rows, out = bench(pi, artifacts["onnx"], pi["fleet"])
    x86, arm = rows["local"], rows["rpi4-emu"]
    assert x86["status"] == arm["status"] == "ok", (x86["error"], arm["error"])
    assert (x86["machine"], x86["emulated"]) == ("x86_64", False)
    assert (arm["machine"], arm["emulated"]) == ("aarch64", True)
    assert (x86["repetitions"], arm["repetitions"]) == (5, 1)      # the emulator's timings are not repeated
    assert x86["eval_n"] == arm["eval_n"] == N_IMAGES
    # measured 2026-12-06: 93.0 % on both (p50 0.7 ms here, 143 ms emulated)
    assert abs(arm["accuracy_top1"] - x86["accuracy_top1"]) <= 1 / N_IMAGES + 1e-9
    report = json.loads((out / arm["report"]).read_text())
    assert report["identity"]["extra"]["emulation"]["emulated"] is True
    assert any(w.startswith("emulated: this aarch64 device runs under qemu-user") for w in report["warnings"])
    assert "emulated" not in json.dumps(json.loads((out / x86["report"]).read_text())["warnings"])


def test_int8_tflite_top1_and_agreement_on_the_emulated_pi(pi, artifacts):
    # the same emulated Pi, its tflite runtime (ai-edge-litert, installed by setup --runtime tflite)
    devices = pi["device_file"].parent
    (devices / "rpi4-emu-tflite.yaml").write_text(
        pi["device_file"].read_text().replace("id: rpi4-emu", "id: rpi4-emu-tflite")
        .replace("runtime: {threads:", "runtime: {name: tflite, threads:"))
    fleet = pi["dir"] / "fleet-tflite.yaml"
    fleet.write_text(textwrap.dedent("""\
        devices:
          - {id: local, class: local, transport: local, runtime: {name: tflite, threads: 1}}
          - include: devices/rpi4-emu-tflite.yaml
        """))
    rows, _ = bench(pi, artifacts["int8"], fleet, "--reference", str(artifacts["onnx"]))
    x86, arm = rows["local"], rows["rpi4-emu-tflite"]
    assert x86["status"] == arm["status"] == "ok", (x86["error"], arm["error"])
    assert arm["runtime"] == "tflite" and arm["emulated"] is True
    # int8: top-1 and agreement with the dense fp32 model's outputs, each reported; measured 2026-12-06: 92.5 % and
    # 99.5 % on both (under qemu's default 'max' CPU, XNNPACK's int8 kernels gave 10 % on the emulated Pi)
    for row in (x86, arm):
        assert row["accuracy_top1"] >= 0.85 and row["agreement"] >= 0.95, row
    print(f"int8 top-1 x86 {x86['accuracy_top1']:.3f} aarch64 {arm['accuracy_top1']:.3f}; agreement x86 "
          f"{x86['agreement']:.3f} aarch64 {arm['agreement']:.3f}")


def test_one_search_over_this_machine_and_the_emulated_pi(pi):
    common = ["--model", "resnet20", "--fleet", str(pi["fleet"]), "--max-accuracy-drop", "3", "--data",
              str(pi["eval"]), "--quick", "--max-evals", "3", "--db", str(pi["dir"] / "results.db")]
    # a latency target for every device: refused before anything runs, naming the emulated device
    r = edgeprune("search", *common, "--target", "latency_p50_ms=0.8x", "--out", str(pi["dir"] / "refused"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "device rpi4-emu runs under user-mode emulation (qemu-user): its p50 latency is the emulator's" in r.stderr
    assert not (pi["dir"] / "refused").exists()
    # the latency target on this machine, accuracy only on the Pi: one search over both
    # (exit 1 when a device's targets are not met: BatchNorm recalibration alone, without --finetune-data, seldom
    # keeps a pruned ResNet-20 within 3 pp here; this machine's verdict is not what this test is about)
    r = edgeprune("search", *common, "--target", "local:latency_p50_ms=0.8x", "--out", str(pi["dir"] / "search"),
                  "--json", timeout=900)
    assert r.returncode in (0, 1), r.stdout[-2000:] + r.stderr[-3000:]
    doc = json.loads(r.stdout)
    by_dev = {d["device"]: d for d in doc["devices"]}
    pi_res = by_dev["rpi4-emu"]
    assert pi_res["verdict"] == "met" and pi_res["reason"].startswith("accuracy only"), pi_res["reason"]
    assert pi_res["device_evals"] == 1 and pi_res["candidate"]["drop_pp"] == 0.0
    assert by_dev["local"]["device_evals"] >= 2          # pruned candidates measured on this machine
    assert "†" in r.stderr                               # the Pi's candidates table marks its latency
