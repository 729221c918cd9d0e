"""Token log-probs (and entropy) through the LM head for RecPO's token loss (arXiv 2505.16994, §3.2),
without materialising the [T, V] logits.

Math. hidden h [T,d], LM head W [V,d], tokens y [T], temperature t:
    z[i,j]  = h_i . W_j / t                       (fp32 accumulation)
    lse[i]  = log sum_j exp z[i,j]
    logp[i] = z[i,y_i] - lse[i]                   (<= 0)
    H[i]    = lse[i] - sum_j p[i,j] z[i,j]        (entropy, p = softmax(z[i]))
Stable online form over vocabulary tiles, relative to the running max m (never z itself, so logits of
1e4 lose nothing):  s = sum exp(z-m),  sz = sum exp(z-m) (z-m),  ls = log s,  H = ls - sz/s.
Two partial states (m1,s1,sz1), (m2,s2,sz2) merge at m = max(m1,m2), a_k = exp(m_k - m):
    s = a1 s1 + a2 s2,   sz = a1 (sz1 + (m1-m) s1) + a2 (sz2 + (m2-m) s2).
m and ls are kept apart, never summed into lse: logp = (z - m) - ls. For a peaked row (logits 30 and
16: s = 1 + 8e-7) fp32 lse = m + ls rounds ls away, which flipped the sign of d logp/dh and put the
entropy gradient 15% off; (z - m) - ls keeps it (and logp <= 0, H >= 0 by construction).
Backward, upstream g = dL/dlogp, e = dL/dH:
    dL/dz_j = g (1[j=y] - p_j)  -  e p_j (logp_j + H)        [dH/dz_j = -p_j (z_j - sum_k p_k z_k)]
    with 1 - p_y = -expm1(logp_y) at the target (no cancellation when p_y is close to 1);
    dh = (dL/dz / t) @ W,   dW = (dL/dz / t)^T @ h
The backward recomputes z tile by tile from h and W (4 GEMM-sized passes in all: z, z again, dh, dW);
nothing [T,V]-sized is ever stored. Masked tokens (prompt, padding) are dropped before any work. Only
the gradients asked for are computed. Frozen head (W without grad, the LoRA case) and no gradient
through the entropy (training returns it only to log it), so only g comes back: dh = -g/t (expm1(logp_y)
W_y + q) with q_i = sum_{j != y} p_ij W_j, which the PyTorch paths accumulate in the forward pass (one
extra GEMM there, no backward pass over W: 2 GEMM-sized passes in all instead of 3). q does not depend on
the outputs asked for, so returning the entropy costs it nothing; a gradient through the entropy needs
sum_j p_j logp_j W_j as well, unknown in the forward, so that backward makes its usual pass (4 in all).
Final-logit soft-capping (softcap=c > 0, Gemma-2's final_logit_softcapping; 0 = off): the raw logit
a = h . W_j is capped BEFORE the temperature, z = c tanh(a / c) / t. Everything above holds in z; the
chain rule only swaps the factor 1/t for dz/da = (1 - tanh^2(a / c)) / t (in the frozen-head form, the
W_j of q and the W_y term each take their own factor 1 - tanh^2). Every path applies it (tanh through
expm1 in the kernels).

Paths (impl=):
- reference: materialised (the spec).
- torch: row blocks of TORCH_CHUNK logits x the whole vocabulary, fp32 GEMMs; CPU and fallback.
- chunked: the same code with blocks of WORKSPACE_BYTES (kernels/__init__.py) and, on CUDA half inputs,
  cuBLAS GEMMs in W's dtype (logits upcast to fp32 per block; dW summed over blocks by addmm_ in W's
  dtype): the plain "big matmul per row block" baseline, usually the fastest once a block is large.
- triton: fused GEMM + online logsumexp forward; backward = fused recompute-to-dlogits kernel per
  vocabulary chunk, then cuBLAS GEMMs for the gradients asked for (each row of dW written once).
  No q (it would need a [BT, d] accumulator per program): frozen head = 3 passes.

Napkin (H100, T=16,384, d=2,048, V=151,936, bf16): one z GEMM is 10.2 TFLOP, so fwd+bwd (4 GEMMs) has a
floor near 51 ms at ~800 TFLOP/s. Measured (triton): forward 22 ms (470 TFLOP/s), fwd+bwd 74 ms, 1.1 GiB
above the inputs; naive fp32 logits + log_softmax 82 ms / 37 GiB; Liger fused linear CE (mean) 80 ms.
"""
import torch

