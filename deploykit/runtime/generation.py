"""MuE on ONNX Runtime: ``MuEEngine``, plus ``predict_vl`` and ``bench_vl`` for the CLI.

Two encoder streams with independent per-sample exits and batch compaction, then a greedy generation loop with
per-token decoder exits (or, for entailment on ``dec_prompt`` engines, one decoder pass over ``<bos>`` + hypothesis
with per-sample exits after each layer).

Compaction: after every encoder layer, rows whose stream exited drop out of that stream's batch; in the decoder,
rows that exit at layer j drop out of layers j+1.. for that step, and rows that finished (``<eos>``) drop out of
later steps. Skipped decoder layers still need a KV-cache entry for this position; the policy is a setting:
``copy`` (MuE's: the exited layer's K/V at this position) or ``compute`` (the skipped layers' own K/V projections of
the exited hidden state, one ``dec{j}_kv`` call per skipped layer).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.backends.ort import OrtRunner
from deploykit.errors import ConfigError, DataError
from deploykit.manifest import Manifest
from deploykit.methods.mue.exits import decoder_threshold, exits, layer_fraction
from deploykit.methods.mue.reference import SampleResult, Thresholds
from deploykit.methods.mue.tokenizer import Vocab


class TaskNotSupportedError(ConfigError):
    """The engine wasn't trained for the requested task (e.g. a caption request on an entailment-only engine)."""


