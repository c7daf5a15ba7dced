"""Model sources: where the model a command prunes comes from, and how it is rebuilt anywhere from a recipe.

Every command that takes ``--model`` accepts the same sources (:func:`resolve`):

* a **built-in name**: the CIFAR ResNets (``resnet20`` … ``resnet56``, with their published weights) or a zoo
  architecture (``tv_resnet18``, ``tv_mobilenet_v2``, … from :mod:`edgeprune.zoo`, seeded random weights unless
  ``--weights`` is given);
* ``MODULE:CALLABLE``: a factory in an importable module (``mypkg.nets:mobilenet``) or in a ``.py`` file
  (``models/net.py:build``), called with the ``--model-arg KEY=VALUE`` keyword arguments (values parsed as YAML
  scalars: ``10`` is an int, ``true`` a bool, ``0.5`` a float, anything else a string). torchvision or timm users
  write ``torchvision.models:mobilenet_v3_small`` or ``timm:create_model --model-arg model_name=...``;
* a **checkpoint file** of a CIFAR ResNet (recognised from its keys, as before);
* a **whole pickled module** (``torch.save(model)``), only with ``--trust-pickle``: unpickling runs code from the
  file, so without it the file is refused with the reason and the safe alternative;
* a **model file** (``.yaml``/``.yml``) that records all of the above plus the input shape, preprocessing, class
  names, task and layers to keep whole, so that ``--model model.yaml`` reproduces a run. Paths in it are relative
  to the file. Fields::

      model: mypkg.nets:mobilenet      # required: any source above but another model file
      args: {num_classes: 5}           # factory keyword arguments
      weights: weights.safetensors     # optional state dict file
      input_shape: [1, 3, 224, 224]    # or input_size: 224 / [224, 200]
      preprocess: {resize: 256, center_crop: 224, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}
      classes: [cat, dog]              # optional class names (index order)
      task: classification             # classification (logits) or other (detector, segmenter, ...)
      ignore_layers: ["head.*"]        # layers kept whole, in addition to the inferred ones
      trust_pickle: false

``--weights FILE`` loads a state dict, or a checkpoint dict holding one under ``state_dict``, ``model``,
``model_state_dict`` or ``net``; the format (torch zip, torch legacy pickle of tensors, safetensors) is detected
from the file's first bytes, never from its extension (published checkpoints come as ``.th``, ``.tar``,
``.bin``). A ``module.`` prefix (DataParallel) is stripped. Loading is strict: a mismatch is one error listing
missing keys, unexpected keys and shape mismatches (the first few of each, and their counts).

What a run records (:attr:`LoadedModel.recipe`): the factory, its arguments, the weights file and its sha256, the
model file and its sha256: enough to rebuild the model on another machine without pickling it.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import data, models, zoo
from .errors import DataError, UsageError

__all__ = ["ModelSpec", "LoadedModel", "resolve", "load_weights", "read_state_dict", "parse_model_args",
           "parse_input_shape", "import_callable", "STATE_DICT_KEYS"]

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net")
TASKS = ("classification", "other")
_MODEL_FILE_FIELDS = {"model", "args", "weights", "input_shape", "input_size", "preprocess", "classes", "task",
                      "ignore_layers", "trust_pickle"}
_LIST_LIMIT = 5


@dataclass
class ModelSpec:
    """What the user said about the model (CLI flags or a model file), before anything is loaded."""

    source: str
    args: Dict[str, Any] = field(default_factory=dict)
    weights: Optional[str] = None
    trust_pickle: bool = False
    input_shape: Optional[Tuple[int, int, int, int]] = None
    preprocess: Optional[Dict[str, Any]] = None
    classes: Optional[List[str]] = None
    task: Optional[str] = None
    ignore_layers: List[str] = field(default_factory=list)

    @classmethod
    def of(cls, opts: Any) -> "ModelSpec":
        """The spec of any options object with the model fields (prune, demo, search and sensitivity share them:
        ``model``, ``model_args``, ``weights``, ``trust_pickle``, ``input_shape``, ``ignore_layers``); absent
        fields take their defaults."""
        return cls(source=opts.model, args=dict(getattr(opts, "model_args", None) or {}),
                   weights=getattr(opts, "weights", None),
                   trust_pickle=bool(getattr(opts, "trust_pickle", False)),
                   input_shape=getattr(opts, "input_shape", None),
                   ignore_layers=list(getattr(opts, "ignore_layers", None) or ()))


@dataclass
class LoadedModel:
    name: str                                   # short name for tags and tables (resnet56, mobilenet, net)
    model: nn.Module                            # in eval mode
    input_shape: Tuple[int, int, int, int]      # N, C, H, W (N = 1)
    meta: Dict[str, Any]                        # sha256 (weights, or the model file), path, best_prec1, ...
    recipe: Dict[str, Any]                      # how to rebuild it: kind, factory, args, weights, sha256s
    preprocess: Optional[Dict[str, Any]] = None
    classes: Optional[List[str]] = None
    task: str = "classification"
    ignore_layers: List[str] = field(default_factory=list)
    builtin: bool = False                       # a CIFAR ResNet with its published weights (the reference path)

    @property
    def example(self) -> torch.Tensor:
        return torch.zeros(*self.input_shape)

    def ignored_modules(self) -> List[nn.Module]:
        """The layers ``--ignore-layers`` / the model file's ``ignore_layers`` name (globs over module names), to be
        kept whole beside the default protected layers (:func:`edgeprune.prune.prune`'s ``extra_ignored``)."""
        if not self.ignore_layers:
            return []
        from .prune_groups import resolve_ignore_globs   # torch_pruning, only when there is something to resolve

        return list(resolve_ignore_globs(self.model, self.ignore_layers))


# --------------------------------------------------------------------------------------------------- parsing
def parse_model_args(items: Sequence[str], arg: str = "--model-arg") -> Dict[str, Any]:
    """``["num_classes=5", "pretrained=false"]`` -> ``{"num_classes": 5, "pretrained": False}`` (YAML scalars)."""
    import yaml

    out: Dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(f"{arg}: expected KEY=VALUE with KEY a Python identifier, got {item!r}")
        if key in out:
            raise UsageError(f"{arg}: {key} given twice")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        if isinstance(value, (dict, list)) or value is None and text.strip() not in ("null", "~", "None"):
            value = text  # only scalars: a '{' or '[' stays the text the user typed
        out[key] = value
    return out


def parse_input_shape(size: Optional[str] = None, shape: Optional[str] = None) -> Optional[Tuple[int, int, int, int]]:
    """``--input-size H[xW]`` (3 channels, batch 1) or ``--input-shape N,C,H,W``; None when neither is given."""
    if size is not None and shape is not None:
        raise UsageError("--input-size and --input-shape: give one of them")
    if size is not None:
        m = re.fullmatch(r"\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*", str(size))
        if not m:
            raise UsageError(f"--input-size: expected H or HxW (e.g. 224 or 224x160), got {size!r}")
        h = int(m.group(1))
        w = int(m.group(2) or h)
        dims = (1, 3, h, w)
        what = "--input-size"
    elif shape is not None:
        try:
            dims = tuple(int(x) for x in str(shape).replace("x", ",").split(","))
        except ValueError:
            raise UsageError(f"--input-shape: expected N,C,H,W integers (e.g. 1,3,224,224), got {shape!r}") from None
        what = "--input-shape"
    else:
        return None
    return _check_shape(dims, what)


def _check_shape(dims: Sequence[Any], what: str) -> Tuple[int, int, int, int]:
    if len(dims) != 4 or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise UsageError(f"{what}: expected 4 integers N,C,H,W, got {list(dims)}")
    n, c, h, w = dims
    if n < 1 or c < 1 or h < 1 or w < 1:
        raise UsageError(f"{what}: every dimension must be >= 1, got {list(dims)}")
    if c not in (1, 3, 4):
        raise UsageError(f"{what}: {c} channels; image models take 1, 3 or 4 channels")
    return (1, c, h, w)


# ------------------------------------------------------------------------------------------------- importing
def import_callable(text: str, arg: str = "--model") -> Tuple[Any, str]:
    """``MODULE:CALLABLE`` -> (the callable, a canonical name). MODULE is importable or a path to a ``.py``
    file; CALLABLE may be dotted (``Net.build``). Every failure is one UsageError quoting the name."""
    mod_text, sep, attr = text.rpartition(":")
    if not sep or not mod_text or not attr:
        raise UsageError(f"{arg}: expected MODULE:CALLABLE, got {text!r}")
    if mod_text.endswith(".py") or "/" in mod_text or "\\" in mod_text:
        path = Path(mod_text).expanduser()
        if not path.is_file():
            raise UsageError(f"{arg}: {text!r}: file {mod_text!r} not found")
        name = "edgeprune_user_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise UsageError(f"{arg}: {text!r}: cannot load {mod_text!r} as a Python module")
            module = importlib.util.module_from_spec(spec)
            # the folder of the file on sys.path while it runs, so its own sibling imports work
            sys.path.insert(0, str(path.resolve().parent))
            try:
                sys.modules[name] = module
                spec.loader.exec_module(module)
            except Exception as e:
                sys.modules.pop(name, None)
                raise UsageError(f"{arg}: {text!r}: importing {mod_text!r} raised {type(e).__name__}: {e}") from None
            finally:
                try:
                    sys.path.remove(str(path.resolve().parent))
                except ValueError:
                    pass
    else:
        try:
            module = importlib.import_module(mod_text)
        except ModuleNotFoundError as e:
            missing = f" ({e.name} is missing)" if e.name and e.name != mod_text else ""
            raise UsageError(f"{arg}: cannot import module {mod_text!r}{missing}: is it installed, or on "
                             "PYTHONPATH? (a file path needs its .py suffix)") from None
        except Exception as e:
            raise UsageError(f"{arg}: importing module {mod_text!r} raised {type(e).__name__}: {e}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{arg}: module {mod_text!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{arg}: {text!r} is a {type(obj).__name__}, not a callable")
    return obj, f"{mod_text}:{attr}"


def _call_factory(factory: Any, name: str, args: Mapping[str, Any], arg: str) -> nn.Module:
    try:
        model = factory(**dict(args))
    except Exception as e:
        raise UsageError(f"{arg}: {name}({_kwargs(args)}) raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"{arg}: {name}({_kwargs(args)}) returned {type(model).__name__}, not a torch nn.Module")
    return model


def _kwargs(args: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items())


# --------------------------------------------------------------------------------------------------- weights
def sniff_format(path: Path) -> str:
    """``zip`` (torch.save since 1.6), ``pickle`` (torch legacy), ``safetensors``, or ``unknown``: from content."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= 100 << 20 and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


_PICKLE_HINT = ("unpickling runs code from the file, so edgeprune does not do it unless told: pass --trust-pickle "
                "if you trust where it came from; better, save model.state_dict() (or safetensors) and give "
                "--model MODULE:CALLABLE --weights FILE")


def _torch_load(path: Path, arg: str, trust_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        pickled_objects = ("weights_only" in text or "Unsupported global" in text or "GLOBAL" in text
                           or type(e).__name__ == "UnpicklingError")
        if not pickled_objects:
            raise DataError(f"{arg}: {path}: not a readable torch file ({type(e).__name__}: "
                            f"{text.splitlines()[0] if text else ''})") from None
        if not trust_pickle:
            raise DataError(f"{arg}: {path}: holds pickled Python objects (a whole model saved with "
                            f"torch.save(model)?), not just tensors; {_PICKLE_HINT}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise DataError(f"{arg}: {path}: --trust-pickle: loading raised {type(e).__name__}: {e}") from None


def read_state_dict(path: Path, arg: str = "--weights", trust_pickle: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The state dict in ``path`` (``module.`` stripped) and metadata (format, sha256, best_prec1 if any)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{arg}: {path}: file not found")
    fmt = sniff_format(path)
    meta: Dict[str, Any] = {"path": str(path), "sha256": models.sha256_file(path), "format": fmt}
    if fmt == "safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise DataError(f"{arg}: {path} is a safetensors file; pip install safetensors to read it") from None
        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as e:
            raise DataError(f"{arg}: {path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    elif fmt in ("zip", "pickle"):
        obj = _torch_load(path, arg, trust_pickle)
    else:
        raise DataError(f"{arg}: {path}: not a torch checkpoint or safetensors file (its first bytes match neither "
                        "format; the extension is not used)")
    if isinstance(obj, nn.Module):
        raise DataError(f"{arg}: {path} holds a whole pickled model, not a state dict: give it as --model FILE "
                        "--trust-pickle instead")
    state = obj
    if isinstance(obj, Mapping) and not _is_state(obj):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), Mapping) and _is_state(obj[key]):
                state = obj[key]
                meta["key"] = key
                break
        else:
            keys = ", ".join(map(str, list(obj)[:8]))
            raise DataError(f"{arg}: {path}: a dict without a state dict: no tensors at the top level and none of "
                            f"the usual keys ({', '.join(STATE_DICT_KEYS)}); it has: {keys}")
        if "best_prec1" in obj:
            try:
                meta["best_prec1"] = float(obj["best_prec1"])
            except (TypeError, ValueError):
                pass
    if not isinstance(state, Mapping):
        raise DataError(f"{arg}: {path}: holds a {type(state).__name__}, not a state dict")
    prefix = "module."
    if state and all(str(k).startswith(prefix) for k in state):
        state = {str(k)[len(prefix):]: v for k, v in state.items()}
        meta["stripped_prefix"] = prefix
    return {str(k): v for k, v in state.items()}, meta


def _is_state(d: Mapping) -> bool:
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, arg: str = "--weights") -> None:
    """Strict load; one DataError listing missing, unexpected and mis-shaped keys (first few, and counts)."""
    own = model.state_dict()
    # BatchNorm fills in a missing num_batches_tracked itself (checkpoints older than torch 0.4.1 lack it)
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", shapes)):
            if items:
                more = f", … ({len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:_LIST_LIMIT])}{more}")
        raise DataError(f"{arg}: {path}: weights do not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(dict(state), strict=True)


# ----------------------------------------------------------------------------------------------- model files
def read_model_file(path: Path) -> ModelSpec:
    """A model file (YAML) -> ModelSpec with paths made relative to the file's folder. Errors name file:field."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--model: {path}: cannot read ({e})") from None
    except yaml.YAMLError as e:
        raise UsageError(f"--model: {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{path}: a model file is a mapping with at least 'model:'")
    unknown = sorted(set(doc) - _MODEL_FILE_FIELDS)
    if unknown:
        raise UsageError(f"{path}: {unknown[0]}: unknown field (known: {', '.join(sorted(_MODEL_FILE_FIELDS))})")
    src = doc.get("model")
    if not isinstance(src, str) or not src:
        raise UsageError(f"{path}: model: required, a built-in name, MODULE:CALLABLE or a checkpoint file")
    if src.endswith((".yaml", ".yml")):
        raise UsageError(f"{path}: model: a model file cannot name another model file ({src})")
    base = path.resolve().parent
    mod, sep, attr = src.rpartition(":")
    if sep and (mod.endswith(".py") or "/" in mod) and not Path(mod).is_absolute():
        src = f"{base / mod}:{attr}"
    elif not sep and src not in _builtin_names() and not Path(src).is_absolute():
        src = str(base / src)
    args = doc.get("args") or {}
    if not isinstance(args, dict) or not all(isinstance(k, str) and k.isidentifier() for k in args):
        raise UsageError(f"{path}: args: a mapping of keyword arguments for the factory")
    weights = doc.get("weights")
    if weights is not None:
        if not isinstance(weights, str):
            raise UsageError(f"{path}: weights: a file path")
        weights = str(Path(weights) if Path(weights).is_absolute() else base / weights)
    shape = None
    if "input_shape" in doc and "input_size" in doc:
        raise UsageError(f"{path}: input_shape and input_size: give one of them")
    if "input_shape" in doc:
        v = doc["input_shape"]
        shape = _check_shape(v if isinstance(v, list) else [v], f"{path}: input_shape")
    elif "input_size" in doc:
        v = doc["input_size"]
        hw = v if isinstance(v, list) else [v, v]
        if len(hw) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in hw):
            raise UsageError(f"{path}: input_size: an integer or [H, W], got {v!r}")
        shape = _check_shape([1, 3, hw[0], hw[1]], f"{path}: input_size")
    prep = doc.get("preprocess")
    if prep is not None and not isinstance(prep, dict):
        raise UsageError(f"{path}: preprocess: a mapping (resize, center_crop, mean, std)")
    classes = doc.get("classes")
    if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, (str, int)) for c in classes)):
        raise UsageError(f"{path}: classes: a list of class names")
    task = doc.get("task")
    if task is not None and task not in TASKS:
        raise UsageError(f"{path}: task: one of {', '.join(TASKS)}, got {task!r}")
    ignore = doc.get("ignore_layers") or []
    if isinstance(ignore, str):
        ignore = [ignore]
    if not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
        raise UsageError(f"{path}: ignore_layers: a list of layer name patterns")
    trust = doc.get("trust_pickle", False)
    if not isinstance(trust, bool):
        raise UsageError(f"{path}: trust_pickle: true or false")
    return ModelSpec(source=src, args=dict(args), weights=weights, trust_pickle=trust, input_shape=shape,
                     preprocess=prep, classes=[str(c) for c in classes] if classes else None, task=task,
                     ignore_layers=list(ignore))


