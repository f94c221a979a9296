"""Pure merging functions: matching, one-hot merge, size-weighted average, PYRA re-activation, near-ties."""

import pytest
import torch

from deploykit.methods import merge as M


def _tome_reference(x, size, metric, r, num_prefix):
    """ToMe's algorithm as its paper / code describe it: alternate over the whole sequence, mask protected tokens
    with -inf, argsort, scatter-add; written independently here to pin the layout deploykit must reproduce."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    scores[:, 0, :] = -torch.inf  # cls is A[0]
    if num_prefix == 2:
        scores[:, :, 0] = -torch.inf  # distillation token is B[0]
    node_max, node_idx = scores.max(dim=-1)
    order = node_max.argsort(dim=-1, descending=True)
    src_idx, unm_idx = order[:, :r], order[:, r:].sort(dim=-1).values
    dst_idx = node_idx.gather(1, src_idx)

    def merge(t):
        ta, tb = t[:, ::2], t[:, 1::2]
        c = t.shape[-1]
        unm = ta.gather(1, unm_idx[..., None].expand(-1, -1, c))
        src = ta.gather(1, src_idx[..., None].expand(-1, -1, c))
        tb = tb.scatter_add(1, dst_idx[..., None].expand(-1, -1, c), src)
        if num_prefix == 2:
            return torch.cat([unm[:, :1], tb[:, :1], unm[:, 1:], tb[:, 1:]], dim=1)
        return torch.cat([unm, tb], dim=1)

    xs, s = merge(x * size), merge(size)
    return xs / s, s


@pytest.mark.parametrize("num_prefix", [1, 2])
@pytest.mark.parametrize("n", [17, 18, 65])
def test_merge_matches_tome_reference(num_prefix, n):
    torch.manual_seed(n)
    x, metric = torch.randn(3, n, 8), torch.randn(3, n, 4)
    size = torch.randint(1, 4, (3, n, 1)).float()
    r = M.max_merge(n, num_prefix) // 2 + 1
    got_x, got_s = M.merge_wavg(x, size, M.bipartite_soft_matching(metric, r, num_prefix), num_prefix)
    ref_x, ref_s = _tome_reference(x, size, metric, r, num_prefix)
    assert got_x.shape == (3, n - r, 8) and got_s.shape == (3, n - r, 1)
    assert torch.equal(got_s, ref_s)
    torch.testing.assert_close(got_x, ref_x, rtol=0, atol=1e-6)


def test_one_hot_merge_equals_scatter_add():
    torch.manual_seed(0)
    dst, src = torch.randn(4, 9, 16), torch.randn(4, 6, 16)
    dst_idx = torch.randint(0, 9, (4, 6))  # many-to-one: repeated destinations
    torch.testing.assert_close(M.one_hot_merge(dst, dst_idx, src), M.scatter_add_merge(dst, dst_idx, src),
                               rtol=0, atol=1e-6)
    # integer-valued tokens: every sum is exact, so the two must agree bit for bit
    di, si = torch.randint(-50, 50, dst.shape).float(), torch.randint(-50, 50, src.shape).float()
    assert torch.equal(M.one_hot_merge(di, dst_idx, si), M.scatter_add_merge(di, dst_idx, si))


def test_matching_partitions_set_a_and_protects_prefix():
    torch.manual_seed(1)
    n, p, r = 21, 1, 6
    metric, x = torch.randn(2, n, 8), torch.randn(2, n, 8)
    m = M.bipartite_soft_matching(metric, r, p)
    n_a = len(range(p % 2, n - p, 2))
    for b in range(2):
        both = torch.cat([m.unm_idx[b], m.src_idx[b]]).sort().values
        assert torch.equal(both, torch.arange(n_a))
        assert torch.all(m.unm_idx[b][1:] > m.unm_idx[b][:-1])  # unmerged stay in sequence order
    size = torch.ones(2, n, 1)
    out, s = M.merge_wavg(x, size, m, p)
    assert torch.equal(out[:, :p], x[:, :p])  # cls untouched and first
    assert torch.equal(s.sum(dim=1), size.sum(dim=1))  # nothing lost


def test_size_weighted_average_preserves_mean():
    torch.manual_seed(2)
    x, metric = torch.randn(2, 33, 8, dtype=torch.float64), torch.randn(2, 33, 4, dtype=torch.float64)
    size = torch.ones(2, 33, 1, dtype=torch.float64)
    y, s = x, size
    for r in (8, 6, 4):
        y, s = M.merge_wavg(y, s, M.bipartite_soft_matching(metric[:, :y.shape[1]], r, 1), 1)
    torch.testing.assert_close(M.size_weighted_mean(y[:, 1:], s[:, 1:]), x[:, 1:].mean(dim=1))


def test_fresh_pyra_is_identity_and_trained_one_is_not():
    torch.manual_seed(3)
    src, partner = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    w_r, norm = torch.empty(5, 1).uniform_(-1, 1), torch.nn.LayerNorm(16)
    assert torch.equal(M.pyra_reactivate(src, partner, w_r, torch.zeros(1, 16), norm), src)
    assert not torch.equal(M.pyra_reactivate(src, partner, w_r, torch.randn(1, 16), norm), src)


def test_proportional_bias():
    size = torch.tensor([[[1.0], [2.0], [4.0]]])
    bias = M.proportional_bias(size)
    assert bias.shape == (1, 1, 1, 3)
    torch.testing.assert_close(bias.flatten(), torch.log(size.flatten()))
    assert torch.equal(M.proportional_bias(torch.ones(2, 5, 1)), torch.zeros(2, 1, 1, 5))


def test_near_tie_rows_flags_ties_only():
    torch.manual_seed(4)
    metric = torch.randn(3, 17, 8)
    assert not M.near_tie_rows(metric, 1, 1, eps=1e-6).any()
    tied = metric.clone()
    # with one prefix token, A holds positions 2, 4, ... and B positions 1, 3, ...: two A tokens identical to a
    # B token both match it perfectly, so which one merges (r = 1) is a coin toss
    tied[1, 2] = tied[1, 3]
    tied[1, 4] = tied[1, 3]
    rows = M.near_tie_rows(tied, 1, 1, eps=1e-6)
    assert rows.tolist() == [False, True, False]
    assert not M.near_tie_rows(metric, 0, 1).any()


def _pyra_reference(x, size, metric, r, w_r, w_d, norm):
    """PYRA's merge as its code does it (one cls token): ToMe's matching, then only the src tokens of ``x * size``
    are re-activated, from LN(src + their dst partners *before* the add), and sizes merge unmodulated."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
    scores[:, 0, :] = -torch.inf
    node_max, node_idx = scores.max(dim=-1)
    order = node_max.argsort(dim=-1, descending=True)
    src_idx, unm_idx = order[:, :r], order[:, r:].sort(dim=-1).values
    dst_idx = node_idx.gather(1, src_idx)

    def idx(i, c):
        return i[..., None].expand(-1, -1, c)

    xs = x * size
    xa, xb = xs[:, ::2], xs[:, 1::2]
    c = x.shape[-1]
    src, tgt = xa.gather(1, idx(src_idx, c)), xb.gather(1, idx(dst_idx, c))
    m = norm(src + tgt)
    w1 = 2 * torch.sigmoid(torch.einsum("ri,brd->bid", w_r, m))  # [B, 1, D]
    w2 = 2 * torch.sigmoid(torch.einsum("brd,id->bri", m, w_d)) - 1  # [B, r, 1]
    src = src + src * w1 * w2
    xo = torch.cat([xa.gather(1, idx(unm_idx, c)), xb.scatter_add(1, idx(dst_idx, c), src)], dim=1)
    sa, sb = size[:, ::2], size[:, 1::2]
    so = torch.cat([sa.gather(1, idx(unm_idx, 1)), sb.scatter_add(1, idx(dst_idx, 1), sa.gather(1, idx(src_idx, 1)))],
                   dim=1)
    return xo / so, so


