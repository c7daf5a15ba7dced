"""Write the README's "Your own model and data" example into a folder (default ``example/``):

* ``images/<class>/*.png`` — 500 CIFAR-10 test images (50 per class) as a class-subfolder image folder, upscaled
  to 40x40 so that the model file's preprocessing (resize to 36, centre crop 32) has work to do;
* ``train/<class>/*.png`` — 1,000 CIFAR-10 training images (the bundled calibration subset), the same way, for
  recovery fine-tuning (``--finetune-data``);
* ``weights.th`` — the published ResNet-20 checkpoint (bundled with edgeprune; ``module.``-prefixed keys, as
  published);
* ``model.yaml`` — the model file: the factory in ``examples/cifar_resnet.py``, the weights, input size,
  preprocessing and class names.

    python examples/make_example.py            # then the commands in the README
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from edgeprune import data

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("example"), help="folder to write (default: example/)")
    p.add_argument("--per-class", type=int, default=50, help="images per class (default 50)")
    args = p.parse_args()
    out = args.out
    ev = data.eval_split(args.per_class)          # bundled: 100 per class at most without ../shared/data
    train = data.calib_split()
    for name, split in (("images", ev), ("train", train)):
        for i, (img, label) in enumerate(zip(split.images, split.labels)):
            folder = out / name / f"{label}-{CLASSES[label]}"   # sorted folder names = label order
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(img)).resize((40, 40), Image.BICUBIC).save(folder / f"{i:05d}.png")
    shutil.copyfile(data.ASSETS / "resnet20-12fca82f.th", out / "weights.th")
    (out / "model.yaml").write_text(
        "# edgeprune model file: --model model.yaml reproduces a run (paths are relative to this file)\n"
        f"model: {HERE / 'cifar_resnet.py'}:resnet20\n"
        "weights: weights.th\n"
        "input_size: 32\n"
        "preprocess: {resize: 36, center_crop: 32, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}\n"
        f"classes: [{', '.join(f'{k}-{c}' for k, c in enumerate(CLASSES))}]\n"
        "task: classification\n")
    print(f"wrote {out / 'images'} ({len(ev)} images in {len(CLASSES)} class folders), {out / 'train'} "
          f"({len(train)} images), {out / 'weights.th'} and {out / 'model.yaml'}")


if __name__ == "__main__":
    main()
