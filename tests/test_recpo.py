"""recpo.py: rewards, advantages and both losses against hand computations and references."""
import math

import pytest
import torch
import torch.nn.functional as F

from recpo import compute_advantages, compute_rewards, item_logprobs, item_loss, token_loss


# --------------------------------------------------------------------------- rewards

def _reward_case():
    # E = identity makes logits[m, j] = H[m, j] / tau: we choose the catalog's logits directly.
    logits = torch.tensor([9.0, 1.0, 3.0, 2.0, 3.0, 0.5])            # item 0 = padding (excluded)
    H = logits.repeat(4, 1)
    E = torch.eye(6)
    targets = torch.tensor([2, 2, 2, 3])
    exclude = torch.tensor([[0, 0], [4, 0], [2, 0], [0, 0]])   # row 1 masks the tie, row 2 its target
    return H, E, targets, exclude


def test_rewards_hand_computed(device):
    H, E, targets, exclude = (t.to(device) for t in _reward_case())
    out = compute_rewards(H, E, targets, exclude, tau=1.0, k=2, beta=0.05)
    out = {k: v.cpu() for k, v in out.items()}
    # row 0: item 4 ties with the target -> pessimistic rank 1; row 1: the tie is history -> rank 0
    assert out["rank"].tolist() == [1, 0, 6, 2]
    e = math.exp
    z_all = e(1) + e(3) + e(2) + e(3) + e(0.5)
    r_d = [1 / math.log2(3), 1.0, 0.0, 0.0]                         # row 3: rank 2 >= k = 2
    r_c = [e(3) / z_all, e(3) / (z_all - e(3)), 0.0, e(2) / z_all]   # row 2: target in history -> 0
    torch.testing.assert_close(out["r_d"], torch.tensor(r_d))
    torch.testing.assert_close(out["r_c"], torch.tensor(r_c))
    torch.testing.assert_close(out["reward"], 0.95 * torch.tensor(r_d) + 0.05 * torch.tensor(r_c))
    assert compute_rewards(H, E, targets, exclude, 1.0, k=1000)["r_d"][3] == pytest.approx(0.5)
    for kind, key in (("ndcg", "r_d"), ("softmax", "r_c")):
        got = compute_rewards(H, E, targets, exclude, 1.0, k=2, kind=kind)["reward"].cpu()
        assert torch.equal(got, out[key])


# --------------------------------------------------------------------------- advantages

def test_advantages_gaussian_loo_and_zero_spread():
    R = torch.tensor([1.0, 0, 0, 0, 0.5, 0.5, 0.5, 0.5, 0.2, 0.4, 0.6, 0.8])
    adv, frac = compute_advantages(R, G=4)
    # group 0: mean 0.25, unbiased std sqrt((0.75² + 3·0.25²)/3) = 0.5
    s2 = math.sqrt((0.09 + 0.01 + 0.01 + 0.09) / 3)
    want = [1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0, -0.3 / s2, -0.1 / s2, 0.1 / s2, 0.3 / s2]
    torch.testing.assert_close(adv, torch.tensor(want), atol=1e-5, rtol=1e-5)
    assert frac == pytest.approx(1 / 3)
    adv, frac = compute_advantages(R, G=4, kind="loo")
    want = [1.0, -1 / 3, -1 / 3, -1 / 3, 0, 0, 0, 0,
            0.2 - 1.8 / 3, 0.4 - 1.6 / 3, 0.6 - 1.4 / 3, 0.8 - 1.2 / 3]           # R_i - mean(others)
    torch.testing.assert_close(adv, torch.tensor(want), atol=1e-6, rtol=1e-6)
    assert frac == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        compute_advantages(R, G=5)


# --------------------------------------------------------------------------- token loss

def _token_surrogate_by_hand(logp, old, adv, mask, eps_low, eps_high, loss_type, max_len):
    B, L = len(logp), len(logp[0])
    per_seq, total, ntok = [], 0.0, 0
    for b in range(B):
        s, n = 0.0, 0
        for t in range(L):
            if mask[b][t]:
                r = math.exp(logp[b][t] - old[b][t])
                s += -min(r * adv[b], min(max(r, 1 - eps_low), 1 + eps_high) * adv[b])
                n += 1
        per_seq.append(s / max(n, 1))
        total, ntok = total + s, ntok + n
    return {"token-mean": total / ntok, "sequence-mean": sum(per_seq) / B,
            "dr-grpo": total / (B * max_len)}[loss_type]


