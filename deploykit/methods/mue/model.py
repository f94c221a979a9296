"""The MuE model: a unified encoder-decoder VL transformer with a two-stream encoder.

Tang et al., "You Need Multiple Exiting", CVPR 2023, arXiv 2211.11152.

Image patches (timm ``PatchEmbed``) and text tokens run through the **same** encoder layers as two independent
streams (no cross-modal attention in the encoder); the decoder cross-attends to LN(concat[image; text]). The token
embedding is shared by encoder text, decoder input and the output projection (tied). Every piece the exported
graphs need is a method here, so training, the PyTorch reference and the ONNX graphs run the same code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from torch import Tensor, nn

from deploykit.methods.mue.config import MuEConfig
from deploykit.runtime.exit_rules import cosine_per_sample

NEG = -1e4  # additive attention bias for masked keys (finite: a fully masked row can't produce NaN)


def key_bias(mask: Tensor) -> Tensor:
    """``mask [B, T]`` (1 = token, 0 = pad) -> additive bias ``[B, 1, 1, T]``."""
    return ((1.0 - mask) * NEG)[:, None, None, :]


class Attention(nn.Module):
    """Multi-head attention written out (matmul + softmax) so it exports to plain ONNX ops."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.dh = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def split(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.reshape(b, t, self.heads, self.dh).transpose(1, 2)

    def kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.split(self.k(x)), self.split(self.v(x))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        a = (q @ k.transpose(-1, -2)) * self.dh**-0.5
        if bias is not None:
            a = a + bias
        out = a.softmax(-1) @ v
        b, _, t, _ = out.shape
        return self.o(out.transpose(1, 2).reshape(b, t, self.heads * self.dh))


class Mlp(nn.Sequential):
    """Two-layer GELU MLP."""

    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class EncoderLayer(nn.Module):
    """Pre-LN self-attention block; used for both streams (weights shared)."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = nn.LayerNorm(dim), Attention(dim, heads), nn.LayerNorm(dim), Mlp(
            dim, hidden)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.ln1(x)
        x = x + self.attn.attend(self.attn.split(self.attn.q(h)), *self.attn.kv(h), key_bias(mask))
        return x + self.mlp(self.ln2(x))


class DecoderLayer(nn.Module):
    """Pre-LN self-attention (causal, KV-cached) -> cross-attention to the encoder -> MLP."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.ln1, self.self_attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.ln2, self.cross_attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.ln3, self.mlp = nn.LayerNorm(dim), Mlp(dim, hidden)

    def self_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """This layer's self-attention K/V of hidden state ``x`` (the ``compute`` KV policy uses it on skips)."""
        return self.self_attn.kv(self.ln1(x))

    def cross_kv(self, enc: Tensor) -> tuple[Tensor, Tensor]:
        return self.cross_attn.kv(enc)

    def _rest(self, x: Tensor, ck: Tensor, cv: Tensor, enc_bias: Tensor) -> Tensor:
        x = x + self.cross_attn.attend(self.cross_attn.split(self.cross_attn.q(self.ln2(x))), ck, cv, enc_bias)
        return x + self.mlp(self.ln3(x))

    def forward(self, x: Tensor, ck: Tensor, cv: Tensor, enc_bias: Tensor) -> Tensor:
        """Whole target sequence at once (training, teacher forcing)."""
        h = self.ln1(x)
        t = x.shape[1]
        causal = torch.full((t, t), NEG, device=x.device).triu(1)
        x = x + self.self_attn.attend(self.self_attn.split(self.self_attn.q(h)), *self.self_attn.kv(h), causal)
        return self._rest(x, ck, cv, enc_bias)

    def step(self, x: Tensor, past_k: Tensor, past_v: Tensor, ck: Tensor, cv: Tensor, enc_bias: Tensor
             ) -> tuple[Tensor, Tensor, Tensor]:
        """One decoding step: ``x [B, 1, D]`` with the cache of earlier steps; returns output and this step's K/V."""
        h = self.ln1(x)
        k, v = self.self_attn.kv(h)
        q = self.self_attn.split(self.self_attn.q(h))
        x = x + self.self_attn.attend(q, torch.cat([past_k, k], 2), torch.cat([past_v, v], 2), None)
        return self._rest(x, ck, cv, enc_bias), k, v


