"""``edgeprune devices check``: reach each device, ask its agent what it has (``probe``) and who holds its
lease, and persist good / bad with the time of the check. One device failing never stops the others."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List

from edgeprune.errors import DeviceError, InfrastructureError
from host.fleet import state
from host.fleet.devices import DeviceConfig
from host.fleet.runner import lease_request, transport_for


# the Python modules that provide each agent runtime (what `agent probe` lists)
RUNTIME_MODULES = {"onnxruntime": ("onnxruntime",), "openvino": ("openvino",), "tensorrt": ("tensorrt",),
                   "tflite": ("ai_edge_litert", "tflite_runtime"), "torch": ("torch",)}


def runtime_installed(probe: Dict[str, Any], runtime: str) -> bool:
    found = probe.get("runtimes") or {}
    return any(found.get(m) for m in RUNTIME_MODULES.get(runtime, (runtime,)))


def _summary(probe: Dict[str, Any]) -> str:
    runtimes = probe.get("runtimes") or {}
    have = [f"{k} {v.get('version') if isinstance(v, dict) else v}" for k, v in sorted(runtimes.items())
            if v and (not isinstance(v, dict) or v.get("version"))]
    temps = probe.get("temperatures_c") or {}
    hottest = f"; {max(temps.values()):.0f} °C" if temps else ""
    disk = probe.get("disk_free_mb")
    emu = probe.get("emulation") or {}
    machine = f"{probe.get('machine')}" + (f", emulated ({emu.get('by')}, {emu.get('cpu') or 'cpu not set'})"
                                           if emu.get("emulated") else "")
    return (f"{machine}; python {probe.get('python', '?')}; " + (", ".join(have) or "no runtime found")
            + (f"; {disk / 1000:.1f} GB free" if isinstance(disk, (int, float)) else "") + hottest
            + f"; power {probe.get('power', '?')}")


def check_device(dev: DeviceConfig, transport_factory: Callable[[DeviceConfig], Any] = transport_for) -> Dict[str, Any]:
    t0 = time.monotonic()
    details: Dict[str, Any] = {}
    health = "bad"
    transport = None
    try:
        transport = transport_factory(dev)
        if getattr(transport, "use_session", False):    # the probe through the device's agent session
            probe = transport.agent_request("probe", 120.0, disk=transport.cache_dir())["probe"]
        else:
            rc, out, err = transport.exec_agent(["probe", "--json", "--disk", transport.cache_dir()], timeout=120)
            if rc != 0:
                raise DeviceError(f"agent probe exited {rc}: {err.strip()[-500:]}")
            probe = json.loads(out)
        try:
            lease = lease_request(transport, dev.id, "show")
        except InfrastructureError:     # `agent lease show` failed: who holds it is not known
            lease = {}
        details["probe"] = probe
        details["summary"] = _summary(probe)
        holder = (lease.get("lease") or {}).get("holder") if lease.get("held") else None
        details["lease"] = (f"{holder.get('user')}@{holder.get('host')} pid {holder.get('pid')}" if holder else None)
        if not runtime_installed(probe, dev.runtime.name):
            raise DeviceError(f"runtime {dev.runtime.name} (from the device config) is not installed on the device: "
                                  f"`edgeprune devices setup --fleet {dev.source or 'FLEET'} --devices {dev.id}` "
                                  "installs it (a venv with the agent's packages and the runtime)")
        health = "good"
    except (DeviceError, ValueError, OSError) as e:
        details["error"] = f"{type(e).__name__}: {e}"
    finally:
        if transport is not None:
            transport.close()
    details["seconds"] = round(time.monotonic() - t0, 3)
    return {"health": health, "details": details}


def emulation_of(dev: DeviceConfig, transport_factory: Callable[[DeviceConfig], Any] = transport_for) -> Dict[str, Any]:
    """What ``dev``'s agent says of emulation (:func:`agent.emulation.detect`: ``emulated``, ``by``, ``evidence``);
    ``{}`` when the device cannot be asked (the search then fails on it as it would have). The local device is
    this machine: asked in this process."""
    if dev.transport == "local":
        from agent import emulation

        return emulation.detect()
    r = check_device(dev, transport_factory)
    return (r["details"].get("probe") or {}).get("emulation") or {}


def check_devices(devices: List[DeviceConfig], state_path: Path = state.DEFAULT_PATH,
                  transport_factory: Callable[[DeviceConfig], Any] = transport_for) -> Dict[str, Dict[str, Any]]:
    with ThreadPoolExecutor(max_workers=max(1, min(32, len(devices)))) as pool:
        futures = {d.id: pool.submit(check_device, d, transport_factory) for d in devices}
        results = {i: f.result() for i, f in futures.items()}
    for dev_id, r in results.items():
        r.update(state.record(dev_id, r["health"], r["details"], state_path))
    return results
