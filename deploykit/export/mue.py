"""Export a MuE run as per-graph ONNX files + a ``deploykit.json`` manifest, and check parity against PyTorch.

Graphs (batch axis symbolic everywhere; sequence and cache lengths symbolic where they vary):
``image_stem``, ``text_embed``, ``enc{i}`` (one per encoder layer, shared by both streams, with the per-sample
cosine score as an output), ``enc_out`` (normalised concat -> every decoder layer's cross-attention K/V),
``dec_embed``, ``dec{j}`` (one decoding step of layer j with KV-cache input and this step's K/V as output, plus the
score), ``dec{j}_kv`` (layer j's K/V of a hidden state: the ``compute`` KV policy), and ``head`` (shared norm +
tied projection). Runs with ``dec_prompt`` (entailment's decoder prompted by ``<bos>`` + hypothesis) also get
``prompt_embed`` and ``dec{j}_prompt`` (layer j over the whole prompt, sequence in and out, with the per-sample cosine
over the non-pad prompt positions); entailment needs no KV cache since it answers in one pass. Parity: identical
entailment answers and greedy captions on the test split, ORT vs PyTorch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deploykit.data.vl import LABELS
from deploykit.errors import ExportError
from deploykit.manifest import MANIFEST_NAME, ExitPolicy, Manifest, Preprocessing, file_sha256
from deploykit.methods.mue.model import MuEModel, key_bias
from deploykit.runtime.tokenizer import Vocab
from deploykit.staging import staged_dir

OPSET = 17
B = "batch"


class _Fn(nn.Module):
    """Wrap one model method as a graph's forward."""

    def __init__(self, fn: Any, model: MuEModel):
        super().__init__()
        self.fn, self.model = fn, model  # the model as a submodule: its weights become initializers

    def forward(self, *args: Tensor) -> Any:
        return self.fn(*args)


