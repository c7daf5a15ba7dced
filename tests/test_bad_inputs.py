"""The bad-input catalogue (issue 8): one case per failure mode of what a user gives edgeprune.

Every case runs a real command line (``host.cli.main`` in this process, so that the whole catalogue takes seconds;
:func:`test_console_command_prints_the_same_single_line` runs a few through the installed ``edgeprune`` command)
against a results store that already holds completed runs, and asserts:

- exit code 2, and exactly one non-empty line on stderr, ``edgeprune: error: ...``, naming the file (with its line
  where the case has one) and the field, or the argument;
- the store is unchanged: the recorded runs, devices, measurements, artifacts and search evaluations are exactly
  as before, and no new run (complete or half-recorded) is there;
- nothing was started: no output folder (``results/``) appeared in the working folder.

What a *device* sends back (a non-JSON or a 100 MB report) is not bad input from the user: that device's row fails
(exit 1, the README's contract) and is recorded as an error, never as a measurement; those cases are at the end,
with the job-spec checks of the agent's own command line (``python -m agent run``).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tracemalloc
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import pytest

from host import cli
from host.results.store import Store

from . import sshd
from .test_demo import edgeprune

BASE_RUN, BASE_SEARCH = "base-1", "base-search-1"
MANIFEST = "r20.onnx.manifest.json"
FILES_RULE = "files: must map plain file names (no folders) to sha256: "
GOOD_KH = ("[127.0.0.1]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n")


# ------------------------------------------------------------------------------------------ the baseline store
def _report(job_id: str, p50: float) -> Dict[str, Any]:
    return {"job_id": job_id, "status": "ok", "schema_version": 1, "warnings": ["baseline"],
            "timing": {"latency_ms": {"median": p50, "p90": p50 * 1.2, "p99": p50 * 1.5, "mean": p50 * 1.1,
                                      "cv": 0.05},
                       "iterations": 200, "throughput_ips": 1000.0 / p50, "samples_ms": [p50, p50 * 1.1]},
            "accuracy": {"split": "eval", "n": 1000, "top1": 0.923, "top5": 0.99}}


@pytest.fixture(scope="module")
def baseline_db(tmp_path_factory) -> Path:
    """A results store holding a completed bench run (a device, an artifact, a measurement) and a completed search
    run (a measurement and its evaluation), recorded through host.results.store as the commands record them."""
    path = tmp_path_factory.mktemp("baseline") / "results.db"
    with Store(str(path)) as s:
        s.start_run(BASE_RUN, "bench", command=["edgeprune", "bench"], provenance={"seed": 0})
        s.add_device(BASE_RUN, "local", device_class="local", config={"id": "local", "class": "local"})
        s.record_measurement(BASE_RUN, "local", device_id="local", report=_report(f"{BASE_RUN}-local", 1.0),
                             label="onnx", model="resnet20",
                             manifest={"sha256": "a" * 64, "format": "onnx", "model": "resnet20"})
        s.finish_run(BASE_RUN, "complete", summary={"rows": 1})
        s.start_run(BASE_SEARCH, "search", command=["edgeprune", "search"], provenance={"seed": 0})
        mid = s.record_measurement(BASE_SEARCH, "dense", device_id="local", report=_report("s-dense", 0.9),
                                   label="dense")
        s.record_evaluation(BASE_SEARCH, "local", "dense", {"key": "dense", "ratio": 0.0}, ok=True, meets=True,
                            ratio=0.0, measurement_id=mid)
        s.finish_run(BASE_SEARCH, "complete", summary={"all_met": True})
    return path


def snapshot(db: Path) -> Dict[str, Any]:
    with Store(str(db), create=False) as s:
        runs = s.list_runs()
        meas = s.measurements()
        return {"runs": runs, "measurements": meas,
                "devices": {r["run_id"]: s.devices(r["run_id"]) for r in runs},
                "evaluations": {r["run_id"]: s.evaluations(r["run_id"]) for r in runs},
                "artifacts": {m["artifact_sha256"]: s.artifact(m["artifact_sha256"]) for m in meas
                              if m["artifact_sha256"]}}


@pytest.fixture
def db(tmp_path, baseline_db) -> Path:
    """This test's copy of the baseline store."""
    d = tmp_path / "store"
    d.mkdir()
    shutil.copyfile(baseline_db, d / "results.db")
    return d / "results.db"


# ------------------------------------------------------------------------------------------ a verified artifact
@pytest.fixture(scope="module")
def artifact(job_inputs) -> Dict[str, Any]:
    """The conftest's verified ResNet-20 ONNX (bytes) and its manifest (a dict), to copy and spoil per case."""
    onnx_path, man, _shard = job_inputs
    return {"name": onnx_path.name, "bytes": onnx_path.read_bytes(), "manifest": asdict(man)}


# ------------------------------------------------------------------------------------------ the cases
@dataclass
class Ctx:
    tmp: Path
    db: Path
    artifact: Dict[str, Any]
    monkeypatch: pytest.MonkeyPatch
    sentinel: Path = field(init=False)

    def __post_init__(self) -> None:
        self.sentinel = self.tmp / "pwned"      # what an executed shell metacharacter would create

    def write(self, rel: str, text: str) -> Path:
        p = self.tmp / "in" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        return p

    def fleet(self, name: str, text: str) -> Path:
        """A fleet folder holding one device file ``name``.yaml with ``text``."""
        return self.write(f"fleet-{name}/{name}.yaml", text).parent

    def art(self, *, content: Optional[bytes] = None, rehash: bool = False, **manifest: Any) -> Path:
        """A folder with the artifact (``content`` instead of the real bytes) and its manifest (``manifest``
        fields replaced; ``rehash``: sha256 and files rewritten to match ``content``, as a tampered export
        would)."""
        import hashlib

        d = self.tmp / "in" / "art"
        d.mkdir(parents=True, exist_ok=True)
        data = self.artifact["bytes"] if content is None else content
        (d / self.artifact["name"]).write_bytes(data)
        m = json.loads(json.dumps(self.artifact["manifest"]))
        if rehash:
            sha = hashlib.sha256(data).hexdigest()
            m["sha256"], m["files"] = sha, {m["file"]: sha}
        m.update(manifest)
        (d / MANIFEST).write_text(json.dumps(m))
        return d

    def data(self, **arrays: np.ndarray) -> Path:
        """EDGEPRUNE_DATA pointed at a folder whose CIFAR-10 test file holds ``arrays``."""
        d = self.tmp / "in" / "data"
        d.mkdir(parents=True, exist_ok=True)
        np.savez(d / "cifar10_test.npz", **arrays)
        self.monkeypatch.setenv("EDGEPRUNE_DATA", str(d))
        return d / "cifar10_test.npz"