from . import (HAS_TRITON, INTERPRET, check_float, check_ids, check_int, check_scale, grads_key,
               pick_impl, workspace_rows)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from . import expm1 as _expm1


# ----------------------------------------------------------------------------- reference (the spec)
def token_logprobs_reference(hidden, weight, tokens, temperature=1.0, mask=None, return_entropy=False,
                             softcap=0.0):
    """Materialises [T, V] logits in fp32 (fp64 if the inputs are fp64). Differentiable by autograd."""
    cdt = torch.promote_types(hidden.dtype, torch.float32)
    z = hidden.to(cdt) @ weight.to(cdt).T                                     # [..., V]
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, tokens.long()[..., None]).squeeze(-1)          # [...]
    ent = -(logp_all.exp() * logp_all).sum(-1)
    if mask is not None:
        logp, ent = torch.where(mask, logp, 0.0), torch.where(mask, ent, 0.0)
    return (logp, ent) if return_entropy else logp


# ----------------------------------------------------------------------------- torch and chunked
TORCH_CHUNK = {"cpu": 1 << 20, "cuda": 1 << 26}   # torch: logits elements per row block (4 MB / 256 MB fp32)


def _plan(impl, h, W, c=0.0):
    """(GEMM dtype, logits dtype, rows per block) of the row-blocked PyTorch paths. torch: fp32 GEMMs
    (fp64 for fp64 inputs), TORCH_CHUNK logits per block. chunked: GEMMs in W's dtype on CUDA half
    inputs (cuBLAS, logits upcast to fp32), WORKSPACE_BYTES of logits per block (soft-capping, c > 0,
    holds one more fp32 block: tanh)."""
    cdt = torch.promote_types(h.dtype, torch.float32)
    V = max(W.shape[0], 1)
    if impl == "chunked":
        gdt = W.dtype if W.is_cuda and W.dtype in (torch.bfloat16, torch.float16) else cdt
        return gdt, cdt, workspace_rows(h.device, V * (gdt.itemsize + (3 if c else 2) * cdt.itemsize))
    return cdt, cdt, max(1, TORCH_CHUNK.get(h.device.type, 1 << 22) // V)


def _torch_forward(impl, h, W, y, t, c, want_q):
    """h [T,d], W [V,d], y [T] -> m, ls, logp, ent [T] and, when want_q, q [T,d] = sum_{j != y} p_j W_j
    (the frozen-head backward needs nothing else; soft-capped, c > 0: p_j (1 - tanh_j^2) W_j, and
    sy [T] = 1 - tanh_y^2, the target's factor; None otherwise)."""
    gdt, cdt, rows = _plan(impl, h, W, c)
    Wg, T = W.to(gdt), h.shape[0]
    m, ls, logp, ent = (torch.empty(T, dtype=cdt, device=h.device) for _ in range(4))
    q = torch.empty(h.shape, dtype=cdt, device=h.device) if want_q else None
    sy = torch.empty(T, dtype=cdt, device=h.device) if want_q and c else None
    for a in range(0, T, rows):
        b = min(T, a + rows)
        z = torch.mm(h[a:b].to(gdt), Wg.T).to(cdt)                             # [r, V] raw logits
        if c:                                                                  # z = c tanh(a / c) / t
            th = z.div_(c).tanh_()
            z = th * (c / t) if want_q else th.mul_(c / t)
        else:
            z.mul_(1.0 / t)
        m[a:b] = z.max(1).values
        z.sub_(m[a:b, None])                                                   # z - m  (<= 0)
        e = z.exp()                                                            # [r, V]
        s = e.sum(1)
        ls[a:b] = s.log()
        logp[a:b] = z.gather(1, y[a:b, None]).squeeze(1) - ls[a:b]
        ent[a:b] = ls[a:b] - (e[:, None, :] @ z[:, :, None]).view(-1) / s      # no 3rd [r,V] buffer
        if want_q:
            w = e.scatter_(1, y[a:b, None], 0.0)
            if c:
                sy[a:b] = 1.0 - th.gather(1, y[a:b, None]).squeeze(1).square()
                w.mul_(th.square_().neg_().add_(1.0))                          # p_j (1 - tanh_j^2) s
            q[a:b] = (w.to(gdt) @ Wg).to(cdt) / s[:, None]
    return m, ls, logp, ent, q, sy


def _torch_backward(impl, h, W, y, t, c, m, ls, ent, g, e, need_dh, need_dW):
    """Recompute z per row block; dW accumulated in place (addmm_, in the GEMM dtype) so no [V,d]
    temporaries. c > 0: soft-capped logits (module docstring)."""
    gdt, cdt, rows = _plan(impl, h, W, c)
    Wg, T = W.to(gdt), h.shape[0]
    dh = torch.empty(h.shape, dtype=cdt, device=h.device) if need_dh else None
    dW = torch.zeros(W.shape, dtype=gdt, device=h.device) if need_dW else None
    for a in range(0, T, rows):
        b = min(T, a + rows)
        hc, yc = h[a:b].to(gdt), y[a:b, None]
        lp = torch.mm(hc, Wg.T).to(cdt)                                        # raw logits
        th = None
        if c:
            th = lp.div_(c).tanh_()
            lp = th * (c / t)
        else:
            lp.mul_(1.0 / t)
        lp.sub_(m[a:b, None]).sub_(ls[a:b, None])                              # log p
        lpy = lp.gather(1, yc)                                                 # [r, 1]
        p = lp.exp()
        fix = torch.zeros_like(lpy)                # dL/dz at y, recomputed without cancellation
        if e is not None:   # -e p (logp + H)
            ec, ent_c = e[a:b, None], ent[a:b, None]
            lp.add_(ent_c).mul_(p).mul_(-ec)
            fix -= ec * lpy.exp() * (lpy + ent_c)
        else:
            lp.zero_()
        if g is not None:   # + g (onehot - p);  g (1 - p_y) = -g expm1(logp_y)
            lp.sub_(p.mul_(g[a:b, None]))
            fix -= g[a:b, None] * torch.expm1(lpy)
        del p
        dz = lp.scatter_(1, yc, fix)                                           # dL/dz [r, V]
        if th is not None:                                                     # dz/da = (1 - tanh^2) / t
            dz.mul_(th.square_().neg_().add_(1.0))
            del th
        dz = dz.mul_(1.0 / t).to(gdt)                                          # dL/d(h.W) [r, V]
        if need_dh:
            dh[a:b] = (dz @ Wg).to(cdt)
        if need_dW:
            dW.addmm_(dz.T, hc)
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
    def _tanh(x):
        """tanh through expm1 (the interpreter has no libdevice): no cancellation near 0, +-1 far out."""
        em = _expm1(-2.0 * tl.abs(x))                                          # in (-1, 0]
        r = -em / (2.0 + em)
        return tl.where(x < 0, -r, r)

    @triton.jit
    def _fwd_kernel(H, W, Y, PM, PS, PSZ, PZY, T, V, D, tiles_per_split, inv_t, inv_c, c_t,
                    stride_h, stride_w,
                    BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
                    EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                    SOFTCAP: tl.constexpr):
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
            if SOFTCAP:                                                        # z = c tanh(a / c) / t
                acc = _tanh(acc * inv_c) * c_t
            else:
                acc = acc * inv_t
            z = tl.where(cmask[None, :], acc, float("-inf"))                   # [BT, BV]
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
    def _dlogits_kernel(H, W, Y, MX, LS, ENT, G, GE, DZ, T, V, D, v0, Vc, inv_t, inv_c, c_t,
                        stride_h, stride_w, stride_dz,
                        BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, HAS_G: tl.constexpr,
                        HAS_E: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
                        PREC: tl.constexpr, SOFTCAP: tl.constexpr):
        """DZ[rows, c] = dL/d(h.W)[rows, v0 + c] for c < Vc, recomputing the logits tile."""
        pid_t, pid_v = tl.program_id(0), tl.program_id(1)
        rows = pid_t * BT + tl.arange(0, BT)
        lc = pid_v * BV + tl.arange(0, BV)                                     # column in the chunk
        cols = v0 + lc
        rmask, cmask = rows < T, (lc < Vc) & (cols < V)
        acc = _tile_logits(H, W, rows, cols, rmask, cmask, D, stride_h, stride_w,
                           BT, BV, BK, EVEN_K, UPCAST, PREC)
        m = tl.load(MX + rows, mask=rmask, other=0.0)
        ls = tl.load(LS + rows, mask=rmask, other=0.0)
        if SOFTCAP:
            th = _tanh(acc * inv_c)
            logp = (th * c_t - m[:, None]) - ls[:, None]                       # [BT, BV]
        else:
            logp = (acc * inv_t - m[:, None]) - ls[:, None]
        p = tl.exp(logp)
        dz = tl.zeros([BT, BV], dtype=tl.float32)
        if HAS_G:   # g (onehot - p); at the target g (1 - p) = -g expm1(logp): no cancellation
            g = tl.load(G + rows, mask=rmask, other=0.0)
            y = tl.load(Y + rows, mask=rmask, other=-1)
            dz -= g[:, None] * tl.where(cols[None, :] == y[:, None], _expm1(logp), p)
        if HAS_E:
            ge = tl.load(GE + rows, mask=rmask, other=0.0)
            ent = tl.load(ENT + rows, mask=rmask, other=0.0)
            dz -= ge[:, None] * p * (logp + ent[:, None])
        dp = DZ + rows.to(tl.int64)[:, None] * stride_dz + lc[None, :]
        if SOFTCAP:                                                            # dz/da = (1 - tanh^2) / t
            dz = dz * (1.0 - th * th)
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


def _triton_forward(h, W, y, t, cap):
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
                            1.0 / cap if cap else 1.0, cap / t, h.stride(0), W.stride(0),
                            EVEN_K=D % c["BK"] == 0, SOFTCAP=bool(cap), **flags, **c)
    pm, ps, psz, pzy = part                                # deterministic merge over splits
    m = pm.max(0).values
    a = torch.exp(pm - m)
    s = (a * ps).sum(0)
    sz = (a * (psz + (pm - m) * ps)).sum(0)
    ls = torch.log(s)
    return m, ls, (pzy.sum(0) - m) - ls, ls - sz / s, None, None


