"""MuE training as a library function: ``train_mue(recipe, out_dir) -> run_dir``.

Single stage, as the paper: the encoder runs both streams at full depth (no exits while training) and every decoder
layer gets the same task loss through the shared final norm and tied projection. Opt-in ``train.stream_depth_drop: p``
(default 0, the reference): each stream of each sample stops after a random k < enc_layers layers with probability
p, so the decoder also learns from truncated streams, as the runtime's encoder exits produce them. The run directory
holds ``config.json`` (resolved recipe), ``model.safetensors``, ``vocab.json`` and ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from deploykit.data.preprocess import load_image, preprocess_image
from deploykit.data.vl import LABELS, VLExample, read_vl_jsonl, synthetic_vl
from deploykit.errors import CheckpointError, ConfigError, DataError
from deploykit.methods.mue.config import MuEConfig, MuEDataSpec, MuETrainSettings, check_recipe_keys
from deploykit.methods.mue.model import MuEModel, layerwise_loss
from deploykit.runtime.tokenizer import Vocab

DEFAULT_TRAIN = MuETrainSettings().to_dict()


def draw_stream_depths(n: int, enc_layers: int, p: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Per-sample encoder depths ``(image [n], text [n])`` for ``train.stream_depth_drop``.

    Each stream of each sample, independently, with probability ``p`` stops after k ~ uniform{1..enc_layers-1}
    layers, else runs all ``enc_layers``.
    """
    out = []
    for _ in range(2):
        drop = torch.rand(n, generator=gen) < p
        k = torch.randint(1, max(enc_layers, 2), (n,), generator=gen)
        out.append(torch.where(drop, k, torch.full_like(k, enc_layers)))
    return out[0], out[1]


def preprocessing_of(cfg: MuEConfig) -> dict[str, Any]:
    """The manifest-style preprocessing block (plain resize, mean/std of the config)."""
    return {"input_size": [cfg.in_chans, cfg.img_size, cfg.img_size], "mean": list(cfg.mean), "std": list(cfg.std),
            "interpolation": "bilinear", "crop_pct": 1.0}


def load_examples(data: dict[str, Any], split: str, tasks: list[str], img_size: int) -> list[VLExample]:
    """Examples of ``split`` from the recipe's data block: ``synthetic-vl`` or ``jsonl:PATH`` (``{split}`` filled)."""
    spec = str(data.get("spec", "synthetic-vl"))
    if spec == "synthetic-vl":
        n = data.get(f"n_{split}")
        return synthetic_vl(split, n=None if n is None else int(n), size=img_size, tasks=tuple(tasks),
                            seed=int(data.get("seed", 0)))
    if spec.startswith("jsonl:"):
        rows = read_vl_jsonl(spec[6:].format(split=split))
        return [r for r in rows if r.task in tasks]
    raise ConfigError(f"unknown MuE data spec {spec!r}; use 'synthetic-vl' or 'jsonl:PATH' (PATH may hold {{split}})")


def image_array(image: Any, pre: dict[str, Any]) -> np.ndarray:
    """A PIL image or a path -> normalised ``float32 [3, H, W]``."""
    img = image if hasattr(image, "convert") else load_image(image)
    return preprocess_image(img, pre)


