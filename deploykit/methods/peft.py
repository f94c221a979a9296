"""Parameter-efficient fine-tuning pieces shared by the methods: LoRA, AdaptFormer adapters, freezing rules.

LoRA (Hu et al., arXiv:2106.09685) adds a trainable low-rank update ``(alpha / r) * B A`` to a frozen linear
layer. It is applied as a tiny guarded patch (ToMe style): the timm ``nn.Linear`` keeps its class family, its
``weight`` / ``bias`` keys and its place in the model, and only gains ``lora_a`` / ``lora_b``. ``merge_lora`` folds
the update into the weight and turns the module back into the plain linear it was, so an exported graph pays
nothing for LoRA.

AdaptFormer (Chen et al., arXiv:2205.13535) adds a parallel bottleneck ``s * up(relu(down(h)))`` beside each
block's MLP. Its ReLU sits between the two projections, so unlike LoRA it can't be folded into the weights: an
adapted model exports the adapters as they are (a few small matmuls per block).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deploykit.errors import BackboneError, ConfigError

PEFT_MODES = ("full", "lora", "adapter")
LORA_TARGETS = ("qkv", "proj")


# ---- LoRA ------------------------------------------------------------------------------------------------------
def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The weight update ``scaling * B @ A`` (``[out, in]``) that LoRA adds to the frozen weight."""
    return (lora_b @ lora_a) * scaling


class LoRALinear(nn.Linear):
    """A linear layer with a LoRA update; made from an existing ``nn.Linear`` by :func:`apply_lora`, never built.

    ``lora_b`` starts at zero, so a freshly patched model computes exactly what the original did.
    """

    lora_a: nn.Parameter
    lora_b: nn.Parameter
    lora_scaling: float
    lora_base_cls: type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer plus the low-rank path (two thin matmuls: cheaper than materialising ``B @ A``)."""
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.lora_scaling

    def extra_repr(self) -> str:
        """Show the rank and scaling in ``print(model)``."""
        return f"{super().extra_repr()}, lora_rank={self.lora_a.shape[0]}, lora_scaling={self.lora_scaling:g}"


def _matches(name: str, targets: Sequence[str]) -> bool:
    """``qkv`` matches ``blocks.3.attn.qkv``; globs such as ``blocks.1*.attn.*`` match full names."""
    return any(name == t or name.endswith("." + t) or fnmatch.fnmatchcase(name, t) for t in targets)


def _block_index(name: str) -> int | None:
    parts = name.split(".")
    if "blocks" in parts:
        i = parts.index("blocks")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def apply_lora(
        model: nn.Module,
        targets: Sequence[str] = ("qkv",),
        rank: int = 8,
        alpha: float = 16.0,
        blocks: Iterable[int] | None = None,
) -> list[str]:
    """Give the matching linear layers of ``model`` a LoRA update, in place.

    Args:
        model: any module (a timm ViT, or an ``ExitModel`` holding one).
        targets: module names or name suffixes to patch (``"qkv"``, ``"proj"``, ``"attn.qkv"``), or globs over
            full names (``"blocks.1*.attn.qkv"``). Only ``nn.Linear`` layers are patched.
        rank: rank ``r`` of the update.
        alpha: the update is scaled by ``alpha / rank`` (so changing the rank doesn't change the step size).
        blocks: only patch layers inside these block indices (``blocks.<i>.``); ``None`` means every block.

    Returns:
        The names of the patched layers.

    Raises:
        ConfigError: for a rank below 1, or when no linear layer matches ``targets``.
    """
    if rank < 1:
        raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
    keep = None if blocks is None else {int(b) for b in blocks}
    patched = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or isinstance(mod, LoRALinear) or not _matches(name, targets):
            continue
        if keep is not None and _block_index(name) not in keep:
            continue
        base_cls = type(mod)
        mod.__class__ = LoRALinear
        mod.lora_base_cls = base_cls
        mod.lora_scaling = float(alpha) / rank
        w = mod.weight
        mod.lora_a = nn.Parameter(torch.empty(rank, mod.in_features, device=w.device, dtype=w.dtype))
        mod.lora_b = nn.Parameter(torch.zeros(mod.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(mod.lora_a, a=math.sqrt(5))  # as nn.Linear / the LoRA reference code
        patched.append(name)
    if not patched:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ConfigError(
            f"LoRA targets {list(targets)} (blocks {sorted(keep) if keep is not None else 'all'}) match no linear "
            f"layer; linear layers are named like {linears[:4]} — use a suffix such as {list(LORA_TARGETS)}"
        )
    return patched


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its weight, in place; the layers become the plain linears they were.

    Returns ``model`` for chaining. Call it on a copy when the unfolded model is still needed.
    """
    for mod in model.modules():
        if isinstance(mod, LoRALinear):
            with torch.no_grad():
                delta = lora_delta(mod.lora_a.float(), mod.lora_b.float(), mod.lora_scaling)
                mod.weight.add_(delta.to(mod.weight.dtype))
            del mod.lora_a, mod.lora_b
            mod.__class__ = mod.lora_base_cls
            del mod.lora_base_cls, mod.lora_scaling
    return model


def has_lora(model: nn.Module) -> bool:
    """Whether any layer still carries an unfolded LoRA update."""
    return any(isinstance(m, LoRALinear) for m in model.modules())


# ---- AdaptFormer parallel adapters -----------------------------------------------------------------------------
class Adapter(nn.Module):
    """Bottleneck ``scale * up(act(down(x)))``; ``up`` starts at zero, so a new adapter changes nothing.

    Also the bypass of DMPO's exits (with ``residual=True`` and a LayerNorm in front).
    """

    def __init__(
            self,
            dim: int,
            bottleneck: int,
            scale: float = 0.1,
            act: type[nn.Module] = nn.ReLU,
            norm: bool = False,
            residual: bool = False,
    ):
        super().__init__()
        if bottleneck < 1:
            raise ConfigError(f"adapter bottleneck width must be >= 1, got {bottleneck}")
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()
        self.down = nn.Linear(dim, bottleneck)
        self.act = act()
        self.up = nn.Linear(bottleneck, dim)
        self.scale = scale
        self.residual = residual
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The bottleneck's output (plus ``x`` when residual)."""
        y = self.up(self.act(self.down(self.norm(x)))) * self.scale
        return x + y if self.residual else y


class _ParallelAdapterMixin:
    """Adds the adapter's output to the wrapped MLP's output (both read the block's normalised tokens)."""

    adapter: Adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """MLP output plus adapter output."""
        return super().forward(x) + self.adapter(x)  # type: ignore[misc]


_ADAPTED_CLASSES: dict[type, type] = {}


def _adapted_class(cls: type) -> type:
    if cls not in _ADAPTED_CLASSES:
        _ADAPTED_CLASSES[cls] = type(f"Adapted{cls.__name__}", (_ParallelAdapterMixin, cls), {"base_cls": cls})
    return _ADAPTED_CLASSES[cls]


def apply_adapters(
        model: nn.Module,
        bottleneck: int = 64,
        scale: float = 0.1,
        blocks: Iterable[int] | None = None,
) -> list[str]:
    """Put an AdaptFormer parallel adapter beside the MLP of each timm block, in place.

    The MLP's class is swapped for a subclass that adds the adapter (ToMe-style), so the MLP keeps its weight keys
    (``blocks.3.mlp.fc1.weight``) and gains ``blocks.3.mlp.adapter.*``. AdaptFormer feeds the adapter the
    pre-norm residual stream; here it reads the MLP's (normalised) input, which composes with other block patches
    (token merging) and keeps one ``scale`` right at every depth. Adapters can't be folded at export.

    Returns:
        The names of the adapted MLPs.
    """
    keep = None if blocks is None else {int(b) for b in blocks}
    mlp_blocks = [(n, blk) for n, blk in _timm_blocks(model) if keep is None or _block_index(n) in keep]
    names = []
    for name, blk in mlp_blocks:
        mlp = blk.mlp
        if isinstance(mlp, _ParallelAdapterMixin):
            continue
        dim = _mlp_in_features(mlp, name)
        w = next(mlp.parameters())
        mlp.__class__ = _adapted_class(type(mlp))
        mlp.add_module("adapter", Adapter(dim, bottleneck, scale).to(device=w.device, dtype=w.dtype))
        names.append(f"{name}.mlp")
    if not names:
        raise ConfigError(f"no timm blocks with an MLP to adapt (blocks {sorted(keep) if keep else 'all'})")
    return names


def _timm_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if _block_index(n) is not None and n.split(".")[-2] == "blocks"
            and hasattr(m, "mlp")]


