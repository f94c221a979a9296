"""``deploykit calibrate`` for MuE (vision-language) engines: per-task exit thresholds from the validation split.

MuE has three thresholds per task (image stream, text stream, decoder; see ``docs/mue.md``), and the two tasks want
very different points (entailment: shallow image stream; captioning: shallow text stream, full image stream). For
each task this sweeps a grid of thresholds on the **val** split, picks the cheapest point (fewest layer executions,
``layer_fraction``) whose quality is within ``max_drop`` points of full depth on val (accuracy points for
entailment, BLEU-4 points for captioning), writes it into the manifest (``extra.mue.thresholds[task]``, which
``MuEEngine`` uses by default), and measures full depth and the chosen point on **test** with the real runtime
(``MuEEngine.generate_ids``: compaction, KV policy and all).

How the sweep stays cheap (and exact):

- Encoder: each stream runs once at full depth, keeping every layer's output and score. A stream's exit layer for a
  threshold is the first layer whose score is above it, and its output is that layer's output, so any (img, txt)
  threshold pair is a gather; identical exit patterns are evaluated once.
- Entailment answers in one decoder step (or, on ``dec_prompt`` engines, one pass over ``<bos>`` + hypothesis): the
  decoder runs once per encoder pattern at full depth keeping every layer's answer and score, which gives every
  decoder threshold at once.
- Captioning is autoregressive (an exit changes later steps through the KV cache), so each decoder threshold runs
  the runtime's own ``MuEEngine.decode``. To bound the cost the search is staged: every encoder pattern with a
  full-depth decoder first, then the decoder grid on the ``caption_keep`` cheapest encoder patterns that still meet
  the target.

The selected thresholds are re-measured on test with the batched runtime; val figures come from the gathered
sweep (same graphs, same rule).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.errors import ConfigError, DataError
from deploykit.manifest import Manifest, as_manifest
from deploykit.runtime.exit_rules import SampleResult, Thresholds, exits, layer_fraction
from deploykit.runtime.tokenizer import Vocab

# allowed quality drop vs full depth on val, in points (accuracy % for entailment, BLEU-4 x 100 for captioning)
DEFAULT_MAX_DROP = {"entailment": 1.0, "caption": 3.0}
_FINE = [None, 0.999, 0.998, 0.995, 0.99, 0.985, 0.98, 0.97, 0.96, 0.95, 0.93, 0.9, 0.85, 0.8, 0.7, 0.6]
GRID: dict[str, dict[str, list[float | None]]] = {
    "entailment": {"img": _FINE, "txt": _FINE, "dec": _FINE},
    "caption": {"img": [None, 0.999, 0.998, 0.995, 0.99, 0.98, 0.95, 0.9], "txt": [None, 0.99, 0.95, 0.9, 0.8, 0.6],
                "dec": [None, 0.995, 0.99, 0.98, 0.97, 0.96, 0.95, 0.93, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.3, 0.0]},
}
DEFAULT_N = {"val": 300, "test": 500}  # examples per task and split
METRIC = {"entailment": "accuracy", "caption": "bleu4"}


def load_vl_split(data: str | None, split: str, task: str, n: int | None, img_size: int) -> list[Any]:
    """Rows of one task: ``None`` / ``synthetic-vl`` (the SYNTHETIC scenes) or ``jsonl:PATH`` (``{split}`` filled)."""
    from deploykit.data.vl import read_vl_jsonl, synthetic_vl

    if data in (None, "synthetic-vl"):
        return synthetic_vl(split, n=n, size=img_size, tasks=(task,))
    if data.startswith("jsonl:"):
        rows = [r for r in read_vl_jsonl(data[6:].format(split=split)) if r.task == task]
        return rows[:n] if n else rows
    raise ConfigError(f"MuE engines calibrate on 'synthetic-vl' or 'jsonl:PATH/{{split}}.jsonl', not {data!r}")


class _Cache:
    """Per-layer encoder outputs and scores of one split, for gathering any exit pattern."""

    def __init__(self, eng: Any, imgs: list[np.ndarray], ids: list[list[int]], bs: int):
        self.eng, self.bs, self.n = eng, bs, len(ids)
        width = max(len(i) for i in ids)
        self.ids = np.zeros((self.n, width), np.int64)
        for r, i in enumerate(ids):
            self.ids[r, : len(i)] = i
        self.txt_mask = (self.ids != Vocab.pad_id).astype(np.float32)
        images = np.stack(imgs)
        img = np.concatenate([eng.runners["image_stem"].run({"image": images[a:a + bs]})["tokens"]
                              for a in range(0, self.n, bs)])
        txt = np.concatenate([eng.runners["text_embed"].run({"ids": self.ids[a:a + bs]})["tokens"]
                              for a in range(0, self.n, bs)])
        self.img_y, self.img_s = self._layers(img, np.ones(img.shape[:2], np.float32))
        self.txt_y, self.txt_s = self._layers(txt, self.txt_mask)

    def _layers(self, x: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ys, ss = [], []
        for i in range(self.eng.n_enc):
            outs = [self.eng.runners[f"enc{i}"].run({"x": x[a:a + self.bs], "mask": mask[a:a + self.bs]})
                    for a in range(0, self.n, self.bs)]
            x = np.concatenate([o["y"] for o in outs])
            ys.append(x)
            ss.append(np.concatenate([o["score"] for o in outs]))
        return np.stack(ys), np.stack(ss)  # [L, N, T, D], [L, N]

    @staticmethod
    def exit_layers(scores: np.ndarray, thr: float | None) -> np.ndarray:
        """1-based exit layer per row, as ``MuEEngine._stream``: the first layer whose score is above ``thr``."""
        stop = np.stack([exits(s, thr) for s in scores])
        stop[-1] = True
        return stop.argmax(0) + 1

    def enc_out(self, p: np.ndarray, q: np.ndarray, rows: slice) -> dict[str, np.ndarray]:
        r = np.arange(self.n)[rows]
        img, txt = self.img_y[p[r] - 1, r], self.txt_y[q[r] - 1, r]
        return self.eng.runners["enc_out"].run({"img": img, "txt": txt, "txt_mask": self.txt_mask[r]})


def _quality(task: str, texts: list[str], rows: list[Any]) -> float:
    from deploykit.runtime.bleu import corpus_bleu

    if task == "entailment":
        return float(np.mean([t == r.target for t, r in zip(texts, rows)]))
    return corpus_bleu(texts, [[r.target] for r in rows])


def _point(task: str, thr: Thresholds, res: list[SampleResult], rows: list[Any], eng: Any) -> dict[str, Any]:
    texts = [eng.vocab.decode(r.tokens) for r in res]
    frac = [layer_fraction(r.img_layers, r.txt_layers, r.dec_layers, eng.n_enc, eng.n_dec) for r in res]
    return {"thresholds": _thr_dict(thr), "quality": _quality(task, texts, rows),
            "layer_fraction": float(np.mean(frac)), "image_layers": float(np.mean([r.img_layers for r in res])),
            "text_layers": float(np.mean([r.txt_layers for r in res])),
            "decoder_layers_per_token": float(np.mean([np.mean(r.dec_layers) for r in res]))}


def _thr_dict(t: Thresholds) -> dict[str, Any]:
    return {"img": t.img, "txt": t.txt, "dec": t.dec, "decay": t.decay}


def _sweep_entailment(eng: Any, cache: _Cache, rows: list[Any], grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every (img, txt, dec) point; the decoder's single step runs once per distinct encoder exit pattern."""
    points = []
    seen: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}
    for ti in grid["img"]:
        p = cache.exit_layers(cache.img_s, ti)
        for tt in grid["txt"]:
            q = cache.exit_layers(cache.txt_s, tt)
            key = p.tobytes() + q.tobytes()
            if key not in seen:
                seen[key] = _decoder_all_layers(eng, cache, p, q)
            answers, scores = seen[key]  # [J, N] answer ids and exit scores of every decoder layer
            for td in grid["dec"]:
                stop = np.stack([exits(s, td) for s in scores])
                stop[-1] = True
                d = stop.argmax(0)
                ans = answers[d, np.arange(cache.n)]
                res = [SampleResult([int(a)], int(pp), int(qq), [int(dd) + 1]) for a, pp, qq, dd in zip(ans, p, q, d)]
                points.append(_point("entailment", Thresholds(ti, tt, td, False), res, rows, eng))
    return points