def _builtin_names() -> List[str]:
    return sorted(models.MODELS) + sorted(zoo.ARCHS)


def merge(file_spec: ModelSpec, cli: ModelSpec) -> ModelSpec:
    """Flags given on the command line override the model file's fields (arguments merge, CLI winning)."""
    return ModelSpec(source=file_spec.source, args={**file_spec.args, **cli.args},
                     weights=cli.weights or file_spec.weights, trust_pickle=cli.trust_pickle or file_spec.trust_pickle,
                     input_shape=cli.input_shape or file_spec.input_shape,
                     preprocess=cli.preprocess or file_spec.preprocess, classes=cli.classes or file_spec.classes,
                     task=cli.task or file_spec.task, ignore_layers=list(file_spec.ignore_layers) + list(cli.ignore_layers))


# ---------------------------------------------------------------------------------------------------- resolve
def resolve(spec: ModelSpec) -> LoadedModel:
    """Load the model ``spec`` describes (see the module docstring); every failure is one UsageError/DataError
    naming the argument or file (and the module or callable it could not find)."""
    file_meta: Dict[str, Any] = {}
    if spec.source.endswith((".yaml", ".yml")):
        p = Path(spec.source).expanduser()
        if not p.is_file():
            raise UsageError(f"--model: model file {spec.source!r} not found")
        file_spec = read_model_file(p)
        file_meta = {"model_file": str(p), "model_file_sha256": models.sha256_file(p)}
        spec = merge(file_spec, ModelSpec(source=file_spec.source, args=spec.args, weights=spec.weights,
                                          trust_pickle=spec.trust_pickle, input_shape=spec.input_shape,
                                          preprocess=spec.preprocess, classes=spec.classes, task=spec.task,
                                          ignore_layers=spec.ignore_layers))
    loaded = _resolve_source(spec)
    loaded.meta.update(file_meta)
    loaded.recipe.update(file_meta)
    if spec.input_shape is not None:
        loaded.input_shape = spec.input_shape
    loaded.preprocess = spec.preprocess
    loaded.classes = spec.classes
    loaded.task = spec.task or "classification"
    loaded.ignore_layers = list(spec.ignore_layers)
    loaded.recipe.update(input_shape=list(loaded.input_shape), task=loaded.task)
    _check_runs(loaded, "--input-shape" if spec.input_shape else "--model")
    return loaded


