"""What every ``edgeprune`` command shares: argument helpers, the model and data source flags, the results
store's ``--db`` (defined here once), device selection, the progress display, and the one place that maps an
exception to an exit code.

Contract: argument helpers only add arguments to a parser; :func:`run_command` calls a command's handler and turns
:class:`~edgeprune.errors.UsageError` into exit 2, any other :class:`~edgeprune.errors.EdgepruneError` into 1 and
Ctrl-C into 130, printing one line on stderr. Nothing here does a command's work.
"""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from edgeprune.errors import EdgepruneError, UsageError

if TYPE_CHECKING:
    from host.fleet.devices import DeviceConfig

Handler = Callable[[argparse.Namespace, Console], int]

DB_HELP = ("results store: sqlite:///FILE, a file path or postgresql://USER@HOST/DB (default: $EDGEPRUNE_DB, else "
           "results/edgeprune.db)")


def ratio_list(text: str) -> List[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1), got {text!r}") from None


def per_class(text: str) -> Optional[int]:
    if text == "full":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'full', got {text!r}") from None


def db_argument(p: argparse.ArgumentParser, *, help: str = DB_HELP, metavar: Optional[str] = "URL") -> None:
    """The results store's ``--db`` (every command that reads or records results takes it). ``help`` and
    ``metavar``: the wording ``report`` and ``regress`` have always shown."""
    p.add_argument("--db", default=None, metavar=metavar, help=help)


MODEL_HELP = ("the model: a built-in name (resnet20 … resnet56, tv_resnet18, tv_mobilenet_v2, …), MODULE:CALLABLE "
              "(mypkg.nets:build or models/net.py:build), a checkpoint file, or a model file (.yaml)")


def model_source_args(p: argparse.ArgumentParser) -> None:
    """The model-source flags every command with --model takes (see edgeprune.sources)."""
    g = p.add_argument_group("model source")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for a MODULE:CALLABLE or built-in factory (value parsed as a YAML scalar); "
                        "repeatable")
    g.add_argument("--weights", default=None, metavar="FILE", help="state dict or checkpoint (torch zip/legacy, or "
                   "safetensors; detected from the content) loaded strictly; 'module.' prefixes are stripped")
    g.add_argument("--trust-pickle", action="store_true", help="allow a whole pickled model (torch.save(model)): "
                   "unpickling runs code from the file")
    g.add_argument("--input-size", default=None, metavar="H[xW]", help="model input size, 3 channels (default: the "
                   "model file's, 32 for the CIFAR ResNets, 224 otherwise)")
    g.add_argument("--input-shape", default=None, metavar="N,C,H,W", help="model input shape (alternative to "
                   "--input-size)")
    g.add_argument("--ignore-layers", default=None, metavar="GLOB,...", help="layers kept whole in addition to the "
                   "inferred ones (the first conv, every layer producing a model output), e.g. 'head.*,features.0'")


def data_source_args(p: argparse.ArgumentParser, *, eval_help: str = "eval data") -> None:
    """The data flags every command with --data takes (see edgeprune.workload and edgeprune.datasets)."""
    g = p.add_argument_group("data (default: CIFAR-10 for the reference models, none otherwise)")
    g.add_argument("--data", default=None, metavar="PATH", help=f"{eval_help}: an image folder (one subfolder per "
                   "class), an .npz (images or inputs, labels optional) or MODULE:CALLABLE returning a torch Dataset")
    g.add_argument("--calib-data", default=None, metavar="PATH", help="BatchNorm recalibration and int8 calibration "
                   "data (default: the fine-tune data, else a seeded part of --data kept out of eval)")
    g.add_argument("--finetune-data", default=None, metavar="PATH", help="labelled recovery data (same classes as "
                   "--data)")
    g.add_argument("--resize", default=None, metavar="N", help="resize images' shorter side to N pixels on the host "
                   "(default: round(max(H, W) / 0.875), 256 for 224; 'none': no resize). An image that already has "
                   "the input size is neither resized nor cropped")
    g.add_argument("--center-crop", default=None, metavar="H[xW]", help="centre crop (default: the input size)")
    g.add_argument("--mean", default=None, metavar="M,M,M", help="per-channel mean after scaling pixels to 0..1 "
                   "(default: ImageNet 0.485,0.456,0.406)")
    g.add_argument("--std", default=None, metavar="S,S,S", help="per-channel std (default: ImageNet "
                   "0.229,0.224,0.225)")