@dataclass
class Case:
    id: str
    what: str                                   # the bad input, for the README's Reliability table
    expected: str                               # what the message names
    argv: Callable[[Ctx], List[str]]            # the command line; may write files through ctx
    names: Callable[[Ctx], Sequence[str]]       # what the one message must contain
    uses_db: bool = True                        # False: --db itself is the bad input (the baseline is not given)


def with_data(c: Ctx, argv: List[str], **arrays: np.ndarray) -> List[str]:
    c.data(**arrays)
    return argv


def bench_fleet(c: Ctx, fleet: Path) -> List[str]:
    return bench(c, "--model", "resnet20", "--fleet", str(fleet))


def demo(c: Ctx, *args: str) -> List[str]:
    return ["demo", "--quick", "--db", str(c.db), "--out", str(c.tmp / "out"), *args]


USER_NET = """
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, num_classes=10, width=16):
        super().__init__()
        if width <= 0:
            raise ValueError("width must be > 0")
        self.conv = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width * 16, num_classes)   # 32x32 input only: 4x4 after the pool

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.bn(self.conv(x)).relu(), 4) if x.shape[-1] == 32 else x.flatten(1)
        return self.fc(x.flatten(1))


def build(num_classes=10, width=16):
    return Net(num_classes, width)


def not_a_model():
    return [1, 2]
"""


def user_net(c: Ctx) -> str:
    """A user's model file (``net.py``) in the case's input folder; its path."""
    p = c.tmp / "in" / "net.py"
    if not p.is_file():
        c.write("net.py", USER_NET)
    return str(p)


def user_weights(c: Ctx) -> Path:
    import importlib.util

    import torch

    p = c.tmp / "in" / "net10.th"
    if not p.is_file():
        p.parent.mkdir(parents=True, exist_ok=True)
        spec = importlib.util.spec_from_file_location("bad_inputs_user_net", user_net(c))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        torch.save({"state_dict": {"module." + k: v for k, v in mod.build().state_dict().items()}}, p)
    return p


def user_pickle(c: Ctx) -> Path:
    import torch

    p = c.tmp / "in" / "whole.pt"
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), p)
    return p


def image_folder(c: Ctx, name: str, classes: Sequence[str] = ("cat", "dog"), extra: Optional[str] = None) -> Path:
    from PIL import Image

    root = c.tmp / "in" / name
    for k, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            Image.new("RGB", (32, 32), (40 * k, 20 * i, 7)).save(root / cls / f"{i}.png")
    if extra:
        (root / classes[0] / extra).write_text("not an image\n")
    return root


def dev_file(c: Ctx, name: str = "dev") -> str:
    """The device file ``Ctx.fleet(name, ...)`` writes."""
    return str(c.tmp / "in" / f"fleet-{name}" / f"{name}.yaml")


def in_art(c: Ctx, name: str = "r20.onnx") -> str:
    """A file of the folder ``Ctx.art`` writes (the artifact, or its manifest ``r20.onnx.manifest.json``)."""
    return str(c.tmp / "in" / "art" / name)


def bench(c: Ctx, *args: str) -> List[str]:
    return ["bench", *args, "--db", str(c.db)]


def search(c: Ctx, *args: str) -> List[str]:
    return ["search", "--model", "resnet20", *args, "--db", str(c.db)]


def _ssh_device(c: Ctx, **ssh: str) -> str:
    fields = ", ".join(f"{k}: {v}" for k, v in {"host": "127.0.0.1", "port": "2222", "user": "bench", **ssh}.items())
    return f"id: pi5-lab-01\nclass: rpi5\ntransport: ssh\nssh: {{{fields}}}\n"


def _fake_key(c: Ctx) -> Path:
    return c.write("id_ed25519", "-----BEGIN OPENSSH PRIVATE KEY-----\n")


def _metachar(case_id: str, device_id: str) -> Case:
    text = "id: " + json.dumps(device_id) + "\nclass: local\n"
    return Case(case_id, f"device id {device_id!r} (shell metacharacters)", "exit 2: file:line, id",
                lambda c: bench_fleet(c, c.fleet("meta", text.replace("PWNED", str(c.sentinel)))),
                lambda c: [dev_file(c, "meta") + ":1:", "id: String should match"])


