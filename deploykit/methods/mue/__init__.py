"""MuE: similarity-based multiple exiting for a unified vision-language encoder-decoder (arXiv 2211.11152).

Registered in the method registry like every method (``deploykit methods`` lists it; its settings are
``MuEConfig``), but it is not a timm ViT cut into stages: it belongs to the ``vl-generation`` family
(``deploykit.families``), which trains, exports and runs it; the classification trainer never builds it. Its exit
rules and tokenizer live on the runtime side (``deploykit.runtime.exit_rules`` / ``tokenizer``) and are imported
from there.
"""

from typing import Any

from deploykit.errors import ConfigError
from deploykit.methods._registry import register_method
from deploykit.methods.mue.config import MuEConfig
from deploykit.methods.mue.model import MuEModel, layerwise_loss
from deploykit.runtime.exit_rules import cosine_per_sample, decoder_threshold, exits, layer_fraction
from deploykit.runtime.tokenizer import Vocab


@register_method("mue", MuEConfig, "MuE: unified VL encoder-decoder, per-stream and per-token similarity exits")
def build_mue(backbone: Any, vocab_size: int, cfg: MuEConfig) -> MuEModel:
    """MuE builds its own encoder-decoder (timm's PatchEmbed stem inside); ``vocab_size`` plays num_classes' part."""
    if backbone is not None:
        raise ConfigError("mue builds its own encoder-decoder; it takes no timm backbone (remove backbone.name)")
    return MuEModel(cfg, vocab_size)


__all__ = ["MuEConfig", "MuEModel", "Vocab", "build_mue", "cosine_per_sample", "decoder_threshold", "exits",
           "layer_fraction", "layerwise_loss"]
