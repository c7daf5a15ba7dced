"""Change one value in a device file in place, keeping everything else (comments, order, style) as written.

Used by ``edgeprune devices setup`` (``python:`` -> the venv it made) and ``devices emulate`` (``ssh.port`` of a
restarted emulated device). The file may be one device's mapping or a fleet file whose ``devices:`` list holds the
device inline; a device that comes from an ``include:`` is edited in its own file (the device's ``source``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from edgeprune.errors import ConfigError
from host.files import write_text_atomic


def _child(node: Any, key: str) -> Optional[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if getattr(k, "value", None) == key:
                return v
    return None


def _device_node(root: yaml.Node, device_id: str) -> Optional[yaml.MappingNode]:
    if isinstance(root, yaml.MappingNode) and getattr(_child(root, "id"), "value", None) == device_id:
        return root
    items = _child(root, "devices")
    if isinstance(items, yaml.SequenceNode):
        for item in items.value:
            if isinstance(item, yaml.MappingNode) and getattr(_child(item, "id"), "value", None) == device_id:
                return item
    return None


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        plain = re.match(r"^[A-Za-z0-9_./~+-]+$", value) is not None and yaml.safe_load(value) == value
        return value if plain else json.dumps(value)
    return str(value)


def set_value(path: Path, device_id: str, keys: Sequence[str], value: Any) -> bool:
    """Set ``keys`` (e.g. ``("python",)`` or ``("ssh", "port")``) of device ``device_id`` in ``path`` to ``value`` (a
    string or number). An existing scalar is replaced where it stands; a missing top-level key of the device is
    added as a line after its ``id:``. Returns whether the file changed. ConfigError naming the file when the device
    or a nested mapping is not there, or the value there is not a plain scalar."""
    path = Path(path)
    text = path.read_text()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    node = _device_node(root, device_id)
    if node is None:
        raise ConfigError(f"{path}: no device with id {device_id!r} in this file")
    for key in keys[:-1]:
        node = _child(node, key)
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError(f"{path}: device {device_id}: {'.'.join(keys[:-1])}: expected a mapping")
    new = _scalar(value)
    target = _child(node, keys[-1])
    if target is not None:
        if not isinstance(target, yaml.ScalarNode):
            raise ConfigError(f"{path}: device {device_id}: {'.'.join(keys)}: expected a plain value")
        if yaml.safe_load(new) == yaml.safe_load(text[target.start_mark.index:target.end_mark.index] or "null"):
            return False
        text = text[:target.start_mark.index] + new + text[target.end_mark.index:]
    else:
        if len(keys) != 1 or node.flow_style:
            raise ConfigError(f"{path}: device {device_id}: {'.'.join(keys)}: not in the file; add it by hand")
        id_value = _child(node, "id")
        assert id_value is not None
        line_end = text.find("\n", id_value.end_mark.index)
        line_end = len(text) if line_end < 0 else line_end
        key_col = next(k for k, _ in node.value if k.value == "id").start_mark.column
        indent = " " * key_col
        text = text[:line_end] + f"\n{indent}{keys[0]}: {new}" + text[line_end:]
    write_text_atomic(path, text)
    return True