def _resolve_source(spec: ModelSpec) -> LoadedModel:
    src = spec.source
    if src in models.MODELS and spec.weights is None and not spec.args:
        model, meta = models.pretrained(src)
        return LoadedModel(src, model, data.INPUT_SHAPE, dict(meta), {"kind": "builtin", "name": src,
                           "weights_sha256": meta["sha256"]}, builtin=True)
    if src in models.MODELS or src in zoo.ARCHS:
        factory = models.MODELS.get(src) or zoo.ARCHS[src]
        model = _call_factory(factory, src, spec.args, "--model")
        shape = data.INPUT_SHAPE if src in models.MODELS else (1, 3, zoo.INPUT_SIZE[src], zoo.INPUT_SIZE[src])
        return _finish(src, model, shape, spec, {"kind": "builtin", "name": src, "args": dict(spec.args)})
    if ":" in src and not Path(src).exists():
        factory, canon = import_callable(src)
        model = _call_factory(factory, canon, spec.args, "--model")
        name = _short_name(canon, spec.args)
        shape = spec.input_shape or _guess_shape(model)
        return _finish(name, model, shape, spec, {"kind": "callable", "factory": canon, "args": dict(spec.args)})
    path = Path(src).expanduser()
    if not path.is_file():
        raise UsageError(f"--model: {src!r} is neither a built-in model ({', '.join(_builtin_names())}), "
                         "MODULE:CALLABLE, a model file (.yaml) nor an existing checkpoint file")
    if spec.args:
        raise UsageError("--model-arg: only a factory (built-in name or MODULE:CALLABLE) takes arguments")
    fmt = sniff_format(path)
    obj = None
    if fmt in ("zip", "pickle"):
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            obj = _torch_load(path, "--model", spec.trust_pickle)  # refuses unless --trust-pickle
    if isinstance(obj, nn.Module):
        meta = {"path": str(path), "sha256": models.sha256_file(path), "format": "pickled-module"}
        model = obj
        if spec.weights:
            state, wmeta = read_state_dict(Path(spec.weights), trust_pickle=spec.trust_pickle)
            load_weights(model, state, Path(spec.weights))
            meta.update(weights=wmeta["path"], weights_sha256=wmeta["sha256"])
        return LoadedModel(path.stem, model.eval(), spec.input_shape or _guess_shape(model), meta,
                           {"kind": "pickled-module", "path": str(path), "sha256": meta["sha256"]})
    if obj is not None:
        raise DataError(f"--model: {path}: holds a {type(obj).__name__}, not a model")
    if spec.weights:
        raise UsageError("--weights: a checkpoint given as --model already has its weights; give a factory "
                         "(built-in name or MODULE:CALLABLE) with --weights")
    name, model, meta = models.model_from_checkpoint(path)
    return LoadedModel(name, model, data.INPUT_SHAPE, dict(meta), {"kind": "checkpoint", "name": name,
                       "path": str(path), "weights_sha256": meta["sha256"]}, builtin=True)


