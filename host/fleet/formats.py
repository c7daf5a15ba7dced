"""Which export format a device's runtime loads, and the options that artifact is exported with.

:func:`profile_for` reads a device config (runtime, its options, the device's first precision) and says which
:mod:`edgeprune.export` format to build for it: ``onnxruntime`` → ``onnx``; ``openvino`` → ``openvino`` (fp32
weights) or ``openvino-fp16``; ``tflite`` → ``tflite``/``tflite-fp16``/``tflite-int8``, or ``edgetpu`` with the
Edge TPU delegate; ``tensorrt`` → ``tensorrt`` at the precision its options fix; ``torch`` → ``torchscript``.
``edgeprune demo`` and ``edgeprune search`` build every artifact for a device through it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Tuple

from edgeprune.errors import UsageError
from host.fleet.devices import DeviceConfig


@dataclass(frozen=True)
class Profile:
    """What a device's artifacts depend on: channel alignment and export format (and its options)."""

    round_to: int
    fmt: str
    export_options: Tuple[Tuple[str, Any], ...] = ()

    @property
    def needs_calibration(self) -> bool:
        """Whether its export takes calibration inputs (an int8 format, or an int8 precision option)."""
        from edgeprune import export

        return bool(export.get_format(self.fmt).calibration
                    or "int8" in str(dict(self.export_options).get("precision", "")))


def profile_for(dev: DeviceConfig) -> Profile:
    """The export format and precision a device's runtime runs: its config's first precision, or the precision
    its runtime options fix (tensorrt), or the Edge TPU delegate."""
    rt = dev.runtime.name
    opts = dev.runtime.options
    prec = str(opts.get("precision") or (dev.precisions[0] if dev.precisions else "fp32"))
    table: Dict[str, Dict[str, str]] = {
        "onnxruntime": {"fp32": "onnx"}, "torch": {"fp32": "torchscript"},
        "openvino": {"fp32": "openvino", "fp16": "openvino-fp16"},
        "tflite": {"fp32": "tflite", "fp16": "tflite-fp16", "int8": "tflite-int8"},
    }
    if rt == "tflite" and opts.get("delegate") == "edgetpu":
        return Profile(dev.round_to, "edgetpu")
    if rt == "tensorrt":
        return Profile(dev.round_to, "tensorrt", (("precision", prec),))
    fmt = table.get(rt, {}).get(prec)
    if fmt is None:
        raise UsageError(f"{dev.source or dev.id}: runtime {rt} with precision {prec}: no export format for it "
                         f"(known runtimes: {', '.join(sorted(table))}, tensorrt)")
    return Profile(dev.round_to, fmt)
