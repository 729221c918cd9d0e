"""Token log-probs (and entropy) through the LM head, without materialising [T, V] logits (SPEC §6).

Math. hidden h [T,d], LM head W [V,d], tokens y [T], temperature t:
    z[i,j]  = h_i . W_j / t                       (fp32 accumulation)
    lse[i]  = log sum_j exp z[i,j]
    logp[i] = z[i,y_i] - lse[i]                   (<= 0; clamped so rounding never makes it positive)
    H[i]    = lse[i] - sum_j p[i,j] z[i,j]        (entropy, p = softmax(z[i]))
Stable online form over vocabulary tiles, relative to the running max m (never z itself, so logits of
1e4 lose nothing):  s = sum exp(z-m),  sz = sum exp(z-m) (z-m),  lse = m + log s,  H = log s - sz/s.
Two partial states (m1,s1,sz1), (m2,s2,sz2) merge at m = max(m1,m2), a_k = exp(m_k - m):
    s = a1 s1 + a2 s2,   sz = a1 (sz1 + (m1-m) s1) + a2 (sz2 + (m2-m) s2).
Backward, upstream g = dL/dlogp, e = dL/dH, with logp_j = z_j - lse:
    dL/dz_j = g (1[j=y] - p_j)  -  e p_j (logp_j + H)        [dH/dz_j = -p_j (z_j - sum_k p_k z_k)]
    dh = (dL/dz / t) @ W,   dW = (dL/dz / t)^T @ h
The backward recomputes z tile by tile from h and W (4 GEMM-sized passes in all: z, z again, dh, dW);
nothing [T,V]-sized is ever stored. Masked tokens (prompt, padding) are dropped before any work.

Paths: reference (materialised, the spec), torch (chunked over T, bounded memory; CPU and fallback),
triton (fused GEMM + online logsumexp forward; backward = fused recompute-to-dlogits kernel per
vocabulary chunk, then two cuBLAS GEMMs, so each row of dW is written exactly once).

Napkin (H100, T=16,384, d=2,048, V=151,936, bf16): one z GEMM is 10.2 TFLOP, so fwd+bwd (4 GEMMs) has a
floor near 51 ms at ~800 TFLOP/s. Measured: forward 22 ms (470 TFLOP/s), fwd+bwd 74 ms, 1.1 GiB above
the inputs; naive fp32 logits + log_softmax 82 ms / 37 GiB; Liger fused linear CE (mean) 80 ms.
"""
import torch

from . import HAS_TRITON, INTERPRET, pick_impl

if HAS_TRITON:
    import triton
    import triton.language as tl


# ----------------------------------------------------------------------------- reference (the spec)
def token_logprobs_reference(hidden, weight, tokens, temperature=1.0, mask=None, return_entropy=False):
    """Materialises [T, V] logits in fp32 (fp64 if the inputs are fp64). Differentiable by autograd."""
    cdt = torch.promote_types(hidden.dtype, torch.float32)
    z = (hidden.to(cdt) @ weight.to(cdt).T) / temperature                      # [..., V]
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, tokens.long()[..., None]).squeeze(-1)          # [...]
    ent = -(logp_all.exp() * logp_all).sum(-1)
    if mask is not None:
        logp, ent = torch.where(mask, logp, 0.0), torch.where(mask, ent, 0.0)
    return (logp, ent) if return_entropy else logp


# ----------------------------------------------------------------------------- chunked PyTorch
TORCH_CHUNK = {"cpu": 1 << 20, "cuda": 1 << 26}   # logits elements per row chunk (4 MB / 256 MB fp32)


