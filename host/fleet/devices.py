"""Device configurations: one YAML file per device, validated, with errors that name the file and field.

The embedded default is the machine edgeprune runs on (``local``), which needs no file. A device file may
override any part of it::

    id: local
    transport: local
    runtime: {name: onnxruntime, threads: 1, options: {}}
    timing: {min_duration_s: 3.0, min_iters: 200, cpu_affinity: auto}
    power: {sensor: model, idle_w: 5.0, max_w: 15.0}
    targets: {latency_p50_ms: 0.5x, accuracy_drop_pp: 1.0}   # what `edgeprune search` must reach here

``targets`` takes the metrics and values of ``--target`` (:mod:`host.fleet.targets`: a number, or a multiple of the
dense model on this device such as ``0.5x``), checked when the file is read; aliases are stored under their
canonical names. A class template's targets merge with the device's metric by metric (the device's value wins,
whichever alias either one uses); a targets file and the command line override both.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from edgeprune.errors import ConfigError, UsageError
from host.fleet import targets as _targets


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _known(kind: str, name: str, known: List[str]) -> str:
    """``name`` when the agent shipped from this host knows it; else a field error listing what it knows."""
    if name not in known:
        raise PydanticCustomError("unknown_name", "unknown {kind} {name}; known: {known}",
                                  {"kind": kind, "name": repr(name), "known": ", ".join(known)})
    return name


class RuntimeConfig(_Strict):
    name: str = "onnxruntime"
    threads: int = Field(1, ge=0)
    options: Dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _agent_has_it(cls, name: str) -> str:
        from agent.runtimes import runtime_names   # the registry only: no runtime is imported

        return _known("runtime", name, runtime_names())


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

    @field_validator("sensor")
    @classmethod
    def _agent_has_it(cls, name: str) -> str:
        from agent.power import sensor_names

        return _known("power sensor", name, sensor_names())


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


class KnownGood(_Strict):
    """Versions measured to work on a class of device: ``pins`` (project -> version) apply where ``when`` holds
    (``machine``, ``python`` as major.minor, ``emulated``: what ``devices setup`` finds on the device)."""

    when: Dict[str, Union[bool, str]] = Field(default_factory=dict)
    pins: Dict[str, str] = Field(default_factory=dict)
    measured: str = ""

    @field_validator("when")
    @classmethod
    def _known_conditions(cls, when: Dict[str, Any]) -> Dict[str, Any]:
        unknown = sorted(set(when) - {"machine", "python", "emulated"})
        if unknown:
            raise ValueError(f"unknown condition {unknown[0]!r}; known: machine, python, emulated")
        return when


def _default_runtime_packages() -> Dict[str, List[str]]:
    return {"onnxruntime": ["onnxruntime"], "tflite": ["ai-edge-litert"], "openvino": ["openvino"],
            "torch": ["torch"]}


class SetupConfig(_Strict):
    """What ``edgeprune devices setup`` installs on the device: a venv (``venv``, made with ``python``, default
    the system ``python3``) holding ``packages`` (what the agent imports) and, per runtime the device uses, the
    requirements in ``runtimes``; the first ``known_good`` entry whose conditions hold pins their versions."""

    venv: str = "~/.local/share/edgeprune/venv"
    python: str = "/usr/bin/python3"
    packages: List[str] = Field(default_factory=lambda: ["numpy>=1.21", "psutil>=5.8"])
    runtimes: Dict[str, List[str]] = Field(default_factory=_default_runtime_packages)
    known_good: List[KnownGood] = Field(default_factory=list)


_WHERE = "targets"   # the prefix host.fleet.targets puts on its messages; cut off again (the loader names the field)


def _target_metric(key: Any) -> Any:
    """The canonical metric of a targets key, or the key itself when it is not a metric (reported later)."""
    try:
        return _targets.canonical_metric(str(key), _WHERE)
    except UsageError:
        return key


class DeviceConfig(_Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    device_class: str = Field("local", alias="class")
    transport: Literal["local", "ssh"] = "local"
    ssh: Optional[SSHConfig] = None
    description: str = ""
    python: Optional[str] = None
    # one agent process per device for the whole run (python -m agent serve); false: one per job (agent run)
    agent_session: bool = True
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    timing: TimingConfig = Field(default_factory=TimingConfig)
    power: Optional[PowerConfig] = None
    round_to: int = Field(1, ge=1)            # channel alignment for pruning on this device
    precisions: List[str] = Field(default_factory=lambda: ["fp32"])
    cache_dir: Optional[str] = None           # local transport: cache and lease folder (default ~/.cache/edgeprune)
    # search targets on this device: metric (host.fleet.targets.METRICS or accuracy_drop_pp) -> number or "0.5x"
    targets: Dict[str, Union[float, str]] = Field(default_factory=dict)
    setup: SetupConfig = Field(default_factory=SetupConfig)   # `edgeprune devices setup`: the agent's venv
    source: Optional[str] = Field(None, exclude=True)  # the file it was read from

    @field_validator("targets", mode="before")
    @classmethod
    def _targets_as_search_reads_them(cls, raw: Any) -> Any:
        """host.fleet.targets' own parser checks each metric and value; keys come back canonical (aliases resolved).
        An error carries the offending key in its context (``target``) so the loader can point at its line."""
        if not isinstance(raw, dict):
            return raw                        # pydantic reports the type error
        out: Dict[str, Any] = {}
        given: Dict[str, "tuple[Any, Any]"] = {}   # metric -> (key as written, parsed value)
        for key, value in raw.items():
            try:
                metric = _targets.canonical_metric(str(key), _WHERE)
                parsed = _targets.parse_value(metric, value, _WHERE)
            except UsageError as e:
                reason = str(e)[len(_WHERE) + 2:] if str(e).startswith(_WHERE + ": ") else str(e)
                if reason.startswith(f"{key}: "):     # "latency_p50_ms: expected ..." under the same key
                    reason = reason[len(str(key)) + 2:]
                raise PydanticCustomError("target", "{reason}", {"reason": reason, "target": str(key)}) from None
            if metric in given and given[metric][1] != parsed:
                twice = f"given twice with different values (as {given[metric][0]} and {key})"
                raise PydanticCustomError("target", "{reason}", {
                    "reason": twice if str(key) == metric else f"{metric}: {twice}", "target": str(key)})
            given[metric] = (key, parsed)
            out[metric] = value
        return out

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


CLASS_ONLY = ("emulate",)   # sections of a class file that are not device settings (host.emulate reads them)
CLASSES_DIR = Path(__file__).resolve().parents[2] / "device_configs" / "classes"


def _field_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _line_of(node: Optional[yaml.Node], loc: tuple) -> Optional[int]:
    """1-based line of the YAML node at ``loc`` (or of its nearest parent that exists)."""
    best = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if getattr(k, "value", None) == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            node = None
        if node is None:
            break
        best = node.start_mark.line + 1
    return best


def _parse_yaml(path: Path) -> "tuple[Any, Optional[yaml.Node]]":
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return yaml.safe_load(text), yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    """``over`` wins; nested mappings merge key by key (a device may override one runtime option)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def class_names(classes_dir: Path = CLASSES_DIR) -> List[str]:
    return sorted(p.stem for p in classes_dir.glob("*.yaml"))