def tensorize(examples: list[VLExample], vocab: Vocab, cfg: MuEConfig) -> dict[str, torch.Tensor]:
    """Stack examples into padded tensors (text ids, decoder input / target with <bos> / <eos>)."""
    pre = preprocessing_of(cfg)
    imgs = np.stack([image_array(e.image, pre) for e in examples])
    lt, lg = cfg.max_text_len, cfg.max_gen_len
    width = max(lg, lt + 1) if cfg.dec_prompt else lg  # decoder sequence: generation steps, <bos> + hypothesis
    ids = np.zeros((len(examples), lt), np.int64)
    tgt = np.zeros((len(examples), width), np.int64)
    dec_in = np.zeros((len(examples), width), np.int64)
    ans_pos = np.zeros(len(examples), np.int64)  # where an entailment answer is predicted
    for i, e in enumerate(examples):
        t = vocab.encode(e.text, lt, unknown="error")
        ids[i, : len(t)] = t
        if cfg.dec_prompt and e.task == "entailment":  # prompt = <bos> + hypothesis; answer at its last position
            dec_in[i, : len(t) + 1] = [vocab.bos_id, *t]
            tgt[i, len(t)] = vocab.encode(e.target, unknown="error")[0]
            ans_pos[i] = len(t)
            continue
        y = vocab.encode(e.target, unknown="error") + [vocab.eos_id]
        if len(y) > lg:
            raise DataError(f"target of {len(y)} tokens (with <eos>) exceeds max_gen_len {lg}; raise max_gen_len")
        tgt[i, : len(y)] = y
        dec_in[i, : len(y)] = [vocab.bos_id, *y[:-1]]
    return {"image": torch.from_numpy(imgs), "ids": torch.from_numpy(ids), "dec_in": torch.from_numpy(dec_in),
            "target": torch.from_numpy(tgt), "is_ve": torch.tensor([e.task == "entailment" for e in examples]),
            "ans_pos": torch.from_numpy(ans_pos)}


@torch.no_grad()
def evaluate(model: MuEModel, t: dict[str, torch.Tensor], vocab: Vocab, bs: int = 256) -> dict[str, float]:
    """Teacher-forced token accuracy per decoder layer, and full-depth entailment accuracy (answer tokens only)."""
    model.eval()
    correct = np.zeros(model.cfg.dec_layers)
    total, ve_ok, ve_n = 0, 0, 0
    ans = [vocab.stoi[w] for w in LABELS if w in vocab.stoi]
    for a in range(0, len(t["ids"]), bs):
        b = {k: v[a:a + bs] for k, v in t.items()}
        logits = model(b["image"], b["ids"], (b["ids"] != 0).float(), b["dec_in"])
        keep = b["target"] != 0
        for j, lg in enumerate(logits):
            correct[j] += int(((lg.argmax(-1) == b["target"]) & keep).sum())
        total += int(keep.sum())
        if b["is_ve"].any() and ans:
            ve, at = b["is_ve"], b["ans_pos"][b["is_ve"]]
            first = logits[-1][ve, at][:, ans].argmax(-1)
            ve_ok += int((torch.tensor(ans)[first] == b["target"][ve, at]).sum())
            ve_n += int(b["is_ve"].sum())
    model.train()
    res = {f"tok_acc_l{j + 1}": float(c / max(total, 1)) for j, c in enumerate(correct)}
    res["ve_acc_full"] = ve_ok / max(ve_n, 1)
    return res