def source_kwargs(args: argparse.Namespace) -> Dict[str, object]:
    """Parsed model-source and data flags, as option-class keyword arguments (only those the command has)."""
    from edgeprune import sources

    kw: Dict[str, object] = {}
    if hasattr(args, "model_arg"):
        kw.update(model_args=sources.parse_model_args(args.model_arg), weights=args.weights,
                  trust_pickle=args.trust_pickle,
                  input_shape=sources.parse_input_shape(args.input_size, args.input_shape),
                  ignore_layers=tuple(x.strip() for x in (args.ignore_layers or "").split(",") if x.strip()))
    for name in ("data", "calib_data", "finetune_data", "resize", "center_crop", "mean", "std"):
        if hasattr(args, name):
            kw[name] = getattr(args, name)
    return kw


def open_recorder(args: argparse.Namespace, run_id: str, kind: str, *, resume: bool = False,
                  seeds: Optional[Dict[str, object]] = None, executor: "Optional[object]" = None) -> "object":
    """The results store's recorder for this command's run (opened before any work: a bad --db fails first);
    ``executor``: where the run's candidates are built (its description goes into the provenance)."""
    from host.results.provenance import host_provenance
    from host.results.store import RunRecorder, Store

    store = Store(args.db)
    extra = {"executor": executor.describe()} if executor is not None else None   # type: ignore[attr-defined]
    return RunRecorder(store, run_id, kind, command=list(sys.argv), resume=resume,
                       provenance=host_provenance(seeds=seeds, extra=extra))


def executor_args(p: argparse.ArgumentParser) -> None:
    """Where candidate builds run (host.executors): ``--executor`` and ``--ray-address``."""
    from host.executors import EXECUTORS

    g = p.add_argument_group("executor (where candidates are pruned, recovered and exported)")
    g.add_argument("--executor", choices=sorted(EXECUTORS), default="local",
                   help="local: in this process, one after the other (default); ray: as tasks on a Ray cluster "
                        "(pip install 'edgeprune[ray]'), overlapping with the measurements of remote devices")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="the Ray cluster (host:port), else $RAY_ADDRESS, else the one `ray start --head` started here")


def open_executor(args: argparse.Namespace) -> "object":
    """The executor the arguments ask for (connected: a Ray cluster that cannot be reached fails here)."""
    from host.executors import open_executor as open_named

    if args.executor != "ray" and args.ray_address is not None:
        raise UsageError("--ray-address: only with --executor ray")
    return open_named(args.executor, **({"address": args.ray_address} if args.executor == "ray" else {}))


def select_devices(fleet: Optional[str], ids: Optional[str], *, connect: bool = True) -> "List[DeviceConfig]":
    """The chosen devices. ``connect``: the command will reach them, so the local files their configs name (an
    SSH key, known_hosts) are checked now, before anything is recorded or built."""
    from host.fleet.devices import check_local_files, load_fleet, local_device

    devices = load_fleet(fleet) if fleet else [local_device()]
    if ids:
        wanted = [i.strip() for i in ids.split(",") if i.strip()]
        known = {d.id: d for d in devices}
        missing = [i for i in wanted if i not in known]
        if missing:
            raise UsageError(f"--devices: {', '.join(missing)} not in the fleet (has: {', '.join(known)})")
        devices = [known[i] for i in wanted]
    if connect:
        for d in devices:
            check_local_files(d)
    return devices


def stage_progress(console: Console) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=console, transient=True)


def one_line(e: BaseException) -> str:
    """An error message as printed: one line (a YAML snippet, a database's or a library's multi-line text folded),
    with rich markup escaped (a path or a value with ``[...]`` in it is printed as it is)."""
    from rich.markup import escape

    return escape(" ".join(part.strip() for part in str(e).splitlines() if part.strip()) or type(e).__name__)


def run_command(handler: Handler, args: argparse.Namespace, console: Console, err: Console) -> int:
    """Run one command's handler; its exit code, or the exception's: 2 bad input, 1 the work failed, 130
    interrupted (the message on ``err``, on one line)."""
    try:
        return handler(args, console)
    except UsageError as e:
        err.print(f"[red]edgeprune: error:[/] {one_line(e)}", highlight=False)
        return 2
    except EdgepruneError as e:
        err.print(f"[red]edgeprune: failed:[/] {one_line(e)}", highlight=False)
        return 1
    except KeyboardInterrupt:
        err.print("edgeprune: interrupted; completed results are in the output folder")
        return 130