def _rows(h, V):
    return max(1, TORCH_CHUNK.get(h.device.type, 1 << 22) // max(V, 1))


def _torch_forward(h, W, y, t):
    """h [T,d], W [V,d], y [T] -> lse, logp, ent [T] (fp32, fp64 for fp64 inputs)."""
    cdt = torch.promote_types(h.dtype, torch.float32)
    Wc, (T, V) = W.to(cdt), (h.shape[0], W.shape[0])
    lse, logp, ent = (torch.empty(T, dtype=cdt, device=h.device) for _ in range(3))
    rows = _rows(h, V)
    for a in range(0, T, rows):
        b = min(T, a + rows)
        z = torch.mm(h[a:b].to(cdt), Wc.T).mul_(1.0 / t)                       # [r, V]
        lse[a:b] = torch.logsumexp(z, 1)
        logp[a:b] = z.gather(1, y[a:b, None]).squeeze(1) - lse[a:b]
        z.sub_(lse[a:b, None])                                                 # log p, in place
        ent[a:b] = -z.exp().mul_(z).sum(1)                                     # one more [r,V] buffer
    return lse, logp, ent


def _torch_backward(h, W, y, t, lse, ent, g, e):
    """Recompute z per row chunk; dW accumulated in place (addmm_) so no [V,d] temporaries."""
    cdt = torch.promote_types(h.dtype, torch.float32)
    Wc, (T, V) = W.to(cdt), (h.shape[0], W.shape[0])
    dh = torch.empty(h.shape, dtype=cdt, device=h.device)
    dW = torch.zeros(W.shape, dtype=cdt, device=h.device)
    rows = _rows(h, V)
    for a in range(0, T, rows):
        b = min(T, a + rows)
        hc = h[a:b].to(cdt)
        z = torch.mm(hc, Wc.T).mul_(1.0 / t).sub_(lse[a:b, None])              # log p  [r, V]
        p = z.exp()
        if e is not None:   # -e p (logp + H)
            z.add_(ent[a:b, None]).mul_(p).mul_(-e[a:b, None])
        else:
            z.zero_()
        if g is not None:   # + g (onehot - p)
            z.sub_(p.mul_(g[a:b, None])).scatter_add_(1, y[a:b, None], g[a:b, None].to(cdt))
        del p
        z.mul_(1.0 / t)                                                        # dL/d(h.W) [r, V]
        torch.mm(z, Wc, out=dh[a:b])
        dW.addmm_(z.T, hc)
    return dh, dW


# ----------------------------------------------------------------------------- Triton kernels
if HAS_TRITON:
    @triton.jit
    def _tile_logits(H, W, rows, cols, rmask, cmask, D, stride_h, stride_w,
                     BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
                     EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
        """acc[BT,BV] = h[rows] . W[cols]^T, fp32 accumulation over d in BK steps (int64 offsets)."""
        ks = tl.arange(0, BK)
        hp = H + rows.to(tl.int64)[:, None] * stride_h + ks[None, :]            # [BT, BK]
        wp = W + cols.to(tl.int64)[None, :] * stride_w + ks[:, None]            # [BK, BV]
        acc = tl.zeros([BT, BV], dtype=tl.float32)
        for k in range(0, D, BK):
            if EVEN_K:
                a = tl.load(hp, mask=rmask[:, None], other=0.0)
                b = tl.load(wp, mask=cmask[None, :], other=0.0)
            else:
                a = tl.load(hp, mask=rmask[:, None] & (ks[None, :] + k < D), other=0.0)
                b = tl.load(wp, mask=cmask[None, :] & (ks[:, None] + k < D), other=0.0)
            if UPCAST:  # the interpreter holds bf16 as raw int16: compute in fp32 there
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PREC)
            hp += BK
            wp += BK
        return acc

    @triton.jit
    def _fwd_kernel(H, W, Y, PM, PS, PSZ, PZY, T, V, D, tiles_per_split, inv_t, stride_h, stride_w,
                    BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
                    EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
        """Program (row tile, vocab split): online (max, sumexp, sum e*(z-m), target logit) over its
        vocabulary tiles; partials go to P*[split, T] and are merged (deterministically) by the host."""
        pid_t, pid_s = tl.program_id(0), tl.program_id(1)
        rows = pid_t * BT + tl.arange(0, BT)
        rmask = rows < T
        y = tl.load(Y + rows, mask=rmask, other=-1)
        m = tl.full([BT], -1e30, tl.float32)   # finite start: (m - m_new) * s never makes inf*0
        s = tl.zeros([BT], dtype=tl.float32)
        sz = tl.zeros([BT], dtype=tl.float32)
        zy = tl.zeros([BT], dtype=tl.float32)
        v0 = pid_s * tiles_per_split * BV
        n_tiles = tl.minimum(tiles_per_split, tl.cdiv(V - v0, BV))
        for i in range(0, n_tiles):
            cols = v0 + i * BV + tl.arange(0, BV)
            cmask = cols < V
            acc = _tile_logits(H, W, rows, cols, rmask, cmask, D, stride_h, stride_w,
                               BT, BV, BK, EVEN_K, UPCAST, PREC)
            z = tl.where(cmask[None, :], acc * inv_t, float("-inf"))           # [BT, BV]
            m_new = tl.maximum(m, tl.max(z, 1))
            alpha = tl.exp(m - m_new)
            zs = z - m_new[:, None]
            ez = tl.exp(zs)                                                    # 0 on the tail
            sz = alpha * (sz + (m - m_new) * s) + tl.sum(ez * tl.where(cmask[None, :], zs, 0.0), 1)
            s = alpha * s + tl.sum(ez, 1)
            zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
            m = m_new
        out = pid_s.to(tl.int64) * T + rows
        tl.store(PM + out, m, mask=rmask)
        tl.store(PS + out, s, mask=rmask)
        tl.store(PSZ + out, sz, mask=rmask)
        tl.store(PZY + out, zy, mask=rmask)

    @triton.jit
    def _dlogits_kernel(H, W, Y, LSE, ENT, G, GE, DZ, T, V, D, v0, Vc, inv_t,
                        stride_h, stride_w, stride_dz,
                        BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, HAS_G: tl.constexpr,
                        HAS_E: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
                        PREC: tl.constexpr):
        """DZ[rows, c] = dL/d(h.W)[rows, v0 + c] for c < Vc, recomputing the logits tile."""
        pid_t, pid_v = tl.program_id(0), tl.program_id(1)
        rows = pid_t * BT + tl.arange(0, BT)
        lc = pid_v * BV + tl.arange(0, BV)                                     # column in the chunk
        cols = v0 + lc
        rmask, cmask = rows < T, (lc < Vc) & (cols < V)
        acc = _tile_logits(H, W, rows, cols, rmask, cmask, D, stride_h, stride_w,
                           BT, BV, BK, EVEN_K, UPCAST, PREC)
        lse = tl.load(LSE + rows, mask=rmask, other=0.0)
        logp = acc * inv_t - lse[:, None]                                      # [BT, BV]
        p = tl.exp(logp)
        dz = tl.zeros([BT, BV], dtype=tl.float32)
        if HAS_G:
            g = tl.load(G + rows, mask=rmask, other=0.0)
            y = tl.load(Y + rows, mask=rmask, other=-1)
            dz += g[:, None] * (tl.where(cols[None, :] == y[:, None], 1.0, 0.0) - p)
        if HAS_E:
            ge = tl.load(GE + rows, mask=rmask, other=0.0)
            ent = tl.load(ENT + rows, mask=rmask, other=0.0)
            dz -= ge[:, None] * p * (logp + ent[:, None])
        dp = DZ + rows.to(tl.int64)[:, None] * stride_dz + lc[None, :]
        tl.store(dp, (dz * inv_t).to(DZ.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


# ----------------------------------------------------------------------------- launchers
# GPU: one small fixed config (no autotune: the interpreter cannot run it, and the shapes barely vary).
# H100, T=16384 d=2048 V=151936 bf16: BV=256 took the forward 34 -> 21 ms and the backward 63 -> 53 ms
# against BV=128 (8 warps, 3 stages; 4 warps/4 stages was no better).
GPU_CFG = dict(fwd=dict(BT=128, BV=256, BK=64, num_warps=8, num_stages=3),
               bwd=dict(BT=128, BV=256, BK=64, num_warps=8, num_stages=3))
CPU_CFG = dict(fwd=dict(BT=32, BV=128, BK=32), bwd=dict(BT=32, BV=128, BK=32))
DZ_CHUNK = 1 << 27          # dlogits elements per backward vocabulary chunk (256 MB in bf16)
FWD_PROGRAMS = 8            # forward grid aims at FWD_PROGRAMS programs per SM (vocab splits)


def _kernel_args(h):
    upcast = INTERPRET or not h.is_cuda
    cfg = (CPU_CFG if upcast else GPU_CFG)
    prec = "ieee" if h.dtype == torch.float32 and not upcast else "tf32"   # exact fp32 dots
    return cfg, dict(UPCAST=upcast, PREC=prec)


def _triton_forward(h, W, y, t):
    (T, D), V = h.shape, W.shape[0]
    cfg, flags = _kernel_args(h)
    c = cfg["fwd"]
    n_t, n_v = triton.cdiv(T, c["BT"]), triton.cdiv(V, c["BV"])
    sms = torch.cuda.get_device_properties(h.device).multi_processor_count if h.is_cuda else 1
    want = max(1, triton.cdiv(FWD_PROGRAMS * sms, n_t)) if h.is_cuda else 3
    per = triton.cdiv(n_v, min(want, n_v))
    n_s = triton.cdiv(n_v, per)                            # every split gets >= 1 tile
    part = torch.empty(4, n_s, T, dtype=torch.float32, device=h.device)
    _fwd_kernel[(n_t, n_s)](h, W, y, part[0], part[1], part[2], part[3], T, V, D, per, 1.0 / t,
                            h.stride(0), W.stride(0), EVEN_K=D % c["BK"] == 0, **flags, **c)
    pm, ps, psz, pzy = part                                # deterministic merge over splits
    m = pm.max(0).values
    a = torch.exp(pm - m)
    s = (a * ps).sum(0)
    sz = (a * (psz + (pm - m) * ps)).sum(0)
    lse = m + torch.log(s)
    return lse, pzy.sum(0) - lse, torch.log(s) - sz / s


def _triton_backward(h, W, y, t, lse, ent, g, e):
    (T, D), V = h.shape, W.shape[0]
    cfg, flags = _kernel_args(h)
    c = cfg["bwd"]
    Vc = min(triton.cdiv(V, c["BV"]) * c["BV"], max(c["BV"], DZ_CHUNK // max(T, 1) // c["BV"] * c["BV"]))
    dz = torch.empty(T, Vc, dtype=h.dtype, device=h.device)
    dh = torch.zeros(T, D, dtype=torch.float32, device=h.device)
    dW = torch.empty_like(W)
    for v0 in range(0, V, Vc):
        vc = min(Vc, V - v0)
        grid = (triton.cdiv(T, c["BT"]), triton.cdiv(vc, c["BV"]))
        _dlogits_kernel[grid](h, W, y, lse, ent, g if g is not None else lse, e if e is not None else lse,
                              dz, T, V, D, v0, vc, 1.0 / t, h.stride(0), W.stride(0), dz.stride(0),
                              HAS_G=g is not None, HAS_E=e is not None, EVEN_K=D % c["BK"] == 0,
                              **flags, **c)
        dzc = dz[:, :vc]                                   # [T, vc]
        torch.mm(dzc.T, h, out=dW[v0:v0 + vc])             # each dW row written once (fp32 inside cuBLAS)
        part = dzc @ W[v0:v0 + vc]                         # [T, D]
        dh += part                                         # fp32 accumulation across chunks
    return dh, dW


# ----------------------------------------------------------------------------- autograd
class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, y, t, impl):
        if h.shape[0] == 0:
            lse = logp = ent = h.new_zeros(0, dtype=torch.promote_types(h.dtype, torch.float32))
        else:   # autocast off inside: the chunked matmuls must stay in the dtype chosen below
            with torch.autocast(h.device.type, enabled=False):
                lse, logp, ent = (_triton_forward if impl == "triton" else _torch_forward)(h, W, y, t)
        ctx.save_for_backward(h, W, y, lse, ent)
        ctx.t, ctx.impl = t, impl
        ctx.set_materialize_grads(False)
        return logp.clamp_(max=0.0), ent.clamp_(min=0.0)   # rounding can nudge logp above 0 / H below

    @staticmethod
    def backward(ctx, g, e):
        h, W, y, lse, ent = ctx.saved_tensors
        if (g is None and e is None) or h.shape[0] == 0:
            return torch.zeros_like(h), torch.zeros_like(W), None, None, None
        g = g.to(lse.dtype).contiguous() if g is not None else None
        e = e.to(lse.dtype).contiguous() if e is not None else None
        fn = _triton_backward if ctx.impl == "triton" else _torch_backward
        with torch.autocast(h.device.type, enabled=False):
            dh, dW = fn(h, W, y, ctx.t, lse, ent, g, e)
        return dh.to(h.dtype), dW.to(W.dtype), None, None, None


# ----------------------------------------------------------------------------- public function
def token_logprobs(hidden, weight, tokens, temperature=1.0, mask=None, return_entropy=False, impl="auto"):
    """log p(tokens) [...] fp32 (and entropy [...] when return_entropy) for hidden [..., d], weight
    [V, d], tokens [...] int64, mask bool [...] (False -> 0 and zero gradient, no compute).
    Differentiable w.r.t. hidden and weight; tied embeddings just work (autograd sums the grads)."""
    impl = pick_impl(impl, hidden, weight)
    t = float(temperature)
    if impl == "reference":
        return token_logprobs_reference(hidden, weight, tokens, t, mask, return_entropy)
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):                      # like nn.Linear under autocast: the head
        dt = torch.get_autocast_dtype(dev)                  # GEMMs run in bf16/fp16, grads flow back
        hidden, weight = hidden.to(dt), weight.to(dt)       # to the fp32 master weights via .to()
    if hidden.dtype == torch.float64 or weight.dtype == torch.float64:
        impl = "torch"                                      # no fp64 tensor-core path
    shape, d = tokens.shape, hidden.shape[-1]
    h, y = hidden.reshape(-1, d), tokens.reshape(-1).long()
    W = weight
    if impl == "triton":                                    # tl.dot wants one dtype, unit inner stride
        dt = torch.promote_types(h.dtype, W.dtype)
        h, W = h.to(dt).contiguous(), W.to(dt).contiguous()
    idx = None
    if mask is not None:                                    # compact active rows: masked ones cost 0
        idx = mask.reshape(-1).nonzero().squeeze(1)
        h, y = h.index_select(0, idx), y.index_select(0, idx)
    logp, ent = _TokenLogprobs.apply(h, W, y.contiguous(), t, impl)
    if idx is not None:
        n = shape.numel()
        logp = logp.new_zeros(n).index_copy(0, idx, logp)
        ent = ent.new_zeros(n).index_copy(0, idx, ent)
    logp, ent = logp.reshape(shape), ent.reshape(shape)
    return (logp, ent) if return_entropy else logp
