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
