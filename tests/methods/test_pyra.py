"""The ``tome`` and ``pyra`` methods on tiny timm ViTs: exactness, schedules, bad input, LoRA, exits, export."""

import collections
import json

import numpy as np
import pytest
import torch

from deploykit.errors import BackboneError, CheckpointError, ConfigError
from deploykit.methods import create_backbone, create_method
from deploykit.methods.pyra import PAPER_SCHEDULES, resolve_schedule, token_counts

KW = dict(img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2)  # 16 patches + cls = 17 tokens
SCHED = [3, 2, 2, 1]


def _pair(name_a, name_b, seed=0, backbone="vit_tiny_patch16_224", **settings):
    """Two methods on backbones with identical weights."""
    torch.manual_seed(seed)
    a = create_method(name_a, create_backbone(backbone, 10, **KW), 10, **settings).eval()
    b = create_method(name_b, create_backbone(backbone, 10, **KW), 10, **settings).eval()
    b.load_state_dict({k: v for k, v in a.state_dict().items() if k in b.state_dict()}, strict=False)
    return a, b


def _randomise_pyra(model):
    with torch.no_grad():
        for m in model.pyra:
            if hasattr(m, "w_d"):
                m.w_d.normal_(0, 0.5)


@pytest.mark.parametrize("backbone", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_zero_merges_equal_unmerged_timm_exactly(backbone):
    torch.manual_seed(0)
    bb = create_backbone(backbone, 10, **KW)
    ref = create_backbone(backbone, 10, **KW)
    ref.load_state_dict(bb.state_dict())
    model = create_method("tome", bb, 10, schedule=0).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.forward_full(x), ref.eval()(x))


def test_fresh_pyra_equals_tome_exactly():
    pyra, tome = _pair("pyra", "tome", schedule=SCHED)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(pyra(x), tome(x)):
            assert torch.equal(a, b)
        _randomise_pyra(pyra)  # once trained, PYRA differs
        assert not torch.equal(pyra.forward_full(x), tome.forward_full(x))


def test_state_shapes_follow_schedule_and_sizes_add_up():
    torch.manual_seed(0)
    model = create_method("pyra", create_backbone("vit_tiny_patch16_224", 10, **KW), 10, schedule=SCHED,
                          num_exits=2).eval()
    assert model.state_names == ("tokens", "sizes")
    state = (torch.randn(2, 3, 32, 32),)
    counts = token_counts(SCHED, 17)
    for k in range(model.num_stages):
        with torch.no_grad():
            state = model.forward_stage(k, *state)
        n = counts[model.exit_blocks[k]]
        assert state[0].shape == (2, n, 32) and state[1].shape == (2, n, 1)
        assert torch.equal(state[1].sum(dim=1), torch.full((2, 1), 17.0))
    assert model.method_config()["stage_tokens"] == [counts[2], counts[4]]


def test_distillation_and_register_tokens_are_protected():
    torch.manual_seed(0)
    deit = create_method("pyra", create_backbone("deit_tiny_distilled_patch16_224", 10, **KW), 10,
                         schedule=[3, 2, 2, 1]).eval()
    assert deit.num_prefix_tokens == 2
    reg = create_method("tome", create_backbone("vit_tiny_patch16_224", 10, reg_tokens=4, **KW), 10,
                        schedule=[2, 2, 1, 1]).eval()
    x = torch.randn(2, 3, 32, 32)
    for model in (deit, reg):
        p = model.num_prefix_tokens
        with torch.no_grad():
            tokens, sizes = model.embed(x)
            prefix = tokens[:, :p].clone()
            tokens, sizes = model.run_block(0, (tokens, sizes))
            assert torch.equal(sizes[:, :p], torch.ones(2, p, 1))
            assert model.forward_full(x).shape == (2, 10)
        assert not torch.equal(tokens[:, :p], prefix)  # they went through the block, but were never merged


