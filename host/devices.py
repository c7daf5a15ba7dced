"""Device configurations: one YAML file per device, validated, with errors that name the file and field.

The embedded default is the machine edgeprune runs on (``local``), which needs no file. A device file may
override any part of it::

    id: local
    transport: local
    runtime: {name: onnxruntime, threads: 1, options: {}}
    timing: {min_duration_s: 3.0, min_iters: 200, cpu_affinity: auto}
    power: {sensor: model, idle_w: 5.0, max_w: 15.0}
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgeprune.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class RuntimeConfig(_Strict):
    name: str = "onnxruntime"
    threads: int = Field(1, ge=0)
    options: Dict[str, Any] = Field(default_factory=dict)


class TimingConfig(_Strict):
    warmup_iters: int = Field(20, ge=0)
    warmup_s: float = Field(0.5, ge=0)
    min_iters: int = Field(200, ge=1)
    min_duration_s: float = Field(3.0, ge=0)
    max_iters: int = Field(100_000, ge=1)
    max_duration_s: float = Field(120.0, gt=0)
    batch_size: int = Field(1, ge=1)
    cv_warn: float = Field(0.10, ge=0)
    cooldown_s: float = Field(0.0, ge=0)
    # "auto": pin to the last `threads` CPUs this process may use (leaves CPU 0 to the host and the OS)
    cpu_affinity: Union[Literal["auto"], List[int], None] = "auto"


class PowerConfig(_Strict):
    sensor: str = "model"
    sample_hz: float = Field(20.0, gt=0)
    idle_w: Optional[float] = Field(None, ge=0)
    max_w: Optional[float] = Field(None, ge=0)
    options: Dict[str, Any] = Field(default_factory=dict)


class SSHConfig(_Strict):
    """How to reach a device over SSH. Unknown host keys are rejected unless ``host_key_policy`` says
    ``accept-new`` (OpenSSH's meaning: record a first-seen key, refuse a changed one)."""

    host: str = Field(min_length=1)
    port: int = Field(22, ge=1, le=65535)
    user: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._][A-Za-z0-9._-]*$")
    key: Optional[str] = None                 # private key file; None: ssh-agent / default keys
    known_hosts: str = "~/.ssh/known_hosts"
    host_key_policy: Literal["reject", "accept-new"] = "reject"
    proxy_jump: Optional[str] = None          # user@host[:port] of a bastion, as OpenSSH's ProxyJump
    connect_timeout_s: float = Field(10.0, gt=0)
    command_timeout_s: float = Field(60.0, gt=0)   # for short commands (probe, hashing); jobs use their own
    keepalive_s: float = Field(15.0, ge=0)
    cache_dir: str = "~/.cache/edgeprune"     # content-addressed cache on the device


class DeviceConfig(_Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    device_class: str = Field("local", alias="class")
    transport: Literal["local", "ssh"] = "local"
    ssh: Optional[SSHConfig] = None
    description: str = ""
    python: Optional[str] = None
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    timing: TimingConfig = Field(default_factory=TimingConfig)
    power: Optional[PowerConfig] = None
    round_to: int = Field(1, ge=1)            # channel alignment for pruning on this device
    source: Optional[str] = Field(None, exclude=True)  # the file it was read from

    @model_validator(mode="after")
    def _transport_needs_its_settings(self) -> "DeviceConfig":
        if self.transport == "ssh" and self.ssh is None:
            raise ValueError("transport 'ssh' needs an 'ssh' section (host, user, ...)")
        if self.transport == "local" and self.ssh is not None:
            raise ValueError("an 'ssh' section needs transport: ssh")
        return self


def local_device() -> DeviceConfig:
    """The embedded default device: this machine. Its power can only be modelled (no sensor here)."""
    return DeviceConfig(
        id="local", description="the machine edgeprune runs on",
        runtime=RuntimeConfig(name="onnxruntime", threads=1, options={"providers": ["CPUExecutionProvider"]}),
        power=PowerConfig(sensor="model", idle_w=5.0, max_w=15.0),
    )


def _field_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def load_device(path: Union[str, Path]) -> DeviceConfig:
    """Read and validate one device YAML file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read device config ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a device config must be a YAML mapping")
    try:
        dev = DeviceConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise ConfigError(f"{path}: {_field_path(err['loc'])}: {err['msg']}{more}") from None
    return dev.model_copy(update={"source": str(path)})


def resolve_device(spec: Optional[str]) -> DeviceConfig:
    """``None`` or ``"local"``: the embedded default; anything else: a device YAML file."""
    if spec in (None, "local"):
        return local_device()
    return load_device(os.path.expanduser(str(spec)))


def auto_affinity(threads: int) -> List[int]:
    """The last ``threads`` CPUs this process may run on (CPU 0 stays with the host and the OS)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    n = max(1, threads)
    return cpus[-n:] if len(cpus) > n else cpus
