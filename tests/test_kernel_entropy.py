"""kernels.logprobs with the entropy output, the call training makes (model.forward_both(...,
return_entropy=True)): the dispatch key tells it apart and impl="auto" reads its entry; every path matches
the float64 reference, forward and backward, with the entropy logged (no gradient: the frozen head's fast
path, no backward pass) or trained, on irregular shapes (d not a multiple of the kernels' 32, masked rows,
V past a tile)."""
import json

import pytest
import torch

import kernels
from kernels import logprobs as lp
from kernels.logprobs import token_logprobs, token_logprobs_reference

PATHS = ["reference", "torch", "chunked", "triton"]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def test_dispatch_key_tells_entropy_apart():
    k = dict(kind="cpu:X", dtype=torch.float32, op="logprob", grads="dX", rows=4, N=100, d=8)
    plain, ent = kernels.dispatch_key(**k), kernels.dispatch_key(**k, entropy=True)
    assert plain == "cpu:X|float32|logprob|dX|1e3"          # the format of the entries already written
    assert ent == "cpu:X|float32|logprob+entropy|dX|1e3" and ent != plain
    with open(kernels.DISPATCH_FILE) as f:                  # every shipped entry still parses
        for e in json.load(f)["entries"]:
            kind, dtype, op, grads, bucket = e["key"].split("|")
            assert op in ("catalog", "logprob", "logprob+entropy") and bucket.startswith("1e"), e["key"]


def test_pick_impl_reads_the_entropy_entry(tmp_path, monkeypatch):
    h, W = torch.randn(6, 8), torch.randn(50, 8)
    kind = kernels.device_kind("cpu")
    key = kernels.dispatch_key(kind, torch.float32, "logprob", "fwd", 6, 50, 8, entropy=True)
    plain = kernels.dispatch_key(kind, torch.float32, "logprob", "fwd", 6, 50, 8)
    plain_dx = kernels.dispatch_key(kind, torch.float32, "logprob", "dX", 6, 50, 8)
    entries = [{"key": key, "impl": "chunked"}, {"key": plain, "impl": "reference"},
               {"key": plain_dx, "impl": "chunked"}]
    path = tmp_path / "dispatch.json"
    path.write_text(json.dumps({"entries": entries}))
    monkeypatch.setattr(kernels, "DISPATCH_FILE", str(path))
    monkeypatch.setattr(kernels, "INTERPRET", False)
    kernels.dispatch_table.cache_clear()
    try:
        assert kernels.pick_impl("auto", h, W, op="logprob", grads="fwd", entropy=True) == "chunked"
        assert kernels.pick_impl("auto", h, W, op="logprob", grads="fwd") == "reference"
        # no entry of its own: the entry without the entropy; none either: the default rule
        assert kernels.pick_impl("auto", h, W, op="logprob", grads="dX", entropy=True) == "chunked"
        assert kernels.pick_impl("auto", h, W, op="logprob", grads="dX+dW", entropy=True) == "torch"
        seen = []                                           # token_logprobs passes return_entropy on
        ref = lp.token_logprobs_reference
        monkeypatch.setattr(lp, "token_logprobs_reference", lambda *a: seen.append(a[5]) or ref(*a))
        y = torch.randint(0, 50, (6,))
        token_logprobs(h, W, y)                             # the entry without entropy: reference
        token_logprobs(h, W, y, return_entropy=True)        # its own entry: chunked
        assert seen == [False]
    finally:
        kernels.dispatch_table.cache_clear()


def _inputs(T, V, d, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, T, d, generator=g) / d ** 0.25
    W = torch.randn(V, d, generator=g) / d ** 0.25 * 2
    y = torch.randint(0, V, (3, T), generator=g)
    mask = torch.rand(3, T, generator=g) > 0.3
    wl, we = torch.randn(3, T, generator=g), torch.randn(3, T, generator=g)
    return h, W, y, mask, wl, we


@pytest.mark.parametrize("impl", PATHS)
@pytest.mark.parametrize("grads", ["dX", "dX+dW"])
@pytest.mark.parametrize("entropy", ["logged", "trained"])
@pytest.mark.parametrize("T,V,d,softcap", [(13, 1001, 40, 0.0), (7, 517, 24, 3.0)])
def test_logprobs_and_entropy_match_the_reference(impl, grads, entropy, T, V, d, softcap, device,
                                                   monkeypatch):
    monkeypatch.setattr(kernels, "WORKSPACE_BYTES", {"cpu": 40_000, "cuda": 40_000})   # chunked: row blocks
    monkeypatch.setattr(lp, "TORCH_CHUNK", {"cpu": 5_000, "cuda": 5_000})               # torch: row blocks
    calls = []
    for name in ("_torch_backward", "_triton_backward"):
        fn = getattr(lp, name)
        monkeypatch.setattr(lp, name, lambda *a, fn=fn: calls.append(name) or fn(*a))
    h, W, y, mask, wl, we = _inputs(T, V, d, seed=T)
    hh, WW = h.clone().to(device).requires_grad_(), W.clone().to(device).requires_grad_(grads == "dX+dW")
    logp, ent = token_logprobs(hh, WW, y.to(device), 0.7, mask.to(device), return_entropy=True, impl=impl,
                               softcap=softcap)
    loss = (logp * wl.to(device)).sum() + ((ent * we.to(device)).sum() if entropy == "trained" else 0)
    loss.backward()
    h64, W64 = h.double().requires_grad_(), W.double().requires_grad_()
    rl, re = token_logprobs_reference(h64, W64, y, 0.7, mask, True, softcap)
    ((rl * wl.double()).sum() + ((re * we.double()).sum() if entropy == "trained" else 0)).backward()
    assert _rel(logp.cpu(), rl) < 1e-5 and _rel(ent.cpu(), re) < 1e-5
    assert (logp.cpu()[~mask] == 0).all() and (ent.cpu()[~mask] == 0).all() and (ent.cpu() >= 0).all()
    assert _rel(hh.grad.cpu(), h64.grad) < 1e-5
    if grads == "dX+dW":
        assert _rel(WW.grad.cpu(), W64.grad) < 1e-5
    else:
        assert WW.grad is None
    # the frozen head's fast path: with the entropy only logged, torch and chunked make no backward pass
    fast = grads == "dX" and entropy == "logged" and impl in ("torch", "chunked")
    assert (calls == []) == (fast or impl == "reference"), calls