def train_mue(recipe: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """Train MuE per ``recipe`` (keys ``name``, ``method``, ``data``, ``train``) into ``out_dir``; returns it."""
    if not isinstance(recipe, dict):
        raise ConfigError(f"a MuE recipe must be a mapping, got {type(recipe).__name__}")
    check_recipe_keys(recipe)
    method = dict(recipe.get("method") or {})
    if method.pop("name", "mue") != "mue":
        raise ConfigError("train_mue needs a recipe with method.name == 'mue'")
    cfg = MuEConfig.from_dict(method)
    settings = MuETrainSettings.from_dict(recipe.get("train"))
    data_spec = MuEDataSpec.from_dict(recipe.get("data"))
    tr, data = settings.to_dict(), data_spec.to_dict()
    share = settings.entailment_share
    sdd = settings.stream_depth_drop
    if tr["threads"]:
        torch.set_num_threads(int(tr["threads"]))
    torch.manual_seed(int(tr["seed"]))
    train_ex = load_examples(data, "train", cfg.tasks, cfg.img_size)
    val_ex = load_examples(data, "val", cfg.tasks, cfg.img_size)
    vocab = Vocab.build([e.text for e in train_ex] + [e.target for e in train_ex] + list(LABELS))
    tt, tv = tensorize(train_ex, vocab, cfg), tensorize(val_ex, vocab, cfg)
    model = MuEModel(cfg, len(vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=float(tr["lr"]), weight_decay=float(tr["weight_decay"]))
    steps, warm = int(tr["steps"]), int(tr["warmup"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "metrics.jsonl", "w")
    gen = torch.Generator().manual_seed(int(tr["seed"]))
    # a generator of its own, so that the batches are the same with and without stream_depth_drop
    depth_gen = torch.Generator().manual_seed(int(tr["seed"]) + 1)
    n, bs, t0 = len(tt["ids"]), int(tr["batch_size"]), time.time()
    perm, pos = torch.randperm(n, generator=gen), 0
    pools = [torch.nonzero(tt["is_ve"]).flatten(), torch.nonzero(~tt["is_ve"]).flatten()]
    if share is not None and not all(len(p) for p in pools):
        raise ConfigError("train.entailment_share needs both tasks in the training data")
    stop = min(steps, settings.max_steps or steps)  # --max-steps: stop early, the schedule keeps its length
    for step in range(stop):
        if share is not None:  # a fixed task mix per batch (rows drawn with replacement from each task)
            k = int(round(float(share) * bs))
            idx = torch.cat([p[torch.randint(len(p), (m,), generator=gen)] for p, m in zip(pools, (k, bs - k))])
        else:
            if pos + bs > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos:pos + bs]
            pos += bs
        depths = draw_stream_depths(len(idx), cfg.enc_layers, sdd, depth_gen) if sdd > 0 and cfg.enc_layers > 1 \
            else None
        logits = model(tt["image"][idx], tt["ids"][idx], (tt["ids"][idx] != 0).float(), tt["dec_in"][idx], depths)
        loss, parts = layerwise_loss(logits, tt["target"][idx], norm=str(tr["loss_norm"]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if tr.get("verbose") and (step + 1) % 50 == 0:
            print(f"step {step + 1}/{steps} loss {float(loss.detach()):.3f} ({time.time() - t0:.0f}s)", flush=True)
        if (step + 1) % int(tr["eval_every"]) == 0 or step + 1 == stop:
            rec = {"step": step + 1, "loss": float(loss.detach()), "loss_layers": parts,
                   "time_s": round(time.time() - t0, 1), **evaluate(model, tv, vocab)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
    log.close()
    save_run(model, vocab, {"name": recipe.get("name", "mue"), "method": {"name": "mue", **cfg.to_dict()},
                            "data": data, "train": tr, "labels": list(LABELS),
                            "preprocessing": preprocessing_of(cfg)}, out)
    return out


def save_run(model: MuEModel, vocab: Vocab, config: dict[str, Any], out: Path) -> None:
    """Safetensors weights + JSON config + vocabulary (never pickles)."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    vocab.save(out / "vocab.json")


def load_mue_run(run_dir: str | os.PathLike) -> tuple[MuEModel, Vocab, dict[str, Any]]:
    """Load a MuE run directory -> (model in eval mode, vocabulary, resolved config)."""
    from safetensors.torch import load_file

    run = Path(run_dir)
    for f in ("config.json", "model.safetensors", "vocab.json"):
        if not (run / f).exists():
            raise CheckpointError(f"{run / f} is missing; {run} is not a finished MuE run (train with train_mue)")
    config = json.loads((run / "config.json").read_text())
    method = dict(config["method"])
    method.pop("name", None)
    cfg = MuEConfig.from_dict(method)
    vocab = Vocab.load(run / "vocab.json")
    model = MuEModel(cfg, len(vocab))
    try:
        model.load_state_dict(load_file(str(run / "model.safetensors")))
    except RuntimeError as e:
        raise CheckpointError(f"{run}/model.safetensors doesn't match its config.json: {e}") from e
    return model.eval(), vocab, config
