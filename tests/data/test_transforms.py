"""deploykit's run-time preprocessing (numpy + PIL) equals timm's eval transform on real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deploykit.data.preprocess import preprocess_image
from deploykit.methods.backbone import backbone_data_config, create_backbone

skdata = pytest.importorskip("skimage.data")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")  # RGB and grey, square and not
# vit_small_patch16_224's pretrained cfg (crop_pct 0.9, bicubic, mean/std 0.5) on a tiny random-weight model
TINY_VIT = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 64}


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skdata, name)())


def timm_eval(cfg: dict, img: Image.Image) -> np.ndarray:
    from timm.data import create_transform

    t = create_transform(**cfg, is_training=False)
    return t(img.convert("RGB")).numpy()


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return create_backbone("vit_small_patch16_224", 10, **TINY_VIT).eval()


def test_data_config_comes_from_the_pretrained_cfg(backbone):
    pre = backbone_data_config(backbone)
    assert pre == {"input_size": [3, 64, 64], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                   "crop_pct": 0.9, "crop_mode": "center"}


def test_preprocessing_equals_timm_eval_transform_on_photos(backbone):
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=backbone)
    cfg["input_size"] = (3, 64, 64)
    pre = backbone_data_config(backbone)
    deltas = {}
    for name in PHOTOS:
        img = photo(name)
        ours, ref = preprocess_image(img, pre), timm_eval(cfg, img)
        assert ours.shape == ref.shape == (3, 64, 64) and ours.dtype == np.float32
        deltas[name] = float(np.abs(ours - ref).max())
    print("max |delta| per photo:", deltas)
    assert max(deltas.values()) <= 1e-6, deltas


@pytest.mark.parametrize("mode,size,crop_pct,interp", [
    ("center", (48, 64), 0.875, "bilinear"),  # non-square: timm's ResizeKeepRatio
    ("squash", (64, 64), 0.95, "bicubic"),
    ("border", (64, 64), 1.0, "bicubic"),  # pads with the mean colour
    ("center", (224, 224), 1.0, "nearest"),  # small photo side upscaled
])
def test_other_crop_modes_and_sizes_match_timm(mode, size, crop_pct, interp):
    cfg = {"input_size": (3, *size), "interpolation": interp, "mean": (0.485, 0.456, 0.406),
           "std": (0.229, 0.224, 0.225), "crop_pct": crop_pct, "crop_mode": mode}
    pre = {**cfg, "input_size": [3, *size]}
    for name in ("coffee", "chelsea"):
        img = photo(name).resize((301, 199))
        assert np.abs(preprocess_image(img, pre) - timm_eval(cfg, img)).max() <= 1e-6


def test_old_manifests_without_crop_mode_stretch_the_whole_image():
    img = photo("coffee")  # 600 x 400
    pre = {"input_size": [3, 32, 32], "mean": [0, 0, 0], "std": [1, 1, 1], "interpolation": "bilinear",
           "crop_pct": 1.0}
    got = preprocess_image(img, pre)
    want = np.asarray(img.resize((32, 32), Image.BILINEAR), dtype=np.float32).transpose(2, 0, 1) / 255
    assert np.abs(got - want).max() <= 1e-6


def test_unknown_interpolation_is_refused():
    from deploykit.errors import DataError

    with pytest.raises(DataError, match="interpolation 'cubic'"):
        preprocess_image(photo("camera"), {"input_size": [3, 8, 8], "mean": [0] * 3, "std": [1] * 3,
                                           "interpolation": "cubic", "crop_mode": "center", "crop_pct": 0.9})


def test_exported_cascade_agrees_with_timm_model_on_photos(backbone, tmp_path):
    """Full pipeline: deploykit preprocessing + exported graphs vs timm transform + the timm model itself."""
    from timm.data import resolve_data_config

    from deploykit.export import export_model
    from deploykit.methods import create_method
    from deploykit.runtime.cascade import Cascade

    torch.manual_seed(0)
    model = create_method("multiexit", backbone, 10, num_exits=2).eval()
    pre = backbone_data_config(backbone)
    m = export_model(model, tmp_path / "eng", labels=[f"c{i}" for i in range(10)], preprocessing=pre)
    assert m.preprocessing.crop_pct == 0.9 and m.preprocessing.crop_mode == "center"
    cfg = {**resolve_data_config({}, model=backbone), "input_size": (3, 64, 64)}
    imgs = [photo(n) for n in PHOTOS]
    ref = torch.from_numpy(np.stack([timm_eval(cfg, i) for i in imgs]))
    with torch.no_grad():
        timm_logits = backbone(ref).numpy()
    timm_labels = timm_logits.argmax(1)
    with Cascade.from_dir(tmp_path / "eng") as cascade:
        x = np.stack([preprocess_image(i, cascade.manifest.preprocessing) for i in imgs])
        res = cascade.run(x, thresholds=[None] * (cascade.manifest.num_stages - 1))
    assert res.labels_idx.tolist() == timm_labels.tolist()
    assert np.abs(res.logits - timm_logits).max() < 1e-3
