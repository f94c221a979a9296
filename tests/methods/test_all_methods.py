"""Every registered ViT method, on a tiny backbone: forward, export, and parity of the graphs with PyTorch."""

import numpy as np
import pytest
import torch

from deploykit.families import get_family
from deploykit.manifest import Manifest
from deploykit.methods import ExitModel, create_backbone, create_method, list_methods

# the classification family's methods are ViT ExitModels; MuE (vl-generation) has its own tests (tests/mue)
VIT_EXIT_MODELS = get_family("classification").methods
PRE = {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}


@pytest.mark.parametrize("name", [m for m in list_methods() if m in VIT_EXIT_MODELS])
def test_method_forward_export_parity(name, tmp_path):
    from deploykit.export import export_model

    torch.manual_seed(0)
    bb = create_backbone("vit_tiny_patch16_224", 10, img_size=16, patch_size=4, depth=4, embed_dim=32, num_heads=2)
    model = create_method(name, bb, 10)
    assert isinstance(model, ExitModel)
    x = torch.randn(5, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        outs = model(x)
    assert len(outs) == model.num_stages and all(o.shape == (5, 10) for o in outs)
    inputs = np.random.default_rng(0).standard_normal((24, 3, 16, 16), dtype=np.float32)
    m = export_model(model, tmp_path / name, labels=[str(i) for i in range(10)], preprocessing=PRE,
                     parity_inputs=inputs)
    assert isinstance(m, Manifest) and m.method["name"] == name
    assert m.provenance["parity"]["prediction_mismatches"] == [0] * m.num_stages
    assert all(s.flops > 0 and s.exit_flops > 0 for s in m.stages)
    # every graph deploykit exports must build with TensorRT: the offline lint checks it without a GPU
    from deploykit.graphs.trt_lint import lint_engine_dir

    report = lint_engine_dir(tmp_path / name)
    assert report.ok and len(report.graphs) == m.num_stages + 1, report.format()