CASES: List[Case] = [
    # ---- YAML that does not parse: the file and its line
    Case("yaml-device", "malformed YAML in a device file", "exit 2: file:line",
         lambda c: bench_fleet(c, c.fleet("bad", "id: a\nruntime: {name: x\n  threads: 1\n")),
         lambda c: [dev_file(c, "bad") + ":3:", "not valid YAML"]),
    Case("yaml-fleet", "malformed YAML in a fleet file", "exit 2: file:line",
         lambda c: bench_fleet(c, c.write("fleet.yaml", "devices:\n  - id: a\n    - x\n")),
         lambda c: [str(c.tmp / "in" / "fleet.yaml") + ":3:", "not valid YAML"]),
    Case("yaml-targets", "malformed YAML in a targets file", "exit 2: file:line",
         lambda c: search(c, "--targets", str(c.write("targets.yaml", "default:\n  latency_p50_ms: [0.5x\n  x: 1\n"))),
         lambda c: [str(c.tmp / "in" / "targets.yaml") + ":3:", "not valid YAML"]),
    Case("yaml-demo-device", "malformed YAML in demo --device", "exit 2: file:line",
         lambda c: ["demo", "--device", str(c.write("dev.yaml", "id: [a\n")), "--db", str(c.db)],
         lambda c: [str(c.tmp / "in" / "dev.yaml") + ":2:", "not valid YAML"]),
    # ---- fields that are not there, or of the wrong type: file:line and the field path
    Case("unknown-field", "unknown field `runtim:` in a device file", "exit 2: file:line, runtim",
         lambda c: bench_fleet(c, c.fleet("dev", "id: a\nruntim: {name: onnxruntime}\n")),
         lambda c: [dev_file(c) + ":2:", "runtim: Extra inputs are not permitted"]),
    Case("mistyped-field", "`timing: {min_iters: \"many\"}` in a device file", "exit 2: file:line, timing.min_iters",
         lambda c: bench_fleet(c, c.fleet("dev", 'id: a\ntiming: {min_iters: "many"}\n')),
         lambda c: [dev_file(c) + ":2:", "timing.min_iters: Input should be a valid integer"]),
    Case("mistyped-fleet-entry", "`round_to: eight` in a fleet file's inline device", "exit 2: file:line, round_to",
         lambda c: bench_fleet(c, c.write("fleet.yaml", "devices:\n  - id: a\n    round_to: eight\n")),
         lambda c: [str(c.tmp / "in" / "fleet.yaml") + ":3:", "round_to: Input should be a valid integer"]),
    Case("unknown-fleet-field", "unknown top-level field in a fleet file", "exit 2: file:line, field",
         lambda c: bench_fleet(c, c.write("fleet.yaml", "devices: [{id: a}]\ndevice: []\n")),
         lambda c: [str(c.tmp / "in" / "fleet.yaml") + ":2:", "device: unknown field"]),
    Case("unknown-runtime", "unknown runtime in a device file", "exit 2: file:line, runtime.name, known runtimes",
         lambda c: bench_fleet(c, c.fleet("dev", "id: a\nruntime: {name: coreml}\n")),
         lambda c: [dev_file(c) + ":2:", "runtime.name: unknown runtime 'coreml'",
                    "onnxruntime"]),
    Case("unknown-class", "unknown device class", "exit 2: file:line, class, known classes",
         lambda c: bench_fleet(c, c.fleet("dev", "id: a\nclass: jetson-thor\n")),
         lambda c: [dev_file(c) + ":2:", "class: unknown device class 'jetson-thor'",
                    "rpi5"]),
    Case("unknown-sensor", "unknown power sensor", "exit 2: file:line, power.sensor",
         lambda c: bench_fleet(c, c.fleet("dev", "id: a\npower: {sensor: geiger}\n")),
         lambda c: [dev_file(c) + ":2:", "power.sensor: unknown power sensor 'geiger'"]),
    Case("demo-ssh-key-missing", "an SSH device given to demo, its key file missing",
         "exit 2: file, ssh.key, key path; before anything is built",
         lambda c: ["demo", "--device", str(c.write("pi.yaml", _ssh_device(c, key=str(c.tmp / "nope")))),
                    "--db", str(c.db)],
         lambda c: [str(c.tmp / "in" / "pi.yaml"), "ssh.key: private key file", str(c.tmp / "nope"),
                    "does not exist"]),
    # ---- files a device config names on this machine
    Case("ssh-key-missing", "missing SSH key file", "exit 2: file, ssh.key, key path",
         lambda c: bench_fleet(c, c.fleet("pi", _ssh_device(c, key=str(c.tmp / "nope")))),
         lambda c: [dev_file(c, "pi"), "ssh.key: private key file", str(c.tmp / "nope"),
                    "does not exist"]),
    Case("ssh-key-dir", "SSH key path is a folder", "exit 2: file, ssh.key",
         lambda c: bench_fleet(c, c.fleet("pi", _ssh_device(c, key=str(c.tmp)))),
         lambda c: [dev_file(c, "pi"), f"ssh.key: private key file {c.tmp} is not a file"]),
    Case("ssh-key-relative", "relative SSH key path missing beside the device file",
         "exit 2: file, ssh.key, resolved path",
         lambda c: ["devices", "check", "--fleet", str(c.fleet("pi", _ssh_device(c, key="keys/id_ed25519")))],
         lambda c: [dev_file(c, "pi"), "ssh.key",
                    str(c.tmp / "in" / "fleet-pi" / "keys" / "id_ed25519")], uses_db=False),
    Case("known-hosts-dir", "known_hosts is a folder", "exit 2: file, ssh.known_hosts",
         lambda c: bench_fleet(c, c.fleet("pi", _ssh_device(
             c, key=str(_fake_key(c)), known_hosts=str(c.tmp)))),
         lambda c: [dev_file(c, "pi"), f"ssh.known_hosts: {c.tmp} is not a regular file"]),
    Case("known-hosts-garbage", "known_hosts holding garbage text", "exit 2: file, ssh.known_hosts, its file:line",
         lambda c: search(c, "--target", "latency_p50_ms=0.5x", "--max-accuracy-drop", "1", "--fleet", str(c.fleet(
             "pi", _ssh_device(c, key=str(_fake_key(c)), known_hosts=str(
                 c.write("known_hosts", GOOD_KH + "this is not a known_hosts file\n")))))),
         lambda c: [dev_file(c, "pi"), "ssh.known_hosts:",
                    str(c.tmp / "in" / "known_hosts") + ":2: not a known_hosts entry"]),
    Case("known-hosts-binary", "known_hosts holding binary garbage", "exit 2: file, ssh.known_hosts",
         lambda c: bench_fleet(c, c.fleet("pi", _ssh_device(
             c, key=str(_fake_key(c)), known_hosts=str(c.tmp / "kh.bin")))),
         lambda c: [dev_file(c, "pi"), f"ssh.known_hosts: {c.tmp / 'kh.bin'} is not a "
                    "known_hosts file (not text)"]),
    # ---- device ids that would be shell code: refused when the file is read (nothing runs; see the sentinel)
    _metachar("id-semicolon", "pi; touch PWNED"),
    _metachar("id-dollar", "$(touch PWNED)"),
    _metachar("id-backticks", "`touch PWNED`"),
    _metachar("id-newline", "pi\ntouch PWNED"),
    # ---- artifacts given to bench --model
    Case("artifact-truncated", "truncated artifact (manifest as exported)", "exit 2: artifact file, sha256, manifest",
         lambda c: bench(c, "--model", str(c.art(content=c.artifact["bytes"][:4096]))),
         lambda c: [in_art(c), "sha256 does not match its manifest",
                    in_art(c, MANIFEST)]),
    Case("artifact-truncated-rehashed", "truncated artifact with a manifest rewritten to match",
         "exit 2: artifact file, manifest, format",
         lambda c: bench(c, "--model", str(c.art(content=c.artifact["bytes"][:-64], rehash=True))),
         lambda c: [in_art(c), "r20.onnx.manifest.json", "format: not a valid ONNX model"]),
    Case("artifact-not-a-model", "text file renamed .onnx, manifest sha256 matching", "exit 2: artifact file, format",
         lambda c: bench(c, "--model", str(c.art(content=b"hello, I am not a model\n", rehash=True))),
         lambda c: [in_art(c), "format: not a valid ONNX model"]),
    Case("artifact-sha-mismatch", "manifest whose sha256 does not match the artifact", "exit 2: artifact file, sha256",
         lambda c: bench(c, "--model", str(c.art(sha256="0" * 64, files={"r20.onnx": "0" * 64}))),
         lambda c: [in_art(c), "sha256 does not match its manifest"]),
    Case("artifact-input-shape", "ONNX input shape differs from the manifest's input_shape",
         "exit 2: artifact file, input_shape, both shapes",
         lambda c: bench(c, "--model", str(c.art(input_shape=[1, 3, 64, 64]))),
         lambda c: [in_art(c), "input_shape: the manifest says [1, 3, 64, 64]",
                    "'input' is ['batch', 3, 32, 32]"]),
    Case("artifact-input-name", "manifest input_name the ONNX does not have", "exit 2: artifact file, input_name",
         lambda c: bench(c, "--model", str(c.art(input_name="images"))),
         lambda c: [in_art(c), "input_name: the model has no input 'images'"]),
    Case("manifest-not-json", "manifest that is not JSON", "exit 2: manifest file",
         lambda c: bench(c, "--model", str(c.write("m/r20.manifest.json", "{not json"))),
         lambda c: [str(c.tmp / "in" / "m" / "r20.manifest.json"), "cannot read the manifest"]),
    Case("manifest-unknown-field", "manifest with an unknown field", "exit 2: manifest file, field",
         lambda c: bench(c, "--model", str(c.art(shipped_by="me"))),
         lambda c: [in_art(c, MANIFEST), "shipped_by: not a manifest field"]),
    Case("manifest-field-newline", "manifest field name with a newline in it", "exit 2: manifest file, field, one line",
         lambda c: bench(c, "--model", str(c.art(**{"evil\nedgeprune: error: second line": 1}))),
         lambda c: [in_art(c, MANIFEST),
                    "evil edgeprune: error: second line: not a manifest field"]),
    Case("markup-in-path", "device file in a folder named like rich markup", "exit 2: the path as it is, file:line",
         lambda c: bench_fleet(c, c.write("lab[bold]/[red]dev.yaml", "id: [a\n").parent),
         lambda c: [str(c.tmp / "in" / "lab[bold]" / "[red]dev.yaml") + ":2:", "not valid YAML"]),
    Case("model-missing", "--model naming nothing", "exit 2: --model",
         lambda c: bench(c, "--model", str(c.tmp / "nothing-here")),
         lambda c: ["--model:", str(c.tmp / "nothing-here")]),
    # ---- path traversal in artifact names
    Case("manifest-file-traversal", "manifest `file: ../../etc/passwd`", "exit 2: manifest file, file",
         lambda c: bench(c, "--model", str(c.art(file="../../etc/passwd"))),
         lambda c: [in_art(c, MANIFEST),
                    "file: '../../etc/passwd' must be a plain file name"]),
    Case("manifest-file-dotdot", "manifest `file: ..`", "exit 2: manifest file, file",
         lambda c: bench(c, "--model", str(c.art(file=".."))),
         lambda c: [in_art(c, MANIFEST), "file: '..' must not start with '.'"]),
    Case("manifest-files-traversal", "manifest files key `../../etc/passwd`", "exit 2: manifest file, files",
         lambda c: bench(c, "--model", str(c.art(files={"r20.onnx": c.artifact["manifest"]["sha256"],
                                                        "../../etc/passwd": "0" * 64}))),
         lambda c: [in_art(c, MANIFEST),
                    FILES_RULE + "'../../etc/passwd' must be a plain file name"]),
    Case("manifest-files-dotdot", "manifest files key `..`", "exit 2: manifest file, files",
         lambda c: bench(c, "--model", str(c.art(files={"r20.onnx": c.artifact["manifest"]["sha256"],
                                                        "..": "0" * 64}))),
         lambda c: [in_art(c, MANIFEST), FILES_RULE + "'..' must not start with '.'"]),
    Case("manifest-files-absolute", "manifest files key `/etc/passwd`", "exit 2: manifest file, files",
         lambda c: bench(c, "--model", str(c.art(files={"r20.onnx": c.artifact["manifest"]["sha256"],
                                                        "/etc/passwd": "0" * 64}))),
         lambda c: [in_art(c, MANIFEST), FILES_RULE + "'/etc/passwd' must be a plain file name"]),
    # ---- eval data that does not fit (the host's data folder: EDGEPRUNE_DATA/cifar10_test.npz)
    Case("eval-image-shape", "eval data with 28x28 images", "exit 2: data file, images, shape",
         lambda c: with_data(c, bench(c, "--model", "resnet20"), images=np.zeros((20, 28, 28, 3), np.uint8),
                             labels=np.arange(20) % 10),
         lambda c: [str(c.tmp / "in" / "data" / "cifar10_test.npz"), "images must be uint8 N×32×32×3",
                    "(20, 28, 28, 3)"]),
    Case("eval-image-dtype", "eval data with float32 images", "exit 2: data file, images, dtype",
         lambda c: with_data(c, bench(c, "--model", "resnet20"), images=np.zeros((20, 32, 32, 3), np.float32),
                             labels=np.arange(20) % 10),
         lambda c: [str(c.tmp / "in" / "data" / "cifar10_test.npz"), "images must be uint8", "float32"]),
    Case("eval-labels-missing", "eval data without labels", "exit 2: data file, labels",
         lambda c: with_data(c, bench(c, "--model", "resnet20"), images=np.zeros((20, 32, 32, 3), np.uint8)),
         lambda c: [str(c.tmp / "in" / "data" / "cifar10_test.npz"), "needs arrays 'images' and 'labels'"]),
    Case("eval-labels-short", "eval data with fewer labels than images", "exit 2: data file, labels",
         lambda c: with_data(c, bench(c, "--model", "resnet20"), images=np.zeros((20, 32, 32, 3), np.uint8),
                             labels=np.arange(10)),
         lambda c: [str(c.tmp / "in" / "data" / "cifar10_test.npz"), "labels must be an integer vector of length 20"]),
    Case("eval-demo", "eval data with 28x28 images (demo)", "exit 2: data file, images",
         lambda c: with_data(c, ["demo", "--quick", "--db", str(c.db)], images=np.zeros((20, 28, 28, 3), np.uint8),
                             labels=np.arange(20) % 10),
         lambda c: [str(c.tmp / "in" / "data" / "cifar10_test.npz"), "images must be uint8 N×32×32×3"]),
    # ---- search targets: negative, contradictory, impossible
    Case("target-negative", "--target latency_p50_ms=-1", "exit 2: --target, metric",
         lambda c: search(c, "--target", "latency_p50_ms=-1", "--max-accuracy-drop", "1"),
         lambda c: ["--target: latency_p50_ms: must be > 0, got '-1'"]),
    Case("target-zero-throughput", "--target throughput_ips=0", "exit 2: --target, metric",
         lambda c: search(c, "--target", "throughput_ips=0", "--max-accuracy-drop", "1"),
         lambda c: ["--target: throughput_ips: must be > 0"]),
    Case("target-p90-below-p50", "p90 bound below the p50 bound", "exit 2: both --target arguments",
         lambda c: search(c, "--target", "latency_p50_ms=2", "--target", "latency_p90_ms=1",
                          "--max-accuracy-drop", "1"),
         lambda c: ["--target latency_p90_ms=1: latency_p90_ms <= 1 ms is below latency_p50_ms <= 2 ms",
                    "(--target latency_p50_ms=2)", "contradictory"]),
    Case("target-twice", "one metric twice (alias) with different values", "exit 2: --target, both values",
         lambda c: search(c, "--target", "latency_p50_ms=1", "--target", "latency_ms=2", "--max-accuracy-drop", "1"),
         lambda c: ["--target: latency_p50_ms is given twice with different values", "contradictory"]),
    Case("target-relative-accuracy", "a relative accuracy drop", "exit 2: --target, accuracy_drop_pp",
         lambda c: search(c, "--target", "latency_p50_ms=1", "--target", "accuracy_drop_pp=0.5x"),
         lambda c: ["--target: accuracy_drop_pp: is a drop in percentage points"]),
    Case("target-accuracy-range", "--max-accuracy-drop 150", "exit 2: --max-accuracy-drop",
         lambda c: search(c, "--target", "latency_p50_ms=1", "--max-accuracy-drop", "150"),
         lambda c: ["--max-accuracy-drop: accuracy_drop_pp: must be in [0, 100)"]),
    Case("target-power-below-idle", "power target below the modelled idle power", "exit 2: --target, device, idle",
         lambda c: search(c, "--target", "power_w=1", "--max-accuracy-drop", "1"),
         lambda c: ["--target power_w=1: 1 W is below device local's idle power"]),
    Case("targets-file-negative", "negative value in a targets file", "exit 2: file, default.latency_p50_ms",
         lambda c: search(c, "--targets", str(c.write("t.yaml",
                                                      "default: {latency_p50_ms: -3, accuracy_drop_pp: 1}\n"))),
         lambda c: [str(c.tmp / "in" / "t.yaml") + ": default.latency_p50_ms: latency_p50_ms: must be > 0"]),
    Case("targets-file-contradictory", "targets file: class p90 below device p50", "exit 2: file, both fields",
         lambda c: search(c, "--targets", str(c.write("t.yaml", "default: {accuracy_drop_pp: 1}\n"
                                                                 "devices: {local: {latency_p50_ms: 2}}\n"
                                                                 "classes: {local: {p90_ms: 1}}\n"))),
         lambda c: [str(c.tmp / "in" / "t.yaml") + ": classes.local.p90_ms: latency_p90_ms <= 1 ms",
                    str(c.tmp / "in" / "t.yaml") + ": devices.local.latency_p50_ms", "contradictory"]),
    Case("targets-file-unknown-section", "targets file with an unknown section", "exit 2: file, field",
         lambda c: search(c, "--targets", str(c.write("t.yaml", "defaults: {latency_p50_ms: 1}\n"))),
         lambda c: [str(c.tmp / "in" / "t.yaml") + ": defaults: unknown field"]),
    Case("device-targets-negative", "negative target in a device file", "exit 2: file:line, targets.metric",
         lambda c: search(c, "--fleet", str(c.fleet("dev", "id: a\n"
                                                       "targets: {latency_p50_ms: -1, accuracy_drop_pp: 1}\n"))),
         lambda c: [dev_file(c) + ":2: targets.latency_p50_ms: must be > 0"]),
    # ---- the user's own model and data (issue 15): every source refused with the name it could not use
    Case("model-module-missing", "--model MODULE:CALLABLE whose module does not import", "exit 2: --model, module",
         lambda c: demo(c, "--model", "no_such_pkg_xyz.nets:build"),
         lambda c: ["--model: cannot import module 'no_such_pkg_xyz.nets'"]),
    Case("model-callable-missing", "--model FILE.py:CALLABLE without that callable", "exit 2: --model, callable",
         lambda c: demo(c, "--model", f"{user_net(c)}:nothere"),
         lambda c: [f"--model: module '{user_net(c)}' has no attribute 'nothere'"]),
    Case("model-factory-raises", "--model factory that raises", "exit 2: --model, the call, the exception",
         lambda c: demo(c, "--model", f"{user_net(c)}:build", "--model-arg", "width=-1"),
         lambda c: [f"--model: {user_net(c)}:build(width=-1) raised ValueError: width must be > 0"]),
    Case("model-not-a-module", "--model factory returning something else", "exit 2: --model, the type",
         lambda c: demo(c, "--model", f"{user_net(c)}:not_a_model"),
         lambda c: [f"--model: {user_net(c)}:not_a_model() returned list, not a torch nn.Module"]),
    Case("weights-mismatch", "--weights that do not fit the model", "exit 2: --weights, file, keys",
         lambda c: demo(c, "--model", f"{user_net(c)}:build", "--model-arg", "num_classes=7", "--weights",
                        str(user_weights(c))),
         lambda c: [f"--weights: {user_weights(c)}: weights do not fit Net: 2 shape mismatches: fc.weight (10, 256) "
                    "vs model (7, 256)"]),
    Case("pickle-untrusted", "--model a whole pickled model without --trust-pickle", "exit 2: --model, --trust-pickle",
         lambda c: demo(c, "--model", str(user_pickle(c))),
         lambda c: [f"--model: {user_pickle(c)}: holds pickled Python objects", "pass --trust-pickle"]),
    Case("input-shape-rejected", "--input-size the model cannot take", "exit 2: --input-shape, the shape",
         lambda c: demo(c, "--model", f"{user_net(c)}:build", "--input-size", "20"),
         lambda c: ["--input-shape: the model rejects input shape [1, 3, 20, 20]", "--input-size"]),
    Case("data-empty-folder", "--data an empty folder", "exit 2: --data, folder",
         lambda c: demo(c, "--model", f"{user_net(c)}:build", "--input-size", "32", "--data", str(c.write("empty/.keep", "").parent)),
         lambda c: ["--data:", str(c.tmp / "in" / "empty")]),
    Case("data-non-image", "--data with a non-image file in a class folder", "exit 2: --data, the file",
         lambda c: demo(c, "--model", f"{user_net(c)}:build", "--input-size", "32", "--data", str(image_folder(c, "imgs", extra="notes.txt"))),
         lambda c: ["--data:", "notes.txt"]),
    Case("data-classes-differ", "--data and --finetune-data with different class folders",
         "exit 2: both arguments, the class",
         lambda c: demo(c, "--model", f"{user_net(c)}:build", "--input-size", "32", "--data", str(image_folder(c, "ev", ("cat", "dog"))),
                        "--finetune-data", str(image_folder(c, "ft", ("cat", "emu")))),
         lambda c: ["--data and --finetune-data have different classes", "'dog'", "'emu'"]),
    Case("mean-wrong-length", "--mean with two values for three channels", "exit 2: --mean",
         lambda c: demo(c, "--model", f"{user_net(c)}:build", "--input-size", "32", "--data", str(image_folder(c, "imgs")),
                        "--mean", "0.5,0.5"),
         lambda c: ["--mean: expected 3 comma-separated numbers"]),
    Case("model-file-unknown-field", "model file with an unknown field", "exit 2: file, field",
         lambda c: demo(c, "--model", str(c.write("m.yaml", f"model: {user_net(c)}:build\ninput_sise: 32\n"))),
         lambda c: [str(c.tmp / "in" / "m.yaml") + ": input_sise: unknown field"]),
    # ---- the results store
    Case("db-scheme", "--db with an unsupported scheme", "exit 2: --db, scheme",
         lambda c: ["bench", "--model", "resnet20", "--db", "mysql://bench@db.example/results"],
         lambda c: ["--db: mysql://bench@db.example/results: unsupported database 'mysql'"], uses_db=False),
    Case("db-postgres-unreachable", "--db PostgreSQL that refuses connections", "exit 2: --db, server",
         lambda c: ["bench", "--model", "resnet20", "--db", "postgresql://bench:s3cret@127.0.0.1:1/results"],
         lambda c: ["--db: cannot open the results database postgresql+psycopg://bench:***@127.0.0.1:1/results"],
         uses_db=False),
    Case("db-memory", "--db sqlite:// (in memory)", "exit 2: --db",
         lambda c: ["demo", "--db", "sqlite://"], lambda c: ["--db: give SQLite a file"], uses_db=False),
    Case("db-folder", "--db naming a folder", "exit 2: --db, path",
         lambda c: ["search", "--model", "resnet20", "--target", "latency_p50_ms=1", "--max-accuracy-drop", "1",
                    "--db", str(c.tmp)],
         lambda c: [f"--db: cannot open the results database {c.tmp}"], uses_db=False),
    Case("db-not-a-database", "--db naming a file that is not a database", "exit 2: --db, path",
         lambda c: ["bench", "--model", "resnet20", "--db", str(c.write("notes.txt", "not a database\n" * 100))],
         lambda c: [f"--db: cannot open the results database {c.tmp / 'in' / 'notes.txt'}: file is not a database"],
         uses_db=False),
    # ---- run ids
    Case("run-id-chars", "--run-id with shell and path characters", "exit 2: --run-id",
         lambda c: bench(c, "--model", "resnet20", "--run-id", "../x;$(touch PWNED)".replace("PWNED", str(c.sentinel))),
         lambda c: ["--run-id: '../x;$(touch", "must match [A-Za-z0-9._-]{1,64}"]),
    Case("run-id-empty", "--run-id ''", "exit 2: --run-id",
         lambda c: ["demo", "--run-id", "", "--db", str(c.db)], lambda c: ["--run-id: '' must match"]),
    Case("run-id-long", "--run-id of 65 characters", "exit 2: --run-id",
         lambda c: search(c, "--target", "latency_p50_ms=1", "--max-accuracy-drop", "1", "--run-id", "r" * 65),
         lambda c: ["--run-id: 'rrrr", "must match"]),
    Case("run-id-duplicate", "--run-id of a completed run (bench)", "exit 2: --run-id, the run, the store",
         lambda c: bench(c, "--model", "resnet20", "--run-id", BASE_RUN),
         lambda c: [f"--run-id: '{BASE_RUN}' is already in the results store {c.db} (bench, complete)"]),
    Case("run-id-duplicate-search", "--run-id of a completed run (search)", "exit 2: --run-id, the run, the store",
         lambda c: search(c, "--target", "latency_p50_ms=1", "--max-accuracy-drop", "1", "--run-id", BASE_SEARCH),
         lambda c: [f"--run-id: '{BASE_SEARCH}' is already in the results store {c.db} (search, complete)"]),
    Case("run-id-duplicate-demo", "--run-id of a completed run (demo)", "exit 2: --run-id, the run",
         lambda c: ["demo", "--run-id", BASE_RUN, "--db", str(c.db)],
         lambda c: [f"--run-id: '{BASE_RUN}' is already in the results store"]),
    Case("resume-no-run-folder", "search --resume of a run with no run folder", "exit 2: --resume, the file",
         lambda c: ["search", "--resume", BASE_RUN, "--db", str(c.db)],
         lambda c: ["--resume: results/search/base-1/search.json not found"]),
]


