"""kernels/logprobs.py: every impl against the materialised reference (computed in float64).

Runs the Triton kernels under the interpreter on CPU (seconds each), or compiled on CUDA with
R2EC_TEST_DEVICE=cuda. Shapes are irregular on purpose: V=1001 (tail tile), d=48 (d % BK != 0).
"""
import gc
import os

import pytest
import torch

import kernels
from kernels import logprobs as lp
from kernels.logprobs import token_logprobs, token_logprobs_reference

IMPLS = ["triton", "torch", "chunked"]
# forward: both dtypes see identical (rounded) inputs, so only fp32 accumulation order differs;
# backward: bf16 stores dlogits and returns grads in bf16.
FWD_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-4}
BWD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}


def make(T, V, d, dtype, device, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, d, generator=g) * scale
    W = torch.randn(V, d, generator=g) / d ** 0.5 * 3
    y = torch.randint(0, V, (T,), generator=g)
    return h.to(dtype).to(device), W.to(dtype).to(device), y.to(device)


def ref64(h, W, y, t, mask=None, gl=None, ge=None):
    """float64 reference values and (optionally) grads of sum(gl*logp + ge*ent)."""
    h64 = h.detach().double().requires_grad_()
    W64 = W.detach().double().requires_grad_()
    logp, ent = token_logprobs_reference(h64, W64, y, t, mask, return_entropy=True)
    if gl is None:
        return logp.detach(), ent.detach(), None, None
    ((logp * gl.double()).sum() + (ent * ge.double()).sum()).backward()
    return logp.detach(), ent.detach(), h64.grad, W64.grad


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def run(h, W, y, t, impl, mask=None, gl=None, ge=None):
    h = h.detach().clone().requires_grad_()
    W = W.detach().clone().requires_grad_()
    logp, ent = token_logprobs(h, W, y, t, mask=mask, return_entropy=True, impl=impl)
    if gl is not None:
        ((logp * gl).sum() + (ent * ge).sum()).backward()
    return logp.detach(), ent.detach(), h.grad, W.grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [0.7, 1.0, 2.0])
def test_forward_backward_vs_reference(impl, dtype, t, device):
    T, V, d = 37, 1001, 48
    h, W, y = make(T, V, d, dtype, device, seed=int(t * 10))
    gl, ge = torch.randn(T, device=device), torch.randn(T, device=device)
    logp, ent, dh, dW = run(h, W, y, t, impl, gl=gl, ge=ge)
    rl, re, rdh, rdW = ref64(h, W, y, t, gl=gl, ge=ge)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    assert (logp <= 0).all() and (ent >= 0).all()
    torch.testing.assert_close(logp.double(), rl, atol=FWD_TOL[dtype] * 10, rtol=FWD_TOL[dtype])
    torch.testing.assert_close(ent.double(), re, atol=FWD_TOL[dtype] * 10, rtol=FWD_TOL[dtype])
    assert dh.dtype == dtype and dW.dtype == dtype
    assert rel(dh, rdh) < BWD_TOL[dtype] and rel(dW, rdW) < BWD_TOL[dtype]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("which", ["logp", "entropy"])