def _decoder_all_layers(eng: Any, cache: _Cache, p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step 0 at full depth: every decoder layer's constrained answer and exit score."""
    if eng.prompted:
        return _prompt_all_layers(eng, cache, p, q)
    answers, scores = [], []
    h, dh = int(eng.meta["heads"]), int(eng.meta["dim"]) // int(eng.meta["heads"])
    for a in range(0, cache.n, cache.bs):
        enc = cache.enc_out(p, q, slice(a, a + cache.bs))
        n = len(enc["enc_mask"])
        x = eng.runners["dec_embed"].run({"token": np.full(n, Vocab.bos_id, np.int64),
                                          "position": np.zeros(n, np.int64)})["x"]
        empty = np.zeros((n, h, 0, dh), np.float32)
        ans, sc = [], []
        for j in range(eng.n_dec):
            r = eng.runners[f"dec{j}"].run({"x": x, "past_k": empty, "past_v": empty, "cross_k": enc[f"cross_k{j}"],
                                            "cross_v": enc[f"cross_v{j}"], "enc_mask": enc["enc_mask"]})
            x = r["y"]
            logits = eng.runners["head"].run({"x": x})["logits"]
            ans.append(eng.answer_ids[logits[:, eng.answer_ids].argmax(-1)])
            sc.append(r["score"])
        answers.append(np.stack(ans))
        scores.append(np.stack(sc))
    return np.concatenate(answers, 1), np.concatenate(scores, 1)


def _prompt_all_layers(eng: Any, cache: _Cache, p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``dec_prompt`` engines: the prompt pass at full depth, every layer's answer (last prompt position) and score."""
    answers, scores = [], []
    for a in range(0, cache.n, cache.bs):
        enc = cache.enc_out(p, q, slice(a, a + cache.bs))
        tokens, mask, last = eng.prompt_inputs(cache.ids[a:a + cache.bs])
        w = int(last.max()) + 1  # as the runtime: the batch is as wide as its longest prompt
        x = eng.runners["prompt_embed"].run({"tokens": tokens[:, :w]})["x"]
        rows = np.arange(len(x))
        ans, sc = [], []
        for j in range(eng.n_dec):
            r = eng.runners[f"dec{j}_prompt"].run({"x": x, "mask": mask[:, :w], "cross_k": enc[f"cross_k{j}"],
                                                   "cross_v": enc[f"cross_v{j}"], "enc_mask": enc["enc_mask"]})
            x = r["y"]
            logits = eng.runners["head"].run({"x": x[rows, last][:, None]})["logits"]
            ans.append(eng.answer_ids[logits[:, eng.answer_ids].argmax(-1)])
            sc.append(r["score"])
        answers.append(np.stack(ans))
        scores.append(np.stack(sc))
    return np.concatenate(answers, 1), np.concatenate(scores, 1)


def _decode_pattern(eng: Any, cache: _Cache, p: np.ndarray, q: np.ndarray, thr: Thresholds, policy: str
                    ) -> list[SampleResult]:
    out = []
    for a in range(0, cache.n, cache.bs):
        enc = cache.enc_out(p, q, slice(a, a + cache.bs))
        toks, used, nsteps = eng.decode(enc, "caption", thr, policy)
        for r in range(len(toks)):
            out.append(SampleResult([int(x) for x in toks[r, : nsteps[r]]], int(p[a + r]), int(q[a + r]),
                                    [int(x) for x in used[r, : nsteps[r]]]))
    return out


def _sweep_caption(eng: Any, cache: _Cache, rows: list[Any], grid: dict[str, list[Any]], floor: float | None,
                   keep: int, policy: str) -> list[dict[str, Any]]:
    """Staged: encoder patterns at full decoder depth, then the decoder grid on the cheapest good patterns."""
    stage1, patterns = [], {}
    for ti in grid["img"]:
        p = cache.exit_layers(cache.img_s, ti)
        for tt in grid["txt"]:
            q = cache.exit_layers(cache.txt_s, tt)
            key = p.tobytes() + q.tobytes()
            thr = Thresholds(ti, tt, None, True)
            if key in patterns:
                continue
            res = _decode_pattern(eng, cache, p, q, thr, policy)
            pt = _point("caption", thr, res, rows, eng)
            patterns[key] = (p, q, pt)
            stage1.append(pt)
    good = [v for v in patterns.values() if floor is None or v[2]["quality"] >= floor]
    good.sort(key=lambda v: (v[2]["layer_fraction"], -v[2]["quality"]))
    points = list(stage1)
    for p, q, pt in good[:keep]:
        for td in grid["dec"]:
            if td is None:
                continue
            thr = Thresholds(pt["thresholds"]["img"], pt["thresholds"]["txt"], td, True)
            points.append(_point("caption", thr, _decode_pattern(eng, cache, p, q, thr, policy), rows, eng))
    return points


def choose_point(points: list[dict[str, Any]], floor: float | None, layer_budget: float | None,
                 task: str = "") -> dict[str, Any]:
    """Cheapest point with quality >= ``floor``; or, with ``layer_budget``, the best quality within the budget."""
    if layer_budget is not None:
        ok = [p for p in points if p["layer_fraction"] <= layer_budget]
        if not ok:
            cheapest = min(p["layer_fraction"] for p in points)
            raise ConfigError(f"{task}: no threshold point uses <= {layer_budget:.2f} of the layers (the cheapest "
                              f"uses {cheapest:.3f}); raise --flops-budget")
        return max(ok, key=lambda p: (p["quality"], -p["layer_fraction"]))
    ok = [p for p in points if p["quality"] >= floor]
    if not ok:
        raise ConfigError(f"{task}: no threshold point reaches the quality target {floor:.4f}; allow a larger drop")
    return min(ok, key=lambda p: (p["layer_fraction"], -p["quality"]))  # full depth is always a point


def pareto(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points that no other point beats on both quality and layers (sorted by layers)."""
    front, best = [], -1.0
    for p in sorted(points, key=lambda p: (p["layer_fraction"], -p["quality"])):
        if p["quality"] > best:
            front.append(p)
            best = p["quality"]
    return front


def _certify_task(eng: Any, task: str, vrows: list[Any], grid: dict[str, list[Any]], policy: str, bs: int,
                  max_drop: float, confidence: float, loss: str, bound: str, keep: int
                  ) -> tuple[dict[str, Any] | None, dict[str, Any], list[dict[str, Any]]]:
    """Learn-then-Test for one task: the path is learnt on the first half of val, certified on the second.

    Path: the Pareto front (quality vs layers) of the sweep on the first half, most layers (most conservative)
    first, full depth left out (it is the fallback). Fixed-sequence testing on the second half with the real
    runtime (``generate_ids``), per-sample loss: the answer / caption differs from full depth's (``consistency``),
    or (entailment only) full depth is right and the exit is wrong (``accuracy``). Returns the chosen path point
    (None: nothing certified, use full depth), the guarantee record and the learning half's sweep.
    """
    from deploykit.tune import risk

    if loss == "accuracy" and task != "entailment":
        raise ConfigError(f"--loss accuracy needs a per-sample right/wrong; {task} has only corpus BLEU: use --loss "
                          "consistency (the caption differs from the full-depth caption)")
    eps, delta = max_drop / 100.0, 1.0 - confidence
    half = len(vrows) // 2
    learn, cert = vrows[:half], vrows[half:]
    cache = _Cache(eng, eng.load_images([r.image for r in learn]), eng.encode_texts([r.text for r in learn]), bs)
    points = (_sweep_entailment(eng, cache, learn, grid) if task == "entailment"
              else _sweep_caption(eng, cache, learn, grid, None, keep, policy))
    path = [p for p in reversed(pareto(points)) if p["layer_fraction"] < 1.0]
    imgs, ids = eng.load_images([r.image for r in cert]), eng.encode_texts([r.text for r in cert])

    def texts(thr: Thresholds) -> np.ndarray:
        return np.asarray([eng.vocab.decode(r.tokens) for r in eng.generate_ids(imgs, ids, task, thr, policy, bs)])

    full = texts(Thresholds.full_depth())
    target = np.asarray([r.target for r in cert])
    pvalues, risks, last = [], [], -1
    for j, p in enumerate(path):  # fixed sequence: stop at the first candidate not rejected
        out = texts(Thresholds(**p["thresholds"]))
        losses = (risk.consistency_loss(out, full) if loss == "consistency"
                  else risk.accuracy_loss(out == target, full == target))
        pvalues.append(risk.pvalue(losses, eps, bound))
        risks.append(float(losses.mean()))
        if pvalues[-1] > delta:
            break
        last = j
    g: dict[str, Any] = {
        "statement": (f"with probability >= {confidence:g} over the calibration sample, the {task} {loss} loss on "
                      f"new data from the same distribution is <= {max_drop:g} points"),
        "certified": last >= 0, "loss": loss, "bound": bound, "delta": delta, "epsilon": eps,
        "path": f"Pareto front of the sweep on {len(learn)} val rows, most layers first ({len(path)} candidates)",
        "calibration_samples": len(cert), "candidates_certified": last + 1,
        "empirical_risk": risks[last] if last >= 0 else 0.0, "p_value": pvalues[last] if last >= 0 else None,
        "min_samples_for_epsilon": risk.min_samples(eps, delta), "path_pvalues": pvalues}
    if last < 0:
        g["message"] = (f"{task}: no threshold meets the guarantee (ε = {max_drop:g} points, δ = {delta:g}, {loss} "
                        f"loss, {len(cert)} calibration rows; at least {g['min_samples_for_epsilon']} are needed "
                        "even with zero losses): falling back to full depth (all exits off)")
    return (path[last] if last >= 0 else None), g, points


def calibrate_mue(engine_dir: str | os.PathLike | Manifest, data: str | None = None,
                  max_drop: float | dict[str, float] | None = None, layer_budget: float | None = None,
                  json_out: str | os.PathLike | None = None, plot_out: str | os.PathLike | None = None,
                  write: bool = True, tasks: list[str] | None = None, n_val: int | None = None,
                  n_test: int | None = None, threads: int | None = 1, batch_size: int = 64,
                  grid: dict[str, dict[str, list[Any]]] | None = None, caption_keep: int = 3,
                  kv_policy: str | None = None, confidence: float | None = None, loss: str = "consistency",
                  bound: str = "binomial") -> dict[str, Any]:
    """Choose per-task thresholds on val, write them into the manifest, and report val and test figures.

    Args:
        engine_dir: exported MuE engine directory, or its loaded manifest (then it is not read again).
        data: ``synthetic-vl`` (default; the SYNTHETIC scenes) or ``jsonl:PATH/{split}.jsonl``.
        max_drop: allowed drop vs full depth on val, in points: accuracy % (entailment), BLEU-4 x 100 (captioning).
            One number for both tasks, or a dict per task; default ``DEFAULT_MAX_DROP`` (1.0 / 3.0).
        layer_budget: instead, the best val quality using at most this fraction of the layer executions.
        json_out: report path (a PNG of quality vs layers used goes beside it unless ``plot_out`` is given).
        plot_out: PNG path for the plot.
        write: write the thresholds (``extra.mue.thresholds[task]``) and a summary (``calibration``) into the
            manifest; the runtime then uses them by default.
        tasks: tasks to calibrate (default: all the engine's).
        n_val: validation examples per task (default ``DEFAULT_N["val"]``, 300).
        n_test: test examples per task (default ``DEFAULT_N["test"]``, 500).
        threads: ONNX Runtime intra-op threads.
        batch_size: rows per session call.
        grid: thresholds to sweep per task and part (``img`` / ``txt`` / ``dec``); default ``GRID``.
        caption_keep: captioning's decoder grid runs on this many of the cheapest encoder patterns that meet the
            target.
        kv_policy: skipped decoder layers' KV (default: the engine's).
        confidence: 1 - δ: risk-controlled thresholds (``_certify_task``): with this probability the loss on new
            data is <= ``max_drop`` points; the path is learnt on half of val and certified on the other half.
        loss: with ``confidence``: ``consistency`` (differs from full depth) or ``accuracy`` (entailment only).
        bound: with ``confidence``: ``binomial`` or ``hb``.
    """
    from deploykit.runtime.generation import MuEEngine

    manifest = as_manifest(engine_dir)
    engine_dir = manifest.root
    if layer_budget is not None and max_drop is not None:
        raise ConfigError("give --max-drop or --flops-budget (a layer budget for MuE), not both")
    if confidence is not None:
        if layer_budget is not None:
            raise ConfigError("--flops-budget with --confidence is not implemented for MuE engines; give --max-drop")
        if not 0 < confidence < 1:
            raise ConfigError(f"--confidence is 1 - δ, strictly between 0 and 1 (e.g. 0.9); got {confidence}")
    drops = dict(DEFAULT_MAX_DROP)
    if isinstance(max_drop, dict):
        drops.update(max_drop)
    elif max_drop is not None:
        drops = {t: float(max_drop) for t in drops}
    grid = grid or GRID
    eng = MuEEngine(manifest, threads)  # raises ConfigError for an engine without MuE graphs
    policy = kv_policy or eng.meta["kv_policy"]
    size = int(manifest.preprocessing.input_size[-1])
    report: dict[str, Any] = {"engine_dir": str(engine_dir), "data": data or "synthetic-vl",
                              "synthetic": data in (None, "synthetic-vl"), "kv_policy": policy,
                              "layer_fraction": "(p + q + sum_s d_s) / (2 N_E + S N_D) per sample, mean",
                              "tasks": {}}
    try:
        for task in tasks or eng.tasks:
            eng.check_task(task)
            if task not in grid:
                raise ConfigError(f"no threshold grid for task {task!r}; grid has {sorted(grid)}")
            t0 = time.perf_counter()
            vrows = load_vl_split(data, "val", task, n_val or DEFAULT_N["val"], size)
            trows = load_vl_split(data, "test", task, n_test or DEFAULT_N["test"], size)
            if not vrows or not trows:
                raise DataError(f"no {task} rows in the val or test split of {data or 'synthetic-vl'}")
            vimgs, vids = eng.load_images([r.image for r in vrows]), eng.encode_texts([r.text for r in vrows])
            full_v = _point(task, Thresholds.full_depth(),
                            eng.generate_ids(vimgs, vids, task, Thresholds.full_depth(), policy, batch_size),
                            vrows, eng)
            floor = None if layer_budget is not None else full_v["quality"] - drops[task] / 100 - 1e-12
            g = {k: list(v) for k, v in grid[task].items()}
            guarantee = None
            if confidence is not None:  # the sweep runs on the learning half of val only
                chosen, guarantee, points = _certify_task(eng, task, vrows, g, policy, batch_size, drops[task],
                                                          confidence, loss, bound, caption_keep)
                best = chosen or full_v
            else:
                cache = _Cache(eng, vimgs, vids, batch_size)
                points = (_sweep_entailment(eng, cache, vrows, g) if task == "entailment"
                          else _sweep_caption(eng, cache, vrows, g, floor, caption_keep, policy))
                best = choose_point(points, floor, layer_budget, task)
            thr = Thresholds(**best["thresholds"])
            timgs, tids = eng.load_images([r.image for r in trows]), eng.encode_texts([r.text for r in trows])
            full_t = _point(task, Thresholds.full_depth(),
                            eng.generate_ids(timgs, tids, task, Thresholds.full_depth(), policy, batch_size),
                            trows, eng)
            chosen_t = _point(task, thr, eng.generate_ids(timgs, tids, task, thr, policy, batch_size), trows, eng)
            report["tasks"][task] = {
                "metric": METRIC[task],
                "objective": ({"layer_budget": layer_budget} if layer_budget is not None
                              else {"max_drop_points": drops[task]}),
                "thresholds": best["thresholds"],
                "val": {"samples": len(vrows), "full": full_v, "chosen": best},
                "test": {"samples": len(trows), "full": full_t, "chosen": chosen_t,
                         "quality_ratio": chosen_t["quality"] / max(full_t["quality"], 1e-12),
                         "layer_reduction": 1 - chosen_t["layer_fraction"]},
                "points_searched": len(points), "pareto_val": pareto(points), "sweep_val": points,
                "seconds": round(time.perf_counter() - t0, 1)}
            if guarantee is not None:
                report["tasks"][task]["guarantee"] = guarantee
                report["tasks"][task]["objective"].update(confidence=confidence, delta=1 - confidence, loss=loss,
                                                          bound=bound)
    finally:
        eng.close()
    from deploykit.tune.report import write_report

    write_report(report, json_out, plot_out, lambda path: plot_mue_calibration(report, path), indent=1)
    if write:
        manifest.extra["mue"]["thresholds"].update({t: r["thresholds"] for t, r in report["tasks"].items()})
        manifest.calibration = {"data": report["data"], "kv_policy": policy, "calibrated_at": time.time(),
                                "tasks": {t: {k: r[k] for k in ("metric", "objective", "thresholds", "val", "test",
                                                                "guarantee") if k in r}
                                          for t, r in report["tasks"].items()}}
        manifest.save()
    return report


def plot_mue_calibration(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Quality vs layers used per task: the val sweep, its Pareto front, full depth and the chosen point on test."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = report["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), dpi=110, squeeze=False)
    for ax, (task, r) in zip(axes[0], tasks.items()):
        sw, fr = r["sweep_val"], r["pareto_val"]
        ax.scatter([p["layer_fraction"] for p in sw], [p["quality"] for p in sw], s=6, c="0.75",
                   label="threshold points (val)")
        ax.plot([p["layer_fraction"] for p in fr], [p["quality"] for p in fr], "-", c="C0", label="Pareto (val)")
        for split, c, mk in (("val", "C0", "o"), ("test", "C3", "*")):
            s = r[split]
            ax.scatter([1.0], [s["full"]["quality"]], c="k", marker=mk, s=50, zorder=3)
            ax.scatter([s["chosen"]["layer_fraction"]], [s["chosen"]["quality"]], c=c, marker=mk, s=90, zorder=3,
                       label=f"chosen ({split}); black: full depth")
        ax.set_xlabel("layer executions used / full depth")
        ax.set_ylabel(r["metric"])
        ax.set_title(f"MuE {task}" + (" (SYNTHETIC data)" if report.get("synthetic") else ""))
        ax.set_xlim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
