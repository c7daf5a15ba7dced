"""Device probing: pure parsers on captured text, and probe() against a fake root tree."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnxruntime

from agent import __version__, probe

# A real /etc/nv_tegra_release line from an L4T R35.4.1 (JetPack 5.1.2) board, as captured in the project brief
L4T_LINE = ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, "
            "DATE: Tue Aug  1 19:57:35 UTC 2023\n")

# Written for this test in the layout of a Raspberry Pi 4 /proc/cpuinfo on a 64-bit OS (one core shown; not a
# capture from a device: the serial is made up)
PI_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3

Hardware\t: BCM2835
Revision\t: c03114
Serial\t\t: 10000000deadbeef
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""

X86_CPUINFO = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz\n"


def test_parse_l4t_release_captured_line() -> None:
    info = probe.parse_l4t_release(L4T_LINE)
    assert info is not None
    assert info["l4t"] == "35.4.1" and info["jetpack"] == "5.1.2"
    assert info["board"] == "t186ref" and info["gcid"] == "33958178" and info["eabi"] == "aarch64"
    assert info["date"] == "Tue Aug  1 19:57:35 UTC 2023"
    assert probe.parse_l4t_release("not a release file\n") is None
    unknown = probe.parse_l4t_release("# R99 (release), REVISION: 0.0, GCID: 1\n")
    assert unknown == {"l4t": "99.0.0", "gcid": "1"}  # no JetPack guess for releases not in the table


def test_parse_os_release() -> None:
    text = 'PRETTY_NAME="Ubuntu 20.04.6 LTS"\nNAME="Ubuntu"\n# comment\nVERSION_ID="20.04"\n'
    assert probe.parse_os_release(text) == {"PRETTY_NAME": "Ubuntu 20.04.6 LTS", "NAME": "Ubuntu",
                                            "VERSION_ID": "20.04"}


def test_parse_cpu_model() -> None:
    assert probe.parse_cpu_model(X86_CPUINFO) == "Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz"
    assert probe.parse_cpu_model(PI_CPUINFO) == "ARM Cortex-A72"
    assert probe.parse_cpu_model("CPU implementer\t: 0x4e\nCPU part\t: 0x004\n") == "NVIDIA Carmel"
    assert probe.parse_cpu_model("") is None


def fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    for rel, text in {"etc/os-release": 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n',
                      "etc/nv_tegra_release": L4T_LINE,
                      "proc/cpuinfo": PI_CPUINFO,
                      "proc/device-tree/model": "Raspberry Pi 4 Model B Rev 1.4\x00"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_probe_reads_everything_through_root(tmp_path: Path) -> None:
    info = probe.probe(str(fake_root(tmp_path)))
    assert info["os"] == "Debian GNU/Linux 12 (bookworm)"
    assert info["cpu_model"] == "ARM Cortex-A72"
    assert info["serial"] == "10000000deadbeef"
    assert info["board_model"] == "Raspberry Pi 4 Model B Rev 1.4"
    assert info["firmware"] == {"l4t": "35.4.1", "jetpack": "5.1.2"}
    assert info["agent_version"] == __version__ and info["power_sensors"] == []
    assert info["runtimes"]["onnxruntime"] == onnxruntime.__version__
    assert info["runtimes"]["tflite_runtime"] is None
    json.dumps(info)  # plain data


def test_probe_of_an_empty_root_has_no_device_keys(tmp_path: Path) -> None:
    info = probe.probe(str(tmp_path))
    assert info["serial"] is None and info["firmware"] == {}
    assert "board_model" not in info and "l4t" not in info
    assert info["cpu_count"] >= 1 and info["hostname"]


def test_identity_carries_firmware_and_board(tmp_path: Path) -> None:
    ident = probe.identity("pi-1", "onnxruntime", "1.0", "c" * 64, root=str(fake_root(tmp_path)))
    assert (ident.device_id, ident.runtime, ident.artifact_sha256) == ("pi-1", "onnxruntime", "c" * 64)
    assert ident.firmware["l4t"] == "35.4.1" and ident.extra["board_model"].startswith("Raspberry Pi 4")
    assert ident.serial == "10000000deadbeef"


def test_probe_does_not_import_the_runtimes_it_finds() -> None:
    code = ("import sys, json; from agent import probe; info = probe.probe(); "
            "print(json.dumps([m for m in ('torch', 'onnxruntime', 'openvino', 'tensorrt') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parents[2]))
    assert json.loads(out.stdout) == []


# ------------------------------------------------------------------------ runtimes, Edge TPU, power
def edgetpu_root(tmp_path: Path) -> Path:
    """A root with a PCIe Edge TPU node and a USB Accelerator (after firmware load: 18d1:9302) beside a mouse."""
    root = tmp_path / "root"
    (root / "dev").mkdir(parents=True)
    (root / "dev" / "apex_0").write_text("")
    for dev, (vendor, product) in {"2-1": ("18d1", "9302"), "1-1": ("046d", "c077")}.items():
        d = root / "sys" / "bus" / "usb" / "devices" / dev
        d.mkdir(parents=True)
        (d / "idVendor").write_text(vendor + "\n")
        (d / "idProduct").write_text(product + "\n")
    return root


def test_edgetpu_found_by_library_pcie_node_and_usb_ids(tmp_path: Path) -> None:
    root = edgetpu_root(tmp_path)
    found = probe.edgetpu(root, find_library=lambda name: "libedgetpu.so.1" if name == "edgetpu" else None)
    assert found == {"library": "libedgetpu.so.1", "pcie": ["apex_0"], "usb": ["18d1:9302"], "present": True}
    assert probe.edgetpu(tmp_path / "empty", find_library=lambda name: None) == \
        {"library": None, "pcie": [], "usb": [], "present": False}
    (root / "dev" / "apex_0").unlink()
    usb_only = probe.edgetpu(root, find_library=lambda name: None)
    assert usb_only["present"] and usb_only["usb"] == ["18d1:9302"] and usb_only["pcie"] == []


def test_probe_reports_edgetpu_backends_and_modelled_power(tmp_path: Path) -> None:
    info = probe.probe(str(edgetpu_root(tmp_path)), find_library=lambda name: None)
    assert info["edgetpu"]["pcie"] == ["apex_0"] and info["edgetpu"]["present"]
    assert info["power_sensors"] == [] and info["power"] == "modelled only"
    assert info["backends"]["onnxruntime"] == "onnxruntime %s" % onnxruntime.__version__
    assert set(info["backends"]) == {"onnxruntime", "openvino", "tflite", "tensorrt", "torch"}
    assert "runtime_devices" not in info  # only when asked
    json.dumps(info)


def test_backends_map_the_first_module_found() -> None:
    found = probe.backends_available({"onnxruntime": "1.17.1", "openvino": None, "tflite_runtime": "2.14.0",
                                      "ai_edge_litert": None, "tensorrt": "8.5.2.2", "torch": None})
    assert found == {"onnxruntime": "onnxruntime 1.17.1", "openvino": None, "tflite": "tflite_runtime 2.14.0",
                     "tensorrt": "tensorrt 8.5.2.2", "torch": None}
    both = probe.backends_available({"ai_edge_litert": "2.3.0", "tflite_runtime": "2.14.0"})
    assert both["tflite"] == "ai_edge_litert 2.3.0"  # the one the backend tries first


def test_probe_lists_runtime_devices_when_asked(tmp_path: Path) -> None:
    info = probe.probe(str(tmp_path), devices=True)
    devices = info["runtime_devices"]
    assert "CPUExecutionProvider" in devices["onnxruntime"]
    if info["runtimes"]["openvino"] is not None:
        assert "CPU" in devices["openvino"]
    else:
        assert devices["openvino"] is None


def test_probe_versions_come_from_metadata_without_imports() -> None:
    code = ("import sys, json; from agent import probe; info = probe.probe(); "
            "print(json.dumps({'imported': [m for m in ('torch', 'onnxruntime', 'openvino', 'tensorrt', "
            "'ai_edge_litert', 'tflite_runtime') if m in sys.modules], 'runtimes': info['runtimes']}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parents[2]))
    got = json.loads(out.stdout)
    assert got["imported"] == []
    assert got["runtimes"]["onnxruntime"] == onnxruntime.__version__
    from importlib import metadata
    for module, dist in (("torch", "torch"), ("ai_edge_litert", "ai-edge-litert")):
        try:
            assert got["runtimes"][module] == metadata.version(dist)
        except metadata.PackageNotFoundError:
            assert got["runtimes"][module] is None


def test_probe_reports_disk_and_temperatures(tmp_path):
    zone = tmp_path / "sys" / "class" / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text("45250\n")
    info = probe.probe(root=str(tmp_path), disk_path=str(tmp_path / "not" / "yet" / "created"))
    assert info["disk_free_mb"] > 0  # measured on the nearest existing parent
    assert list(info["temperatures_c"].values()) == [45.25]
    assert probe.probe(root=str(tmp_path / "empty"))["temperatures_c"] is None