def test_single_output_gradient(impl, which, device):
    """Only one of the two outputs feeds the loss (the other grad arrives as None)."""
    T, V, d = 19, 300, 40
    h, W, y = make(T, V, d, torch.float32, device, seed=3)
    w = torch.randn(T, device=device)
    hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
    out = token_logprobs(hh, WW, y, 1.3, return_entropy=True, impl=impl)[which == "entropy"]
    (out * w).sum().backward()
    z = torch.zeros(T, device=device)
    gl, ge = (w, z) if which == "logp" else (z, w)
    _, _, rdh, rdW = ref64(h, W, y, 1.3, gl=gl, ge=ge)
    assert rel(hh.grad, rdh) < 1e-5 and rel(WW.grad, rdW) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_vocab_smaller_than_tile(impl, device):
    T, V, d = 5, 50, 16
    h, W, y = make(T, V, d, torch.float32, device, seed=4)
    gl, ge = torch.randn(T, device=device), torch.randn(T, device=device)
    logp, ent, dh, dW = run(h, W, y, 1.0, impl, gl=gl, ge=ge)
    rl, re, rdh, rdW = ref64(h, W, y, 1.0, gl=gl, ge=ge)
    torch.testing.assert_close(logp.double(), rl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), re, atol=1e-5, rtol=1e-5)
    assert rel(dh, rdh) < 1e-5 and rel(dW, rdW) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_many_chunks_and_splits(impl, device, monkeypatch):
    """Force several backward vocab chunks / torch row chunks (V=1001 -> 8 chunks of 128, last 105)."""
    monkeypatch.setattr(lp, "DZ_CHUNK", 128 * 33)
    monkeypatch.setattr(lp, "TORCH_CHUNK", {"cpu": 2000, "cuda": 2000})
    monkeypatch.setattr(kernels, "WORKSPACE_BYTES", {"cpu": 20000, "cuda": 20000})   # ~2 rows a block
    T, V, d = 33, 1001, 24
    h, W, y = make(T, V, d, torch.float32, device, seed=5)
    gl, ge = torch.randn(T, device=device), torch.randn(T, device=device)
    logp, ent, dh, dW = run(h, W, y, 0.9, impl, gl=gl, ge=ge)
    rl, re, rdh, rdW = ref64(h, W, y, 0.9, gl=gl, ge=ge)
    torch.testing.assert_close(logp.double(), rl, atol=1e-5, rtol=1e-5)
    assert rel(dh, rdh) < 1e-5 and rel(dW, rdW) < 1e-5
    again = run(h, W, y, 0.9, impl, gl=gl, ge=ge)          # deterministic: bitwise equal
    assert torch.equal(again[0], logp) and torch.equal(again[3], dW)


@pytest.mark.parametrize("impl", IMPLS)
def test_mask_excluded_zero_grad(impl, device):
    B, L, V, d = 3, 11, 1001, 48                            # leading dims [B, L] are kept
    h, W, y = make(B * L, V, d, torch.float32, device, seed=6)
    h, y = h.view(B, L, d), y.view(B, L)
    mask = torch.rand(B, L, generator=torch.Generator().manual_seed(1)) < 0.6
    mask[0, :4] = False
    mask = mask.to(device)
    gl, ge = torch.randn(B, L, device=device), torch.randn(B, L, device=device)
    logp, ent, dh, dW = run(h, W, y, 1.0, impl, mask=mask, gl=gl, ge=ge)
    rl, re, rdh, rdW = ref64(h, W, y, 1.0, mask=mask, gl=gl, ge=ge)
    assert logp.shape == (B, L) and (logp[~mask] == 0).all() and (ent[~mask] == 0).all()
    assert (dh[~mask] == 0).all() and dh[mask].abs().sum() > 0
    torch.testing.assert_close(logp.double(), rl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), re, atol=1e-5, rtol=1e-5)
    assert rel(dh, rdh) < 1e-5 and rel(dW, rdW) < 1e-5
    full = token_logprobs(h, W, y, impl=impl)               # same values as without the mask
    torch.testing.assert_close(logp[mask], full[mask], atol=1e-6, rtol=1e-6)
    none = run(h, W, y, 1.0, impl, mask=torch.zeros_like(mask), gl=gl, ge=ge)
    assert (none[0] == 0).all() and (none[3] == 0).all()   # all masked: zeros, zero grad, no crash


