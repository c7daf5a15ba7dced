"""Host-side provenance of a run: what produced it, so a number in the store can be traced and reproduced.

The device side (identity and firmware: L4T/JetPack, OS, kernel; runtime name and version; the timing protocol as
applied) comes in each agent report and is stored with the measurement and the run's device rows; the artifact's
hash and manifest are stored with the artifact. This module adds the host: edgeprune's version and git commit
(with a dirty flag), Python, the platform, the versions of the libraries that prune and export, the command
line and the seeds.
"""
from __future__ import annotations

import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

PACKAGES = ("edgeprune", "torch", "torch-pruning", "numpy", "onnx", "onnxruntime", "openvino", "litert-torch",
            "ai-edge-litert", "paramiko", "sqlalchemy")
SOURCE = Path(__file__).resolve().parents[2]


def version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_state(where: Path = SOURCE) -> Dict[str, Any]:
    """The commit edgeprune runs from, and whether its tracked files differ from it; ``{}`` outside a checkout
    (an installed wheel) or without git."""
    def git(*args: str) -> Optional[str]:
        try:
            p = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return p.stdout.strip() if p.returncode == 0 else None

    if not (where / ".git").exists():
        return {}
    sha = git("rev-parse", "HEAD")
    if sha is None:
        return {}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"sha": sha, "dirty": bool(status) if status is not None else None}


def host_provenance(*, argv: Optional[Sequence[str]] = None, seeds: Optional[Mapping[str, Any]] = None,
                    extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    out: Dict[str, Any] = {
        "edgeprune_version": version("edgeprune"),
        "git": git_state(),
        "host": {"hostname": socket.gethostname(), "platform": platform.platform(), "machine": platform.machine(),
                 "python": platform.python_version()},
        "packages": {p: v for p in PACKAGES if p != "edgeprune" for v in [version(p)] if v is not None},
        "argv": list(argv) if argv is not None else list(sys.argv),
        "seeds": dict(seeds or {}),
    }
    if extra:
        out.update(extra)
    return out
