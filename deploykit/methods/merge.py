"""Token merging as small pure tensor functions: ToMe's bipartite soft matching plus PYRA's re-activation.

ToMe: Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023 (arXiv:2210.09461).
PYRA: Xiong et al., "Parallel Yielding Re-Activation for Training-Inference Efficient Task Adaptation", ECCV 2024
(arXiv:2403.09192). Re-implemented from the papers and the behaviour described in ``research/pyra.md``; no code
from either repository.

Everything here is written so one stage exports to ONNX ops TensorRT builds, with static token shapes:

- the number of tokens merged (``r``) is a Python int, so every shape except the batch is fixed;
- the argsort is a ``topk`` over all of set A with a constant ``k`` (TopK, ``sorted=1``, K well below 3840);
- the many-to-one add of merged tokens into their partners is a one-hot assignment matrix times the tokens
  (a MatMul; exact, as every product is with 0 or 1), never a ScatterElements / ScatterND with reduction.

Prefix tokens (cls, distillation, registers) never take part in matching and stay first, in order. Among the
patch tokens, set A / set B alternate by *sequence position* as in ToMe, so with one cls token the split, the
matching and the output order are ToMe's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Matching(NamedTuple):
    """Which tokens merge: indices into set A (``unm_idx``, ``src_idx``) and set B (``dst_idx``), all ``[B, *]``."""

    unm_idx: torch.Tensor
    src_idx: torch.Tensor
    dst_idx: torch.Tensor


def max_merge(num_tokens: int, num_prefix: int) -> int:
    """The most tokens one layer can merge: half of its non-prefix tokens (each src needs a distinct A slot)."""
    return max(num_tokens - num_prefix, 0) // 2


def split_ab(x: torch.Tensor, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``[B, N, C]`` into (prefix, set A, set B); A and B alternate by position, as in ToMe."""
    patches = x[:, num_prefix:]
    first = num_prefix % 2  # ToMe puts even positions in A; position num_prefix is even iff num_prefix is
    return x[:, :num_prefix], patches[:, first::2], patches[:, 1 - first::2]


def match_scores(metric: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Cosine similarity of every A token with every B token, ``[B, N_a, N_b]``."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    _, a, b = split_ab(metric, num_prefix)
    return a @ b.transpose(-1, -2)


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_prefix: int) -> Matching:
    """ToMe's matching: each A token's best B partner; the ``r`` best-matched A tokens merge away.

    Args:
        metric: ``[B, N, d]`` similarity features (the attention keys averaged over heads).
        r: tokens to merge; a Python int, so every output shape is static.
        num_prefix: protected leading tokens (cls, distillation, registers).
    """
    with torch.no_grad():
        scores = match_scores(metric, num_prefix)
        node_max, node_idx = scores.max(dim=-1)
        n_a = scores.shape[-2]
        # argsort as a full, sorted TopK with a constant K: what TensorRT accepts
        order = torch.topk(node_max, n_a, dim=-1, largest=True, sorted=True).indices
        src_idx = order[:, :r]
        # unmerged A tokens back in sequence order, so the cls-first, ToMe-identical layout holds
        unm_idx = torch.topk(order[:, r:], n_a - r, dim=-1, largest=False, sorted=True).values
        dst_idx = torch.gather(node_idx, 1, src_idx)
    return Matching(unm_idx, src_idx, dst_idx)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, idx[b, i]]`` for ``[B, N, C]`` tokens and ``[B, M]`` indices (one GatherElements)."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def assignment_matrix(dst_idx: torch.Tensor, num_dst: int, dtype: torch.dtype) -> torch.Tensor:
    """One-hot ``[B, num_dst, r]``: entry (j, i) is 1 when src token i merges into B token j."""
    slots = torch.arange(num_dst, device=dst_idx.device)
    return (slots.view(1, -1, 1) == dst_idx.unsqueeze(1)).to(dtype)


