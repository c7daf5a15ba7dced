"""One module per export format, and what they share; the registry and entry point are :mod:`edgeprune.export`.

Members: ``onnx``, ``torchscript``, ``openvino`` (``openvino``, ``openvino-fp16``), ``tflite`` (``tflite``,
``tflite-fp16``, ``tflite-int8``), ``edgetpu``, ``tensorrt``: each holds its exporter(s), its own checks and a
``FORMATS`` dict of its :class:`~edgeprune.exporters.base.ExportFormat` entries, and says in its docstring which
runtime consumes it, the toolchain it needs and what was verified here. Shared: ``manifest`` (the manifest
written beside every artifact), ``base`` (tolerances, the comparison with torch, delete-on-failure, the format
description), ``artifacts`` (checking and running an exported artifact on the host). Members import only
``base``, ``manifest`` and a format they build on (openvino and tensorrt on onnx, edgetpu on tflite), never
:mod:`edgeprune.export`; toolchains (onnx, openvino, litert) are imported inside the functions that use them.
"""