def _marked(cases: Sequence[Case]) -> List[Any]:
    return [pytest.param(case, id=case.id, marks=pytest.mark.reliability(
        kind="bad-input", what=case.what, expected=case.expected)) for case in cases]


def assert_one_error(code: int, err: str, names: Sequence[str], out: str = "") -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and err.count("\n") == 1, f"not one line on stderr: {err!r}"
    assert lines[0].startswith("edgeprune: error: "), lines[0]
    for name in names:
        assert name in lines[0], f"{name!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def ctx(tmp_path, db, artifact, monkeypatch) -> Ctx:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EDGEPRUNE_DB", raising=False)
    (tmp_path / "kh.bin").write_bytes(bytes(range(256)) * 4)
    return Ctx(tmp_path, db, artifact, monkeypatch)


@pytest.mark.parametrize("case", _marked(CASES))
def test_bad_input_is_one_clear_error_and_loses_nothing(case: Case, ctx: Ctx, capsys) -> None:
    before = snapshot(ctx.db)
    argv = case.argv(ctx)
    if case.uses_db:
        assert str(ctx.db) in argv
    capsys.readouterr()
    code = cli.main(argv)
    out, err = capsys.readouterr()
    print(assert_one_error(code, err, case.names(ctx), out))   # the catalogue's message, shown with -s
    assert "s3cret" not in out + err                       # a --db password is never printed
    assert snapshot(ctx.db) == before                      # nothing lost, nothing half-recorded
    assert not (ctx.tmp / "results").exists(), sorted(p.name for p in (ctx.tmp / "results").rglob("*"))
    assert not ctx.sentinel.exists()                       # no shell metacharacter ran


