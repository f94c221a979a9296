"""The manifest: the contract between export and everything that runs a model.

``deploykit.json`` sits next to the per-stage graphs. The runtime, ``calibrate``, ``bench``, ``build`` and
``serve-local`` read only this file and the graph / engine files, never model Python code. It is versioned and
validated on load; a file of another schema version is refused with a message saying what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deploykit.errors import ManifestError

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
    """How raw images become the model's input tensor (from the backbone's timm data config)."""

    input_size: list[int]
    mean: list[float]
    std: list[float]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(
            input_size=[int(v) for v in d["input_size"]],
            mean=[float(v) for v in d["mean"]],
            std=[float(v) for v in d["std"]],
            interpolation=str(d.get("interpolation", "bicubic")),
            crop_pct=float(d.get("crop_pct", 1.0)),
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
        """Absolute path of a file named in the manifest (files are stored relative to the manifest)."""
        if self.root is None:
            raise ManifestError("manifest has no root directory; load it with Manifest.load(ENGINE_DIR)")
        return self.root / file

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
        return m

    def validate(self) -> None:
        """Check internal consistency: stage order, state hand-over between stages, thresholds."""
        if self.task == "classification":
            if not self.stages:
                raise ManifestError("manifest lists no stages; re-export the model")
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
    def load(cls, engine_dir: str | os.PathLike) -> Manifest:
        """Load and validate ``ENGINE_DIR/deploykit.json`` (or a path to the JSON file itself)."""
        path = Path(engine_dir)
        if path.is_dir():
            path = path / MANIFEST_NAME
        if not path.exists():
            raise ManifestError(
                f"no manifest at {path}; point at a directory written by `deploykit export RUN_DIR -o ENGINE_DIR`"
            )
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{path} is not valid JSON ({e}); re-export the model") from e
        return cls.from_dict(data, root=path.parent)

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
            if not p.exists():
                raise ManifestError(f"graph file {p} named by the manifest is missing; re-export the model")
            if verify_hash and s.sha256 and file_sha256(p) != s.sha256:
                raise ManifestError(
                    f"{p} does not match the hash recorded in the manifest (file replaced or corrupt); re-export"
                )
            for side in s.extra.get("sidecars", []):  # files a graph needs beside it (OpenVINO IR weights)
                q = self.path_of(str(side["file"]))
                if not q.exists():
                    raise ManifestError(f"{q}, which {s.file} needs, is missing; re-run the command that wrote it")
                if verify_hash and side.get("sha256") and file_sha256(q) != side["sha256"]:
                    raise ManifestError(f"{q} does not match the hash recorded in the manifest (file replaced or "
                                        "corrupt); re-run the command that wrote it")


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, streamed so large graphs don't load into memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