_GENERIC = {"build", "create", "create_model", "get_model", "model", "make_model", "net", "main"}


def _short_name(canon: str, args: Mapping[str, Any]) -> str:
    """A name for tags and tables: the callable's, or its module's when the callable's is generic (``build``);
    ``timm:create_model --model-arg model_name=X`` is X."""
    mod, _, attr = canon.rpartition(":")
    if isinstance(args.get("model_name"), str):
        name = str(args["model_name"])
    else:
        name = attr.split(".")[-1]
        if name.lower() in _GENERIC:
            name = Path(mod).stem if mod.endswith(".py") else mod.split(".")[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def _finish(name: str, model: nn.Module, shape: Tuple[int, int, int, int], spec: ModelSpec,
            recipe: Dict[str, Any]) -> LoadedModel:
    meta: Dict[str, Any] = {}
    if spec.weights:
        state, wmeta = read_state_dict(Path(spec.weights), trust_pickle=spec.trust_pickle)
        load_weights(model, state, Path(spec.weights))
        meta.update(path=wmeta["path"], sha256=wmeta["sha256"], weights_format=wmeta["format"])
        if "best_prec1" in wmeta:
            meta["best_prec1"] = wmeta["best_prec1"]
        recipe.update(weights=wmeta["path"], weights_sha256=wmeta["sha256"])
    else:
        # no weights file: the factory's own weights (seeded random for the zoo); identify them by content
        h = hashlib.sha256()
        for k, v in model.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        meta.update(path=None, sha256=h.hexdigest(), weights_source="factory")
        recipe.update(weights=None, weights_sha256=meta["sha256"])
    return LoadedModel(name, model.eval(), spec.input_shape or shape, meta, recipe)


def _guess_shape(model: nn.Module) -> Tuple[int, int, int, int]:
    """Without --input-size: the first conv's input channels at 224x224 (what most vision models take)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return (1, conv.in_channels if conv is not None else 3, 224, 224)


def _check_runs(loaded: LoadedModel, arg: str) -> None:
    """One forward pass on the example input; a model that rejects the shape is one clear error."""
    try:
        with torch.no_grad():
            out = loaded.model(loaded.example)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UsageError(f"{arg}: the model rejects input shape {list(loaded.input_shape)} "
                         f"({type(e).__name__}: {first}); give the size it takes with --input-size H[xW] or "
                         "--input-shape N,C,H,W") from None
    outs = flatten_outputs(out)
    if not outs:
        raise UsageError(f"{arg}: the model's forward returned {type(out).__name__}: no tensor outputs")
    loaded.meta["outputs"] = [list(o.shape[1:]) for o in outs]


def flatten_outputs(out: Any) -> List[torch.Tensor]:
    """A forward's result as a list of tensors, in the order the ONNX exporter emits them (tuple/list order,
    dict insertion order)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in flatten_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten_outputs(v)]
    return []


def describe(loaded: LoadedModel) -> str:
    r = loaded.recipe
    what = {"builtin": f"built-in {r.get('name')}", "callable": f"factory {r.get('factory')}",
            "checkpoint": f"checkpoint {r.get('path')}", "pickled-module": f"pickled module {r.get('path')}"}
    text = what.get(r.get("kind", ""), str(r.get("kind")))
    if r.get("args"):
        text += f"({_kwargs(r['args'])})"
    if r.get("weights"):
        text += f", weights {r['weights']} (sha256 {str(r.get('weights_sha256'))[:12]}…)"
    elif loaded.builtin:
        text += f", weights sha256 {str(loaded.meta.get('sha256'))[:12]}…"
    return text + f", input {list(loaded.input_shape)}"


def recipe_json(loaded: LoadedModel) -> str:
    return json.dumps(loaded.recipe, sort_keys=True, default=str)