def _triton_backward(h, W, y, t, cap, m, ls, ent, g, e, need_dh, need_dW):
    (T, D), V = h.shape, W.shape[0]
    cfg, flags = _kernel_args(h)
    c = cfg["bwd"]
    Vc = min(triton.cdiv(V, c["BV"]) * c["BV"], max(c["BV"], DZ_CHUNK // max(T, 1) // c["BV"] * c["BV"]))
    buf = torch.empty(T * Vc, dtype=h.dtype, device=h.device)
    dh = torch.zeros(T, D, dtype=torch.float32, device=h.device) if need_dh else None
    dW = torch.empty_like(W) if need_dW else None
    for v0 in range(0, V, Vc):
        vc = min(Vc, V - v0)
        dz = buf[:T * vc].view(T, vc)                      # contiguous: no padding for a GEMM to read
        grid = (triton.cdiv(T, c["BT"]), triton.cdiv(vc, c["BV"]))
        _dlogits_kernel[grid](h, W, y, m, ls, ent, g if g is not None else m, e if e is not None else m,
                              dz, T, V, D, v0, vc, 1.0 / t, 1.0 / cap if cap else 1.0, cap / t,
                              h.stride(0), W.stride(0), dz.stride(0),
                              HAS_G=g is not None, HAS_E=e is not None, EVEN_K=D % c["BK"] == 0,
                              SOFTCAP=bool(cap), **flags, **c)
        if need_dW:
            torch.mm(dz.T, h, out=dW[v0:v0 + vc])         # each dW row written once (fp32 inside cuBLAS)
        if need_dh:
            dh += dz @ W[v0:v0 + vc]                       # [T, D], fp32 accumulation across chunks
    return dh, dW


# ----------------------------------------------------------------------------- autograd
class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, y, t, impl, want_q, c=0.0):
        # want_q: frozen head, so unless the entropy gets a gradient only g reaches the backward: the
        # PyTorch paths accumulate q here and that backward makes no pass over W
        want_q = want_q and impl != "triton"
        if h.shape[0] == 0:
            m = ls = logp = ent = h.new_zeros(0, dtype=torch.promote_types(h.dtype, torch.float32))
            q = h.new_zeros(h.shape, dtype=m.dtype) if want_q else None
            sy = m if want_q and c else None
        else:   # autocast off inside: the chunked matmuls must stay in the dtype chosen below
            with torch.autocast(h.device.type, enabled=False):
                if impl == "triton":
                    m, ls, logp, ent, q, sy = _triton_forward(h, W, y, t, c)
                else:
                    m, ls, logp, ent, q, sy = _torch_forward(impl, h, W, y, t, c, want_q)
        logp, ent = logp.clamp_(max=0.0), ent.clamp_(min=0.0)   # rounding could nudge logp > 0 / H < 0
        ctx.save_for_backward(h, W, y, m, ls, ent, logp, q, sy)
        ctx.t, ctx.impl, ctx.c = t, impl, c
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g, e):
        h, W, y, m, ls, ent, logp, q, sy = ctx.saved_tensors
        need_dh, need_dW = ctx.needs_input_grad[:2]
        if (g is None and e is None) or h.shape[0] == 0:
            return (torch.zeros_like(h) if need_dh else None, torch.zeros_like(W) if need_dW else None,
                    None, None, None, None, None)
        g = g.to(m.dtype).contiguous() if g is not None else None
        e = e.to(m.dtype).contiguous() if e is not None else None
        if q is not None and e is None and not need_dW:   # dh = -g/t (expm1(logp_y) [1 - tanh_y^2] W_y + q)
            ey = torch.expm1(logp) if sy is None else torch.expm1(logp) * sy
            dh = (g / -ctx.t)[:, None] * (ey[:, None] * W[y].to(q.dtype) + q)
            return dh.to(h.dtype), None, None, None, None, None, None
        with torch.autocast(h.device.type, enabled=False):
            if ctx.impl == "triton":
                dh, dW = _triton_backward(h, W, y, ctx.t, ctx.c, m, ls, ent, g, e, need_dh, need_dW)
            else:
                dh, dW = _torch_backward(ctx.impl, h, W, y, ctx.t, ctx.c, m, ls, ent, g, e, need_dh, need_dW)
        return (None if dh is None else dh.to(h.dtype), None if dW is None else dW.to(W.dtype),
                None, None, None, None, None)