def test_the_catalogue_has_one_case_per_id() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


# ------------------------------------------------------------------------------------------ the real command
@pytest.mark.parametrize("case_id", ["yaml-device", "artifact-input-shape", "run-id-duplicate"])
def test_console_command_prints_the_same_single_line(case_id: str, ctx: Ctx, capsys) -> None:
    """The installed ``edgeprune`` command, in its own process with stderr a pipe: the same one line, exit 2."""
    case = next(c for c in CASES if c.id == case_id)
    before = snapshot(ctx.db)
    r = edgeprune(*case.argv(ctx), cwd=ctx.tmp, env={k: v for k, v in os.environ.items() if k != "EDGEPRUNE_DB"},
                  timeout=300)
    assert_one_error(r.returncode, r.stderr, case.names(ctx), r.stdout)
    assert snapshot(ctx.db) == before
    assert not (ctx.tmp / "results").exists()


# ------------------------------------------------------------------------------------------ what devices send back
FAKE_AGENT = """#!/bin/sh
# stands in for the device's python: the agent's lease commands run for real; `{op}` answers with {what}
if [ "$3" = "{op}" ]; then
{body}
  exit 0
fi
exec {python} "$@"
"""


def _garbage_device(c: Ctx, name: str, body: str, op: str = "run") -> Path:
    """A local device whose agent answers ``op`` with ``body``: ``run`` (one agent process per job, the device's
    ``agent_session: false``; its report is the file "$6") or ``serve`` (the agent session's stdout)."""
    script = c.write(f"{name}.sh", FAKE_AGENT.format(what=name, body=body, op=op,
                                                     python=shlex.quote(sys.executable)))
    script.chmod(0o755)
    return c.fleet(name, f"id: {name}\nclass: local\npython: {script}\ncache_dir: {c.tmp / 'cache'}\n"
                         f"agent_session: {'false' if op == 'run' else 'true'}\n")