def test_pyra_merge_matches_reference_on_src_tokens_only():
    torch.manual_seed(4)
    n, r, d = 17, 5, 16
    x, metric = torch.randn(2, n, d, dtype=torch.float64), torch.randn(2, n, 4, dtype=torch.float64)
    size = torch.randint(1, 4, (2, n, 1)).double()
    w_r, w_d = torch.empty(r, 1, dtype=torch.float64).uniform_(-1, 1), torch.randn(1, d, dtype=torch.float64)
    norm = torch.nn.LayerNorm(d, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_(0, 0.1)
    m = M.bipartite_soft_matching(metric, r, 1)
    got_x, got_s = M.merge_wavg(x, size, m, 1, lambda s, p: M.pyra_reactivate(s, p, w_r, w_d, norm))
    ref_x, ref_s = _pyra_reference(x, size, metric, r, w_r, w_d, norm)
    assert torch.equal(got_s, ref_s)  # sizes are never re-activated
    torch.testing.assert_close(got_x, ref_x, rtol=0, atol=1e-12)
    plain_x, _ = M.merge_wavg(x, size, m, 1)
    # only the B tokens that received a src token change; cls and the unmerged A tokens are plain ToMe's
    changed = (got_x - plain_x).abs().amax(dim=-1) > 1e-9
    n_keep = 1 + (n - 1) // 2 - r
    assert not changed[:, :n_keep].any() and changed.any()
