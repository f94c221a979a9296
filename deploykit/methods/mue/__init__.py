"""MuE: similarity-based multiple exiting for a unified vision-language encoder-decoder (arXiv 2211.11152).

Kept out of the ViT method registry on purpose: the registry's builders return an ``ExitModel`` (a timm ViT cut
into stages with exit heads, a classification task), which generic train / export / cascade code iterates over.
MuE is a different model family (encoder-decoder, generation, no exit heads); the CLI dispatches to it by
``method.name == "mue"`` (training) and ``manifest.task.startswith("vl")`` (predict / bench).
"""

from deploykit.methods.mue.config import MuEConfig
from deploykit.methods.mue.model import MuEModel, layerwise_loss
from deploykit.runtime.exit_rules import cosine_per_sample, decoder_threshold, exits, layer_fraction
from deploykit.runtime.tokenizer import Vocab

__all__ = ["MuEConfig", "MuEModel", "Vocab", "cosine_per_sample", "decoder_threshold", "exits", "layer_fraction",
           "layerwise_loss"]