@pytest.mark.parametrize("loss_type", ["token-mean", "sequence-mean", "dr-grpo"])
def test_token_loss_aggregation_ragged(loss_type):
    g = torch.Generator().manual_seed(0)
    B, L = 3, 7
    lengths = torch.tensor([7, 2, 4])
    mask = torch.arange(L)[None] < lengths[:, None]
    logp = -torch.rand(B, L, generator=g) * 3
    old = logp + 0.4 * torch.randn(B, L, generator=g)
    old[~mask] = 50.0                                               # garbage on padding must not leak
    adv = torch.tensor([1.3, -0.7, 0.4])
    loss, _ = token_loss(logp, old, adv, mask, loss_type=loss_type, max_len=9)
    want = _token_surrogate_by_hand(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(),
                                    0.2, 0.28, loss_type, 9)
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_token_gradient_elementwise_when_group_advantages_sum_to_zero():
    g = torch.Generator().manual_seed(1)
    R = torch.tensor([0.9, 0.1, 0.3, 0.2])
    adv, _ = compute_advantages(R, G=4)
    assert abs(adv.sum().item()) < 1e-6
    mask = torch.arange(6)[None] < torch.tensor([6, 3, 5, 2])[:, None]
    logp = (-torch.rand(4, 6, generator=g)).requires_grad_()
    loss, st = token_loss(logp, logp.detach(), adv, mask)
    loss.backward()
    # one update per rollout: d loss / d logp[b, t] = -A_b / #tokens on every completion token
    want = -adv[:, None] * mask / mask.sum()
    torch.testing.assert_close(logp.grad, want)
    assert logp.grad[mask].abs().min() > 0.01 and st["clip_low"] == st["clip_high"] == 0
    # the reference code's outer product: -mean(A)/#tokens per token, i.e. ~nothing
    logp.grad = None
    token_loss(logp, logp.detach(), adv, mask, reference_broadcast=True)[0].backward()
    assert logp.grad.abs().max() < 1e-7


def test_token_clipping_second_iteration_and_kl():
    g = torch.Generator().manual_seed(2)
    B, L = 4, 8
    mask = torch.arange(L)[None] < torch.tensor([8, 5, 8, 3])[:, None]
    logp = (-torch.rand(B, L, generator=g) * 2).requires_grad_()
    old = logp.detach() + 0.5 * torch.randn(B, L, generator=g)       # the policy moved since rollout
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0])
    loss, st = token_loss(logp, old, adv, mask)
    loss.backward()
    r = torch.exp(logp.detach() - old)
    A = adv[:, None].expand(B, L)
    low = (r < 0.8) & (A < 0) & mask
    high = (r > 1.28) & (A > 0) & mask
    assert low.any() and high.any()
    assert st["clip_low"] == pytest.approx(low.sum().item() / mask.sum().item())
    assert st["clip_high"] == pytest.approx(high.sum().item() / mask.sum().item())
    assert torch.all(logp.grad[low | high] == 0)                    # the ignored side: no gradient
    active = mask & ~low & ~high
    torch.testing.assert_close(logp.grad[active], (-A * r / mask.sum())[active])
    # k3 KL: value and its contribution to the token-mean loss
    ref = logp.detach() + 0.3 * torch.randn(B, L, generator=g)
    d = ref - logp.detach()
    k3 = ((torch.exp(d) - d - 1) * mask).sum() / mask.sum()
    loss_kl, st_kl = token_loss(logp, old, adv, mask, ref_logp=ref, kl_beta=0.1)
    assert st_kl["kl"] == pytest.approx(k3.item(), rel=1e-5) and k3 > 0
    assert loss_kl.item() == pytest.approx(loss.item() + 0.1 * k3.item(), rel=1e-5)


# --------------------------------------------------------------------------- item loss

def _item_batch(seed=3, d=5):
    g = torch.Generator().manual_seed(seed)
    targets = torch.tensor([5, 5, 7, 7, 5, 5, 9, 9])                # groups 0 and 2 share item 5
    table = F.normalize(torch.randn(12, d, generator=g), dim=-1)    # true item embeddings
    h = F.normalize(torch.randn(8, d, generator=g), dim=-1)          # the item head's output: unit vectors
    adv = torch.tensor([0.7, -0.7, -0.2, 0.2, 1.0, -1.0, 0.0, 0.0])
    return h, table, targets, adv