@pytest.mark.parametrize("impl", IMPLS)
def test_tied_weight_gradient(impl, device):
    """Embedding used as both input table and LM head: its grad sums both uses, as plain autograd."""
    V, d, T = 1001, 48, 29
    g = torch.Generator().manual_seed(7)
    E0 = (torch.randn(V, d, generator=g) * 0.5).to(device)
    A0 = (torch.randn(d, d, generator=g) / d ** 0.5).to(device)
    x = torch.randint(0, V, (T,), generator=g).to(device)
    y = torch.randint(0, V, (T,), generator=g).to(device)
    w = torch.randn(T, generator=g).to(device)
    grads = {}
    for which in (impl, "reference"):
        E, A = E0.clone().requires_grad_(), A0.clone().requires_grad_()
        hidden = torch.tanh(E[x] @ A)                       # tiny "model" reading the same table
        logp, ent = token_logprobs(hidden, E, y, 0.8, return_entropy=True, impl=which)
        ((logp * w).sum() + 0.1 * ent.sum()).backward()
        grads[which] = (E.grad, A.grad)
    assert rel(grads[impl][0], grads["reference"][0]) < 1e-5
    assert rel(grads[impl][1], grads["reference"][1]) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_huge_logits_no_nan_never_positive(impl, device):
    T, V, d = 13, 777, 32
    h, W, y = make(T, V, d, torch.float32, device, seed=8)
    h = h / h.norm(dim=1, keepdim=True) * 1e4 / W.norm(dim=1).max()   # |logits| up to ~1e4
    y[:4] = (h[:4] @ W.T).argmax(1)                         # dominant target: logp ~ -0, must stay <= 0
    gl, ge = torch.randn(T, device=device), torch.randn(T, device=device)
    logp, ent, dh, dW = run(h, W, y, 0.7, impl, gl=gl, ge=ge)
    rl, re, rdh, rdW = ref64(h, W, y, 0.7, gl=gl, ge=ge)
    for x in (logp, ent, dh, dW):
        assert torch.isfinite(x).all()
    assert (logp <= 0).all() and (ent >= 0).all()
    assert (rl.abs() > 100).any()                           # the test really has big margins
    torch.testing.assert_close(logp.double(), rl, atol=0.05, rtol=1e-5)
    torch.testing.assert_close(ent.double(), re, atol=0.05, rtol=1e-3)


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_runs_head_in_low_precision(impl, device):
    """Under autocast with fp32 params the head runs on bf16 copies (fast path on GPU); the grads
    reach the fp32 params and match the reference on the bf16-rounded inputs."""
    T, V, d = 21, 500, 40
    h, W, y = make(T, V, d, torch.float32, device, seed=10)
    hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        logp = token_logprobs(hh, WW, y, impl=impl)
    w = torch.randn(T, device=device)
    (logp * w).sum().backward()
    rl, _, rdh, rdW = ref64(h.bfloat16(), W.bfloat16(), y, 1.0, gl=w, ge=torch.zeros_like(w))
    assert logp.dtype == torch.float32 and WW.grad.dtype == torch.float32
    torch.testing.assert_close(logp.double(), rl, atol=2e-4, rtol=2e-4)
    assert rel(hh.grad, rdh) < 1.5e-2 and rel(WW.grad, rdW) < 1.5e-2


def _rss():
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                vals[k] = int(v.split()[0]) * 1024
    return vals["VmRSS"], vals["VmHWM"]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak RSS")
def test_torch_path_memory_bounded(device):
    if device.type != "cpu":
        pytest.skip("CPU memory check")
    """Chunked torch path, V=50,000, d=256 (CPU): peak <= 1.5x inputs+outputs+grads. The extra is
    dW plus two fixed-size chunk buffers, independent of T; T=512 keeps the test fast (T=2048 measured
    140 MiB against a 153 MiB budget)."""
    try:  # fixed 1 MB mmap threshold: big buffers go back to the OS on free, so RSS tracks live bytes
        import ctypes
        assert ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20) == 1   # M_MMAP_THRESHOLD
    except Exception:
        pytest.skip("needs glibc mallopt")
    T, V, d = 512, 50_000, 256
    h, W, y = make(T, V, d, torch.float32, "cpu", seed=9)
    h.requires_grad_(), W.requires_grad_()
    token_logprobs(h[:2], W[:50].detach(), y[:2] % 50, impl="torch").sum().backward()  # warm up libs
    h.grad = None
    gc.collect()
    nbytes = lambda *xs: sum(x.numel() * x.element_size() for x in xs)
    inputs = nbytes(h, W, y)
    budget = 1.5 * (inputs + 2 * T * 4 + nbytes(h, W))      # + outputs (logp, entropy) + grads
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                        # reset the peak-RSS counter
    before, _ = _rss()
    logp, ent = token_logprobs(h, W, y, return_entropy=True, impl="torch")
    (logp.sum() + ent.sum()).backward()
    _, peak = _rss()
    assert torch.isfinite(W.grad).all() and W.grad.abs().sum() > 0
    print(f"peak {(inputs + peak - before) / 2**20:.0f} MiB, budget {budget / 2**20:.0f} MiB")
    assert inputs + (peak - before) <= budget, f"peak {(inputs + peak - before) / 2**20:.0f} MiB > {budget / 2**20:.0f}"