def test_avg_pool_backbone_uses_size_weighted_pooling():
    torch.manual_seed(0)
    bb = create_backbone("vit_tiny_patch16_224", 10, global_pool="avg", class_token=False, **KW)
    model = create_method("pyra", bb, 10, schedule=[4, 2, 1, 1]).eval()
    assert model.num_prefix_tokens == 0
    with torch.no_grad():
        assert all(o.shape == (2, 10) for o in model(torch.randn(2, 3, 32, 32)))


def test_paper_schedules_match_published_token_counts():
    assert token_counts(resolve_schedule("low", 12, 197, 1), 197)[-1] == 11
    assert token_counts(resolve_schedule("high", 12, 197, 1), 197)[-1] == 5
    assert token_counts(resolve_schedule("low", 24, 197, 1), 197)[-1] == 7
    assert token_counts(resolve_schedule("vit_l_high", 24, 197, 1), 197)[-1] == 5
    assert resolve_schedule("high", 12, 198, 2) == PAPER_SCHEDULES["deit_b_high"]
    assert resolve_schedule("low", 4, 17, 1) == [4, 4, 4, 2]  # ToMe's constant r, trimmed at the last layer
    assert resolve_schedule(2, 4, 17, 1) == [2, 2, 2, 2]


@pytest.mark.parametrize("schedule, match", [
    ([8, 8, 0, 0], "block 1 has only 9 tokens"),
    ([9, 0, 0, 0], "merge at most 8"),
    ([1, 1, 1], "3 entries but .* needs one per block \\(4\\)"),
    ("vit_b_low", "12 entries"),
    ("high", "only defined for ViT-B/16"),
    ("fast", "unknown merge schedule"),
    ([1, -1, 0, 0], "non-negative"),
])
def test_bad_schedules_say_what_is_wrong(schedule, match):
    bb = create_backbone("vit_tiny_patch16_224", 10, **KW)
    with pytest.raises(ConfigError, match=match):
        create_method("pyra", bb, 10, schedule=schedule)


def test_checkpoint_of_another_schedule_is_refused():
    torch.manual_seed(0)
    a = create_method("tome", create_backbone("vit_tiny_patch16_224", 10, **KW), 10, schedule=[3, 2, 2, 1])
    b = create_method("tome", create_backbone("vit_tiny_patch16_224", 10, **KW), 10, schedule=[2, 2, 2, 2])
    with pytest.raises(CheckpointError, match=r"trained with merge schedule \[3, 2, 2, 1\].*uses \[2, 2, 2, 2\]"):
        b.load_state_dict(a.state_dict())
    plain = create_method("multiexit", create_backbone("vit_tiny_patch16_224", 10, **KW), 10)
    with pytest.raises(CheckpointError, match="not trained with token merging"):
        b.load_state_dict(plain.state_dict())


def test_unsupported_backbones_are_refused():
    from timm.models.vision_transformer import ParallelScalingBlock

    bb = create_backbone("vit_tiny_patch16_224", 10, block_fn=ParallelScalingBlock, **KW)
    with pytest.raises(BackboneError, match="standard Block"):
        create_method("tome", bb, 10, schedule=1)
    bb = create_backbone("vit_tiny_patch16_224", 10, global_pool="map", **KW)
    with pytest.raises(BackboneError, match="pools with 'map'"):
        create_method("tome", bb, 10, schedule=1)