def one_hot_merge(dst: torch.Tensor, dst_idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst`` with each ``src[i]`` added to ``dst[dst_idx[i]]`` (many-to-one), as a MatMul rather than a scatter.

    Exact: every product is with 0 or 1, so only the order of the additions can differ from a scatter-add.
    """
    return dst + assignment_matrix(dst_idx, dst.shape[1], src.dtype) @ src


def pyra_reactivate(
        src: torch.Tensor,
        partner: torch.Tensor,
        w_r: torch.Tensor,
        w_d: torch.Tensor,
        norm: torch.nn.Module,
) -> torch.Tensor:
    """PYRA's parallel yielding re-activation of the src tokens about to be merged.

    ``M = LN(src + partner)``; channel weights ``2σ(W_rᵀ M)`` ``[B, 1, D]`` and token weights
    ``2σ(M W_Dᵀ) - 1`` ``[B, r, 1]`` give ``src + src * w1 * w2``. With ``W_D = 0`` the token weight is exactly 0,
    so a fresh PYRA layer is plain ToMe bit for bit.

    Args:
        src: ``[B, r, D]`` src tokens (already multiplied by their sizes, as they are merged).
        partner: ``[B, r, D]`` their dst partners (also size-multiplied).
        w_r: ``[r, 1]`` per-pair coefficients pooled into channel weights.
        w_d: ``[1, D]`` per-channel coefficients giving token weights (zero-initialised).
        norm: the layer's LayerNorm over ``D``.
    """
    m = norm(src + partner)
    w1 = 2.0 * torch.sigmoid(w_r.transpose(0, 1) @ m)
    w2 = 2.0 * torch.sigmoid(m @ w_d.transpose(0, 1)) - 1.0
    return src + (src * w1) * w2


def merge_wavg(
        x: torch.Tensor,
        size: torch.Tensor,
        m: Matching,
        num_prefix: int,
        reactivate: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge tokens by size-weighted average; returns ``(tokens [B, N-r, C], sizes [B, N-r, 1])``.

    Output order is ``[prefix, unmerged A (in sequence order), B (with the merged tokens added)]``.
    ``reactivate(src, partner)`` (PYRA) modulates only the src tokens, before they are added: sizes are untouched.
    """
    xs = x * size
    pre_x, a_x, b_x = split_ab(xs, num_prefix)
    pre_s, a_s, b_s = split_ab(size, num_prefix)
    src = gather_tokens(a_x, m.src_idx)
    if reactivate is not None:
        src = reactivate(src, gather_tokens(b_x, m.dst_idx))
    b_x = one_hot_merge(b_x, m.dst_idx, src)
    b_s = one_hot_merge(b_s, m.dst_idx, gather_tokens(a_s, m.src_idx))
    xs = torch.cat([pre_x, gather_tokens(a_x, m.unm_idx), b_x], dim=1)
    size = torch.cat([pre_s, gather_tokens(a_s, m.unm_idx), b_s], dim=1)
    return xs / size, size


def proportional_bias(size: torch.Tensor) -> torch.Tensor:
    """``log(size)`` as an attention-logit bias ``[B, 1, 1, N]``: a merged token counts as the tokens it holds."""
    return size.log().transpose(1, 2).unsqueeze(1)


def size_weighted_mean(x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Mean over tokens weighted by size: the mean of the original tokens the merged ones stand for."""
    return (x * size).sum(dim=1) / size.sum(dim=1)


def near_tie_rows(metric: torch.Tensor, r: int, num_prefix: int, eps: float = 1e-4) -> torch.Tensor:
    """Rows whose merge decision hinges on a score gap below ``eps`` (``[B]`` bool).

    Two discrete choices can flip under float noise (e.g. ONNX Runtime vs PyTorch): which A tokens make the top
    ``r`` (the gap between the r-th and (r+1)-th best match), and which B token a merged A token picks (the gap
    between its best and second-best partner). Parity checks count these rows instead of hiding them.
    """
    with torch.no_grad():
        scores = match_scores(metric.float(), num_prefix)
        n_a, n_b = scores.shape[-2:]
        tied = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
        if r <= 0:
            return tied
        best = scores.topk(min(2, n_b), dim=-1).values
        node_max = best[..., 0]
        ranked = node_max.sort(dim=-1, descending=True)
        if r < n_a:
            tied |= (ranked.values[:, r - 1] - ranked.values[:, r]).abs() < eps
        if n_b > 1:
            partner_gap = torch.gather(best[..., 0] - best[..., 1], 1, ranked.indices[:, :r])
            tied |= (partner_gap < eps).any(dim=-1)
        return tied


def scatter_add_merge(dst: torch.Tensor, dst_idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Reference many-to-one add with ``scatter_add`` (ToMe's way; not exported: it becomes ScatterElements-add)."""
    return dst.scatter_add(1, dst_idx.unsqueeze(-1).expand(-1, -1, src.shape[-1]), src)


__all__ = [
    "Matching", "assignment_matrix", "bipartite_soft_matching", "gather_tokens", "match_scores", "max_merge",
    "merge_wavg", "near_tie_rows", "one_hot_merge", "proportional_bias", "pyra_reactivate", "scatter_add_merge",
    "size_weighted_mean", "split_ab",
]