def _mlp_in_features(mlp: nn.Module, name: str) -> int:
    fc1 = getattr(mlp, "fc1", None)
    if isinstance(fc1, nn.Linear):
        return fc1.in_features
    raise BackboneError(
        f"{name}.mlp ({type(mlp).__name__}) has no fc1 linear layer; AdaptFormer adapters need timm's Mlp — "
        "use peft='lora' or 'full' for this backbone"
    )


# ---- freezing rules --------------------------------------------------------------------------------------------
def set_trainable(model: nn.Module, mode: str, always_train: Sequence[str] = ()) -> int:
    """Decide which parameters train, by PEFT mode; returns the number of trainable parameters.

    ``full`` trains everything; ``lora`` only the LoRA factors; ``adapter`` only the adapters. Parameters whose
    names start with one of ``always_train`` (new heads, exit modules) train in every mode.
    """
    if mode not in PEFT_MODES:
        raise ConfigError(f"PEFT mode must be one of {PEFT_MODES}, got {mode!r}")
    n = 0
    for name, p in model.named_parameters():
        if mode == "full" or name.startswith(tuple(always_train)):
            train = True
        elif mode == "lora":
            train = name.rsplit(".", 1)[-1] in ("lora_a", "lora_b")
        else:
            train = ".adapter." in f".{name}"
        p.requires_grad_(train)
        n += p.numel() if train else 0
    return n
