"""Vision-language task data for MuE: a deterministic SYNTHETIC scene data set, and the same format from files.

No VL data set ships with any package this project can install, so ``synthetic_vl`` renders small scenes of
coloured shapes with PIL and derives captions and entailment hypotheses from the scene description. It is
synthetic: figures measured on it say how MuE's exits behave on a learnable task, not how it does on SNLI-VE or
COCO. Real data uses the same task format from files (``read_vl_jsonl``; SNLI-VE style keys are accepted).

Task format: one ``VLExample`` per row — ``task`` ("entailment" | "caption"), an image (PIL or a path), ``text``
(the hypothesis; the fixed prompt for captioning) and ``target`` (the label word or the caption).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploykit.errors import DataError

CAPTION_PROMPT = "what does the image describe ?"
LABELS = ("entailment", "neutral", "contradiction")
COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40),
          "purple": (160, 60, 200)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 6, "large": 10}  # half-extent in pixels on a 48 px canvas
SIDES = ("left", "right")
NONVISUAL = ("heavy", "moving", "new", "wooden", "hot")


@dataclass
class SceneObject:
    """One shape in a scene; the attributes are what captions and hypotheses talk about."""

    shape: str
    color: str
    size: str
    side: str
    x: int
    y: int


@dataclass
class VLExample:
    """One task row: image (PIL image, or a path loaded lazily), input text and target text."""

    task: str
    image: Any
    text: str
    target: str


def render_scene(objects: list[SceneObject], size: int = 48, seed: int = 0) -> Any:
    """Draw the objects on a noisy grey canvas (noise so that patch statistics are not trivially constant)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    bg = (rng.normal(70, 12, (size, size, 3))).clip(0, 255).astype("uint8")
    img = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(img)
    scale = size / 48
    for o in objects:
        r = SIZES[o.size] * scale
        box = (o.x - r, o.y - r, o.x + r, o.y + r)
        col = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse(box, fill=col)
        elif o.shape == "square":
            draw.rectangle(box, fill=col)
        else:
            draw.polygon([(o.x, o.y - r), (o.x - r, o.y + r), (o.x + r, o.y + r)], fill=col)
    return img


def random_scene(rng: random.Random, size: int = 48) -> list[SceneObject]:
    """One or two objects; with two, one on each side, so the caption is unambiguous."""
    n = rng.choice((1, 2, 2))
    sides = rng.sample(SIDES, n)
    objs = []
    for side in sorted(sides, key=SIDES.index):
        sz = rng.choice(list(SIZES))
        r = SIZES[sz] * size / 48
        lo, hi = (r + 1, size / 2 - r - 1) if side == "left" else (size / 2 + r + 1, size - r - 1)
        objs.append(SceneObject(rng.choice(SHAPES), rng.choice(list(COLORS)), sz, side,
                                int(rng.uniform(lo, hi)), int(rng.uniform(r + 1, size - r - 1))))
    return objs


def caption_of(objects: list[SceneObject]) -> str:
    """Left-to-right description: 'a large red circle on the left and a small blue square on the right'."""
    return " and ".join(f"a {o.size} {o.color} {o.shape} on the {o.side}" for o in objects)


def _matches(o: SceneObject, attrs: dict[str, str]) -> bool:
    return all(getattr(o, k) == v for k, v in attrs.items())


def _phrase(attrs: dict[str, str]) -> str:
    words = "there is a " + " ".join(attrs[k] for k in ("size", "color") if k in attrs) + " " + attrs["shape"]
    return " ".join(words.split()) + (f" on the {attrs['side']}" if "side" in attrs else "")


def hypothesis_for(objects: list[SceneObject], label: str, rng: random.Random) -> str:
    """A hypothesis with the requested label; contradictions change one attribute so that the binding matters."""
    if label == "neutral":  # a non-visual claim about an object that is there: can't be confirmed nor refuted
        o = rng.choice(objects)
        return f"the {o.color} {o.shape} is {rng.choice(NONVISUAL)}"
    for _ in range(100):
        o = rng.choice(objects)
        keys = ["shape", "color"] + [k for k in ("size", "side") if rng.random() < 0.6]
        attrs = {k: getattr(o, k) for k in keys}
        if label == "contradiction":
            if rng.random() < 0.25:  # non-visual claim about an object that is not there
                c, s = rng.choice(list(COLORS)), rng.choice(SHAPES)
                if not any(_matches(x, {"color": c, "shape": s}) for x in objects):
                    return f"the {c} {s} is {rng.choice(NONVISUAL)}"
                continue
            k = rng.choice(keys)
            pool = {"shape": SHAPES, "color": list(COLORS), "size": list(SIZES), "side": SIDES}[k]
            attrs[k] = rng.choice([v for v in pool if v != attrs[k]])
            if any(_matches(x, attrs) for x in objects):
                continue
        return _phrase(attrs)
    raise RuntimeError("could not build a hypothesis")  # unreachable for the attribute pools above


