"""Rebuild the data and weights bundled in edgeprune/_assets from the full files in ../shared/data.

    python scripts/make_bundled_assets.py [DATA_DIR]

The bundled files let the demo and the tests run on a machine without ../shared. They are exactly the
``eval`` split (100 test images per class) and the ``calib`` split (100 training images per class) that
edgeprune.data selects from the full files, plus the ResNet-20 checkpoint (BSD-2-Clause, see LICENSE there).
"""
import shutil
import sys
from pathlib import Path

import numpy as np

from edgeprune import data
from edgeprune.models import sha256_file

src = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1].parent / "shared" / "data"
out = data.ASSETS
for name, fname, seed, bundle in ((data.TEST_FILE, data.BUNDLED_EVAL, data.EVAL_SEED, data.DEFAULT_EVAL_PER_CLASS),
                                  (data.TRAIN_FILE, data.BUNDLED_CALIB, data.TRAIN_SEED, data.DEFAULT_CALIB_PER_CLASS)):
    images, labels = data.load_npz(src / name)
    idx = data.stratified_indices(labels, bundle, seed)
    np.savez_compressed(out / fname, images=images[idx], labels=labels[idx])
    print(out / fname, len(idx), sha256_file(out / fname))
shutil.copyfile(src / "resnet20-12fca82f.th", out / "resnet20-12fca82f.th")
print(out / "resnet20-12fca82f.th", sha256_file(out / "resnet20-12fca82f.th"))
