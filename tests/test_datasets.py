"""edgeprune.datasets: image folders, npz files and MODULE:CALLABLE datasets; preprocessing; splits; memory."""
from __future__ import annotations

import hashlib
import json
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeprune import data, datasets, preprocess
from edgeprune.datasets import Preprocess, open_source, parse_preprocess, split_indices
from edgeprune.errors import DataError, UsageError

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def rgb(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth-ish random image (JPEG-friendly) as uint8 h x w x 3."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 127 // max(h + w - 2, 1))], -1)
    return np.clip(base + rng.integers(-20, 20, size=(h, w, 3)), 0, 255).astype(np.uint8)


def write(path: Path, arr: np.ndarray, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    kw = {"lossless": True} if fmt == "WEBP" else {}
    Image.fromarray(arr).save(path, fmt, **kw)
    return path


def reference(arr: np.ndarray, resize: int, crop: tuple) -> list:
    """Independent Resize(shorter side) + CenterCrop: the candidate crops (offset rounding may go either way)."""
    h, w = arr.shape[:2]
    if h <= w:
        size = (int(resize * w / h), resize)
    else:
        size = (resize, int(resize * h / w))
    big = np.asarray(Image.fromarray(arr).resize(size, Image.BILINEAR))
    ch, cw = crop
    dh, dw = big.shape[0] - ch, big.shape[1] - cw
    return [big[t:t + ch, l:l + cw] for t in {dh // 2, (dh + 1) // 2} for l in {dw // 2, (dw + 1) // 2}]


@pytest.fixture
def folder(tmp_path):
    """3 classes created out of order; PNG/JPEG/WebP, various sizes; one PNG per class already 48x40."""
    root = tmp_path / "imgs"
    arrays = {}
    specs = [("zebra", "a.png", (48, 40), "PNG"), ("zebra", "b.JPG", (90, 120), "JPEG"),
             ("ant", "x.webp", (70, 50), "WEBP"), ("ant", "y.png", (48, 40), "PNG"),
             ("ant", "sub/z.jpeg", (200, 64), "JPEG"), ("moth", "m.png", (48, 40), "PNG")]
    for k, (cls, name, (h, w), fmt) in enumerate(specs):
        arrays[f"{cls}/{name}"] = rgb(h, w, k)
        write(root / cls / name, arrays[f"{cls}/{name}"], fmt)
    (root / "ant" / ".DS_Store").write_bytes(b"junk")  # hidden files and folders: skipped
    (root / "ant" / ".cache").mkdir()
    (root / "ant" / ".cache" / "thumbs.db").write_bytes(b"junk")
    (root / ".ipynb_checkpoints").mkdir()
    (root / "README.txt").write_text("files directly in the root are ignored, as ImageFolder does")
    return root, arrays


HW = (48, 40)


def default_pre():
    return Preprocess.default(HW)


# ----------------------------------------------------------------------------------------------- preprocess
def test_preprocess_defaults_and_record_roundtrip():
    p = Preprocess.default((224, 224))
    assert (p.resize, p.center_crop, p.mean, p.std) == (256, (224, 224), preprocess.IMAGENET_MEAN,
                                                        preprocess.IMAGENET_STD)
    d = json.loads(json.dumps(p.to_dict()))
    assert set(d) == {"resize", "center_crop", "mean", "std", "scale"}
    assert Preprocess.from_dict(d) == p
    assert Preprocess.default((224, 200)).resize == 256  # max(H, W): a non-square crop is never padded
    assert Preprocess.from_dict({k: v for k, v in d.items() if k != "scale"}) == p
    with pytest.raises(DataError, match="missing 'mean'"):
        Preprocess.from_dict({k: v for k, v in d.items() if k != "mean"})
    # a model file's shorthand: center_crop one int, the rest from the input size's defaults
    assert Preprocess.from_dict({"resize": 256, "center_crop": 224}, (224, 224)) == p
    assert Preprocess.from_dict({"mean": [0.5] * 3}, (224, 224)).mean == (0.5,) * 3
    with pytest.raises(DataError, match="preprocess record: "):
        Preprocess.from_dict(dict(d, mean=0.5))


def test_parse_preprocess():
    p = parse_preprocess("256", "224", "0.5,0.5,0.5", "0.25, 0.25, 0.25", (224, 224))
    assert (p.resize, p.center_crop, p.mean, p.std) == (256, (224, 224), (0.5,) * 3, (0.25,) * 3)
    assert parse_preprocess(None, "224x200", None, None, (224, 200)).center_crop == (224, 200)
    assert parse_preprocess(None, None, None, None, (224, 224)) == Preprocess.default((224, 224))
    q = parse_preprocess("none", "none", "0.5", "0.5", (28, 28), channels=1)
    assert (q.resize, q.center_crop, q.mean) == (None, None, (0.5,))


@pytest.mark.parametrize("args, msg", [
    (dict(mean="0.5,0.5"), r"^--mean: expected 3 comma-separated numbers \(one per input channel\), got 2$"),
    (dict(std="0.2,0,0.2"), r"^--std: every value must be > 0"),
    (dict(std="0.2,-1,0.2"), r"^--std: every value must be > 0"),
    (dict(mean="a,b,c"), r"^--mean: expected numbers"),
    (dict(resize="abc"), r"^--resize: expected a positive whole number .* got 'abc'"),
    (dict(resize="-3"), r"^--resize: expected a positive whole number"),
    (dict(resize="200"), r"^--resize: 200 is smaller than the crop 224x224"),
    (dict(center_crop="22x"), r"^--center-crop: expected SIZE or HxW"),
    (dict(center_crop="200"), r"^--center-crop: 200x200 is not the model input 224x224"),
    (dict(channels=1), r"^--mean: the default \(ImageNet\) is for 3 channels but the model input has 1"),
])
def test_parse_preprocess_errors(args, msg):
    kw = dict(resize=None, center_crop=None, mean=None, std=None, input_hw=(224, 224))
    kw.update(args)
    with pytest.raises(UsageError, match=msg):
        parse_preprocess(**kw)


# ---------------------------------------------------------------------------------------------- image folder
def test_folder_classes_labels_and_images(folder):
    root, arrays = folder
    src = open_source(str(root), input_hw=HW, preprocess=default_pre())
    assert (src.kind, src.name, src.classes, len(src)) == ("folder", str(root), ["ant", "moth", "zebra"], 6)
    # as ImageFolder: sorted(os.walk(class folder)), so a class folder's own files come before its subfolders'
    assert src.files == ["ant/x.webp", "ant/y.png", "ant/sub/z.jpeg", "moth/m.png", "zebra/a.png", "zebra/b.JPG"]
    assert src.labels().tolist() == [0, 0, 0, 1, 2, 2] and src.labels().dtype == np.int64
    assert not src.is_preprocessed
    got = {}
    for x, y in src.batches(np.arange(6), 4):
        assert x.dtype == np.uint8 and x.shape[1:] == (48, 40, 3) and y.dtype == np.int64
        got.update({src.files[len(got) + k]: x[k] for k in range(len(x))})
    # already 48x40: bit-identical, not resized
    for rel in ("ant/y.png", "moth/m.png", "zebra/a.png"):
        assert np.array_equal(got[rel], arrays[rel])
    # lossless WebP 70x50 -> resized (shorter side 55) and cropped, as the independent reference
    assert any(np.array_equal(got["ant/x.webp"], r) for r in reference(arrays["ant/x.webp"], 55, HW))
    # JPEG: the reference is computed from the same decoded file (JPEG is lossy)
    for rel in ("zebra/b.JPG", "ant/sub/z.jpeg"):
        decoded = np.asarray(Image.open(root / rel).convert("RGB"))
        assert any(np.array_equal(got[rel], r) for r in reference(decoded, 55, HW))


def test_resize_crop_matches_reference_224():
    pre = Preprocess.default((224, 224))
    for h, w in [(375, 500), (500, 333), (300, 300), (224, 300), (100, 150)]:
        arr = rgb(h, w, h * w)
        out = pre.apply(Image.fromarray(arr), (224, 224), "x")
        assert out.shape == (224, 224, 3)
        assert any(np.array_equal(out, r) for r in reference(arr, 256, (224, 224))), (h, w)
    arr = rgb(224, 224, 1)
    assert np.array_equal(pre.apply(Image.fromarray(arr), (224, 224), "x"), arr)


def test_labels_need_no_decoding(folder, monkeypatch):
    root, _ = folder

    def no_decode(*a, **k):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(Image, "open", no_decode)
    src = open_source(str(root), input_hw=HW, preprocess=default_pre())
    assert src.labels().tolist() == [0, 0, 0, 1, 2, 2]
    assert len(src.fingerprint()) == 64
    with pytest.raises(DataError, match=r"x.webp: cannot decode image \(AssertionError: an image was decoded\)"):
        next(src.batches(np.arange(1), 1))


def test_folder_fingerprint_tracks_files(folder):
    root, arrays = folder
    a = open_source(str(root), input_hw=HW, preprocess=default_pre()).fingerprint()
    assert a == open_source(str(root), input_hw=HW, preprocess=default_pre()).fingerprint()
    write(root / "moth" / "n.png", arrays["moth/m.png"])
    assert open_source(str(root), input_hw=HW, preprocess=default_pre()).fingerprint() != a


def test_to_tensor_matches_cifar_normalisation(eval_split):
    src = datasets.FolderSource.__new__(datasets.FolderSource)
    datasets.DataSource.__init__(src, "x", (32, 32), Preprocess.default((32, 32)))
    imgs = eval_split.images[:8]
    assert np.allclose(src.to_tensor(imgs).numpy(), data.to_tensor_batch(imgs).numpy(), atol=1e-6)
    f = np.ones((2, 3, 32, 32), np.float32)
    assert np.array_equal(src.to_tensor(f).numpy(), f)


def test_cifar_bundled_npz_as_png_folder_round_trip(tmp_path, eval_split):
    images, labels = data.load_npz(data.ASSETS / data.BUNDLED_EVAL)
    root = tmp_path / "cifar"
    for i, (img, y) in enumerate(zip(images, labels)):
        write(root / f"{y}_{CIFAR_CLASSES[y]}" / f"{i:04d}.png", img)
    src = open_source(str(root), input_hw=(32, 32), preprocess=Preprocess.default((32, 32)))
    assert src.classes == [f"{k}_{c}" for k, c in enumerate(CIFAR_CLASSES)]
    order = np.array([int(Path(f).stem) for f in src.files])  # the folder lists by class, then by name
    assert np.array_equal(src.labels(), labels[order])
    xs, ys = zip(*src.batches(np.arange(len(src)), 128))
    assert np.array_equal(np.concatenate(xs), images[order]) and np.array_equal(np.concatenate(ys), labels[order])
    npz = open_source(str(data.ASSETS / data.BUNDLED_EVAL), input_hw=(32, 32), preprocess=Preprocess.default((32, 32)))
    assert np.array_equal(next(npz.batches(order[:50], 50))[0], images[order[:50]])


# ----------------------------------------------------------------------------------------------------- npz
def test_npz_images_labels_classes(tmp_path):
    imgs = np.stack([rgb(48, 40, i) for i in range(5)])
    p = tmp_path / "d.npz"
    np.savez(p, images=imgs, labels=np.array([1, 0, 1, 0, 1]), classes=np.array(["cat", "dog"]))
    src = open_source(str(p), input_hw=HW, preprocess=default_pre())
    assert (src.kind, src.classes, len(src), src.labels().tolist()) == ("npz", ["cat", "dog"], 5, [1, 0, 1, 0, 1])
    assert isinstance(src.data, np.memmap)  # read by index, not whole
    x, y = next(src.batches(np.array([4, 0]), 8))
    assert np.array_equal(x, imgs[[4, 0]]) and y.tolist() == [1, 1]
    assert src.fingerprint() == hashlib.sha256(p.read_bytes()).hexdigest()


def test_npz_resized_like_folder_and_compressed_and_unlabelled(tmp_path):
    imgs = np.stack([rgb(60, 80, i) for i in range(3)])
    p = tmp_path / "c.npz"
    np.savez_compressed(p, images=imgs)
    src = open_source(str(p), input_hw=HW, preprocess=default_pre())
    assert src.labels() is None and src.classes is None
    x, y = next(src.batches(np.arange(3), 3))
    assert y is None and x.shape == (3, 48, 40, 3)
    for k in range(3):
        assert any(np.array_equal(x[k], r) for r in reference(imgs[k], 55, HW))


def test_npz_inputs(tmp_path):
    inputs = np.random.default_rng(0).standard_normal((4, 3, 48, 40)).astype(np.float32)
    p = tmp_path / "i.npz"
    np.savez(p, inputs=inputs, labels=np.arange(4))
    src = open_source(str(p), input_hw=HW, preprocess=default_pre())
    assert src.is_preprocessed
    x, y = next(src.batches(np.arange(4), 4))
    assert x.dtype == np.float32 and np.array_equal(x, inputs) and np.array_equal(src.to_tensor(x).numpy(), inputs)
    np.savez(p, inputs=inputs[:, :, :40, :])
    with pytest.raises(DataError, match=r"^--data: .*i\.npz: inputs are float32 \(4, 3, 40, 40\) but the model input "
                                        r"wants float32 \(N, 3, 48, 40\)$"):
        open_source(str(p), input_hw=HW, preprocess=default_pre())


@pytest.mark.parametrize("arrays, msg", [
    (dict(labels=np.arange(3)), "needs one array 'images'"),
    (dict(images=np.zeros((2, 8, 8, 3), np.float32)), r"images must be uint8 N x H x W x 3, got float32"),
    (dict(images=np.zeros((2, 8, 8, 3), np.uint8), labels=np.arange(3)), "labels must be 2 integers"),
    (dict(images=np.zeros((2, 8, 8, 3), np.uint8), classes=np.array([1, 2])), "classes must be a vector of strings"),
])
def test_npz_errors(tmp_path, arrays, msg):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(DataError, match="^--eval-data: .*bad.npz: " + msg):
        open_source(str(p), input_hw=HW, preprocess=default_pre(), arg="--eval-data")


def test_npz_with_pickled_objects_refused(tmp_path):
    p = tmp_path / "obj.npz"
    np.savez(p, images=np.array([object()], dtype=object))
    with pytest.raises(DataError, match="not a readable npz file without pickle"):
        open_source(str(p), input_hw=HW, preprocess=default_pre())


# ------------------------------------------------------------------------------------------- MODULE:CALLABLE
DS_FILE = '''
import torch
from torch.utils.data import Dataset

class Squares(Dataset):
    classes = ["even", "odd"]
    def __len__(self):
        return 6
    def __getitem__(self, i):
        return torch.full((3, 48, 40), float(i)), i % 2

def build():
    return Squares()
'''


def test_callable_from_py_path(tmp_path):
    (tmp_path / "mydata").mkdir()
    f = tmp_path / "mydata" / "ds.py"
    f.write_text(DS_FILE)
    before = set(sys.modules)
    src = open_source(f"{f}:build", input_hw=HW, preprocess=default_pre())
    assert "ds" not in sys.modules and all(m.startswith("_edgeprune_user_") for m in set(sys.modules) - before)
    assert (src.kind, src.classes, len(src), src.is_preprocessed) == ("callable", ["even", "odd"], 6, True)
    assert src.labels().tolist() == [0, 1, 0, 1, 0, 1] and src.fingerprint() == f"callable:{f}:build"
    x, y = next(src.batches(np.array([5, 2]), 4))
    assert x.dtype == np.float32 and x.shape == (2, 3, 48, 40) and x[:, 0, 0, 0].tolist() == [5, 2]
    assert y.tolist() == [1, 0]
    # a second ds.py elsewhere is its own module, not the cached first one
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "ds.py").write_text(DS_FILE.replace('["even", "odd"]', '["x", "y"]'))
    assert open_source(str(tmp_path / "other" / "ds.py") + ":build", input_hw=HW,
                       preprocess=default_pre()).classes == ["x", "y"]


def test_callable_from_importable_module():
    from tests import user_data

    src = open_source("tests.user_data:build", input_hw=user_data.HW, preprocess=default_pre())
    assert src.classes == ["a", "b", "c"] and src.labels().tolist() == [i % 3 for i in range(10)]
    batches = list(src.batches(np.arange(10), 4))
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    un = open_source("tests.user_data:build_unlabelled", input_hw=user_data.HW, preprocess=default_pre())
    assert un.labels() is None and next(un.batches(np.arange(2), 2))[1] is None
    tg = open_source("tests.user_data:build_with_targets", input_hw=user_data.HW, preprocess=default_pre())
    calls = tg.dataset.calls
    assert tg.labels().tolist() == [i % 3 for i in range(10)] and tg.dataset.calls == calls  # from targets


@pytest.mark.parametrize("spec, msg", [
    ("no_such_pkg_xyz.ds:build", r"^--data: cannot import module 'no_such_pkg_xyz.ds' \(ModuleNotFoundError"),
    ("tests.user_data:nope", r"^--data: module 'tests.user_data' has no attribute 'nope'$"),
    ("tests.user_data:NOT_CALLABLE", r"^--data: tests.user_data:NOT_CALLABLE is int, not a callable$"),
    ("tests.user_data:build_raises",
     r"^--data: tests.user_data:build_raises raised ValueError: no such split 'val'$"),
    ("tests.user_data:build_list", r"^--data: tests.user_data:build_list returned list, not a torch Dataset "
                                   r"\(needs __len__ and __getitem__\)$"),
    ("tests.user_data:build_wrong_shape", r"^--data: tests.user_data:build_wrong_shape item 0 is Tensor \(3, 8, 8\); "
                                          r"expected a float tensor of shape \(3, 16, 12\)"),
    ("missing/ds.py:build", r"^--data: missing/ds.py: no such file"),
    ("/no/such/folder", r"^--data: /no/such/folder: no such folder or file"),
])
def test_callable_and_spec_errors(spec, msg):
    with pytest.raises(DataError, match=msg):
        open_source(spec, input_hw=(16, 12), preprocess=default_pre())


def test_callable_module_raising_on_import(tmp_path):
    f = tmp_path / "broken.py"
    f.write_text("import json\nraise RuntimeError('config missing')\n")
    before = set(sys.modules)
    with pytest.raises(DataError, match=r"^--data: importing module '.*broken.py' raised RuntimeError: "
                                        r"config missing$"):
        open_source(f"{f}:build", input_hw=HW, preprocess=default_pre())
    assert set(sys.modules) - before <= {"json"}
    g = tmp_path / "needsdep.py"
    g.write_text("import no_such_dep_xyz\n")
    with pytest.raises(DataError, match=r"^--data: importing module '.*needsdep.py' raised ModuleNotFoundError: "
                                        r"No module named 'no_such_dep_xyz'$"):
        open_source(f"{g}:build", input_hw=HW, preprocess=default_pre())


# ------------------------------------------------------------------------------------------------ bad folders
def test_folder_errors(tmp_path):
    pre = default_pre()

    def err(path, arg="--data"):
        with pytest.raises(DataError) as e:
            src = open_source(str(path), input_hw=HW, preprocess=pre, arg=arg)
            list(src.batches(np.arange(len(src)), 8))
        assert "\n" not in str(e.value)
        return str(e.value)

    assert err(tmp_path / "nope") == f"--data: {tmp_path / 'nope'}: no such folder or file (and not MODULE:CALLABLE)"
    (tmp_path / "empty").mkdir()
    assert "no class subfolders" in err(tmp_path / "empty") and "it is empty" in err(tmp_path / "empty")
    write(tmp_path / "flat" / "a.png", rgb(8, 8, 0))
    assert "1 files lie directly in it" in err(tmp_path / "flat")
    write(tmp_path / "noimg" / "cat" / "a.png", rgb(8, 8, 0))
    (tmp_path / "noimg" / "dog").mkdir()
    assert err(tmp_path / "noimg", "--finetune-data") == (
        f"--finetune-data: {tmp_path / 'noimg' / 'dog'}: class folder 'dog' has no images (.jpg, .jpeg, .png, .webp)")
    write(tmp_path / "txt" / "cat" / "a.png", rgb(8, 8, 0))
    (tmp_path / "txt" / "cat" / "notes.txt").write_text("hi")
    msg = err(tmp_path / "txt")
    assert msg.startswith(f"--data: {tmp_path / 'txt' / 'cat' / 'notes.txt'}: not an image, in class folder 'cat'")
    write(tmp_path / "bad" / "cat" / "a.png", rgb(48, 40, 0))
    (tmp_path / "bad" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert err(tmp_path / "bad").startswith(f"--data: {tmp_path / 'bad' / 'cat' / 'broken.jpg'}: cannot decode image")
    (tmp_path / "x.csv").write_text("a,b")
    assert "not a folder of images, an .npz file or MODULE:CALLABLE" in err(tmp_path / "x.csv")


def test_image_that_cannot_reach_input_size(tmp_path):
    write(tmp_path / "f" / "cat" / "a.png", rgb(60, 60, 0))
    pre = parse_preprocess("50", "none", None, None, HW)
    src = open_source(str(tmp_path / "f"), input_hw=HW, preprocess=pre)
    with pytest.raises(DataError, match=r"a.png: image is 60x60, 50x50 after resize/crop, but the model "
                                        r"input is 48x40"):
        next(src.batches(np.arange(1), 1))


def test_check_same_classes(tmp_path, folder):
    root, arrays = folder
    other = tmp_path / "ft"
    for cls in ("ant", "moth", "zebra"):
        write(other / cls / "a.png", arrays["moth/m.png"])
    a = open_source(str(root), input_hw=HW, preprocess=default_pre())
    b = open_source(str(other), input_hw=HW, preprocess=default_pre(), arg="--finetune-data")
    datasets.check_same_classes(a, b, "--data", "--finetune-data")
    (other / "moth").rename(other / "mouse")
    b = open_source(str(other), input_hw=HW, preprocess=default_pre())
    with pytest.raises(DataError, match=r"^--data and --finetune-data have different classes: class 1 is 'moth' in "
                                        r"--data \(.*imgs\) but 'mouse' in --finetune-data \(.*ft\)$"):
        datasets.check_same_classes(a, b, "--data", "--finetune-data")
    write(other / "zz" / "a.png", arrays["moth/m.png"])
    (other / "mouse").rename(other / "moth")
    b = open_source(str(other), input_hw=HW, preprocess=default_pre())
    with pytest.raises(DataError, match="--finetune-data .* has 4, --data .* has 3; first extra class 'zz'"):
        datasets.check_same_classes(a, b, "--data", "--finetune-data")


# ------------------------------------------------------------------------------------------------------ splits
def test_split_stratified_deterministic_proportional():
    labels = np.repeat(np.arange(4), [100, 50, 20, 10])
    a = split_indices(labels, len(labels), fraction=0.2, seed=3)
    assert np.array_equal(a, split_indices(labels, len(labels), fraction=0.2, seed=3))
    assert np.all(np.diff(a) > 0) and np.bincount(labels[a]).tolist() == [20, 10, 4, 2]
    assert not np.array_equal(a, split_indices(labels, len(labels), fraction=0.2, seed=4))
    b = split_indices(labels, len(labels), per_class=5, seed=3)
    assert np.bincount(labels[b]).tolist() == [5] * 4
    assert set(split_indices(labels, len(labels), per_class=3, seed=3)) <= set(b)  # a larger split extends it


def test_split_exclude_disjoint_and_errors():
    labels = np.repeat(np.arange(3), 10)
    calib = split_indices(labels, 30, per_class=4, seed=1)
    rest = split_indices(labels, 30, seed=1, exclude=calib)
    assert len(np.intersect1d(calib, rest)) == 0 and len(calib) + len(rest) == 30
    half = split_indices(labels, 30, fraction=0.5, seed=1, exclude=calib)
    assert np.bincount(labels[half]).tolist() == [3, 3, 3] and not len(np.intersect1d(half, calib))
    with pytest.raises(DataError, match="class 0 has 6 items left after excluding those already used; cannot take 7"):
        split_indices(labels, 30, per_class=7, seed=1, exclude=calib)
    with pytest.raises(DataError, match="class 0 has 10 items; cannot take 11 per class"):
        split_indices(labels, 30, per_class=11)
    with pytest.raises(UsageError, match="not both"):
        split_indices(labels, 30, fraction=0.5, per_class=2)
    u = split_indices(None, 50, fraction=0.3, seed=2)
    assert len(u) == 15 and np.array_equal(u, split_indices(None, 50, fraction=0.3, seed=2))
    assert len(np.intersect1d(u, split_indices(None, 50, seed=2, exclude=u))) == 0


# ------------------------------------------------------------------------------------------------------ memory
def test_folder_batches_hold_one_batch_at_a_time(tmp_path):
    root = tmp_path / "many"
    rng = np.random.default_rng(0)
    for i in range(300):
        write(root / f"c{i % 3}" / f"{i:03d}.png", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    batch_bytes = 16 * 64 * 64 * 3
    total_bytes = 300 * 64 * 64 * 3  # 19 batches
    tracemalloc.start()  # numpy buffers are traced (Pillow's own pixel memory is not: one image at a time)
    try:
        src = open_source(str(root), input_hw=(64, 64), preprocess=Preprocess.default((64, 64)))
        n = 0
        for x, y in src.batches(np.arange(len(src)), 16):
            n += len(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 300
    # the batch the caller holds + the one being decoded + Pillow's 64 KiB read buffer and the file list
    assert peak < 4 * batch_bytes < total_bytes / 4, (peak, batch_bytes)