def test_item_inbatch_duplicates_of_positive_are_not_negatives():
    h, table, targets, adv = _item_batch()
    emb = table[targets]
    lp = item_logprobs(h, emb, targets, tau=0.5)
    s = F.normalize(h, dim=-1) @ table[[5, 7, 9]].T / 0.5            # each distinct item once
    col = torch.tensor([0, 0, 1, 1, 0, 0, 2, 2])                    # row -> column of its item
    want = torch.log_softmax(s, 1).gather(1, col[:, None]).squeeze(1)
    torch.testing.assert_close(lp, want)
    naive = torch.log_softmax(F.normalize(h, dim=-1) @ emb.T / 0.5, 1)[torch.arange(8), torch.arange(8)]
    assert (naive - lp).abs().min() > 0.1                           # one column per row would differ


def test_item_loss_topk_weights_and_reference_broadcast():
    h, table, targets, adv = _item_batch()
    h.requires_grad_()
    emb = table[targets].clone().requires_grad_()
    loss, st = item_loss(h, emb, targets, adv, None, G=2, topk=1, tau=0.5)
    sel = torch.tensor([0, 3, 4, 6])                                # best row per group (tie: A=0)
    assert loss.item() == pytest.approx(-adv[sel].sum().item() / 8, rel=1e-6)   # ratio 1
    loss.backward()
    lp_rows = torch.zeros(8, dtype=torch.bool)
    lp_rows[sel] = True
    assert torch.all(h.grad[~lp_rows] == 0) and h.grad[[0, 3, 4]].abs().sum() > 0
    # the reference's (B,1)x(B,1,1) product: every row's log-prob, scaled by mean of selected advs
    h2 = h.detach().clone().requires_grad_()
    loss_b, _ = item_loss(h2, emb.detach(), targets, adv, None, G=2, tau=0.5, reference_broadcast=True)
    loss_b.backward()
    h3 = h.detach().clone().requires_grad_()
    (-adv[sel].sum() / 8 * item_logprobs(h3, emb.detach(), targets, 0.5).mean()).backward()
    assert loss_b.item() == pytest.approx(-adv[sel].sum().item() / 8, rel=1e-6)
    torch.testing.assert_close(h2.grad, h3.grad)
    assert torch.all(h2.grad.abs().sum(1) > 0)                      # non-top-k rows trained too


def test_item_loss_clipping_with_old_logprobs():
    h, table, targets, adv = _item_batch()
    emb = table[targets]
    h.requires_grad_()
    old = item_logprobs(h.detach(), emb, targets, 0.5) + torch.tensor([-1.0, 0, 0, 0.5, 0.5, 0, 0, 0])
    loss, st = item_loss(h, emb, targets, adv, old, G=2, tau=0.5)
    # row 0: A > 0, ratio e > 1.28 -> clipped high; row 3: A > 0, ratio e^-0.5 -> active;
    # row 4: A > 0, ratio < 1 -> active
    assert st["item_clip_high"] == pytest.approx(0.25) and st["item_clip_low"] == 0
    loss.backward()
    assert torch.all(h.grad[0] == 0) and h.grad[3].abs().sum() > 0 and h.grad[4].abs().sum() > 0


def test_item_loss_full_catalog_matches_materialised_reference(device):
    g = torch.Generator().manual_seed(4)
    N, d, tau = 12, 6, 0.3
    h, _, targets, adv = _item_batch(seed=5, d=d)
    E = F.normalize(torch.randn(N, d, generator=g), dim=-1)         # stale cached table
    emb = F.normalize(torch.randn(8, d, generator=g), dim=-1)       # fresh item-head outputs
    emb[1], emb[5] = emb[0], emb[0]                                 # same item -> same embedding
    exclude = torch.randint(0, N, (8, 3), generator=g)
    exclude[0, 0] = 5                                               # a target inside its history
    old = item_logprobs(h, emb, targets, tau, "full", E, exclude) + 0.3 * torch.randn(8, generator=g)
    # the fused catalog path runs on `device`; the materialised reference below on CPU
    h1, e1 = h.clone().to(device).requires_grad_(), emb.clone().to(device).requires_grad_()
    loss, _ = item_loss(h1, e1, targets.to(device), adv.to(device), old.to(device), G=2, tau=tau,
                        mode="full", E=E.to(device), exclude=exclude.to(device))
    loss.backward()
    loss, g1, e1g = loss.cpu(), h1.grad.cpu(), e1.grad.cpu()

    h2, e2 = h.clone().requires_grad_(), emb.clone().requires_grad_()
    T = E.clone()
    for b in [0, 2, 6]:   # first row of each distinct item: the table's value, the fresh row's gradient
        T[targets[b]] = E[targets[b]] + e2[b] - e2[b].detach()
    logits = h2 @ T.T / tau                                         # [B, N] materialised (unit vectors in)
    masked = torch.zeros(8, N, dtype=torch.bool)
    masked[:, 0] = True
    masked.scatter_(1, exclude, True)
    masked[torch.arange(8), targets] = False                        # the positive is never masked
    lp = torch.log_softmax(logits.masked_fill(masked, float("-inf")), 1)[torch.arange(8), targets]
    sel = torch.tensor([0, 3, 4, 6])
    r = torch.exp(lp[sel] - old[sel])
    a = adv[sel]
    ref = -torch.min(r * a, r.clamp(0.8, 1.28) * a).sum() / 8
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(g1, h2.grad)
    torch.testing.assert_close(e1g, e2.grad)
    assert e1g[0].abs().sum() > 0 and torch.all(e1g[1] == 0)   # duplicates: first row only