def test_lora_trains_only_lora_pyra_and_heads_and_folds_at_export():
    torch.manual_seed(0)
    model = create_method("pyra", create_backbone("vit_tiny_patch16_224", 10, **KW), 10, schedule=SCHED,
                          peft="lora", lora_rank=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_a" in n for n in trainable) and any(n.startswith("pyra.") for n in trainable)
    assert any(n.startswith("exit_heads.") for n in trainable) and "backbone.head.weight" in trainable
    assert "backbone.blocks.0.attn.qkv.weight" not in trainable and "backbone.pos_embed" not in trainable
    x = torch.randn(3, 3, 32, 32)
    loss, _ = model.compute_loss(model(x), torch.tensor([1, 2, 3]), 0.5)
    loss.backward()
    assert model.pyra[0].w_d.grad is not None and model.pyra[0].w_d.grad.abs().sum() > 0
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_b"):
                m.lora_b.normal_(0, 0.1)
        _randomise_pyra(model)
    model.eval()
    folded = model.prepare_for_export()
    assert not any(hasattr(m, "lora_a") for m in folded.modules())
    with torch.no_grad():
        for a, b in zip(model(x), folded(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_dmpo_exits_on_a_pyra_backbone():
    from deploykit.methods.dmpo import DMPOExitHead

    torch.manual_seed(0)
    model = create_method("pyra", create_backbone("vit_tiny_patch16_224", 10, **KW), 10, schedule=SCHED,
                          exits="dmpo", dmpo={"predictor_groups": 4, "switch_point": 0.5,
                                              "phase1_weights": "linear_up", "phase2_weights": "uniform"})
    assert all(isinstance(h, DMPOExitHead) for h in model.exit_heads)
    outs = model(torch.randn(2, 3, 32, 32))
    assert len(outs) == 4 and all(o.shape == (2, 10) for o in outs)
    assert model.loss_weights(0.1) != model.loss_weights(0.9)
    with pytest.raises(ConfigError, match="belong to the merging method"):
        create_method("pyra", create_backbone("vit_tiny_patch16_224", 10, **KW), 10, exits="dmpo",
                      dmpo={"peft": "lora"})


def test_near_tie_report():
    torch.manual_seed(0)
    model = create_method("pyra", create_backbone("vit_tiny_patch16_224", 10, **KW), 10, schedule=SCHED).eval()
    report = model.count_near_ties(torch.randn(8, 3, 32, 32), eps=1e-6)
    assert report["rows"] == 8 and len(report["per_stage"]) == model.num_stages
    assert 0 <= report["near_tied_rows"] <= 8
    assert model.count_near_ties(torch.randn(4, 3, 32, 32), eps=10.0)["near_tied_rows"] == 4


def test_stage_exports_to_static_shapes_without_scatter_and_matches_ort(tmp_path):
    import onnx

    from deploykit.backends.ort import OrtRunner
    from deploykit.export.graphs import StageGraph
    from deploykit.export.onnx_io import export_graph

    torch.manual_seed(0)
    model = create_method("pyra", create_backbone("vit_tiny_patch16_224", 10, **KW), 10, schedule=SCHED,
                          num_exits=2, peft="lora", lora_rank=2).eval()
    _randomise_pyra(model)
    model = model.prepare_for_export()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        state = model.forward_stage(0, x)
    graph = StageGraph(model, 1, "max_softmax")  # a middle-of-the-chain stage: tokens + sizes in
    path = tmp_path / "stage1.onnx"
    export_graph(graph, state, path, ["tokens", "sizes"], ["logits", "score"])
    proto = onnx.load(str(path))
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert not {"ScatterND", "ScatterElements", "Loop", "If"} & set(ops)
    assert ops["TopK"] == 2 * sum(1 for i in model.stage_block_range(1) if SCHED[i] > 0)
    consts = {i.name for i in proto.graph.initializer} | {o for n in proto.graph.node if n.op_type == "Constant"
                                                          for o in n.output}
    for n in proto.graph.node:
        if n.op_type == "TopK":  # TensorRT: sorted output and a constant K
            assert {a.name: a.i for a in n.attribute}.get("sorted", 1) == 1
            assert n.input[1] in consts
    runner = OrtRunner(path)
    for b in (1, 6):
        out = runner.run({"tokens": state[0][:b].numpy(), "sizes": state[1][:b].numpy()})
        with torch.no_grad():
            ref = graph(state[0][:b], state[1][:b])
        np.testing.assert_allclose(out["logits"], ref[0].numpy(), atol=1e-4, rtol=1e-3)
        assert (out["logits"].argmax(1) == ref[0].numpy().argmax(1)).all()
    runner.close()


# ---- export parity with near-tied merge decisions (deploykit/export/validate.py) -----------------------------------
PRE = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}


def _tied_model_and_inputs():
    """A PYRA model without position embeddings, and images whose first rows are constant: every patch token of
    such an image is identical, so every merge decision (top-r and partner) is an exact tie, in every stage."""
    torch.manual_seed(0)
    model = create_method("pyra", create_backbone("vit_tiny_patch16_224", 10, **KW), 10, schedule=SCHED,
                          num_exits=2).eval()
    _randomise_pyra(model)
    with torch.no_grad():
        model.backbone.pos_embed.zero_()
    x = torch.randn(10, 3, 32, 32)
    x[:4] = torch.randn(4, 3, 1, 1).expand(4, 3, 32, 32)  # 4 constant images: tied rows
    return model, x.numpy()


@pytest.fixture(scope="module")
def tied_engine(tmp_path_factory):
    """The tied model exported with the parity check on its tied and untied rows (one export for both tests)."""
    from deploykit.export import export_model

    model, x = _tied_model_and_inputs()
    out = tmp_path_factory.mktemp("tied") / "eng"
    return model, x, export_model(model, out, labels=[str(i) for i in range(10)], preprocessing=PRE,
                                  parity_inputs=x)


def test_parity_counts_near_tied_rows_in_the_manifest(tied_engine):
    model, x, m = tied_engine
    tied = model.near_tie_rows(0, torch.from_numpy(x))
    assert tied[:4].all() and not tied[4:].any()  # the planted ties, and only those
    p = m.provenance["parity"]
    assert p["near_tie_eps"] == 1e-4
    assert p["near_tied_rows"] == [4, 4] and p["chain_near_tied_rows"] == [4, 4]
    assert len(p["near_tied_prediction_mismatches"]) == 2
    saved = json.loads(m.path_of("deploykit.json").read_text())["provenance"]["parity"]
    assert saved["near_tied_rows"] == [4, 4]


def test_parity_waives_mismatches_only_on_near_tied_rows(tied_engine):
    """An engine that disagrees with PyTorch passes only where every disagreeing row is near-tied."""
    from deploykit.errors import ExportError
    from deploykit.export.validate import check_parity

    model, x, m = tied_engine
    other = model.prepare_for_export()
    with torch.no_grad():  # PyTorch side now disagrees with the exported graphs on (almost) every row
        other.backbone.head.weight.neg_()
        for h in other.exit_heads:
            h.fc.weight.neg_()
    with pytest.raises(ExportError, match="near-tied rows"):  # random rows aren't tied: mismatches there fail
        check_parity(other, m, x)
    report = check_parity(other, m, x[:4])  # only tied rows: reported, not a failure
    assert report.near_tied_rows == [4, 4]
    assert sum(report.prediction_mismatches) > 0
    assert report.near_tied_prediction_mismatches == report.prediction_mismatches
    assert report.chain_near_tied_prediction_mismatches == report.chain_prediction_mismatches
    with pytest.raises(ExportError):  # eps 0: nothing is near-tied, the same mismatches fail
        check_parity(other, m, x[:4], tie_eps=0.0)


@pytest.mark.parametrize("other", [[3, 1], [2, 0]])
def test_load_run_names_the_schedule_of_a_pyra_run(tmp_path, other):
    """A run whose config asks for another schedule fails on the schedule, not on a generic shape mismatch."""
    from deploykit.train import load_run, train

    recipe = {"name": "tiny-pyra", "method": {"name": "pyra", "num_exits": 2, "schedule": [2, 2]},
              "backbone": {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 16, "patch_size": 4, "depth": 2,
                                                                      "embed_dim": 32, "num_heads": 2}},
              "data": {"spec": "digits"},
              "train": {"epochs": 1, "max_steps": 1, "batch_size": 16, "warmup_epochs": 0, "seed": 0}}
    run = train(recipe, out=tmp_path / "run")
    load_run(run)  # its own schedule loads
    config = json.loads((run / "config.json").read_text())
    config["method"]["schedule"] = other
    (run / "config.json").write_text(json.dumps(config))
    want = rf"trained with merge schedule \[2, 2\].*uses \[{other[0]}, {other[1]}\]"
    with pytest.raises(CheckpointError, match=want):
        load_run(run)
