"""The manifest: the contract between export and everything that runs a model.

``deploykit.json`` sits next to the per-stage graphs. The runtime, ``calibrate``, ``bench``, ``build`` and
``serve-local`` read only this file and the graph / engine files, never model Python code. It is versioned and
validated on load; a file of another schema version is refused with a message saying what to do.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deploykit.errors import ManifestError
from deploykit.kinds import is_cascade

SCHEMA_VERSION = 1
MANIFEST_NAME = "deploykit.json"
BATCH_DIM = "batch"


@dataclass
class TensorSpec:
    """Name, shape (``"batch"`` marks the symbolic batch axis) and dtype of one graph input or output."""

    name: str
    shape: list[int | str]
    dtype: str = "float32"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(name=str(d["name"]), shape=list(d["shape"]), dtype=str(d.get("dtype", "float32")))


@dataclass
class StageSpec:
    """One stage graph: the blocks it runs, the state it hands on, and its exit head's outputs.

    ``outputs`` lists the state passed to the next stage (empty for the last stage); ``exit_logits`` and
    ``exit_score`` name the exit head's outputs, which every stage has.
    """

    index: int
    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    exit_logits: str = "logits"
    exit_score: str = "score"
    flops: int = 0
    exit_flops: int = 0
    blocks: list[int] = field(default_factory=list)
    sha256: str = ""
    precision: str = "fp32"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageSpec:
        return cls(
            index=int(d["index"]),
            file=str(d["file"]),
            inputs=[TensorSpec.from_dict(t) for t in d["inputs"]],
            outputs=[TensorSpec.from_dict(t) for t in d.get("outputs", [])],
            exit_logits=str(d.get("exit_logits", "logits")),
            exit_score=str(d.get("exit_score", "score")),
            flops=int(d.get("flops", 0)),
            exit_flops=int(d.get("exit_flops", 0)),
            blocks=[int(b) for b in d.get("blocks", [])],
            sha256=str(d.get("sha256", "")),
            precision=str(d.get("precision", "fp32")),
            extra=dict(d.get("extra", {})),
        )


@dataclass
class Preprocessing:
    """How raw images become the model's input tensor (from the backbone's timm data config).

    ``crop_mode`` ``center`` is timm's eval transform (shorter side to ``size / crop_pct``, centre crop); absent
    (manifests written before it was recorded) means ``squash``: the whole image stretched to the input size.
    """

    input_size: list[int]
    mean: list[float]
    std: list[float]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    crop_mode: str = "squash"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(
            input_size=[int(v) for v in d["input_size"]],
            mean=[float(v) for v in d["mean"]],
            std=[float(v) for v in d["std"]],
            interpolation=str(d.get("interpolation", "bicubic")),
            crop_pct=float(d.get("crop_pct", 1.0)),
            crop_mode=str(d.get("crop_mode", "squash")),
        )


@dataclass
class ExitPolicy:
    """Which score the stage graphs compute and the per-stage thresholds (a row exits when score >= threshold).

    ``thresholds`` has one entry per stage; ``None`` means the exit is disabled. The last stage always exits.
    """

    score: str = "max_softmax"
    thresholds: list[float | None] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExitPolicy:
        thr = [None if t is None else float(t) for t in d.get("thresholds", [])]
        return cls(score=str(d.get("score", "max_softmax")), thresholds=thr)


@dataclass
class Manifest:
    """Everything a runtime needs to run an exported model; see docs/manifest.md for the field reference."""

    name: str
    method: dict[str, Any]
    backbone: dict[str, Any]
    labels: list[str]
    preprocessing: Preprocessing
    stages: list[StageSpec]
    exit_policy: ExitPolicy
    monolithic: StageSpec | None = None
    calibration: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    task: str = "classification"
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    root: Path | None = field(default=None, compare=False, repr=False)

    # ---- derived views -------------------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def input_spec(self) -> TensorSpec:
        return self.stages[0].inputs[0]

    def path_of(self, file: str) -> Path:
        """Absolute path of a file named in the manifest, confined to the engine directory (see resolve_inside)."""
        if self.root is None:
            raise ManifestError("manifest has no root directory; load it with Manifest.load(ENGINE_DIR)")
        return resolve_inside(self.root, file)

    def named_files(self) -> list[tuple[str, str]]:
        """Every ``(file, sha256 or "")`` the manifest names: stage and full graphs, TensorRT plans, MuE graphs."""
        out: list[tuple[str, str]] = []
        for s in list(self.stages) + ([self.monolithic] if self.monolithic else []):
            out.append((s.file, s.sha256))
            for side in (s.extra.get("sidecars") or []) if isinstance(s.extra, dict) else []:
                out.append((str(side["file"]), str(side.get("sha256", ""))))  # OpenVINO IR weights beside the .xml
            trt = s.extra.get("trt") if isinstance(s.extra, dict) else None
            if isinstance(trt, dict) and trt.get("engine"):
                out.append((str(trt["engine"]), str(trt.get("sha256", ""))))
        mue = self.extra.get("mue") if isinstance(self.extra, dict) else None
        if isinstance(mue, dict):
            for g in (mue.get("graphs") or {}).values():
                if isinstance(g, dict) and g.get("file"):
                    out.append((str(g["file"]), str(g.get("sha256", ""))))
            if mue.get("vocab"):
                out.append((str(mue["vocab"]), ""))
        return out

    def thresholds(self) -> list[float | None]:
        """Per-stage thresholds, padded with ``None`` (exit disabled) and the last stage always exiting."""
        thr = list(self.exit_policy.thresholds) + [None] * (self.num_stages - len(self.exit_policy.thresholds))
        return thr[: self.num_stages]

    # ---- (de)serialisation -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("root", None)
        order = ["schema_version", "name", "task", "method", "backbone", "labels", "preprocessing", "stages",
                 "monolithic", "exit_policy", "calibration", "provenance", "extra"]
        return {k: d[k] for k in order}

    @classmethod
    def from_dict(cls, d: dict[str, Any], root: Path | None = None) -> Manifest:
        if not isinstance(d, dict):
            raise ManifestError(f"manifest must be a JSON object, found {type(d).__name__}")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"manifest schema version {version!r} is not supported (this deploykit reads version "
                f"{SCHEMA_VERSION}); re-export the model with this deploykit version (`deploykit export`)"
            )
        missing = [k for k in ("name", "method", "backbone", "labels", "preprocessing", "stages", "exit_policy")
                   if k not in d]
        if missing:
            raise ManifestError(f"manifest is missing required field(s) {missing}; re-export the model")
        try:
            m = cls(
                name=str(d["name"]),
                method=dict(d["method"]),
                backbone=dict(d["backbone"]),
                labels=[str(v) for v in d["labels"]],
                preprocessing=Preprocessing.from_dict(d["preprocessing"]),
                stages=[StageSpec.from_dict(s) for s in d["stages"]],
                exit_policy=ExitPolicy.from_dict(d["exit_policy"]),
                monolithic=StageSpec.from_dict(d["monolithic"]) if d.get("monolithic") else None,
                calibration=d.get("calibration"),
                provenance=dict(d.get("provenance", {})),
                task=str(d.get("task", "classification")),
                extra=dict(d.get("extra", {})),
                root=root,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(
                f"manifest field has the wrong form ({type(e).__name__}: {e}); re-export the model") from e
        m.validate()
        m.validate_semantics()
        return m

    def validate(self) -> None:
        """Check internal consistency: stage order, state hand-over between stages, thresholds, typed sections."""
        from deploykit.manifest_sections import validate_sections

        validate_sections(self)
        if self.stages:
            for i, s in enumerate(self.stages):
                if s.index != i:
                    raise ManifestError(f"stage {i} has index {s.index}; stages must be listed in order 0..K-1")
            for a, b in zip(self.stages, self.stages[1:]):
                handed = [t.name for t in a.outputs]
                wanted = [t.name for t in b.inputs]
                if handed != wanted:
                    raise ManifestError(
                        f"stage {a.index} hands on {handed} but stage {b.index} expects {wanted}; "
                        "the manifest and graphs don't belong together — re-export the model"
                    )
            if self.stages[-1].outputs:
                raise ManifestError("the last stage must not hand on state; re-export the model")
            if len(self.exit_policy.thresholds) > self.num_stages:
                raise ManifestError(
                    f"{len(self.exit_policy.thresholds)} thresholds for {self.num_stages} stages; "
                    "run `deploykit calibrate` again"
                )
        if self.exit_policy.score not in ("max_softmax", "entropy", "cosine"):
            raise ManifestError(f"unknown exit score {self.exit_policy.score!r}; expected max_softmax or entropy")

    @classmethod
    def load(cls, engine_dir: str | os.PathLike, verify: bool = True) -> Manifest:
        """Load and validate ``ENGINE_DIR/deploykit.json`` (or a path to the JSON file itself).

        Validation happens once, here: structure (:meth:`validate`), meaning (:meth:`validate_semantics`), every
        named file confined to the engine directory, and (``verify``) every graph's sha256 (:meth:`verify_files`),
        so a tampered or escaping engine is refused before anything runs.
        """
        path = Path(engine_dir)
        if path.is_dir():
            path = path / MANIFEST_NAME
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise ManifestError(
                f"no manifest at {path} (it {what}); point at a directory written by "
                "`deploykit export RUN_DIR -o ENGINE_DIR`"
            )
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as e:
            raise ManifestError(f"{path} is not valid JSON ({e}); re-export the model") from e
        except OSError as e:
            raise ManifestError(f"can't read {path} ({e})") from e
        m = cls.from_dict(data, root=path.parent)
        for file, _ in m.named_files():
            m.path_of(file)
        if verify:
            m.verify_files()
        return m

    def save(self, engine_dir: str | os.PathLike | None = None) -> Path:
        """Write the manifest atomically (temp file + rename), so a crash never leaves half a manifest."""
        root = Path(engine_dir) if engine_dir is not None else self.root
        if root is None:
            raise ManifestError("no directory to save the manifest in")
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        path = root / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    def check_files(self, verify_hash: bool = False) -> None:
        """Check that every graph file exists (and, optionally, still has the hash recorded at export)."""
        specs = list(self.stages) + ([self.monolithic] if self.monolithic else [])
        for s in specs:
            p = self.path_of(s.file)
            if not p.is_file():
                raise ManifestError(f"graph file {p} named by the manifest is missing; re-export the model")
            for side in s.extra.get("sidecars", []):  # files a graph needs beside it (OpenVINO IR weights)
                q = self.path_of(str(side["file"]))
                if not q.is_file():
                    raise ManifestError(f"{q}, which {s.file} needs, is missing; re-run the command that wrote it")
        if verify_hash:
            self.verify_files()

    def verify_files(self) -> None:
        """Every named file that has a recorded sha256 must exist and still hash to it (one streamed read each).

        Raises:
            ManifestError: naming the first file that is missing, replaced or corrupt.
        """
        for file, digest in self.named_files():
            if not digest:
                continue
            p = self.path_of(file)
            if not p.is_file():
                raise ManifestError(f"{file} named by {self.root}/{MANIFEST_NAME} is missing; re-export the model")
            if file_sha256(p) != digest:
                raise ManifestError(f"{p} does not match the sha256 recorded in the manifest (file replaced or "
                                    "corrupt); refusing to run it — re-export the model or restore the file")

    def validate_semantics(self) -> None:
        """What the numbers mean must hold, checked once at load: name, labels, preprocessing, shapes, thresholds.

        A manifest that parses but can't be served right (std 0, a label count the graphs don't have, NaN
        thresholds...) is refused here with a one-line error instead of failing per request.
        """
        _check_name(self.name)
        if is_cascade(self) and not self.labels:
            raise ManifestError("manifest lists no labels; re-export the model")
        pre = self.preprocessing
        if len(pre.input_size) != 3 or any(v < 1 for v in pre.input_size):
            raise ManifestError(f"preprocessing.input_size must be [C, H, W] of positive integers, found "
                                f"{pre.input_size}")
        c = pre.input_size[0]
        for key in ("mean", "std"):
            vals = getattr(pre, key)
            if len(vals) != c or not all(math.isfinite(v) for v in vals):
                raise ManifestError(f"preprocessing.{key} must be {c} finite numbers (one per channel), found {vals}")
        if any(v == 0 for v in pre.std):
            raise ManifestError(f"preprocessing.std {pre.std} has a 0 (division by zero); re-export the model")
        if not 0 < pre.crop_pct <= 1 or not math.isfinite(pre.crop_pct):
            raise ManifestError(f"preprocessing.crop_pct must be in (0, 1], found {pre.crop_pct}")
        for s in list(self.stages) + ([self.monolithic] if self.monolithic else []):
            for t in s.inputs + s.outputs:
                _check_dims(s.file, t)
        if is_cascade(self):
            want = self.stages[0].inputs[0].shape[1:]
            if list(want) != list(pre.input_size):
                raise ManifestError(f"preprocessing.input_size {pre.input_size} doesn't match the graph input "
                                    f"{self.stages[0].inputs[0].name} {want}; re-export the model")
        for t in self.exit_policy.thresholds:
            if t is not None and not math.isfinite(t):
                raise ManifestError(f"exit_policy.thresholds {self.exit_policy.thresholds} has a non-finite value; "
                                    "run `deploykit calibrate` again")
        _check_calibration(self.calibration)


def resolve_inside(root: str | os.PathLike, rel: str) -> Path:
    """``root / rel`` with symlinks resolved, refused unless it stays inside ``root`` (also resolved).

    Manifests are data: a ``file`` of ``../../x``, an absolute path or a symlink out of the engine directory
    must never make deploykit read, run or copy a file elsewhere.
    """
    base = Path(root).resolve()
    if not isinstance(rel, str) or not rel or "\x00" in rel or Path(rel).is_absolute():
        raise ManifestError(f"manifest names the file {rel!r}; files must be relative paths inside the engine "
                            f"directory {base}")
    p = (base / rel).resolve()
    if not p.is_relative_to(base) or p == base:
        raise ManifestError(f"manifest file {rel!r} resolves to {p}, outside the engine directory {base}; "
                            "refusing to use it (re-export the model, or copy the file into the directory)")
    return p


def _check_name(name: str) -> None:
    bad = not name or name.startswith(".") or any(ch in name for ch in '/\\\x00') or len(name) > 200
    if bad or not name.isprintable():
        raise ManifestError(f"model name {name!r} can't be served (it becomes a URL path segment and a Triton "
                            "directory): use letters, digits, '-', '_' or '.', without '/'")


def _check_dims(file: str, t: TensorSpec) -> None:
    for i, d in enumerate(t.shape):
        ok = isinstance(d, str) if i == 0 else (isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool)
                                                                          and d >= 1))
        if not ok:
            raise ManifestError(f"{file}: tensor {t.name!r} has shape {t.shape}; dimensions must be positive "
                                "integers or named axes — re-export the model")


def _check_calibration(cal: Any) -> None:
    if cal is None:
        return
    if not isinstance(cal, dict):
        raise ManifestError(f"calibration must be an object or null, found {type(cal).__name__}; run "
                            "`deploykit calibrate` again")
    test = cal.get("test")
    if test is None:
        return
    fields = ("cascade_accuracy", "flops_ratio", "full_accuracy")
    if not isinstance(test, dict) or not all(_is_number(test[k]) for k in fields if k in test):
        raise ManifestError(f"calibration.test must hold numbers {list(fields)}, found {str(test)[:120]}; run "
                            "`deploykit calibrate` again")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def as_manifest(engine: str | os.PathLike | Manifest) -> Manifest:
    """A loaded manifest as it is, or load the one of an engine directory (so a command reads it once)."""
    return engine if isinstance(engine, Manifest) else Manifest.load(engine)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, streamed so large graphs don't load into memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