def _bench_garbage(c: Ctx, capsys, name: str, body: str,
                   op: str = "run") -> "tuple[int, str, str, Dict[str, Any], Dict[str, Any]]":
    before = snapshot(c.db)
    art = c.art()
    code = cli.main(bench(c, "--model", str(art), "--fleet", str(_garbage_device(c, name, body, op)),
                          "--run-id", "g1"))
    out, err = capsys.readouterr()
    return code, " ".join(out.split()), err, before, snapshot(c.db)


def _assert_recorded_as_error(before: Dict[str, Any], after: Dict[str, Any]) -> Dict[str, Any]:
    """The baseline is intact, and the new run holds one measurement, an error (never counted as measured)."""
    assert after["runs"][:len(before["runs"])] == before["runs"]
    assert after["measurements"][:len(before["measurements"])] == before["measurements"]
    new = [m for m in after["measurements"] if m["run_id"] == "g1"]
    assert len(new) == 1 and new[0]["status"] == "error" and new[0]["latency_p50_ms"] is None
    return new[0]


@pytest.mark.reliability(kind="bad-input", what="device's agent writes a non-JSON report (local transport)",
                         expected="exit 1: that device's row names the report file; recorded as an error")
def test_non_json_report_from_a_device_is_that_devices_error(ctx: Ctx, capsys) -> None:
    code, out, err, before, after = _bench_garbage(ctx, capsys, "garbage", '  printf "this is not JSON" > "$6"')
    assert code == 1 and err == "", (out, err)
    assert "invalid report from the agent: report is not valid JSON" in out and "report.json" in out
    row = _assert_recorded_as_error(before, after)
    assert "invalid report from the agent" in row["error"]


