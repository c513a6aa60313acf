"""Real-data loaders read their on-disk formats into the dataset contract of `cut.data`.

Every test writes a few tiny samples in the exact published format into tmp_path, so no dataset is
needed; one test also reads the real Fashion-MNIST files when the Debian package is installed.
"""

from __future__ import annotations

import gzip
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import skip_unless_installed
from PIL import Image

from cut.data import DATASETS, multifashion
from cut.data.cityscapes import Cityscapes
from cut.data.multifashion import MultiFashion, read_idx
from cut.data.nyuv2 import BGR_MEAN, NYUv2
from cut.data.taskonomy import Taskonomy

# ---------------------------------------------------------------- MultiFashion


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fashion_dir(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """Six 28x28 'garments' (a bright blob on a zero background) per split, labels 0..5."""
    rng = np.random.default_rng(0)
    items = np.zeros((6, 28, 28), dtype=np.uint8)
    for k in range(6):
        items[k, 4 + k : 20 + k, 6:22] = rng.integers(1, 256, size=(16, 16))
    labels = np.arange(6, dtype=np.uint8)
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", items)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return tmp_path, labels


def test_multifashion_contract_and_labels(tmp_path):
    root, labels = _fashion_dir(tmp_path)
    ds = MultiFashion("train", data_dir=root, num_samples=9, seed=0)
    assert DATASETS["multifashion"] is MultiFashion
    assert len(ds) == 9 and ds.input_size == (36, 36) and ds.in_channels == 1
    assert [(t.name, t.kind, t.num_classes) for t in ds.tasks] == [
        ("left", "classification", 10),
        ("right", "classification", 10),
        ("layout", "segmentation", 3),
    ]
    for i in range(len(ds)):
        image, targets = ds[i]
        assert image.shape == (1, 36, 36) and image.dtype == torch.float32
        assert targets["left"].dtype == torch.long and targets["left"].shape == ()
        assert int(targets["left"]) == labels[i % 6] == ds.attribute(i)
        assert int(targets["right"]) != int(targets["left"])  # the partner is another item
        assert targets["layout"].shape == (36, 36) and targets["layout"].dtype == torch.long


def test_multifashion_layout_matches_the_image(tmp_path):
    root, _ = _fashion_dir(tmp_path)
    ds = MultiFashion("test", data_dir=root, num_samples=12, seed=3)
    for i in range(len(ds)):
        image, targets = ds[i]
        combined, left, right = (torch.from_numpy(a.astype(np.int64)) for a in ds.canvas(i))
        expected_image = (combined.float() / 255.0 - multifashion.PIXEL_MEAN) / multifashion.PIXEL_STD
        assert torch.allclose(image[0], expected_image, atol=1e-5)
        layout = targets["layout"]
        assert torch.equal(layout == 0, combined == 0)  # background exactly where the canvas is dark
        assert torch.all(combined[layout == 1] == left[layout == 1])  # pixel comes from the left item
        assert torch.all(combined[layout == 2] == right[layout == 2])
        assert torch.all(left[layout == 2] < right[layout == 2])  # right wins only when brighter
        assert (layout == 1).any() and (layout == 2).any()
        # the left item sits towards the top-left, the right one towards the bottom-right
        _, cols_l = torch.nonzero(left).float().mean(0)
        _, cols_r = torch.nonzero(right).float().mean(0)
        assert cols_l <= cols_r


def test_multifashion_is_deterministic_by_seed(tmp_path):
    root, _ = _fashion_dir(tmp_path)

    def samples(seed: int) -> list:
        ds = MultiFashion("train", data_dir=root, num_samples=10, seed=seed)
        return [ds[i] for i in range(len(ds))]

    a, b, c = samples(0), samples(0), samples(1)
    for (xa, ta), (xb, tb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert any(
        not torch.equal(xa, xc) or int(ta["right"]) != int(tc["right"])
        for (xa, ta), (xc, tc) in zip(a, c, strict=True)
    )


def test_multifashion_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        MultiFashion("train", data_dir=tmp_path / "nowhere")
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message and "--data-dir" in message
    assert "train-images-idx3-ubyte" in message


def test_multifashion_rejects_bad_input(tmp_path):
    root, _ = _fashion_dir(tmp_path)
    with pytest.raises(ValueError):
        MultiFashion("train", data_dir=root, size=20)
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + b"\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="IDX"):
        read_idx(bad)


REAL_FASHION = multifashion.DEFAULT_DIR / "t10k-images-idx3-ubyte.gz"


def test_multifashion_real_files():
    skip_unless_installed(REAL_FASHION.is_file(), "Fashion-MNIST (dataset-fashion-mnist)")
    ds = MultiFashion("test", num_samples=200, seed=0)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    assert images.shape == (200, 1, 36, 36)
    assert abs(float(images.mean())) < 0.3 and 0.7 < float(images.std()) < 1.3
    assert len({ds.attribute(i) for i in range(len(ds))}) == 10
    _, targets = ds[5]
    assert torch.equal(targets["layout"] == 0, torch.from_numpy(ds.canvas(5)[0] == 0))
    assert ds.tasks[0].class_names[9] == "ankle boot"


# ---------------------------------------------------------------- NYUv2


def _write_nyu(root: Path, n: int = 2, h: int = 24, w: int = 32) -> list[dict]:
    rng = np.random.default_rng(1)
    raw = []
    for d in ("img", "seg", "normal_mask", "depth"):
        (root / d).mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        rgb = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        seg = np.full((h, w), 7, dtype=np.uint8)
        seg[:4] = 255
        seg[-3:, :5] = 39
        normal = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)  # no 255 anywhere ...
        normal[0, 0] = (128, 255, 10)  # ... but here: invalid
        normal[1, 1] = (127, 127, 254)  # almost +z
        depth = rng.uniform(0.5, 5.0, size=(h, w)).astype(np.float32)
        depth[2, 3] = 0.0
        depth[2, 4] = -1.0
        Image.fromarray(rgb).save(root / "img" / f"{i}.png")
        Image.fromarray(seg).save(root / "seg" / f"{i}.png")
        Image.fromarray(normal).save(root / "normal_mask" / f"{i}.png")
        np.save(root / "depth" / f"{i}.npy", depth)
        entries.append([f"img/{i}.png", f"seg/{i}.png", f"normal_mask/{i}.png", f"depth/{i}.npy"])
        raw.append({"rgb": rgb, "seg": seg, "normal": normal, "depth": depth})
    (root / "nyu_v2_3task.json").write_text(json.dumps({"train": entries, "test": entries[:1]}))
    return raw


def test_nyuv2_contract_and_invalid_pixels(tmp_path):
    raw = _write_nyu(tmp_path)
    ds = NYUv2("train", data_dir=tmp_path, std=1.0)
    assert DATASETS["nyuv2"] is NYUv2
    assert len(ds) == 2 and ds.input_size == (24, 32) and ds.in_channels == 3
    assert [(t.name, t.kind, t.num_classes) for t in ds.tasks] == [
        ("seg", "segmentation", 40),
        ("normals", "normals", 0),
        ("depth", "depth", 0),
    ]
    image, t = ds[0]
    assert image.shape == (3, 24, 32) and image.dtype == torch.float32
    r, g, b = raw[0]["rgb"][5, 6].astype(np.float32)
    assert torch.allclose(image[:, 5, 6], torch.tensor([b, g, r]) - torch.from_numpy(BGR_MEAN), atol=1e-3)
    assert t["seg"].dtype == torch.long and t["seg"].shape == (24, 32)
    assert torch.all(t["seg"][:4] == 255) and int(t["seg"][-1, 0]) == 39 and int(t["seg"][10, 10]) == 7
    n = t["normals"]
    assert n.shape == (3, 24, 32) and n.dtype == torch.float32
    assert torch.equal(n[:, 0, 0], torch.zeros(3))
    assert torch.allclose(n.norm(dim=0)[1:], torch.ones(23, 32), atol=1e-5)
    assert float(n[2, 1, 1]) > 0.99
    d = t["depth"]
    assert d.shape == (1, 24, 32) and d.dtype == torch.float32
    assert math.isnan(float(d[0, 2, 3])) and math.isnan(float(d[0, 2, 4]))
    assert float(d[0, 5, 5]) == pytest.approx(float(raw[0]["depth"][5, 5]))
    assert ds.attribute(1) == 7
    assert len(NYUv2("test", data_dir=tmp_path)) == 1


def test_nyuv2_default_scale_and_resize(tmp_path):
    _write_nyu(tmp_path)
    full = NYUv2("train", data_dir=tmp_path)[0][0]
    assert torch.allclose(full * 58.0, NYUv2("train", data_dir=tmp_path, std=1.0)[0][0], atol=1e-3)
    ds = NYUv2("train", data_dir=tmp_path, size=(12, 16))
    assert ds.input_size == (12, 16)
    image, t = ds[0]
    assert image.shape == (3, 12, 16) and t["seg"].shape == (12, 16)
    assert t["normals"].shape == (3, 12, 16) and t["depth"].shape == (1, 12, 16)
    assert set(t["seg"].unique().tolist()) <= {7, 39, 255}
    lengths = t["normals"].norm(dim=0)
    assert torch.all(((lengths - 1).abs() < 1e-5) | (lengths == 0))


def test_nyuv2_errors_name_the_missing_path(tmp_path):
    with pytest.raises(ValueError, match="data_dir"):
        NYUv2("train")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        NYUv2("train", data_dir=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nyu_v2_3task.json"):
        NYUv2("train", data_dir=tmp_path)
    _write_nyu(tmp_path)
    (tmp_path / "depth" / "1.npy").unlink()
    ds = NYUv2("train", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"depth/1\.npy"):
        ds[1]
    (tmp_path / "img" / "0.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"img/0\.png"):
        NYUv2("train", data_dir=tmp_path)


def test_nyuv2_rejects_labels_outside_the_format(tmp_path):
    _write_nyu(tmp_path)
    Image.fromarray(np.full((24, 32), 45, dtype=np.uint8)).save(tmp_path / "seg" / "1.png")
    with pytest.raises(ValueError, match="45"):
        NYUv2("train", data_dir=tmp_path)[1]


# ---------------------------------------------------------------- Cityscapes


def _write_cityscapes(root: Path, layout: str, h: int = 16, w: int = 32) -> dict:
    rng = np.random.default_rng(2)
    image = rng.uniform(0, 1, size=(h, w, 3)).astype(np.float32)
    label = rng.integers(0, 19, size=(h, w)).astype(np.int64)
    label[0, :] = -1
    label[1, 0] = 18
    depth = rng.uniform(0.01, 0.3, size=(h, w, 1)).astype(np.float32)
    depth[3, 3] = 0.0
    depth[3, 4] = 1e-5
    for d in ("image", "depth", "label"):
        (root / "train" / d).mkdir(parents=True, exist_ok=True)
    np.save(root / "train/image/0.npy", image)
    np.save(root / "train/label/0.npy", label)
    np.save(root / "train/depth/0.npy", depth)
    paths = {"image": "train/image/0.npy", "label": "train/label/0.npy", "depth": "train/depth/0.npy"}
    entry = {
        "dict": paths,
        "five": [paths["image"], paths["depth"], paths["label"], paths["label"], paths["label"]],
        "three": [paths["image"], paths["label"], paths["depth"]],
        "three_swapped": [paths["image"], paths["depth"], paths["label"]],
    }[layout]
    (root / "cityscape.json").write_text(json.dumps({"train": [entry, entry], "test": [entry]}))
    return {"image": image, "label": label, "depth": depth}


@pytest.mark.parametrize("layout", ["dict", "five", "three", "three_swapped"])
def test_cityscapes_layouts_and_ignore_handling(tmp_path, layout):
    raw = _write_cityscapes(tmp_path, layout)
    ds = Cityscapes("train", data_dir=tmp_path, std=1.0)
    assert DATASETS["cityscapes"] is Cityscapes
    assert len(ds) == 2 and ds.input_size == (16, 32) and ds.in_channels == 3
    assert [(t.name, t.kind, t.num_classes, t.ignore_index) for t in ds.tasks] == [
        ("seg", "segmentation", 19, 255),
        ("depth", "depth", 0, 255),
    ]
    image, t = ds[0]
    assert image.shape == (3, 16, 32) and image.dtype == torch.float32
    rgb = raw["image"][4, 5] * 255.0
    expected = torch.tensor(rgb[::-1].copy()) - torch.from_numpy(BGR_MEAN)
    assert torch.allclose(image[:, 4, 5], expected, atol=1e-3)
    seg = t["seg"]
    assert seg.dtype == torch.long and seg.shape == (16, 32)
    assert torch.all(seg[0] == 255) and int(seg[1, 0]) == 18
    assert torch.equal(seg[2:], torch.from_numpy(raw["label"][2:]))
    d = t["depth"]
    assert d.shape == (1, 16, 32) and d.dtype == torch.float32
    assert math.isnan(float(d[0, 3, 3])) and math.isnan(float(d[0, 3, 4]))
    assert int(torch.isnan(d).sum()) == 2


def test_cityscapes_resize_and_attribute(tmp_path):
    raw = _write_cityscapes(tmp_path, "dict")
    ds = Cityscapes("train", data_dir=tmp_path, size=(8, 16))
    image, t = ds[0]
    assert image.shape == (3, 8, 16) and t["seg"].shape == (8, 16) and t["depth"].shape == (1, 8, 16)
    valid = raw["label"][raw["label"] >= 0]
    assert ds.attribute(0) == int(np.bincount(valid).argmax())


def test_cityscapes_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cityscape.json"):
        Cityscapes("train", data_dir=tmp_path)
    (tmp_path / "cityscape.json").write_text(json.dumps({"train": [["a.npy", "b.npy", "c.npy"]]}))
    with pytest.raises(ValueError, match="depth"):
        Cityscapes("train", data_dir=tmp_path)
    _write_cityscapes(tmp_path, "dict")
    with pytest.raises(ValueError, match="'val'"):
        Cityscapes("val", data_dir=tmp_path)
    (tmp_path / "train/label/0.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"label/0\.npy"):
        Cityscapes("train", data_dir=tmp_path)


# ---------------------------------------------------------------- Taskonomy


def _write_taskonomy(root: Path, buildings: tuple[str, ...] = ("allensville", "beechwood")) -> dict:
    rng = np.random.default_rng(3)
    s = 16
    raw: dict = {}
    entries = []
    for k, b in enumerate(buildings):
        folder = root / b
        folder.mkdir(parents=True, exist_ok=True)
        rgb = rng.integers(0, 256, size=(s, s, 3), dtype=np.uint8)
        seg = np.full((s, s), 3, dtype=np.uint8)
        seg[0] = 0
        seg[1, :4] = 17
        normal = rng.integers(0, 256, size=(s, s, 3), dtype=np.uint8)
        depth = rng.integers(0, 60000, size=(s, s)).astype(np.uint16)
        depth[5, 5] = 65000
        depth[6, 6] = 100
        keypoint = rng.integers(0, 2**16, size=(s, s)).astype(np.uint16)
        edge = rng.integers(0, 2**16, size=(s, s)).astype(np.uint16)
        names = [f"p{k}_{d}.png" for d in ("rgb", "semseg", "normal", "depth", "keypoint", "edge")]
        for name, arr in zip(names, (rgb, seg, normal, depth, keypoint, edge), strict=True):
            Image.fromarray(arr).save(folder / name)
        entries.append([f"{b}/{n}" for n in names])
        raw[b] = {"rgb": rgb, "normal": normal, "keypoint": keypoint}
    (root / "taskonomy.json").write_text(json.dumps({"train": entries, "test": entries[:1]}))
    return raw


def test_taskonomy_contract_and_label_mapping(tmp_path):
    raw = _write_taskonomy(tmp_path)
    ds = Taskonomy("train", data_dir=tmp_path, size=(16, 16), std=1.0)
    assert DATASETS["taskonomy"] is Taskonomy
    assert len(ds) == 2 and ds.input_size == (16, 16) and ds.in_channels == 3
    assert [(t.name, t.kind, t.num_classes) for t in ds.tasks] == [
        ("seg", "segmentation", 17),
        ("normals", "normals", 0),
        ("depth", "depth", 0),
    ]
    image, t = ds[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    r, g, b = raw["allensville"]["rgb"][7, 8].astype(np.float32)
    assert torch.allclose(image[:, 7, 8], torch.tensor([b, g, r]) - torch.from_numpy(BGR_MEAN), atol=1e-3)
    seg = t["seg"]
    assert seg.dtype == torch.long and seg.shape == (16, 16)
    assert torch.all(seg[0] == 255) and torch.all(seg[1, :4] == 16) and int(seg[5, 5]) == 2
    d = t["depth"]
    assert d.shape == (1, 16, 16)
    assert math.isnan(float(d[0, 5, 5])) and int(torch.isnan(d).sum()) == 1
    assert float(d[0, 6, 6]) == pytest.approx(math.log(101) / math.log(2**16), rel=1e-5)
    n = t["normals"]
    assert n.shape == (3, 16, 16) and torch.equal(n[:, 5, 5], torch.zeros(3))
    expected = raw["allensville"]["normal"][6, 6].astype(np.float32) / 255 * 2 - 1
    expected /= np.linalg.norm(expected)
    assert torch.allclose(n[:, 6, 6], torch.from_numpy(expected), atol=1e-5)
    extras = ds.extras(0)
    assert extras["keypoint"].shape == (1, 16, 16) and extras["edge"].shape == (1, 16, 16)
    for m in extras.values():
        assert float(m.min()) >= -1.0 and float(m.max()) <= 1.0
    kp = raw["allensville"]["keypoint"][2, 2] / 2**16
    assert float(extras["keypoint"][0, 2, 2]) == pytest.approx(min(kp, 0.005) / 0.005 * 2 - 1, abs=1e-5)


def test_taskonomy_resizes_and_uses_buildings_as_attribute(tmp_path):
    _write_taskonomy(tmp_path)
    ds = Taskonomy("train", data_dir=tmp_path, size=(8, 8))
    image, t = ds[1]
    assert image.shape == (3, 8, 8) and t["seg"].shape == (8, 8)
    assert t["normals"].shape == (3, 8, 8) and t["depth"].shape == (1, 8, 8)
    assert set(t["seg"].unique().tolist()) <= {2, 16, 255}
    assert [ds.attribute(i) for i in range(len(ds))] == [0, 1]
    one_folder = Taskonomy("test", data_dir=tmp_path)
    assert one_folder.attribute(0) == 2  # falls back to the dominant seg class (raw 3 -> 2)


def test_taskonomy_errors(tmp_path):
    with pytest.raises(ValueError, match="data_dir"):
        Taskonomy("train")
    with pytest.raises(FileNotFoundError, match="taskonomy.json"):
        Taskonomy("train", data_dir=tmp_path)
    (tmp_path / "taskonomy.json").write_text(json.dumps({"train": [["a.png", "b.png"]]}))
    with pytest.raises(ValueError, match="rgb"):
        Taskonomy("train", data_dir=tmp_path)
    _write_taskonomy(tmp_path)
    (tmp_path / "beechwood" / "p1_semseg.png").unlink()
    ds = Taskonomy("train", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="p1_semseg.png"):
        ds[1]