class MuEModel(nn.Module):
    """Two-stream encoder + decoder with a shared final norm and tied output projection for every decoder layer."""

    def __init__(self, cfg: MuEConfig, vocab_size: int):
        super().__init__()
        cfg.validate()
        self.cfg, d = cfg, cfg.dim
        hidden = int(d * cfg.mlp_ratio)
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, d)
        self.img_pos = nn.Parameter(torch.randn(1, cfg.num_patches, d) * 0.02)
        self.txt_pos = nn.Parameter(torch.randn(1, cfg.max_text_len, d) * 0.02)
        self.dec_pos = nn.Parameter(torch.randn(cfg.dec_positions, d) * 0.02)
        self.type_embed = nn.Parameter(torch.randn(3, d) * 0.02)  # image, text, decoder
        self.tok_embed = nn.Embedding(vocab_size, d)
        nn.init.normal_(self.tok_embed.weight, std=0.02)
        self.img_ln, self.txt_ln, self.dec_ln_embed = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.enc = nn.ModuleList(EncoderLayer(d, cfg.heads, hidden) for _ in range(cfg.enc_layers))
        self.enc_norm = nn.LayerNorm(d)
        self.dec = nn.ModuleList(DecoderLayer(d, cfg.heads, hidden) for _ in range(cfg.dec_layers))
        self.dec_norm = nn.LayerNorm(d)

    # ---- pieces (each is one exported graph) --------------------------------------------------------------
    def embed_image(self, image: Tensor) -> Tensor:
        return self.img_ln(self.patch_embed(image) + self.img_pos + self.type_embed[0])

    def embed_text(self, ids: Tensor) -> Tensor:
        return self.txt_ln(self.tok_embed(ids) + self.txt_pos[:, : ids.shape[1]] + self.type_embed[1])

    def encoder_layer(self, i: int, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Layer ``i`` on one stream; the score is the per-sample cosine of output vs input (pads excluded)."""
        y = self.enc[i](x, mask)
        return y, cosine_per_sample(y, x, mask)

    def encode_out(self, img: Tensor, txt: Tensor, txt_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised concat of the two streams and its key mask."""
        enc = self.enc_norm(torch.cat([img, txt], 1))
        return enc, torch.cat([torch.ones(img.shape[:2], dtype=txt_mask.dtype, device=img.device), txt_mask], 1)

    def embed_dec(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Decoder input ``[B, T, D]`` for ``tokens [B, T]`` at ``positions [B, T]``."""
        return self.dec_ln_embed(self.tok_embed(tokens) + self.dec_pos[positions] + self.type_embed[2])

    def embed_prompt(self, tokens: Tensor) -> Tensor:
        """Decoder input of a prompt ``tokens [B, T]`` (``<bos>`` + hypothesis, right-padded) at positions 0..T-1."""
        pos = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return self.embed_dec(tokens, pos)

    def prompt_layer(self, j: int, x: Tensor, ck: Tensor, cv: Tensor, enc_bias: Tensor, mask: Tensor
                     ) -> tuple[Tensor, Tensor]:
        """Decoder layer ``j`` over a whole prompt ``x [B, T, D]`` at once, and its exit score.

        Causal, so right pads never reach a real position; the score is the per-sample cosine of output vs input
        over the prompt's non-pad positions (``mask``).
        """
        y = self.dec[j](x, ck, cv, enc_bias)
        return y, cosine_per_sample(y, x, mask)

    def head(self, x: Tensor) -> Tensor:
        """Shared final norm + tied projection: the same head for every decoder layer's exit."""
        return self.dec_norm(x) @ self.tok_embed.weight.t()

    # ---- training forward ----------------------------------------------------------------------------------
    def encode_full(self, image: Tensor, ids: Tensor, txt_mask: Tensor,
                    depths: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Both streams at full depth (training disables exits, as the reference does).

        ``depths`` (``train.stream_depth_drop``): per-sample layer counts ``(image [B], text [B])`` in
        ``1..enc_layers``; each stream's output is its state after that many layers, i.e. what an encoder exit
        after layer k hands to ``encode_out`` at run time. ``None``: full depth.
        """
        img, txt = self.embed_image(image), self.embed_text(ids)
        img_mask = torch.ones(img.shape[:2], device=img.device)
        img_out = txt_out = None
        if depths is not None:
            img_out, txt_out = torch.zeros_like(img), torch.zeros_like(txt)
        for i in range(self.cfg.enc_layers):
            img, txt = self.enc[i](img, img_mask), self.enc[i](txt, txt_mask)
            if depths is not None:  # keep each sample's state after its own depth
                img_out = torch.where((depths[0] == i + 1)[:, None, None], img, img_out)
                txt_out = torch.where((depths[1] == i + 1)[:, None, None], txt, txt_out)
        if depths is not None:
            img, txt = img_out, txt_out
        return self.encode_out(img, txt, txt_mask)

    def forward(self, image: Tensor, ids: Tensor, txt_mask: Tensor, dec_in: Tensor,
                enc_depths: tuple[Tensor, Tensor] | None = None) -> list[Tensor]:
        """Logits ``[B, T, V]`` of every decoder layer through the shared head (teacher forcing).

        ``enc_depths``: per-sample encoder depths of the two streams (see ``encode_full``); ``None``: full depth.
        """
        enc, enc_mask = self.encode_full(image, ids, txt_mask, enc_depths)
        bias = key_bias(enc_mask)
        pos = torch.arange(dec_in.shape[1], device=dec_in.device).expand_as(dec_in)
        x = self.embed_dec(dec_in, pos)
        out = []
        for layer in self.dec:
            x = layer(x, *layer.cross_kv(enc), bias)
            out.append(self.head(x))
        return out


def layerwise_loss(logits: list[Tensor], target: Tensor, pad_id: int = 0, norm: str = "token"
                   ) -> tuple[Tensor, list[float]]:
    """MuE's layer-wise task loss: the same CE at every decoder layer, equal weights (mean over layers).

    ``norm="token"`` averages CE over all target tokens of the batch (fairseq's convention); ``"sample"`` averages
    each sample's tokens first, then the samples, so a one-word entailment answer weighs as much as a 16-token
    caption in a mixed-task batch (with token averaging it gets about a tenth of the gradient).
    """
    if norm not in ("token", "sample"):
        raise ValueError(f"loss norm {norm!r} unknown; expected 'token' or 'sample'")
    keep = (target != pad_id).float()
    parts = []
    for lg in logits:
        ce = F.cross_entropy(lg.flatten(0, 1), target.flatten(), ignore_index=pad_id, reduction="none")
        ce = ce.view_as(keep)
        if norm == "token":
            parts.append(ce.sum() / keep.sum().clamp(min=1))
        else:
            parts.append((ce.sum(1) / keep.sum(1).clamp(min=1)).mean())
    return torch.stack(parts).mean(), [float(p.detach()) for p in parts]
