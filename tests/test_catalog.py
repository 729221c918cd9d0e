"""kernels/catalog.py: the torch, chunked and Triton paths against the materialised float64 reference.

Runs the Triton path under the interpreter on CPU (small shapes: seconds each), on CUDA with
R2EC_TEST_DEVICE=cuda. Rank ties are compared exactly where the reference has no near-tie.
"""
import pytest
import torch

import kernels
from kernels import catalog
from kernels.catalog import catalog_loss, catalog_stats, catalog_stats_reference

IMPLS = ["triton", "torch", "chunked"]
TOL = {torch.float32: dict(rtol=1e-5, atol=2e-4), torch.bfloat16: dict(rtol=1e-5, atol=2e-4)}
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}      # relative to the largest |grad|


def _inputs(M, N, d, dtype, device, X=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    H = (torch.randn(M, d, generator=g) / d ** 0.25).to(dtype)
    E = (torch.randn(N, d, generator=g) / d ** 0.25).to(dtype)
    t = torch.randint(1, N, (M,), generator=g)
    ex = torch.randint(0, N, (M, X), generator=g)
    ex[:, -1] = ex[:, 0]                                       # duplicate ids in the list
    ex[:, 1] = 0                                               # padding
    if M > 1:
        ex[1, 2] = t[1]                                        # one target excluded -> rank N
    return H.to(device), E.to(device), t.to(device), ex.to(device)


def _ref(H, E, t, ex, tau, topk=0):
    """float64 reference, plus its logits with excluded items at +inf (for the near-tie rule)."""
    M, N = H.shape[0], E.shape[0]
    z = (H.double() @ E.double().T) / tau
    z = z.masked_fill(catalog._excluded_mask(M, N, ex, H.device), float("inf"))
    return catalog_stats_reference(H.double(), E.double(), t, ex, tau, topk), z


def _check_stats(got, ref, z, N, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(got.lse.double(), ref.lse, **tol)
    torch.testing.assert_close(got.target_logit.double(), ref.target_logit, **tol)
    # pessimistic rank: exact, except for items within rounding of the target logit in the reference
    near = ((z - ref.target_logit[:, None]).abs() < 1e-4).sum(1).clamp(min=1) - 1
    assert ((got.rank - ref.rank).abs() <= near).all(), (got.rank, ref.rank)
    assert got.rank.dtype == torch.long and (got.rank <= N).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,d", [(7, 1001, 48), (21, 37, 20)])  # irregular; N below one tile
def test_stats_match_reference(impl, dtype, M, N, d, device):
    H, E, t, ex = _inputs(M, N, d, dtype, device)
    k = min(12, N)
    got = catalog_stats(H, E, t, ex, tau=0.7, topk=k, impl=impl)
    ref, z = _ref(H, E, t, ex, 0.7, topk=k)
    _check_stats(got, ref, z, N, dtype)
    assert got.rank[1].item() == N                              # excluded target: never a hit
    torch.testing.assert_close(got.topk_scores.double(), ref.topk_scores, **TOL[dtype])
    # ids must agree wherever the score is separated from its neighbours (no tie ambiguity)
    s = ref.topk_scores
    gap = torch.minimum(torch.diff(s, prepend=s[:, :1] + 1, dim=1).abs(),
                        torch.diff(s, append=s[:, -1:] - 1, dim=1).abs())
    sep = gap > 1e-3
    assert (got.topk_ids.cpu()[sep.cpu()] == ref.topk_ids.cpu()[sep.cpu()]).all()
    assert sep.float().mean() > 0.5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,reduction", [(torch.float32, "mean"), (torch.bfloat16, "none")])
def test_loss_and_grads(impl, dtype, reduction, device, monkeypatch):
    monkeypatch.setattr(catalog, "CHUNK_BYTES", 16 << 10)        # force several catalog chunks
    monkeypatch.setattr(kernels, "WORKSPACE_BYTES", {"cpu": 8 << 10, "cuda": 8 << 10})  # row blocks
    M, N, d = 19, 1001, 48                                        # 2 row tiles, 16 column tiles
    H, E, t, ex = _inputs(M, N, d, dtype, device, seed=1)
    w = torch.rand(M, dtype=torch.float64, device=device) + 0.5  # non-uniform upstream grad
    Hg, Eg = H.clone().requires_grad_(), E.clone().requires_grad_()
    loss = catalog_loss(Hg, Eg, t, ex, tau=0.5, reduction=reduction, impl=impl)
    (loss.double() * (w if reduction == "none" else 1)).sum().backward()
    Hr, Er = H.double().requires_grad_(), E.double().requires_grad_()
    lr = catalog.catalog_loss_reference(Hr, Er, t, ex, 0.5, reduction)
    (lr * (w if reduction == "none" else 1)).sum().backward()
    torch.testing.assert_close(loss.double(), lr.detach(), rtol=1e-5, atol=1e-4)
    for got, want in ((Hg.grad, Hr.grad), (Eg.grad, Er.grad)):
        assert got.dtype == dtype and torch.isfinite(got).all()
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < GRAD_TOL[dtype], err
    assert Eg.grad[0].abs().max() == 0                           # padding row gets no gradient


@pytest.mark.parametrize("impl", IMPLS)
def test_only_dH_when_E_frozen(impl, device):
    H, E, t, ex = _inputs(4, 300, 24, torch.float32, device, seed=2)
    Hg = H.clone().requires_grad_()
    catalog_loss(Hg, E, t, ex, impl=impl, reduction="sum").backward()
    Hr = H.double().requires_grad_()
    catalog.catalog_loss_reference(Hr, E.double(), t, ex, 1.0, "sum").backward()
    torch.testing.assert_close(Hg.grad.double(), Hr.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_dtypes(impl, device):
    # fp32 user states against a bf16 item table (the Triton path rounds H to bf16)
    H, E, t, ex = _inputs(6, 150, 40, torch.float32, device, seed=8)
    E = E.bfloat16()
    got = catalog_stats(H, E, t, ex, impl=impl)
    ref = catalog_stats_reference(H.double(), E.double(), t, ex)
    torch.testing.assert_close(got.lse.double(), ref.lse, rtol=1e-2, atol=1e-2)
    Hg = H.clone().requires_grad_()
    catalog_loss(Hg, E, t, ex, impl=impl).backward()
    assert Hg.grad.dtype == torch.float32 and torch.isfinite(Hg.grad).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_ties_are_pessimistic(impl, device):
    # small integers: every path computes the logits exactly, so ties are real ties
    g = torch.Generator().manual_seed(3)
    M, N, d = 6, 200, 9
    H = torch.randint(-2, 3, (M, d), generator=g).float()
    E = torch.randint(-2, 3, (N, d), generator=g).float()
    t = torch.randint(1, N, (M,), generator=g)
    H, E, t = H.to(device), E.to(device), t.to(device)
    got = catalog_stats(H, E, t, None, impl=impl)
    ref = catalog_stats_reference(H.double(), E.double(), t, None)
    assert torch.equal(got.rank.cpu(), ref.rank.cpu())
    z = ref.target_logit.cpu()[:, None]
    all_logits = (H.double() @ E.double().T).cpu()
    assert ((all_logits == z).sum(1) > 1).any()                 # the test does contain ties
    # random float rows identical to the target's row tie with it exactly, and count against it
    H2, E2, t2, _ = _inputs(5, 500, 40, torch.float32, device, seed=4)
    base = catalog_stats(H2, E2, t2, None, impl=impl).rank
    E2[t2 + 1 - 2 * (t2 > 250).long()] = E2[t2]                # a twin next to each target
    twin = catalog_stats(H2, E2, t2, None, impl=impl).rank
    assert (twin >= base).all() and (twin > 0).all()
    z = (H2.double() @ E2.double().T).float()                     # correctly rounded logits
    z[:, 0] = float("-inf")                                       # padding never counts
    zt = z.gather(1, t2[:, None])
    assert twin.tolist() == ((z >= zt).sum(1) - 1).tolist()


@pytest.mark.parametrize("impl", IMPLS)
def test_all_but_one_excluded(impl, device):
    M, N, d = 3, 40, 16
    H, E, _, _ = _inputs(M, N, d, torch.float32, device, seed=5)
    keep = torch.tensor([7, 21, 39], device=device)               # the one allowed item per row
    ids = torch.arange(N, device=device).expand(M, N)
    ex = torch.where(ids == keep[:, None], 0, ids)                 # every id but keep (0 = pad)
    ex = torch.cat([ex, ex[:, :5]], 1)                            # plus duplicates
    t = torch.tensor([7, 3, 39], device=device)                    # row 1: target excluded
    got = catalog_stats(H, E, t, ex, topk=3, impl=impl)
    z = (H.double() @ E.double().T).gather(1, keep[:, None].cpu().to(device)).squeeze(1)
    torch.testing.assert_close(got.lse.double(), z, rtol=1e-5, atol=1e-5)
    assert got.rank.tolist() == [0, N, 0]
    assert got.topk_ids[:, 0].tolist() == keep.tolist()
    assert torch.isinf(got.topk_scores[:, 1:]).all()
    loss = catalog_loss(H, E, t, ex, reduction="none", impl=impl)    # rows 0, 2: only the target
    assert loss[0].abs() < 1e-5 and loss[2].abs() < 1e-5 and loss[1] > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_excluded_items_dominate(impl, device):
    # excluded items get +30 logits (e^30 of the mass); exclusion must be exact, not subtracted
    M, N, d = 4, 700, 17
    H, E, t, _ = _inputs(M, N, d, torch.float32, device, seed=6)
    H[:, -1], E[:, -1] = 1.0, 0.0
    bad = torch.tensor([5, 99, 400, 401, 650], device=device)
    E[bad, -1] = 30.0
    ex = bad.expand(M, -1).clone()
    got = catalog_stats(H, E, t, ex, impl=impl)
    ref = catalog_stats_reference(H.double(), E.double(), t, ex)
    torch.testing.assert_close(got.lse.double(), ref.lse, rtol=1e-6, atol=1e-5)
    assert ref.lse.max() < 20                                    # the test means something
    Hg = H.clone().requires_grad_()
    catalog_loss(Hg, E, t, ex, impl=impl).backward()
    Hr = H.double().requires_grad_()
    catalog.catalog_loss_reference(Hr, E.double(), t, ex).backward()
    torch.testing.assert_close(Hg.grad.double(), Hr.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_huge_scores_stay_finite(impl, device):
    M, N, d = 5, 300, 32
    H, E, t, ex = _inputs(M, N, d, torch.float32, device, seed=7)
    H = H * 60                                                    # logits of order +-1e4 ... 1e3
    E = E * 60
    got = catalog_stats(H, E, t, ex, tau=0.5, topk=4, impl=impl)
    ref = catalog_stats_reference(H.double(), E.double(), t, ex, 0.5, topk=4)
    assert ref.lse.abs().max() > 2e3
    assert torch.isfinite(got.lse).all() and torch.isfinite(got.topk_scores).all()
    torch.testing.assert_close(got.lse.double(), ref.lse, rtol=1e-5, atol=1e-2)
    Hg, Eg = H.clone().requires_grad_(), E.clone().requires_grad_()
    catalog_loss(Hg, Eg, t, ex, tau=0.5, impl=impl).backward()
    assert torch.isfinite(Hg.grad).all() and torch.isfinite(Eg.grad).all()
    Hr = H.double().requires_grad_()
    catalog.catalog_loss_reference(Hr, E.double(), t, ex, 0.5).backward()
    err = (Hg.grad.double() - Hr.grad).abs().max() / Hr.grad.abs().max()
    assert err < 1e-3


def test_bad_arguments(device):
    H, E, t, ex = _inputs(2, 50, 8, torch.float32, device)
    with pytest.raises(ValueError, match="reduction"):
        catalog_loss(H, E, t, ex, reduction="avg")
    with pytest.raises(ValueError, match="impl"):
        catalog_stats(H, E, t, ex, impl="cuda")