class MuEEngine:
    """Runs an exported MuE engine directory (manifest + graphs + vocabulary) on ONNX Runtime."""

    def __init__(self, manifest: Manifest, threads: int | None = None):
        if "mue" not in manifest.extra:
            raise ConfigError(f"engine {manifest.root} is not a MuE engine (task {manifest.task!r}); use the cascade")
        self.manifest, self.meta = manifest, manifest.extra["mue"]
        self.runners = {k: OrtRunner(manifest.path_of(g["file"]), threads=threads)
                        for k, g in self.meta["graphs"].items()}
        self.vocab = Vocab.load(manifest.path_of(self.meta["vocab"]))
        self.tasks: list[str] = list(self.meta["tasks"])
        self.thresholds = {t: Thresholds(v["img"], v["txt"], v["dec"], bool(v["decay"]))
                           for t, v in self.meta["thresholds"].items()}
        self.n_enc, self.n_dec = int(self.meta["enc_layers"]), int(self.meta["dec_layers"])
        self.answer_ids = np.array([self.vocab.stoi[w] for w in self.meta["answer_tokens"]])
        # engines from before the setting have no key: entailment's decoder starts from <bos> alone
        self.prompted = bool(self.meta.get("dec_prompt", False))

    @classmethod
    def from_dir(cls, engine_dir: str | os.PathLike, threads: int | None = None) -> MuEEngine:
        return cls(Manifest.load(engine_dir), threads)

    def close(self) -> None:
        for r in self.runners.values():
            r.close()

    def __enter__(self) -> MuEEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- inputs --------------------------------------------------------------------------------------------
    def check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise TaskNotSupportedError(f"this engine was trained for {self.tasks}, not {task!r}; use an engine "
                                        f"exported from a run whose method.tasks includes {task!r}")

    def encode_texts(self, texts: list[str], unknown: str = "warn", too_long: str = "error") -> list[list[int]]:
        return [self.vocab.encode(t, int(self.meta["max_text_len"]), unknown, too_long) for t in texts]

    def load_images(self, images: list[Any]) -> list[np.ndarray]:
        """Paths, PIL images or preprocessed ``[3, H, W]`` arrays -> model input arrays."""
        from deploykit.data.preprocess import load_image, preprocess_image

        out = []
        for im in images:
            if isinstance(im, np.ndarray):
                out.append(im.astype(np.float32))
                continue
            if isinstance(im, str | os.PathLike) and not Path(im).exists():
                raise DataError(f"image {im} does not exist; check the path")
            img = im if hasattr(im, "convert") else load_image(im)
            out.append(preprocess_image(img, self.manifest.preprocessing))
        return out

    # ---- encoder ---------------------------------------------------------------------------------------------
    def _stream(self, x: np.ndarray, mask: np.ndarray, thr: float | None, depth: int | None
                ) -> tuple[np.ndarray, np.ndarray]:
        """Run one stream through the shared layers; exited rows leave the batch (compaction)."""
        used = np.zeros(len(x), np.int64)
        active = np.arange(len(x))
        for i in range(self.n_enc):
            r = self.runners[f"enc{i}"].run({"x": x[active], "mask": mask[active]})
            x[active] = r["y"]
            used[active] = i + 1
            stop = exits(r["score"], thr) | (i + 1 == depth)
            active = active[~stop]
            if not len(active):
                break
        return x, used

    def encode(self, images: np.ndarray, ids: np.ndarray, thr: Thresholds, depth: int | None = None
               ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Both streams with independent exits -> (enc_out outputs, image layers, text layers) per row."""
        img = self.runners["image_stem"].run({"image": images})["tokens"]
        txt = self.runners["text_embed"].run({"ids": ids})["tokens"]
        txt_mask = (ids != Vocab.pad_id).astype(np.float32)
        img, p = self._stream(img, np.ones(img.shape[:2], np.float32), thr.img, depth)
        txt, q = self._stream(txt, txt_mask, thr.txt, depth)
        return self.runners["enc_out"].run({"img": img, "txt": txt, "txt_mask": txt_mask}), p, q

    # ---- decoder ---------------------------------------------------------------------------------------------
    def _fill_skipped(self, policy: str, rows: np.ndarray, j: int, s: int, y: np.ndarray, k: np.ndarray,
                      v: np.ndarray, kc: list[np.ndarray], vc: list[np.ndarray]) -> None:
        for jj in range(j + 1, self.n_dec):
            if policy == "compute":
                r = self.runners[f"dec{jj}_kv"].run({"x": y})
                k, v = r["k"], r["v"]
            kc[jj][rows, :, s], vc[jj][rows, :, s] = k[:, :, 0], v[:, :, 0]

    def decode(self, enc: dict[str, np.ndarray], task: str, thr: Thresholds, policy: str,
               depth: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Greedy generation with per-token, per-sample decoder exits -> (tokens, decoder layers, steps) per row."""
        n = len(enc["enc_mask"])
        steps = 1 if task == "entailment" else int(self.meta["max_gen_len"])
        h, dh = int(self.meta["heads"]), int(self.meta["dim"]) // int(self.meta["heads"])
        kc = [np.zeros((n, h, steps, dh), np.float32) for _ in range(self.n_dec)]
        vc = [np.zeros((n, h, steps, dh), np.float32) for _ in range(self.n_dec)]
        tokens = np.zeros((n, steps), np.int64)
        used = np.zeros((n, steps), np.int64)
        nsteps = np.zeros(n, np.int64)
        alive, tok = np.arange(n), np.full(n, Vocab.bos_id, np.int64)
        for s in range(steps):
            t = decoder_threshold(s, thr.dec, int(self.meta["max_gen_len"]), thr.decay)
            xs = self.runners["dec_embed"].run({"token": tok[alive], "position": np.full(len(alive), s)})["x"]
            going = np.arange(len(alive))
            for j in range(self.n_dec):
                g = alive[going]
                r = self.runners[f"dec{j}"].run({
                    "x": xs[going], "past_k": kc[j][g, :, :s], "past_v": vc[j][g, :, :s],
                    "cross_k": enc[f"cross_k{j}"][g], "cross_v": enc[f"cross_v{j}"][g], "enc_mask": enc["enc_mask"][g]})
                xs[going] = r["y"]
                kc[j][g, :, s], vc[j][g, :, s] = r["k"][:, :, 0], r["v"][:, :, 0]
                used[g, s] = j + 1
                if j == self.n_dec - 1:
                    break
                stop = exits(r["score"], t) | (j + 1 == depth)
                if stop.any():
                    self._fill_skipped(policy, g[stop], j, s, r["y"][stop], r["k"][stop], r["v"][stop], kc, vc)
                    going = going[~stop]
                if not len(going):
                    break
            logits = self.runners["head"].run({"x": xs})["logits"]
            if task == "entailment":
                nxt = self.answer_ids[logits[:, self.answer_ids].argmax(-1)]
            else:
                nxt = logits.argmax(-1)
            tokens[alive, s], nsteps[alive], tok[alive] = nxt, s + 1, nxt
            alive = alive[nxt != Vocab.eos_id]  # finished rows leave the batch
            if not len(alive):
                break
        return tokens, used, nsteps

    @staticmethod
    def prompt_inputs(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Right-padded hypothesis ids ``[B, L]`` -> prompt, its mask, and each row's last prompt position.

        The prompt is ``<bos>`` + ids ``[B, L+1]``; the answer is read at the last position.
        """
        tokens = np.concatenate([np.full((len(ids), 1), Vocab.bos_id, np.int64), ids.astype(np.int64)], 1)
        return tokens, (tokens != Vocab.pad_id).astype(np.float32), (ids != Vocab.pad_id).sum(1)

    def answer_prompted(self, enc: dict[str, np.ndarray], ids: np.ndarray, thr: Thresholds, depth: int | None = None
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Entailment of ``dec_prompt`` engines: one non-incremental decoder pass over ``<bos>`` + hypothesis.

        After each decoder layer the rows whose prompt cosine (over their non-pad positions) is above the static
        threshold leave the batch, and the batch's width shrinks to the longest prompt still running. The answer is
        the best of the answer words at each row's last prompt position. Returns (tokens, layers, steps) per row
        in the shape of ``decode``'s.
        """
        n = len(ids)
        tokens, mask, last = self.prompt_inputs(ids)
        x = self.runners["prompt_embed"].run({"tokens": tokens})["x"]
        t = decoder_threshold(0, thr.dec, int(self.meta["max_gen_len"]), thr.decay)
        used = np.zeros(n, np.int64)
        active = np.arange(n)
        for j in range(self.n_dec):
            w = int(last[active].max()) + 1
            r = self.runners[f"dec{j}_prompt"].run({
                "x": x[active, :w], "mask": mask[active, :w], "cross_k": enc[f"cross_k{j}"][active],
                "cross_v": enc[f"cross_v{j}"][active], "enc_mask": enc["enc_mask"][active]})
            x[active, :w] = r["y"]
            used[active] = j + 1
            if j == self.n_dec - 1:
                break
            active = active[~(exits(r["score"], t) | (j + 1 == depth))]
            if not len(active):
                break
        logits = self.runners["head"].run({"x": x[np.arange(n), last][:, None]})["logits"]
        answer = self.answer_ids[logits[:, self.answer_ids].argmax(-1)]
        return answer[:, None], used[:, None], np.ones(n, np.int64)

    # ---- whole pipeline --------------------------------------------------------------------------------------
    def generate_ids(self, images: list[np.ndarray], ids: list[list[int]], task: str, thr: Thresholds | None = None,
                     kv_policy: str | None = None, batch_size: int = 32, depth: int | None = None
                     ) -> list[SampleResult]:
        """Generated ids and layer counts per sample; ``depth`` forces a fixed depth (for depth-matters checks)."""
        self.check_task(task)
        thr = thr or self.thresholds[task]
        policy = kv_policy or self.meta["kv_policy"]
        if policy not in ("copy", "compute"):
            raise ConfigError(f"kv_policy {policy!r} unknown; expected 'copy' or 'compute'")
        out: list[SampleResult] = []
        for a in range(0, len(ids), batch_size):
            chunk = ids[a:a + batch_size]
            width = max(len(i) for i in chunk)
            arr = np.zeros((len(chunk), width), np.int64)
            for r, i in enumerate(chunk):
                arr[r, : len(i)] = i
            enc, p, q = self.encode(np.stack(images[a:a + batch_size]), arr, thr, depth)
            if task == "entailment" and self.prompted:
                toks, used, nsteps = self.answer_prompted(enc, arr, thr, depth)
            else:
                toks, used, nsteps = self.decode(enc, task, thr, policy, depth)
            for r in range(len(chunk)):
                out.append(SampleResult([int(x) for x in toks[r, : nsteps[r]]], int(p[r]), int(q[r]),
                                        [int(x) for x in used[r, : nsteps[r]]]))
        return out

    def predict(self, images: list[Any], texts: list[str] | None, task: str, thr: Thresholds | None = None,
                batch_size: int = 32, unknown: str = "warn", too_long: str = "error") -> list[dict[str, Any]]:
        """Answers or captions with the layers each sample used."""
        from deploykit.data.vl import CAPTION_PROMPT

        self.check_task(task)
        if texts is None:
            if task == "entailment":
                raise DataError("entailment needs one hypothesis text per image")
            texts = [CAPTION_PROMPT] * len(images)
        if len(texts) != len(images):
            raise DataError(f"{len(images)} images but {len(texts)} texts; give one text per image")
        ids = self.encode_texts(texts, unknown, too_long)
        res = self.generate_ids(self.load_images(images), ids, task, thr, batch_size=batch_size)
        out = []
        for r in res:
            d: dict[str, Any] = {"task": task, "image_layers": r.img_layers, "text_layers": r.txt_layers,
                                 "decoder_layers": r.dec_layers,
                                 "layer_fraction": layer_fraction(r.img_layers, r.txt_layers, r.dec_layers,
                                                                  self.n_enc, self.n_dec)}
            text = self.vocab.decode(r.tokens)
            d["answer" if task == "entailment" else "caption"] = text
            out.append(d)
        return out


def predict_vl(engine_dir: str | os.PathLike, image_paths: list[Any], texts: list[str] | None, task: str,
               threads: int | None = None, **kw: Any) -> list[dict[str, Any]]:
    """``deploykit predict`` for MuE engines: one dict per image (answer or caption, layers used)."""
    with MuEEngine.from_dir(engine_dir, threads) as eng:
        return eng.predict(list(image_paths), texts, task, **kw)


def bench_vl(engine_dir: str | os.PathLike, task: str | None = None, n: int = 200, batch_size: int = 1,
             repeats: int = 3, threads: int | None = None, thresholds: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """``deploykit bench`` for MuE engines, on the SYNTHETIC test split.

    Quality and layers used with the engine's thresholds vs full depth, and the wall-clock of both (median of
    ``repeats``, after a warm-up).
    """
    from deploykit.data.vl import synthetic_vl
    from deploykit.methods.mue.metrics import corpus_bleu

    eng = MuEEngine.from_dir(engine_dir, threads)
    tasks = [task] if task else eng.tasks
    report: dict[str, Any] = {"engine": str(engine_dir), "data": "synthetic-vl test split (SYNTHETIC)",
                              "batch_size": batch_size, "n": n, "tasks": {}}
    for t in tasks:
        eng.check_task(t)
        rows = synthetic_vl("test", n=n, size=int(eng.manifest.preprocessing.input_size[-1]), tasks=(t,))
        imgs = eng.load_images([r.image for r in rows])
        ids = eng.encode_texts([r.text for r in rows])
        thr = Thresholds(**thresholds[t]) if thresholds and t in thresholds else eng.thresholds[t]
        entry = {}
        for name, th in (("full", Thresholds.full_depth()), ("exits", thr)):
            eng.generate_ids(imgs[:batch_size], ids[:batch_size], t, th, batch_size=batch_size)  # warm-up
            times, res = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                res = eng.generate_ids(imgs, ids, t, th, batch_size=batch_size)
                times.append(time.perf_counter() - t0)
            entry[name] = summarize(res, rows, eng, corpus_bleu) | {
                "seconds": float(np.median(times)), "seconds_min": float(np.min(times)),
                "seconds_max": float(np.max(times))}
        entry["speedup"] = entry["full"]["seconds"] / entry["exits"]["seconds"]
        report["tasks"][t] = entry
    eng.close()
    return report


def summarize(res: list[SampleResult], rows: list[Any], eng: MuEEngine, bleu: Any) -> dict[str, Any]:
    """Quality (accuracy or BLEU-4) and mean layers used for generated results against their examples."""
    texts = [eng.vocab.decode(r.tokens) for r in res]
    task = rows[0].task
    q = (float(np.mean([t == r.target for t, r in zip(texts, rows)])) if task == "entailment"
         else bleu(texts, [[r.target] for r in rows]))
    frac = [layer_fraction(r.img_layers, r.txt_layers, r.dec_layers, eng.n_enc, eng.n_dec) for r in res]
    return {"accuracy" if task == "entailment" else "bleu4": q, "layer_fraction": float(np.mean(frac)),
            "image_layers": float(np.mean([r.img_layers for r in res])),
            "text_layers": float(np.mean([r.txt_layers for r in res])),
            "decoder_layers_per_token": float(np.mean([np.mean(r.dec_layers) for r in res]))}
