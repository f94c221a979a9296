"""PyTorch reference of MuE inference, one sample at a time: the ground truth the ORT runtime is checked against.

It shares no code with the runtime's batching and compaction, so parity (identical answers and greedy captions) is
a real check of both. Decisions are per sample because every call holds a single sample.
"""

from __future__ import annotations

import torch

from deploykit.methods.mue.model import MuEModel, key_bias
from deploykit.runtime.exit_rules import SampleResult, Thresholds, cosine_per_sample, decoder_threshold, exits
from deploykit.runtime.tokenizer import Vocab


def _stream(model: MuEModel, x: torch.Tensor, mask: torch.Tensor, thr: float | None) -> tuple[torch.Tensor, int]:
    used = 0
    for i in range(model.cfg.enc_layers):
        x, s = model.encoder_layer(i, x, mask)
        used = i + 1
        if bool(exits(s, thr)[0]):
            break
    return x, used


@torch.no_grad()
def reference_generate(model: MuEModel, image: torch.Tensor, ids: list[int], task: str, thr: Thresholds,
                       kv_policy: str, answer_ids: list[int] | None = None) -> SampleResult:
    """Greedy generation for one sample ``image [3, H, W]``; entailment answers in one constrained step."""
    cfg, pad = model.cfg, Vocab.pad_id
    ids_t = torch.tensor([ids])
    img, p = _stream(model, model.embed_image(image[None]), torch.ones(1, cfg.num_patches), thr.img)
    txt_mask = (ids_t != pad).float()
    txt, q = _stream(model, model.embed_text(ids_t), txt_mask, thr.txt)
    enc, enc_mask = model.encode_out(img, txt, txt_mask)
    bias = key_bias(enc_mask)
    cross = [layer.cross_kv(enc) for layer in model.dec]
    if task == "entailment" and cfg.dec_prompt:
        return _prompted_answer(model, ids, cross, bias, thr, answer_ids, p, q)
    h, dh = cfg.heads, cfg.dim // cfg.heads
    cache = [[torch.zeros(1, h, 0, dh), torch.zeros(1, h, 0, dh)] for _ in model.dec]
    tok, out, dec_used = Vocab.bos_id, [], []
    steps = 1 if task == "entailment" else cfg.max_gen_len
    for s in range(steps):
        x = model.embed_dec(torch.tensor([[tok]]), torch.tensor([[s]]))
        t = decoder_threshold(s, thr.dec, cfg.max_gen_len, thr.decay)
        for j, layer in enumerate(model.dec):
            y, k, v = layer.step(x, cache[j][0], cache[j][1], *cross[j], bias)
            score = cosine_per_sample(y[:, 0], x[:, 0])
            x = y
            cache[j] = [torch.cat([cache[j][0], k], 2), torch.cat([cache[j][1], v], 2)]
            if j < cfg.dec_layers - 1 and bool(exits(score, t)[0]):
                for jj in range(j + 1, cfg.dec_layers):  # fill the skipped layers' caches for this position
                    kk, vv = (k, v) if kv_policy == "copy" else model.dec[jj].self_kv(x)
                    cache[jj] = [torch.cat([cache[jj][0], kk], 2), torch.cat([cache[jj][1], vv], 2)]
                break
        dec_used.append(j + 1)
        logits = model.head(x)[0, 0]
        if answer_ids is not None and task == "entailment":
            tok = answer_ids[int(logits[answer_ids].argmax())]
        else:
            tok = int(logits.argmax())
        out.append(tok)
        if tok == Vocab.eos_id:
            break
    return SampleResult(out, p, q, dec_used)


def _prompted_answer(model: MuEModel, ids: list[int], cross: list[tuple[torch.Tensor, torch.Tensor]],
                     bias: torch.Tensor, thr: Thresholds, answer_ids: list[int] | None, p: int, q: int
                     ) -> SampleResult:
    """Entailment with ``dec_prompt``: one non-incremental decoder pass over ``<bos>`` + hypothesis.

    The sample exits after layer j when the cosine over its whole prompt is above the threshold (static:
    entailment's thresholds have no decay); the answer is read at the last prompt position.
    """
    prompt = torch.tensor([[Vocab.bos_id, *ids]])
    x = model.embed_prompt(prompt)
    mask = torch.ones(prompt.shape, dtype=torch.float32)
    n, t = model.cfg.dec_layers, decoder_threshold(0, thr.dec, model.cfg.max_gen_len, thr.decay)
    for j in range(n):
        x, score = model.prompt_layer(j, x, *cross[j], bias, mask)
        if j < n - 1 and bool(exits(score, t)[0]):
            break
    logits = model.head(x[:, -1])[0]
    tok = answer_ids[int(logits[answer_ids].argmax())] if answer_ids is not None else int(logits.argmax())
    return SampleResult([tok], p, q, [j + 1])