def synthetic_vl(split: str, n: int | None = None, size: int = 48, tasks: tuple[str, ...] = ("entailment", "caption"),
                 seed: int = 0) -> list[VLExample]:
    """Deterministic SYNTHETIC examples for ``split`` ("train" | "val" | "test"); same call, same data.

    Each scene gives one caption example and one entailment example (label drawn uniformly), per ``tasks``.
    """
    offsets = {"train": 0, "val": 1, "test": 2}
    if split not in offsets:
        raise DataError(f"unknown split {split!r}; expected one of {list(offsets)}")
    n = n if n is not None else {"train": 6000, "val": 500, "test": 1000}[split]
    rng = random.Random(f"mue-synthetic-{seed}-{split}")
    out: list[VLExample] = []
    for i in range(n):
        objs = random_scene(rng, size)
        img = render_scene(objs, size, seed=hash((seed, offsets[split], i)) & 0xFFFF)
        if "caption" in tasks:
            out.append(VLExample("caption", img, CAPTION_PROMPT, caption_of(objs)))
        if "entailment" in tasks:
            label = rng.choice(LABELS)
            out.append(VLExample("entailment", img, hypothesis_for(objs, label, rng), label))
    return out


# ---- files ------------------------------------------------------------------------------------------------------
def write_vl_jsonl(examples: list[VLExample], out_dir: str | os.PathLike, name: str = "data.jsonl") -> Path:
    """Write examples as JSONL + PNG files (the format ``read_vl_jsonl`` reads)."""
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    path = root / name
    seen: dict[int, str] = {}
    with open(path, "w") as f:
        for i, ex in enumerate(examples):
            if id(ex.image) not in seen:
                rel = f"images/{len(seen):06d}.png"
                ex.image.save(root / rel)
                seen[id(ex.image)] = rel
            key = "hypothesis" if ex.task == "entailment" else "prompt"
            tgt = "label" if ex.task == "entailment" else "caption"
            f.write(json.dumps({"id": i, "task": ex.task, "image": seen[id(ex.image)], key: ex.text, tgt: ex.target})
                    + "\n")
    return path


def read_vl_jsonl(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[VLExample]:
    """Read task rows from JSONL; images stay paths, resolved against ``image_root`` (default: the file's folder).

    Keys: ``image`` (or SNLI-VE's ``Flickr30K_ID``, ``.jpg`` appended), ``hypothesis`` (or ``sentence2``) with
    ``label`` (or ``gold_label``) for entailment; ``caption`` (and optional ``prompt``) for captioning.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist; write one with deploykit.data.vl.write_vl_jsonl")
    root = Path(image_root) if image_root is not None else path.parent
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n} is not JSON ({e})") from e
        img = d.get("image") or (f"{d['Flickr30K_ID']}.jpg" if "Flickr30K_ID" in d else None)
        if img is None:
            raise DataError(f"{path}:{n} has no 'image' (or 'Flickr30K_ID') key")
        hyp, label = d.get("hypothesis", d.get("sentence2")), d.get("label", d.get("gold_label"))
        task = d.get("task") or ("entailment" if hyp is not None else "caption")
        if task == "entailment":
            if hyp is None or label not in LABELS:
                raise DataError(f"{path}:{n}: entailment rows need 'hypothesis' and a 'label' in {LABELS}")
            out.append(VLExample(task, str(root / img), str(hyp), str(label)))
        elif task == "caption":
            if "caption" not in d:
                raise DataError(f"{path}:{n}: caption rows need a 'caption'")
            out.append(VLExample(task, str(root / img), str(d.get("prompt", CAPTION_PROMPT)), str(d["caption"])))
        else:
            raise DataError(f"{path}:{n}: unknown task {task!r}; expected 'entailment' or 'caption'")
    return out


def vl_vocabulary_words() -> list[str]:
    """Every word the synthetic generator can produce (the vocabulary is built from data, this is a superset)."""
    words = set(CAPTION_PROMPT.split()) | set(LABELS) | set(COLORS) | set(SHAPES) | set(SIZES) | set(SIDES)
    words |= set(NONVISUAL) | {"a", "on", "the", "and", "there", "is"}
    return sorted(words)