FLOOD = ('  head -c 104857600 /dev/zero | tr "\\0" y\n'             # 100 MB on stdout
         '  head -c 104857600 /dev/zero | tr "\\0" z >&2\n'         # and on stderr
         '  printf "this is not JSON" > "$6"')
HUNDRED_MB_REPORT = '  head -c 104857600 /dev/zero | tr "\\0" x > "$6"'


def _bench_garbage_peak(c: Ctx, capsys, name: str, body: str, op: str = "run"):
    """``_bench_garbage`` under tracemalloc: also the peak of what Python allocated meanwhile (bytes)."""
    tracemalloc.start()
    try:
        return (*_bench_garbage(c, capsys, name, body, op), tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()
        shutil.rmtree(c.tmp / "results", ignore_errors=True)   # 100 MB stays out of pytest's kept tmp folders


@pytest.mark.reliability(kind="bad-input", what="device's agent prints 100 MB on stdout and on stderr, then a "
                         "non-JSON report (local transport)",
                         expected="exit 1: that device's row names the report file; recorded as an error; "
                                  "the output is never held in memory")
def test_100_mb_of_garbage_from_a_device_is_that_devices_error(ctx: Ctx, capsys) -> None:
    code, out, err, before, after, peak = _bench_garbage_peak(ctx, capsys, "flood", FLOOD)
    assert code == 1, (out, err)
    assert "invalid report from the agent: report is not valid JSON" in out
    _assert_recorded_as_error(before, after)
    # stdout is discarded and only stderr's last 4000 bytes are read: before, communicate() held all 200 MB
    assert peak < 50e6, peak


@pytest.mark.reliability(kind="bad-input", what="100 MB report through the local transport, refused by size",
                         expected="exit 1: the device's error gives the report's size and the limit; "
                                  "recorded as an error; the report is never read")
def test_oversized_report_is_refused_by_size_without_reading_it(ctx: Ctx, capsys) -> None:
    code, out, err, before, after, peak = _bench_garbage_peak(ctx, capsys, "flood", HUNDRED_MB_REPORT)
    assert code == 1 and "report.json is 104857600 bytes, over the 16777216-byte limit; not read" in out, (out, err)
    row = _assert_recorded_as_error(before, after)
    assert "over the 16777216-byte limit" in row["error"]
    assert peak < 50e6, peak


# ------------------------------------------------------------------------------------------ the agent's job spec
def _job(tmp: Path, **changes: Any) -> Path:
    job: Dict[str, Any] = {"schema_version": 2, "job_id": "j1", "device_id": "local", "power": None,
                           "artifact": {"path": "model.onnx", "sha256": "0" * 64}}
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            job[section] = dict(job.get(section) or {}, **{name: value})
        else:
            job[section] = value
    d = tmp / "jobs" / "j1"
    d.mkdir(parents=True, exist_ok=True)
    (d / "job.json").write_text(json.dumps(job))
    return d / "job.json"


AGENT_CASES = [
    ("job-artifact-path-traversal", "job artifact.path ../../etc/passwd",
     {"artifact__path": "../../etc/passwd"}, "artifact.path: '../../etc/passwd' escapes the job folder"),
    ("job-eval-path-traversal", "job eval.path ../../x.npz",
     {"eval": {"path": "../../x.npz", "sha256": "0" * 64}}, "eval.path: '../../x.npz' escapes the job folder"),
    ("job-files-dotdot", "job artifact.files name ../model.bin",
     {"artifact__files": {"../model.bin": "0" * 64}}, "artifact.files: '../model.bin' must be a plain file name"),
    ("job-files-absolute", "job artifact.files name /etc/passwd",
     {"artifact__files": {"/etc/passwd": "0" * 64}}, "artifact.files: '/etc/passwd' must be a plain file name"),
]


@pytest.mark.parametrize("edit, message", [
    pytest.param(edit, message, id=cid, marks=pytest.mark.reliability(
        kind="bad-input", what=what, expected="exit 2 (python -m agent run): job file, field; nothing read"))
    for cid, what, edit, message in AGENT_CASES])
def test_agent_refuses_job_paths_that_leave_the_job_folder(tmp_path, capsys, edit, message) -> None:
    from agent import cli as agent_cli

    job = _job(tmp_path, **edit)
    report = job.parent / "report.json"
    assert agent_cli.main(["run", str(job), "--out", str(report)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{job}: ") and message in err, err
    assert not report.exists()


# ------------------------------------------------------------------------------------------ quoted on the device
@pytest.mark.ssh
@pytest.mark.skipif(not sshd.have_sshd(), reason="OpenSSH server not installed (/usr/sbin/sshd)")
@pytest.mark.reliability(kind="bad-input", what="shell metacharacters in the fields that reach the device's shell "
                         "(python, ssh.cache_dir), real sshd",
                         expected="exit 1: the device is unhealthy; nothing executed there")
def test_metacharacters_in_remote_fields_are_quoted_not_run(tmp_path, monkeypatch, capsys) -> None:
    """Device ids are refused when read (above); ``python`` and ``ssh.cache_dir`` may hold any path, so they reach
    the device's shell, quoted: a ``;``, ``$(...)`` or backticks in them is never executed."""
    import yaml

    monkeypatch.chdir(tmp_path)
    sentinels = [tmp_path / f"pwned{i}" for i in range(3)]
    fleet = sshd.start_fleet(tmp_path / "sshd", 1)
    try:
        dev = fleet.device(0, device_id="meta-ssh", python=f"python3; touch {sentinels[0]}",
                           cache_dir=f"{tmp_path}/cache$(touch {sentinels[1]})`touch {sentinels[2]}`")
        path = tmp_path / "fleet" / "meta-ssh.yaml"
        path.parent.mkdir()
        path.write_text(yaml.safe_dump(dev.model_dump(by_alias=True, exclude={"source"}, exclude_none=True)))
        code = cli.main(["devices", "check", "--fleet", str(path.parent), "--json"])
        out = capsys.readouterr().out
    finally:
        fleet.stop()
    got = json.loads(out)["meta-ssh"]
    assert code == 1 and got["health"] == "bad", out
    assert f"'python3; touch {sentinels[0]}'" in got["details"]["error"]    # one word: a program not found
    assert not any(s.exists() for s in sentinels)
    made = [p.name for p in tmp_path.iterdir() if p.name.startswith("cache")]
    assert made == [f"cache$(touch {sentinels[1]})`touch {sentinels[2]}`".split("/")[0]], made


@pytest.mark.reliability(kind="bad-input", what="device's agent session prints 100 MB on one line, and one that "
                         "prints non-JSON lines and closes (local transport)",
                         expected="exit 1: that device's row says the session refused the line, or lost it; "
                                  "recorded as an error; the line is never held whole")
@pytest.mark.parametrize("body,says", [
    ('  head -c 104857600 /dev/zero | tr "\\0" y', "agent session refused: a reply over"),
    ('  echo "this is not JSON"', "agent session lost")])
def test_garbage_from_an_agent_session_is_that_devices_error(ctx: Ctx, capsys, body: str, says: str) -> None:
    code, out, err, before, after, peak = _bench_garbage_peak(ctx, capsys, "flood", body, op="serve")
    assert code == 1 and says in out, (out, err)
    row = _assert_recorded_as_error(before, after)
    assert says in row["error"]
    assert peak < 50e6, peak