def _graphs(m: MuEModel) -> list[tuple[str, Any, list[str], list[str], dict[str, dict[int, str]]]]:
    """(name, fn, input names, output names, dynamic axes) of every graph."""
    dec = [f"cross_k{j}" for j in range(m.cfg.dec_layers)]
    g = [("image_stem", m.embed_image, ["image"], ["tokens"], {"image": {0: B}, "tokens": {0: B}}),
         ("text_embed", m.embed_text, ["ids"], ["tokens"], {"ids": {0: B, 1: "text"}, "tokens": {0: B, 1: "text"}}),
         ("dec_embed", lambda t, p: m.embed_dec(t[:, None], p[:, None]), ["token", "position"], ["x"],
          {"token": {0: B}, "position": {0: B}, "x": {0: B}}),
         ("head", lambda x: m.head(x)[:, 0], ["x"], ["logits"], {"x": {0: B}, "logits": {0: B}})]
    for i in range(m.cfg.enc_layers):
        g.append((f"enc{i}", lambda x, mk, i=i: m.encoder_layer(i, x, mk), ["x", "mask"], ["y", "score"],
                  {"x": {0: B, 1: "seq"}, "mask": {0: B, 1: "seq"}, "y": {0: B, 1: "seq"}, "score": {0: B}}))

    def enc_out(img: Tensor, txt: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
        enc, enc_mask = m.encode_out(img, txt, mask)
        return (enc_mask, *[t for layer in m.dec for t in layer.cross_kv(enc)])

    kv_names = [n for j in range(m.cfg.dec_layers) for n in (dec[j], f"cross_v{j}")]
    g.append(("enc_out", enc_out, ["img", "txt", "txt_mask"], ["enc_mask", *kv_names],
              {"img": {0: B}, "txt": {0: B, 1: "text"}, "txt_mask": {0: B, 1: "text"}, "enc_mask": {0: B, 1: "src"},
               **{n: {0: B, 2: "src"} for n in kv_names}}))
    from deploykit.runtime.exit_rules import cosine_per_sample

    for j, layer in enumerate(m.dec):
        def step(x: Tensor, pk: Tensor, pv: Tensor, ck: Tensor, cv: Tensor, mk: Tensor, layer: Any = layer) -> Any:
            y, k, v = layer.step(x, pk, pv, ck, cv, key_bias(mk))
            return y, k, v, cosine_per_sample(y[:, 0], x[:, 0])

        g.append((f"dec{j}", step, ["x", "past_k", "past_v", "cross_k", "cross_v", "enc_mask"],
                  ["y", "k", "v", "score"],
                  {"x": {0: B}, "past_k": {0: B, 2: "past"}, "past_v": {0: B, 2: "past"}, "cross_k": {0: B, 2: "src"},
                   "cross_v": {0: B, 2: "src"}, "enc_mask": {0: B, 1: "src"}, "y": {0: B}, "k": {0: B},
                   "v": {0: B}, "score": {0: B}}))
        g.append((f"dec{j}_kv", layer.self_kv, ["x"], ["k", "v"], {"x": {0: B}, "k": {0: B}, "v": {0: B}}))
    if m.cfg.dec_prompt and "entailment" in m.cfg.tasks:  # entailment's one non-incremental pass over the prompt
        P = {0: B, 1: "prompt"}
        g.append(("prompt_embed", m.embed_prompt, ["tokens"], ["x"], {"tokens": P, "x": P}))
        for j in range(m.cfg.dec_layers):
            def prompt(x: Tensor, mk: Tensor, ck: Tensor, cv: Tensor, em: Tensor, j: int = j) -> Any:
                return m.prompt_layer(j, x, ck, cv, key_bias(em), mk)

            g.append((f"dec{j}_prompt", prompt, ["x", "mask", "cross_k", "cross_v", "enc_mask"], ["y", "score"],
                      {"x": P, "mask": P, "cross_k": {0: B, 2: "src"}, "cross_v": {0: B, 2: "src"},
                       "enc_mask": {0: B, 1: "src"}, "y": P, "score": {0: B}}))
    return g


def _dummies(m: MuEModel, name: str) -> tuple[Tensor, ...]:
    c, b = m.cfg, 2
    d, h, dh, n, lt, src = c.dim, c.heads, c.dim // c.heads, c.num_patches, 5, c.num_patches + 5
    if name == "image_stem":
        return (torch.randn(b, c.in_chans, c.img_size, c.img_size),)
    if name == "text_embed":
        return (torch.randint(4, 10, (b, lt)),)
    if name == "dec_embed":
        return torch.tensor([1, 5]), torch.tensor([0, 3])
    if name == "prompt_embed":
        return (torch.tensor([[1, 5, 6, 7], [1, 8, 0, 0]]),)
    if name.endswith("_prompt"):
        return (torch.randn(b, 4, d), torch.tensor([[1.0] * 4, [1.0] * 2 + [0.0] * 2]), torch.randn(b, h, src, dh),
                torch.randn(b, h, src, dh), torch.ones(b, src))
    if name == "head" or name.endswith("_kv"):
        return (torch.randn(b, 1, d),)
    if name.startswith("enc") and name != "enc_out":
        return torch.randn(b, n, d), torch.ones(b, n)
    if name == "enc_out":
        return torch.randn(b, n, d), torch.randn(b, lt, d), torch.tensor([[1.0] * lt, [1.0] * 3 + [0.0] * 2])
    return (torch.randn(b, 1, d), torch.randn(b, h, 3, dh), torch.randn(b, h, 3, dh), torch.randn(b, h, src, dh),
            torch.randn(b, h, src, dh), torch.ones(b, src))


def dynamic_axis_ranges(num_patches: int, max_text_len: int, max_gen_len: int, prompt: bool = False
                        ) -> dict[str, list[int]]:
    """``[min, opt, max]`` of every named non-batch axis of the MuE graphs (the TensorRT profiles' ranges).

    ``text``: 1..max_text_len words (empty text is refused); ``seq``: an encoder layer's stream, image
    (num_patches) or text (<= max_text_len), opt at the image stream; ``src``: image + text tokens; ``past``: the
    decoder's KV-cache length, **0** at the first step (the runtime feeds an empty cache there, as on ONNX Runtime;
    TensorRT supports empty tensors) up to max_gen_len. Opt text length is half the limit. With ``prompt`` (engines
    of ``dec_prompt`` runs) also ``prompt``: the entailment decoder's ``<bos>`` + hypothesis, 2..max_text_len+1.
    """
    n, lt, lg = int(num_patches), int(max_text_len), int(max_gen_len)
    opt_t = max(1, (lt + 1) // 2)
    axes = {"text": [1, opt_t, lt], "seq": [1, n, max(n, lt)], "src": [n + 1, n + opt_t, n + lt],
            "past": [0, max(1, lg // 2), max(1, lg)]}
    if prompt:
        axes["prompt"] = [2, opt_t + 1, lt + 1]
    return axes


def _spec(names: list[str], axes: dict[str, dict[int, str]], tensors: Any) -> list[dict[str, Any]]:
    out = []
    for n, t in zip(names, tensors):
        shape: list[int | str] = list(t.shape)
        for ax, sym in axes.get(n, {}).items():
            shape[ax] = sym
        out.append({"name": n, "shape": shape, "dtype": "int64" if t.dtype == torch.int64 else "float32"})
    return out


def export_mue(run_dir: str | os.PathLike, out_dir: str | os.PathLike, check: bool = True,
               n_check: int | None = None, thresholds: dict[str, dict[str, Any]] | None = None,
               opset: int = OPSET, overwrite: bool = True) -> Manifest:
    """Export a MuE run directory to ``out_dir``; with ``check``, verify parity and record it in the manifest.

    All or nothing, as the cascade's export: graphs go to a staging directory beside ``out_dir`` that replaces it
    only when every graph exported and parity held; an existing engine is replaced only with ``overwrite``.
    """
    from deploykit.methods.mue.train import load_mue_run

    final = Path(out_dir)
    if final.exists() and any(final.iterdir()):
        if not (final / MANIFEST_NAME).exists():
            raise ExportError(f"{final} exists and is not a deploykit engine directory; choose an empty or new path")
        if not overwrite:
            raise ExportError(f"{final} already holds an engine; pass overwrite=True (CLI: --force) to replace it")
    model, vocab, config = load_mue_run(run_dir)
    with staged_dir(final) as out:
        _export_into(model, vocab, config, Path(run_dir), out, check, n_check, thresholds, opset)
    return Manifest.load(final)


def _export_into(model: MuEModel, vocab: Vocab, config: dict[str, Any], run_dir: Path, out: Path, check: bool,
                 n_check: int | None, thresholds: dict[str, dict[str, Any]] | None, opset: int) -> Manifest:
    import warnings

    cfg = model.cfg
    model.requires_grad_(False)
    graphs: dict[str, Any] = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn, ins, outs, axes in _graphs(model):
            args = _dummies(model, name)
            res = fn(*args)
            res = res if isinstance(res, tuple) else (res,)
            path = out / f"{name}.onnx"
            try:
                torch.onnx.export(_Fn(fn, model), args, str(path), input_names=ins, output_names=outs,
                                  dynamic_axes=axes, opset_version=opset, dynamo=False)
            except Exception as e:  # the exporter raises many types
                raise ExportError(f"ONNX export of MuE graph {name!r} failed: {e}") from e
            graphs[name] = {"file": path.name, "inputs": _spec(ins, axes, args), "outputs": _spec(outs, axes, res),
                            "sha256": file_sha256(path)}
    vocab.save(out / "vocab.json")
    tasks = list(cfg.tasks)
    thr = thresholds or {t: {"img": cfg.img_threshold, "txt": cfg.txt_threshold, "dec": cfg.dec_threshold,
                             "decay": cfg.dec_decay and t == "caption"} for t in tasks}
    task = "vl" if len(tasks) > 1 else f"vl-{tasks[0]}"
    prompted = bool(cfg.dec_prompt and "entailment" in tasks)
    import timm

    manifest = Manifest(
        name=str(config.get("name", "mue")), method=dict(config["method"]),
        backbone={"name": "mue-unified-vl", "patch_embed": "timm.layers.PatchEmbed", "dim": cfg.dim},
        labels=list(LABELS), preprocessing=Preprocessing.from_dict(config["preprocessing"]), stages=[],
        exit_policy=ExitPolicy(score="cosine", thresholds=[]), task=task,
        provenance={"torch": torch.__version__, "timm": timm.__version__, "opset": opset,
                    "checkpoint_sha256": file_sha256(run_dir / "model.safetensors")},
        extra={"mue": {"graphs": graphs, "tasks": tasks, "thresholds": thr, "kv_policy": cfg.kv_policy,
                       "vocab": "vocab.json", "answer_tokens": list(LABELS), "enc_layers": cfg.enc_layers,
                       "dec_layers": cfg.dec_layers, "heads": cfg.heads, "dim": cfg.dim,
                       "max_text_len": cfg.max_text_len, "max_gen_len": cfg.max_gen_len,
                       "num_patches": cfg.num_patches, "decisions": "per-sample", "dec_prompt": prompted},
               "dynamic_axes": dynamic_axis_ranges(cfg.num_patches, cfg.max_text_len, cfg.max_gen_len, prompted)})
    manifest.save(out)
    if check:
        from deploykit.methods.mue.train import load_examples

        data = dict(config.get("data", {"spec": "synthetic-vl"}))
        if n_check is not None:
            data["n_test"] = n_check
        examples = load_examples(data, "test", tasks, cfg.img_size)
        report = check_parity(model, vocab, out, examples)
        manifest.extra["mue"]["parity"] = report
        manifest.save(out)
        bad = {k: v for k, v in report.items() if v["mismatches"]}
        if bad:
            raise ExportError(f"ORT and PyTorch disagree on {bad}; the exported graphs are not faithful")
    return manifest


def check_parity(model: MuEModel, vocab: Vocab, engine_dir: Path, examples: list[Any]) -> dict[str, Any]:
    """Generated tokens of ORT (batched, compacted) vs the per-sample PyTorch reference, full depth and with exits."""
    from deploykit.methods.mue.reference import reference_generate
    from deploykit.methods.mue.train import image_array, preprocessing_of
    from deploykit.runtime.exit_rules import Thresholds
    from deploykit.runtime.generation import MuEEngine

    engine = MuEEngine.from_dir(engine_dir)
    pre = preprocessing_of(model.cfg)
    answers = [vocab.stoi[w] for w in LABELS]
    report: dict[str, Any] = {}
    for task in engine.tasks:
        rows = [e for e in examples if e.task == task]
        imgs = [image_array(e.image, pre) for e in rows]
        ids = [vocab.encode(e.text, model.cfg.max_text_len) for e in rows]
        for mode in ("full", "exits"):
            t = engine.thresholds[task] if mode == "exits" else Thresholds.full_depth()
            for policy in (("copy", "compute") if task == "caption" and mode == "exits" else ("copy",)):
                res = engine.generate_ids(imgs, ids, task, t, kv_policy=policy, batch_size=64)
                ref = [reference_generate(model, torch.from_numpy(im), i, task, t, policy, answers).tokens
                       for im, i in zip(imgs, ids)]
                mism = sum(r.tokens != f for r, f in zip(res, ref))
                report[f"{task}/{mode}/{policy}"] = {"n": len(rows), "mismatches": int(mism)}
    engine.close()
    return report
