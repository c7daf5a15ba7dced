"""How host images become model inputs: resize and centre crop to the input size, then scale, mean and std.

Contract: :class:`Preprocess` holds the steps (``resize`` the shorter side, aspect kept, bilinear, as torchvision's
``Resize``; ``center_crop`` as ``CenterCrop``; then ``x * scale``, ``(x - mean) / std`` per channel).
:meth:`Preprocess.apply` brings one PIL image to uint8 H x W x C at exactly the input size, or raises
:class:`~edgeprune.errors.DataError` naming it; an image that already is H x W is neither resized nor cropped
(bit-identical). :meth:`Preprocess.to_dict` / :meth:`Preprocess.from_dict` are its record in manifests and runs;
:func:`parse_preprocess` builds it from the CLI's ``--resize``/``--center-crop``/``--mean``/``--std`` strings, with
:class:`~edgeprune.errors.UsageError` naming the flag. The scale/mean/std part runs in
:meth:`edgeprune.datasets.DataSource.to_tensor` here and in the agent on the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from .errors import DataError, UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_FRACTION = 0.875  # default resize = round(max(H, W) / 0.875): 256 for 224 x 224
HW = Tuple[int, int]


def one_line(e: BaseException) -> str:
    """An exception as one line: ``Type: message``, newlines removed."""
    return ("%s: %s" % (type(e).__name__, e)).replace("\n", " ").strip().rstrip(":")


@dataclass
class Preprocess:
    """Host-side resize + centre crop for images, then ``x * scale``, ``(x - mean) / std`` per channel."""

    resize: Optional[int] = None  # shorter side to this many pixels, aspect kept (None: no resize)
    center_crop: Optional[HW] = None  # (H, W); None: no crop
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    scale: float = 1.0 / 255.0

    @classmethod
    def default(cls, input_hw: Sequence[int]) -> "Preprocess":
        """ImageNet mean/std; resize to round(max(H, W) / 0.875) (256 for 224 x 224), centre crop H x W. The max, not
        the min, so that a non-square crop never needs padding: both resized sides are >= max(H, W)."""
        h, w = int(input_hw[0]), int(input_hw[1])
        return cls(resize=int(round(max(h, w) / CROP_FRACTION)), center_crop=(h, w))

    def to_dict(self) -> Dict[str, Any]:
        return {"resize": self.resize, "center_crop": None if self.center_crop is None else list(self.center_crop),
                "mean": list(self.mean), "std": list(self.std), "scale": self.scale}

    @classmethod
    def from_dict(cls, d: Dict[str, Any], input_hw: Optional[Sequence[int]] = None) -> "Preprocess":
        """The inverse of :meth:`to_dict`. ``center_crop`` may also be one int (a model file's ``224``); ``scale``
        defaults to 1/255; with ``input_hw``, any other missing key takes :meth:`default`'s value."""
        base = cls.default(input_hw).to_dict() if input_hw is not None else {"scale": 1.0 / 255.0}
        missing = [k for k in ("resize", "center_crop", "mean", "std") if k not in d and k not in base]
        if missing:
            raise DataError("preprocess record: missing %s" % ", ".join(map(repr, missing)))
        d = dict(base, **d)
        try:
            crop = d["center_crop"]
            crop = None if crop is None else (int(crop), int(crop)) if isinstance(crop, (int, float)) else \
                (int(crop[0]), int(crop[-1]))
            return cls(resize=None if d["resize"] is None else int(d["resize"]), center_crop=crop,
                       mean=tuple(float(v) for v in d["mean"]), std=tuple(float(v) for v in d["std"]),
                       scale=float(d["scale"]))
        except (TypeError, ValueError, IndexError) as e:
            raise DataError("preprocess record: %s (%s)" % (one_line(e), {k: d[k] for k in sorted(d)})) from None

    def apply(self, img, input_hw: Sequence[int], where: str) -> np.ndarray:
        """A PIL image -> uint8 H x W x C at exactly ``input_hw`` (``where`` names it in errors)."""
        from PIL import Image

        h, w = int(input_hw[0]), int(input_hw[1])
        if img.size != (w, h):
            got = img.size
            if self.resize is not None:
                iw, ih = img.size
                short, long = min(iw, ih), max(iw, ih)
                if short != self.resize:  # as torchvision: long side int(resize * long / short)
                    new_long = int(self.resize * long / short)
                    size = (self.resize, new_long) if iw <= ih else (new_long, self.resize)
                    img = img.resize(size, Image.BILINEAR)
            if self.center_crop is not None:
                ch, cw = self.center_crop
                iw, ih = img.size
                left, top = _crop_offset(iw, cw), _crop_offset(ih, ch)  # outside the image: zero padding
                img = img.crop((left, top, left + cw, top + ch))
            if img.size != (w, h):
                raise DataError("%s: image is %dx%d, %dx%d after resize/crop, but the model input is %dx%d; "
                                "set --resize/--center-crop" % (where, got[1], got[0], img.size[1], img.size[0], h, w))
        a = np.asarray(img, dtype=np.uint8)
        return a[:, :, None] if a.ndim == 2 else a


def _crop_offset(size: int, crop: int) -> int:
    """torchvision's CenterCrop offset: padded symmetrically when the crop is larger, else centred (rounded)."""
    return -((crop - size) // 2) if crop > size else int(round((size - crop) / 2.0))


def _numbers(text: str, arg: str, channels: int) -> Tuple[float, ...]:
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if len(parts) != channels:
        raise UsageError("%s: expected %d comma-separated numbers (one per input channel), got %d"
                         % (arg, channels, len(parts)))
    try:
        vals = tuple(float(p) for p in parts)
    except ValueError:
        raise UsageError("%s: expected numbers like 0.5,0.5,0.5, got %r" % (arg, text)) from None
    if not all(np.isfinite(vals)):
        raise UsageError("%s: numbers must be finite, got %r" % (arg, text))
    return vals


def _pixels(text: str, arg: str, expected: str, most: int = 1) -> Optional[Tuple[int, ...]]:
    """``"none"`` -> None; ``"224"`` / ``"224x200"`` -> positive ints (at most ``most`` of them)."""
    t = str(text).strip().lower()
    if t == "none":
        return None
    try:
        vals = tuple(int(d) for d in t.split("x"))
    except ValueError:
        vals = ()
    if not 1 <= len(vals) <= most or min(vals) <= 0:
        raise UsageError("%s: expected %s, got %r" % (arg, expected, text))
    return vals


def parse_preprocess(resize: Optional[str], center_crop: Optional[str], mean: Optional[str], std: Optional[str],
                     input_hw: Sequence[int], channels: int = 3) -> Preprocess:
    """:class:`Preprocess` from CLI strings; None takes the default for ``input_hw``, ``"none"`` turns a step off.

    ``resize``: ``"256"``; ``center_crop``: ``"224"`` or ``"224x200"`` (H x W, must be the input size: the crop is
    the last step); ``mean``/``std``: ``"0.5,0.5,0.5"``, one number per channel (the ImageNet default is for 3)."""
    h, w = int(input_hw[0]), int(input_hw[1])
    p = Preprocess.default((h, w))
    if resize is not None:
        r = _pixels(resize, "--resize", "a positive whole number of pixels (the shorter side) or 'none'")
        p.resize = None if r is None else r[0]
    if center_crop is not None:
        c = _pixels(center_crop, "--center-crop", "SIZE or HxW in pixels (e.g. 224 or 224x200) or 'none'", 2)
        p.center_crop = None if c is None else (c[0], c[-1])
        if p.center_crop is not None and p.center_crop != (h, w):
            raise UsageError("--center-crop: %dx%d is not the model input %dx%d (the crop is the last step)"
                             % (p.center_crop + (h, w)))
    if p.resize is not None and p.center_crop is not None and p.resize < max(p.center_crop):
        raise UsageError("--resize: %d is smaller than the crop %dx%d; images would be padded"
                         % ((p.resize,) + p.center_crop))
    for arg, text, default in (("--mean", mean, IMAGENET_MEAN), ("--std", std, IMAGENET_STD)):
        if text is None and channels != len(default):
            raise UsageError("%s: the default (ImageNet) is for 3 channels but the model input has %d; give %s"
                             % (arg, channels, arg))
        vals = default if text is None else _numbers(text, arg, channels)
        if arg == "--std" and min(vals) <= 0:
            raise UsageError("--std: every value must be > 0, got %r" % text)
        setattr(p, arg[2:], tuple(vals))
    return p
