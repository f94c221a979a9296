"""predict on directories and every listed image format; a bad file is reported on its line and the rest go on."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from deploykit.cli import main
from deploykit.data.datasets import IMAGE_EXTS

skdata = pytest.importorskip("skimage.data")


def write_formats(folder):
    """The astronaut photo saved by PIL in every listed extension, plus awkward modes (16-bit, CMYK, RGBA, P)."""
    folder.mkdir(parents=True)
    img = Image.fromarray(skdata.astronaut()).resize((48, 48))
    for ext in sorted(IMAGE_EXTS):
        img.save(folder / f"astronaut{ext}")
    Image.fromarray(skdata.camera().astype(np.uint16) * 257).save(folder / "camera16.tif")
    img.convert("CMYK").save(folder / "cmyk.jpg")
    img.convert("RGBA").save(folder / "rgba.webp")
    img.convert("P").save(folder / "palette.png")
    (folder / "notes.txt").write_text("not an image, not listed: skipped")
    return folder


def test_every_listed_extension_decodes_through_predict(trained_engine, tmp_path):
    folder = write_formats(tmp_path / "imgs")
    r = CliRunner().invoke(main, ["predict", str(trained_engine), str(folder)])
    assert r.exit_code == 0, r.output
    lines = [json.loads(ln) for ln in r.stdout.splitlines()]
    names = sorted(p.name for p in folder.iterdir() if p.suffix != ".txt")
    assert sorted(ln["image"].rsplit("/", 1)[1] for ln in lines) == names
    assert all("error" not in ln and 0 <= ln["exit_stage"] < 4 for ln in lines)


def test_sixteen_bit_tiff_keeps_its_contrast():
    from deploykit.data.preprocess import load_image, preprocess_image

    cam = skdata.camera()
    pre = {"input_size": [3, 32, 32], "mean": [0, 0, 0], "std": [1, 1, 1], "interpolation": "bilinear"}
    eight = preprocess_image(Image.fromarray(cam), pre)
    import io

    buf = io.BytesIO()
    Image.fromarray(cam.astype(np.uint16) * 257).save(buf, format="TIFF")
    sixteen = preprocess_image(load_image(buf.getvalue()), pre)
    assert np.abs(sixteen - eight).max() <= 1 / 255 + 1e-6  # not clipped to white


def test_bad_files_get_an_error_line_and_the_rest_go_on(trained_engine, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = Image.fromarray(skdata.chelsea()).resize((40, 30))
    good.save(folder / "a_cat.png")
    good.save(folder / "c_cat.tif")
    (folder / "b_broken.tif").write_bytes((folder / "c_cat.tif").read_bytes()[:100])
    (folder / "d_text.jpg").write_text("hello")
    missing = tmp_path / "nope.png"
    r = CliRunner().invoke(main, ["predict", str(trained_engine), str(folder), str(missing)])
    assert r.exit_code == 1
    lines = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [ln["image"].rsplit("/", 1)[1] for ln in lines] == ["a_cat.png", "b_broken.tif", "c_cat.tif",
                                                              "d_text.jpg", "nope.png"]
    bad = {ln["image"].rsplit("/", 1)[1]: ln["error"] for ln in lines if "error" in ln}
    assert set(bad) == {"b_broken.tif", "d_text.jpg", "nope.png"}
    assert "does not exist" in bad["nope.png"] and "can't decode" in bad["d_text.jpg"]
    assert all("label" in ln for ln in lines if "error" not in ln)
    assert "3 image(s) could not be read" in r.stderr


def test_empty_directory_is_a_one_line_error(trained_engine, tmp_path):
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(main, ["predict", str(trained_engine), str(tmp_path / "empty")])
    assert r.exit_code == 2 and r.output.startswith("error: no images in directory")