def load_class(name: str, classes_dir: Path = CLASSES_DIR) -> Dict[str, Any]:
    path = classes_dir / f"{name}.yaml"
    if not path.is_file():
        raise KeyError(name)
    data, _ = _parse_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a device class must be a YAML mapping")
    return data


def device_from_mapping(data: Any, source: Path, node: Optional[yaml.Node] = None,
                        classes_dir: Path = CLASSES_DIR) -> DeviceConfig:
    """Validate one device mapping: class template first, then the device's own values over it."""
    if not isinstance(data, dict):
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        raise ConfigError(f"{source}{line}: a device config must be a YAML mapping")
    merged = dict(data)
    cls = data.get("class")
    if cls is not None:
        try:
            template = load_class(str(cls), classes_dir)
        except KeyError:
            line = _line_of(node, ("class",))
            raise ConfigError(f"{source}{f':{line}' if line else ''}: class: unknown device class {cls!r}; known: "
                              f"{', '.join(class_names(classes_dir))}") from None
        template = {k: v for k, v in template.items() if k not in CLASS_ONLY}
        tr, dr = template.get("runtime"), data.get("runtime")
        if isinstance(tr, dict) and isinstance(dr, dict) and "name" in dr and \
                dr["name"] != tr.get("name", RuntimeConfig.model_fields["name"].default):
            # another runtime than the class's: its options are that runtime's (the class's would be unknown
            # to it); the thread count stays, it describes the board's cores
            template = dict(template, runtime={k: v for k, v in tr.items() if k == "threads"})
        ct, dt = template.get("targets"), data.get("targets")
        if isinstance(ct, dict) and isinstance(dt, dict):   # per metric, whichever alias each side spells it with
            mine = {_target_metric(k) for k in dt}
            template = dict(template, targets={k: v for k, v in ct.items() if _target_metric(k) not in mine})
        merged = _merge(template, data)
    try:
        dev = DeviceConfig.model_validate(merged)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err["loc"])
        in_device = bool(loc) and loc[0] in data
        target = (err.get("ctx") or {}).get("target") if err.get("type") == "target" else None
        if target is not None:                # a bad targets entry: point at its key
            in_device = in_device and isinstance(data.get("targets"), dict) and \
                target in {str(k) for k in data["targets"]}
            loc = loc + (target,)
        line = _line_of(node, loc if in_device else ())   # a missing field: the mapping's own line
        origin = f" (from class {cls!r})" if cls is not None and loc and not in_device and loc[0] in merged else ""
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise ConfigError(f"{source}{f':{line}' if line else ''}: {_field_path(loc)}: {err['msg']}{origin}{more}") from None
    return dev.model_copy(update={"source": str(source)})