def test_relabel_topk_never_pushes_away_from_the_target():
    """--relabel-topk 2: a selected chain with a negative advantage gets no item-loss gradient (its advantage is
    clamped at 0), while the selected chains with positive advantages do."""
    torch.manual_seed(0)
    h = torch.randn(6, 8, requires_grad=True)
    e = torch.randn(6, 8)
    t = torch.tensor([1, 1, 1, 2, 2, 2])
    adv = torch.tensor([1.2, -0.3, -0.9, 0.8, 0.4, -1.2])     # group 1's second-best chain is negative
    loss, _ = item_loss(h, e, t, adv, None, G=3, topk=2, tau=0.1)
    loss.backward()
    g = h.grad.abs().sum(1)                                    # [6] per-row gradient mass
    assert g[1] == 0 and g[2] == 0 and g[5] == 0               # negative or unselected: nothing
    assert g[0] > 0 and g[3] > 0 and g[4] > 0                  # the positive selected rows learn
    h.grad = None
    ref, _ = item_loss(h, e, t, adv, None, G=3, topk=2, tau=0.1, reference_broadcast=True)
    ref.backward()
    assert h.grad.abs().sum() > 0                              # the ablation keeps the reference's behaviour


def test_uniform_item_weighting_is_cross_entropy_of_the_selected_rows():
    """weighting="uniform": the item loss's gradient is that of the mean in-batch cross-entropy over the top-k rows
    of each group, whatever their advantages (negative or zero included), on irregular shapes."""
    torch.manual_seed(3)
    G, B = 3, 15
    h = torch.randn(B, 7, requires_grad=True)
    e = torch.randn(B, 7)
    t = torch.randint(1, 6, (B,))
    e = e[torch.unique(t, return_inverse=True)[1]]                  # rows with the same target hold the same item
    adv = torch.randn(B)
    adv[3:6] = 0.0                                                  # a group of equal rewards still learns
    for k in (1, 2, 3, 0):                                          # 0: all G chains
        hu, eu = torch.nn.functional.normalize(h, dim=-1), torch.nn.functional.normalize(e, dim=-1)
        loss, _ = item_loss(hu, eu, t, adv, None, G=G, topk=k, tau=0.1, weighting="uniform")
        rows = adv.view(-1, G).topk(k or G, 1).indices + torch.arange(0, B, G)[:, None]
        rows = rows.flatten().sort().values
        uniq, inv = torch.unique(t, return_inverse=True)
        first = torch.tensor([int((t == u).nonzero()[0]) for u in uniq])
        hn, en = torch.nn.functional.normalize(h, dim=-1), torch.nn.functional.normalize(e[first], dim=-1)
        ref = torch.nn.functional.cross_entropy(hn[rows] @ en.T / 0.1, inv[rows])
        # with ratio 1 the surrogate's value is -1, its gradient the cross-entropy's
        torch.testing.assert_close(torch.autograd.grad(loss, h)[0], torch.autograd.grad(ref, h)[0])
    g = torch.autograd.grad(item_loss(h, e, t, adv, None, G=G, topk=0, tau=0.1, weighting="uniform")[0], h)[0]
    assert (g.abs().sum(1) > 0).all()                               # every chain of every group learns