# ----------------------------------------------------------------------------- public function
def _check(hidden, weight, tokens, temperature, mask):
    fn = "token_logprobs"
    check_float(fn, "hidden", hidden)
    check_float(fn, "weight", weight, 2)
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{fn}: hidden [..., d] and weight [V, d] must share d, got {list(hidden.shape)} "
                         f"and {list(weight.shape)}")
    check_int(fn, "tokens", tokens, hidden.shape[:-1])
    if mask is not None and tuple(mask.shape) != tuple(tokens.shape):
        raise ValueError(f"{fn}: mask must have the shape of tokens {list(tokens.shape)}, "
                         f"got {list(mask.shape)}")
    return check_scale(fn, "temperature", temperature)


def token_logprobs(hidden, weight, tokens, temperature=1.0, mask=None, return_entropy=False, impl="auto",
                   softcap=0.0):
    """log p(tokens) [...] fp32 (and entropy [...] when return_entropy) for hidden [..., d], weight
    [V, d], tokens [...] int64, mask bool [...] (False -> 0 and zero gradient, no compute).
    softcap c > 0: final-logit soft-capping (Gemma-2), logits c tanh(h.W / c) before the temperature;
    0 = off. Differentiable w.r.t. hidden and weight; tied embeddings just work (autograd sums the grads);
    only the gradients asked for are computed (weight without grad: no dW work)."""
    t = _check(hidden, weight, tokens, temperature, mask)
    c = check_scale("token_logprobs", "softcap", softcap) if softcap else 0.0   # finite and > 0; 0/None: off
    grads = grads_key(hidden, weight)
    impl = pick_impl(impl, hidden, weight, op="logprob", grads=grads, entropy=bool(return_entropy))
    if impl == "reference":
        active = tokens if mask is None else tokens[mask.bool()]
        check_ids("token_logprobs", ("tokens", active, weight.shape[0]))
        return token_logprobs_reference(hidden, weight, tokens, t, mask, return_entropy, c)
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):                      # like nn.Linear under autocast: the head
        dt = torch.get_autocast_dtype(dev)                  # GEMMs run in bf16/fp16, grads flow back
        hidden, weight = hidden.to(dt), weight.to(dt)       # to the fp32 master weights via .to()
    if impl == "triton" and (hidden.dtype == torch.float64 or weight.dtype == torch.float64):
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
    check_ids("token_logprobs", ("tokens", y, W.shape[0]))
    logp, ent = _TokenLogprobs.apply(h, W, y.contiguous(), t, impl, grads == "dX", c)
    if idx is not None:
        n = shape.numel()
        logp = logp.new_zeros(n).index_copy(0, idx, logp)
        ent = ent.new_zeros(n).index_copy(0, idx, ent)
    logp, ent = logp.reshape(shape), ent.reshape(shape)
    return (logp, ent) if return_entropy else logp