def load_device(path: Union[str, Path]) -> DeviceConfig:
    """Read and validate one device YAML file."""
    path = Path(path)
    data, node = _parse_yaml(path)
    return device_from_mapping(data, path, node)


def load_fleet(path: Union[str, Path]) -> List[DeviceConfig]:
    """A fleet: a YAML file with a ``devices:`` list (inline mappings or ``{include: FILE}``, relative to the
    fleet file), one device's mapping (a fleet of one, no ``devices:`` needed), or a folder of device YAML files
    (``classes/`` inside it is skipped). Ids must be unique."""
    path = Path(os.path.expanduser(str(path)))
    devices: List[DeviceConfig] = []
    if path.is_dir():
        for f in sorted(path.glob("*.yaml")) + sorted(path.glob("*.yml")):
            devices.append(load_device(f))
    else:
        data, node = _parse_yaml(path)
        if isinstance(data, dict) and "devices" not in data and "id" in data:   # one device's file: a fleet of one
            return [device_from_mapping(data, path, node)]
        if not isinstance(data, dict) or not isinstance(data.get("devices"), list):
            raise ConfigError(f"{path}: a fleet file needs a 'devices:' list, or is one device's mapping with its "
                              "'id:' (or pass a folder of device files)")
        unknown = sorted(set(data) - {"devices"})
        if unknown:
            raise ConfigError(f"{path}:{_line_of(node, (unknown[0],))}: {unknown[0]}: unknown field in a fleet file")
        items_node = _child(node, "devices")
        for i, item in enumerate(data["devices"]):
            item_node = items_node.value[i] if isinstance(items_node, yaml.SequenceNode) else None
            if isinstance(item, dict) and set(item) == {"include"}:
                inc = Path(str(item["include"]))
                devices.append(load_device(inc if inc.is_absolute() else path.parent / inc))
            else:
                devices.append(device_from_mapping(item, path, item_node))
    seen: Dict[str, str] = {}
    for d in devices:
        if d.id in seen:
            raise ConfigError(f"{d.source}: id: device id {d.id!r} is already used by {seen[d.id]}")
        seen[d.id] = str(d.source)
    if not devices:
        raise ConfigError(f"{path}: the fleet has no devices")
    return devices


