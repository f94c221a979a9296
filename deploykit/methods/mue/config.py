"""MuE settings: model size, exit thresholds and the KV-cache policy (data, written to the run and the manifest)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from deploykit.errors import ConfigError

KV_POLICIES = ("copy", "compute")


@dataclass
class MuEConfig:
    """One unified encoder-decoder VL transformer and its exit settings.

    The small default (64 wide, 6 + 6 layers, 48 px images in 8 px patches) trains on a CPU in a few minutes.
    Thresholds follow the reference: a stream / token exits when cosine(layer output, layer input) > threshold;
    1.0 (or more) never exits. ``dec_decay`` applies the reference's step-decayed threshold with the first third of
    steps forced to full depth (captioning); entailment answers in one step with the static threshold.

    ``dec_prompt`` (the reference's ``prompt_type=prev_output``): the entailment decoder gets ``<bos>`` + the
    hypothesis as its prompt and predicts the answer at the last prompt position, in one non-incremental pass over
    the prompt; without it (runs from before the setting) the decoder starts from ``<bos>`` alone. Captioning is
    unchanged.
    """

    dim: int = 64
    heads: int = 4
    enc_layers: int = 6
    dec_layers: int = 6
    mlp_ratio: float = 2.0
    img_size: int = 48
    patch_size: int = 8
    in_chans: int = 3
    max_text_len: int = 16
    max_gen_len: int = 18
    tasks: list[str] = field(default_factory=lambda: ["entailment", "caption"])
    img_threshold: float = 0.9
    txt_threshold: float = 0.95
    dec_threshold: float = 0.9
    dec_decay: bool = True
    kv_policy: str = "copy"
    dec_prompt: bool = False
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    def validate(self) -> None:
        """Refuse settings that can't build a model, with what to change."""
        if self.dim % self.heads:
            raise ConfigError(f"mue: dim {self.dim} must be divisible by heads {self.heads}")
        if self.img_size % self.patch_size:
            raise ConfigError(f"mue: img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")
        if self.kv_policy not in KV_POLICIES:
            raise ConfigError(f"mue: kv_policy {self.kv_policy!r} unknown; expected one of {KV_POLICIES}")
        bad = sorted(set(self.tasks) - {"entailment", "caption"})
        if bad or not self.tasks:
            raise ConfigError(f"mue: tasks {self.tasks} invalid; use 'entailment' and/or 'caption'")
        if min(self.enc_layers, self.dec_layers) < 1:
            raise ConfigError("mue: enc_layers and dec_layers must be >= 1")

    @property
    def dec_positions(self) -> int:
        """Decoder position embeddings: generation steps, and with ``dec_prompt`` the ``<bos>`` + hypothesis."""
        return max(self.max_gen_len, self.max_text_len if self.dec_prompt else 0) + 1

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MuEConfig:
        known = cls.__dataclass_fields__
        unknown = sorted(set(d) - set(known) - {"name"})
        if unknown:
            raise ConfigError(f"mue: unknown setting(s) {unknown}; known: {', '.join(sorted(known))}")
        cfg = cls(**{k: v for k, v in d.items() if k in known and v is not None})
        cfg.validate()
        return cfg


def _typed(cls: type, d: Any, where: str) -> Any:
    """Build a settings dataclass from a recipe block, refusing unknown keys and values of the wrong type."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"mue recipe: {where} must be a mapping, got {d!r}")
    known = cls.__dataclass_fields__
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"mue recipe: unknown key(s) {unknown} in {where}; valid keys: {', '.join(known)}")
    out = cls(**{k: v for k, v in d.items() if v is not None or k in cls.NULLABLE})
    for k, f in known.items():
        v = getattr(out, k)
        kind = {"int": int, "float": (int, float), "bool": bool, "str": str}.get(str(f.type).split(" ")[0])
        if isinstance(v, str) and kind == (int, float):  # YAML 1.1 reads 3e-3 as a string
            try:
                v = float(v)
            except ValueError:
                pass
            setattr(out, k, v)
        if v is not None and kind is not None and (not isinstance(v, kind) or (kind is int and isinstance(v, bool))):
            raise ConfigError(f"mue recipe: {where}.{k} must be {f.type}, got {v!r}")
    out.validate()
    return out


@dataclass
class MuETrainSettings:
    """MuE's ``train:`` block (single-stage training; see ``deploykit.methods.mue.train``).

    ``steps`` sets the schedule's length; ``max_steps`` (``deploykit train --max-steps``) stops early without
    changing the schedule, as for the classification recipes.
    """

    steps: int = 2500
    max_steps: int | None = None
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 100
    seed: int = 0
    eval_every: int = 500
    threads: int | None = None
    verbose: bool = False
    loss_norm: str = "token"
    entailment_share: float | None = None
    stream_depth_drop: float = 0.0

    NULLABLE = ("max_steps", "threads", "entailment_share")

    def validate(self) -> None:
        checks = [
            (self.steps >= 1, "train.steps must be >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "train.max_steps must be >= 1 or null"),
            (self.batch_size >= 1, "train.batch_size must be >= 1"),
            (self.lr > 0, "train.lr must be > 0"),
            (self.weight_decay >= 0, "train.weight_decay must be >= 0"),
            (self.warmup >= 1, "train.warmup must be >= 1 (steps)"),
            (self.eval_every >= 1, "train.eval_every must be >= 1"),
            (self.threads is None or self.threads >= 1, "train.threads must be >= 1 or null"),
            (self.loss_norm in ("token", "sample"), "train.loss_norm must be 'token' or 'sample'"),
            (self.entailment_share is None or 0.0 <= self.entailment_share <= 1.0,
             "train.entailment_share must be in [0, 1] (the entailment rows of each batch)"),
            (0.0 <= self.stream_depth_drop <= 1.0,
             "train.stream_depth_drop must be in [0, 1] (per-sample, per-stream probability)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"mue recipe: {msg}; got {asdict(self)}")

    @classmethod
    def from_dict(cls, d: Any) -> MuETrainSettings:
        return _typed(cls, d, "train")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MuEDataSpec:
    """MuE's ``data:`` block: ``synthetic-vl`` (sizes per split, seed) or ``jsonl:PATH/{split}.jsonl``."""

    spec: str = "synthetic-vl"
    n_train: int | None = None
    n_val: int | None = None
    n_test: int | None = None
    seed: int = 0

    NULLABLE = ("n_train", "n_val", "n_test")

    def validate(self) -> None:
        if self.spec != "synthetic-vl" and not self.spec.startswith("jsonl:"):
            raise ConfigError(f"unknown MuE data spec {self.spec!r}; use 'synthetic-vl' or 'jsonl:PATH' "
                              "(PATH may hold {split})")
        for k in self.NULLABLE:
            v = getattr(self, k)
            if v is not None and v < 1:
                raise ConfigError(f"mue recipe: data.{k} must be >= 1 or null, got {v}")

    @classmethod
    def from_dict(cls, d: Any) -> MuEDataSpec:
        return _typed(cls, d, "data")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


RECIPE_KEYS = ("name", "method", "data", "train")


def check_recipe_keys(recipe: dict[str, Any]) -> None:
    """A MuE recipe has name / method / data / train; a ``backbone:`` (timm ViT) block doesn't apply."""
    unknown = sorted(set(recipe) - set(RECIPE_KEYS) - {"labels", "preprocessing"})
    if unknown:
        raise ConfigError(f"mue recipe: unknown key(s) {unknown}; valid keys: {', '.join(RECIPE_KEYS)} "
                          "(MuE builds its own encoder-decoder: no backbone block)")
