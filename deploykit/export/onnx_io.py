"""torch -> ONNX for one graph, with a symbolic batch axis on every input and output."""

from __future__ import annotations

import inspect
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from deploykit.errors import ExportError
from deploykit.manifest import BATCH_DIM

DEFAULT_OPSET = 18


def export_graph(
        module: nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        path: Path,
        input_names: list[str],
        output_names: list[str],
        opset: int = DEFAULT_OPSET,
) -> None:
    """Export ``module`` to ``path`` with the dynamo exporter and check the file with ``onnx.checker``.

    The example batch must be >= 2: torch.export specialises size-1 dimensions.
    """
    import onnx

    if example_inputs[0].shape[0] < 2:
        raise ExportError("export needs an example batch of at least 2 rows (size-1 axes get specialised)")
    batch = torch.export.Dim(BATCH_DIM, min=1, max=65536)
    per_input = tuple({0: batch} for _ in example_inputs)
    # dynamic_shapes mirrors forward's signature: one tuple for a ``*inputs`` parameter, one entry per named one
    params = inspect.signature(module.forward).parameters.values()
    varargs = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
    dynamic_shapes = (per_input,) if varargs else per_input
    module = module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet = logging.getLogger("torch.onnx")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(
                module, example_inputs, dynamo=True, input_names=input_names, output_names=output_names,
                dynamic_shapes=dynamic_shapes, opset_version=opset, external_data=False, verbose=False,
            )
            program.save(str(path), external_data=False)
        except Exception as e:
            raise ExportError(f"ONNX export of {path.name} failed: {type(e).__name__}: {e}") from e
        finally:
            quiet.setLevel(level)
    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise ExportError(f"{path.name} fails onnx.checker: {e}") from e
    _name_batch_axes(model, path)


def _name_batch_axes(model: object, path: Path) -> None:
    """Make axis 0 of every graph input and output the symbolic ``batch`` (the runtime relies on it)."""
    import onnx

    changed = False
    for vi in list(model.graph.input) + list(model.graph.output):  # type: ignore[attr-defined]
        dims = vi.type.tensor_type.shape.dim
        if not dims:
            continue
        if dims[0].HasField("dim_value"):
            raise ExportError(
                f"{path.name}: axis 0 of {vi.name!r} was exported as the constant {dims[0].dim_value}; the batch "
                "axis must stay symbolic (a Python int taken from x.shape in forward bakes it in)"
            )
        if dims[0].dim_param != BATCH_DIM:
            dims[0].dim_param = BATCH_DIM
            changed = True
        for d in dims[1:]:
            if not d.HasField("dim_value"):
                raise ExportError(
                    f"{path.name}: {vi.name!r} has a symbolic non-batch axis {d.dim_param!r}; every axis but the "
                    "batch must be static so TensorRT can build it"
                )
    if changed:
        onnx.save(model, str(path))