def _child(node: Optional[yaml.Node], key: str) -> Optional[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return next((v for k, v in node.value if getattr(k, "value", None) == key), None)
    return None


def local_path(dev: DeviceConfig, value: str) -> Path:
    """A path of ``dev``'s config on this machine: ``~`` expanded; a relative path is relative to the folder of the
    config file it was read from (else to the current folder). The SSH transport resolves ``ssh.key`` and
    ``ssh.known_hosts`` the same way."""
    p = Path(os.path.expanduser(value))
    if not p.is_absolute() and dev.source:
        p = Path(dev.source).resolve().parent / p
    return p


# a known_hosts entry: [@marker] hosts keytype base64-key [comment]
_KH_KEYTYPE = re.compile(r"^(ssh-[a-z0-9-]+|ecdsa-sha2-[a-z0-9-]+|sk-[A-Za-z0-9@._-]+|[a-z0-9-]+-cert-v01@openssh\.com"
                         r"|[A-Za-z0-9._-]+@[A-Za-z0-9._-]+)$")
_KH_B64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")


def _known_hosts_problem(path: Path) -> Optional[str]:
    """Why the known_hosts file at ``path`` cannot be used, or None (a file that is not there is fine: every key
    is then unknown, and refused or recorded as ``host_key_policy`` says)."""
    if not path.exists() and not path.is_symlink():
        return None
    if not path.is_file():
        return f"{path} is not a regular file (a directory?)"
    try:
        raw = path.read_bytes()
    except OSError as e:
        return f"cannot read {path}: {e.strerror}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return f"{path} is not a known_hosts file (not text)"
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if fields[0].startswith("@"):          # @cert-authority / @revoked
            fields = fields[1:]
        ok = len(fields) >= 3 and _KH_KEYTYPE.match(fields[1]) is not None and \
            _KH_B64.match(fields[2]) is not None and len(fields[2]) % 4 == 0
        if not ok:
            return f"{path}:{n}: not a known_hosts entry (HOSTS KEYTYPE BASE64-KEY)"
    return None


def check_local_files(dev: DeviceConfig) -> None:
    """ConfigError naming the device file and field when a file the config names on this machine cannot serve:
    ``ssh.key`` missing, not a file or unreadable; ``ssh.known_hosts`` a folder, unreadable or not a known_hosts
    file. Checked by the commands that connect (bench, search, devices check) before they start any work."""
    if dev.transport != "ssh" or dev.ssh is None:
        return
    where = dev.source or f"device {dev.id}"
    if dev.ssh.key is not None:
        key = local_path(dev, dev.ssh.key)
        if not key.is_file():
            what = "is not a file" if key.exists() else "does not exist"
            raise ConfigError(f"{where}: ssh.key: private key file {key} {what}")
        try:
            with open(key, "rb") as f:
                f.read(1)
        except OSError as e:
            raise ConfigError(f"{where}: ssh.key: cannot read {key}: {e.strerror}") from None
    problem = _known_hosts_problem(local_path(dev, dev.ssh.known_hosts))
    if problem is not None:
        raise ConfigError(f"{where}: ssh.known_hosts: {problem}")


def resolve_device(spec: Optional[str], what: str = "--device") -> DeviceConfig:
    """``None`` or ``"local"``: the embedded default; anything else: a device YAML file, or a fleet file or
    folder (:func:`load_fleet`) that holds exactly one device."""
    if spec in (None, "local"):
        return local_device()
    path = Path(os.path.expanduser(str(spec)))
    devices = load_fleet(path)
    if len(devices) != 1:
        raise ConfigError(f"{path}: {what} takes one device; this fleet has {len(devices)} "
                          f"({', '.join(d.id for d in devices)}): pass one device's file")
    return devices[0]


def auto_affinity(threads: int) -> List[int]:
    """The last ``threads`` CPUs this process may run on (CPU 0 stays with the host and the OS)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    n = max(1, threads)
    return cpus[-n:] if len(cpus) > n else cpus
