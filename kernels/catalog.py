"""Catalog softmax for the item head: stats, rank, top-k and loss over all N items (SPEC §6).

Math. User states H [M,d], item table E [N,d] (row j = item id j; row 0 = padding), targets t [M],
per-row excluded ids X [M,Xc] (0-padded, duplicates allowed), temperature tau:
    z[m,j]   = H[m] . E[j] / tau                               (fp32 accumulation)
    A[m]     = {j : j != 0, j not in X[m]}                     (the items row m may be scored on)
    lse[m]   = log sum_{j in A[m]} exp z[m,j]                  (-inf if A[m] is empty)
    rank[m]  = #{j in A[m], j != t[m] : z[m,j] >= z[m,t[m]]}   (0-based, pessimistic: ties count
               against the target); rank = N if t[m] is not in A[m] (never a hit, reward 0)
    topk     = the k largest z[m,j] over j in A[m], with their ids
    loss[m]  = lse'[m] - z[m,t[m]],  lse' over A[m] + {t[m]}   (the positive is never masked)
Exclusion happens before the max and the sum (masked to -inf), never by subtracting excluded mass
afterwards, so it stays exact when excluded items hold nearly all of the probability.
Stable online form over catalog tiles: running max mx and s = sum exp(z - mx); two partial states
merge at mx = max(mx1, mx2): s = s1 exp(mx1 - mx) + s2 exp(mx2 - mx); lse = mx + log s.
Backward of loss with upstream g [M]:  dz[m,j] = g[m] (softmax'[m,j] - 1[j = t[m]]) / tau on A'[m],
0 elsewhere;  dH = dz @ E,  dE = dz^T @ H.  Tiles of z are recomputed, never stored.

Paths (impl=):
- reference: materialises [M,N] (the spec).
- torch: chunked over the catalog (CHUNK_BYTES of scratch), custom backward that recomputes chunks;
  CPU and fallback. Its stats use fp64 GEMMs rounded to fp32 so that ties are ties.
- triton: grid (M-tiles, catalog splits); each program streams its slice of E through tl.dot tiles
  (bf16 in, fp32 accumulate) keeping online (max, sumexp, count) per row; a second step merges
  the [splits, M] partials (deterministic, no atomics). Exclusions are (row, id) pairs sorted by
  tile on the host, so a tile compares only the ~1 pair that falls in it. The target logit comes
  from a [BM, BM] tile of the same tl.dot steps, so an item identical to the target ties exactly.
  Top-k: a chunk kernel writes masked fp32 logits per catalog chunk, torch.topk merges them.
  Backward: per catalog chunk, a kernel recomputes z and writes dz (E's dtype), then two cuBLAS
  GEMMs: dH += dz @ E_c (fp32 sum over chunks), dE_c = dz^T @ H (each row of dE written once).
"""
from collections import namedtuple

import torch

from . import HAS_TRITON, INTERPRET, pick_impl

if HAS_TRITON:
    import triton
    import triton.language as tl

CatalogStats = namedtuple("CatalogStats", "lse target_logit rank topk_scores topk_ids")
CHUNK_BYTES = 64 << 20   # scratch per catalog chunk (fp32 logits + fp32 item rows); x4 on a GPU
# H100: 128x128 tiles, d streamed in 64-wide steps (bf16) through a 3-stage pipeline
GPU_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=64, num_warps=8, num_stages=3)
SPLIT_WAVES = 16         # stats kernel: ~16 programs per SM, so the last wave is short
CHUNK_WARPS = 4          # warps of the per-chunk (top-k logits / backward dz) kernel


# ----------------------------------------------------------------------------- reference (the spec)
def _excluded_mask(M, N, exclude, device):
    mask = torch.zeros(M, N, dtype=torch.bool, device=device)
    mask[:, 0] = True                                                          # padding item
    if exclude is not None and exclude.numel():
        ex = exclude.long()
        mask.scatter_(1, torch.where((ex >= 0) & (ex < N), ex, 0), True)       # dupes harmless
    return mask


def _logits_reference(H, E, tau):
    cdt = torch.promote_types(H.dtype, torch.float32)                          # fp64 stays fp64
    return (H.to(cdt) @ E.to(cdt).T) / tau                                     # [M, N]


def catalog_stats_reference(H, E, targets, exclude=None, tau=1.0, topk=0):
    M, N = H.shape[0], E.shape[0]
    logits = _logits_reference(H, E, tau)
    excl = _excluded_mask(M, N, exclude, H.device)
    t = targets.long()
    tgt = logits.gather(1, t[:, None]).squeeze(1)                             # [M]
    t_excl = excl.gather(1, t[:, None]).squeeze(1)
    masked = logits.masked_fill(excl, float("-inf"))
    lse = torch.logsumexp(masked, dim=1)
    beats = (masked >= tgt[:, None]) & ~excl
    beats.scatter_(1, t[:, None], False)
    rank = torch.where(t_excl, torch.full_like(t, N), beats.sum(1))
    ts = ti = None
    if topk:
        ts, ti = masked.topk(min(topk, N), dim=1)
    return CatalogStats(lse, tgt, rank, ts, ti)


def catalog_loss_reference(H, E, targets, exclude=None, tau=1.0, reduction="mean"):
    M, N = H.shape[0], E.shape[0]
    logits = _logits_reference(H, E, tau)
    excl = _excluded_mask(M, N, exclude, H.device)
    excl.scatter_(1, targets.long()[:, None], False)  # the positive is never masked in the loss
    logp = torch.log_softmax(logits.masked_fill(excl, float("-inf")), 1)
    return _reduce(-logp.gather(1, targets.long()[:, None]).squeeze(1), reduction)


def _reduce(loss, reduction):
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


# ----------------------------------------------------------------------------- chunked PyTorch
def _dtypes(H, exact):
    """(GEMM dtype, logits dtype). exact: fp64 GEMMs rounded to fp32, so that an item identical to
    the target gets bit-identical logits (BLAS rounds differently at different positions of a
    matrix) and the pessimistic rank counts it; used for catalog_stats."""
    cdt = torch.promote_types(H.dtype, torch.float32)
    return (torch.float64, cdt) if exact and cdt == torch.float32 else (cdt, cdt)


def _chunk_mask(c0, c1, M, exclude, t, loss):
    """bool [M, c1-c0]: True where column c0+j is excluded for that row."""
    mask = torch.zeros(M, c1 - c0, dtype=torch.bool, device=t.device)
    if c0 == 0:
        mask[:, 0] = True
    if exclude is not None and exclude.numel():
        r, x = ((exclude >= c0) & (exclude < c1)).nonzero(as_tuple=True)
        mask[r, exclude[r, x] - c0] = True
    if loss:                                                                   # positive stays in
        r = ((t >= c0) & (t < c1)).nonzero(as_tuple=True)[0]
        mask[r, t[r] - c0] = False
    return mask


def _torch_chunks(H, E, t, exclude, tau, loss, exact=False):
    """Yield (c0, c1, z, Ec): z [M, c1-c0] masked logits; memory bounded by CHUNK_BYTES."""
    M, d = H.shape
    N = E.shape[0]
    gdt, cdt = _dtypes(H, exact)
    Hf = H.to(gdt)
    nc = max(1, (CHUNK_BYTES * (4 if H.is_cuda else 1)) // (gdt.itemsize * (M + d)))
    for c0 in range(0, N, nc):
        c1 = min(N, c0 + nc)
        Ec = E[c0:c1].to(gdt)                                                  # [nc, d]
        z = (Hf @ Ec.T).mul_(1.0 / tau).to(cdt)                                # [M, nc]
        yield c0, c1, z.masked_fill_(_chunk_mask(c0, c1, M, exclude, t, loss), float("-inf")), Ec


def _scan_chunks(chunks, t, tgt, M, topk, stats=True):
    """Online lse / pessimistic count / top-k over chunks of masked logits."""
    lse = torch.full((M,), float("-inf"), dtype=tgt.dtype, device=t.device)
    cnt = torch.zeros(M, dtype=torch.long, device=t.device)
    ts = ti = None
    for c0, c1, z, *_ in chunks:
        if stats:
            lse = torch.logaddexp(lse, torch.logsumexp(z, 1))
            cnt += (z >= tgt[:, None]).sum(1)
            r = ((t >= c0) & (t < c1)).nonzero(as_tuple=True)[0]               # the target itself
            cnt[r] -= (z[r, t[r] - c0] >= tgt[r]).long()                       # does not count
        if topk:
            v, i = z.topk(min(topk, c1 - c0), dim=1)
            if ts is not None:
                v, j = torch.cat([ts, v], 1).topk(min(topk, v.shape[1] + ts.shape[1]), dim=1)
                i = torch.cat([ti, i + c0], 1).gather(1, j)
            else:
                i = i + c0
            ts, ti = v, i
    return lse, cnt, ts, ti


def _torch_grads(H, E, t, exclude, tau, lse, scale, need_dE):
    """dH [M,d] fp32 and dE (E's dtype, or None), chunk by chunk over the catalog."""
    dH = torch.zeros(H.shape, dtype=lse.dtype, device=H.device)
    dE = torch.empty_like(E) if need_dE else None
    Hf = H.to(lse.dtype)
    for c0, c1, z, Ec in _torch_chunks(H, E, t, exclude, tau, loss=True):
        p = z.sub_(lse[:, None]).exp_()                                        # 0 where excluded
        r = ((t >= c0) & (t < c1)).nonzero(as_tuple=True)[0]
        p[r, t[r] - c0] -= 1.0
        p.mul_(scale[:, None])                                                 # dz [M, nc]
        dH.addmm_(p, Ec)
        if need_dE:
            dE[c0:c1] = (p.T @ Hf).to(E.dtype)
    return dH, dE


# ----------------------------------------------------------------------------- Triton kernels
if HAS_TRITON:
    @triton.jit
    def _tile_logits(H, E, rows, cols, rmask, cmask, D, stride_h, stride_e, inv_tau,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
        """z tile [BLOCK_M, BLOCK_N] = H[rows] . E[cols] * inv_tau, looping over d in BLOCK_D."""
        # Out-of-range rows/cols read row 0 instead of being masked: unmasked loads keep the
        # copy pipeline fast; their results are masked by the caller.
        offs = tl.arange(0, BLOCK_D)
        rows64 = tl.where(rmask, rows, 0).to(tl.int64)                         # int64: N*d > 2^31
        cols64 = tl.where(cmask, cols, 0).to(tl.int64)
        hp = H + rows64[:, None] * stride_h + offs[None, :]                       # [BM, BD]
        ep = E + cols64[:, None] * stride_e + offs[None, :]                       # [BN, BD]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            if EVEN_D:
                h = tl.load(hp)                                                # [BM, BD]
                e = tl.load(ep)                                                # [BN, BD]
            else:
                h = tl.load(hp, mask=(d0 + offs)[None, :] < D, other=0.0)
                e = tl.load(ep, mask=(d0 + offs)[None, :] < D, other=0.0)
            if UPCAST:   # the interpreter holds bf16 as raw int16: upcast right after the load
                h = h.to(tl.float32)
                e = e.to(tl.float32)
            acc = tl.dot(h, tl.trans(e), acc, input_precision=PREC)
            hp += BLOCK_D
            ep += BLOCK_D
        return acc * inv_tau

    @triton.jit
    def _tile_excluded(XR, XC, rows, cols, cmask, tgt, x0, x1, LOSS: tl.constexpr):
        """bool [BM, BN]: padding, out-of-range and excluded columns. (XR, XC)[x0:x1] lists the
        (row, id) exclusions that fall in this tile (sorted by tile on the host): ~1 per tile that
        has any, so the exact compare costs next to nothing."""
        excl = ((cols == 0) | (cmask == 0))[None, :] & (rows >= 0)[:, None]
        for i in range(x0, x1):
            excl = excl | ((rows == tl.load(XR + i))[:, None] & (cols == tl.load(XC + i))[None, :])
        if LOSS:
            excl = excl & (cols[None, :] != tgt[:, None])
        return excl

    @triton.jit
    def _target_kernel(H, E, TGT, OUT, M, D, stride_h, stride_e, inv_tau,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                       UPCAST: tl.constexpr, PREC: tl.constexpr):
        # The diagonal of a [BM, BM] tile with the same tl.dot/BLOCK_D steps as the main kernel, so
        # an item identical to the target gets the very same logit (ties are exact).
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        tgt = tl.load(TGT + rows, mask=rmask, other=0)
        z = _tile_logits(H, E, rows, tgt, rmask, rmask, D, stride_h, stride_e, inv_tau,
                         BLOCK_M, BLOCK_M, BLOCK_D, EVEN_D, UPCAST, PREC)
        diag = tl.arange(0, BLOCK_M)[:, None] == tl.arange(0, BLOCK_M)[None, :]
        tl.store(OUT + rows, tl.sum(tl.where(diag, z, 0.0), 1), mask=rmask)

    @triton.jit
    def _stats_kernel(H, E, TGT, TL, XR, XC, XP, PM, PS, PC, M, N, D, n_tiles, tiles_per_split,
                      stride_h, stride_e, inv_tau, LOSS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
        """Program (M-tile, split): partial (max, sumexp, count >= target) over its slice of E."""
        pid_m = tl.program_id(0)                 # fastest: the M-tiles of one split share E in L2
        pid_s = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        tgt = tl.load(TGT + rows, mask=rmask, other=-1)
        tz = tl.load(TL + rows, mask=rmask, other=0.0)
        mx = tl.full([BLOCK_M], -1e30, tl.float32)       # finite floor: no inf - inf = nan
        s = tl.zeros([BLOCK_M], dtype=tl.float32)
        cnt = tl.zeros([BLOCK_M], dtype=tl.int32)
        t0 = pid_s * tiles_per_split
        for nt in range(t0, tl.minimum(t0 + tiles_per_split, n_tiles)):
            cols = nt * BLOCK_N + tl.arange(0, BLOCK_N)
            cmask = cols < N
            x0 = tl.load(XP + pid_m * n_tiles + nt)        # issued before the GEMM: latency hidden
            x1 = tl.load(XP + pid_m * n_tiles + nt + 1)
            z = _tile_logits(H, E, rows, cols, rmask, cmask, D, stride_h, stride_e, inv_tau,
                             BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, UPCAST, PREC)
            excl = _tile_excluded(XR, XC, rows, cols, cmask, tgt, x0, x1, LOSS)
            z = tl.where(excl, float("-inf"), z)                              # mask BEFORE max/sum
            m_new = tl.maximum(mx, tl.max(z, 1))
            s = s * tl.exp2((mx - m_new) * 1.4426950408889634) + \
                tl.sum(tl.exp2((z - m_new[:, None]) * 1.4426950408889634), 1)
            mx = m_new
            beats = (z >= tz[:, None]) & (cols[None, :] != tgt[:, None])
            cnt += tl.sum(beats.to(tl.int32), 1)
        out = pid_s * M + rows
        tl.store(PM + out, mx, mask=rmask)
        tl.store(PS + out, s, mask=rmask)
        tl.store(PC + out, cnt, mask=rmask)

    @triton.jit
    def _chunk_kernel(H, E, TGT, XR, XC, XP, LSE, SCALE, OUT, M, N, D, n_tiles, c0, c1, tile0,
                      stride_h, stride_e, stride_o, inv_tau, GRAD: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
        """OUT[:, c-c0] for catalog columns c in [c0, c1): masked logits (GRAD=0, for top-k) or
        dz = scale * (softmax - onehot(target)) (GRAD=1, for the backward GEMMs)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        cols = c0 + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < c1
        tgt = tl.load(TGT + rows, mask=rmask, other=-1)
        x0 = tl.load(XP + pid_m * n_tiles + tile0 + pid_n)
        x1 = tl.load(XP + pid_m * n_tiles + tile0 + pid_n + 1)
        z = _tile_logits(H, E, rows, cols, rmask, cmask, D, stride_h, stride_e, inv_tau,
                         BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, UPCAST, PREC)
        excl = _tile_excluded(XR, XC, rows, cols, cmask, tgt, x0, x1, GRAD)
        z = tl.where(excl, float("-inf"), z)
        if GRAD:
            lse = tl.load(LSE + rows, mask=rmask, other=float("inf"))           # dead rows: p = 0
            sc = tl.load(SCALE + rows, mask=rmask, other=0.0)
            p = tl.exp2((z - lse[:, None]) * 1.4426950408889634)                # 0 where excluded
            out = tl.where(cols[None, :] == tgt[:, None], p - 1.0, p) * sc[:, None]
        else:
            out = z
        optr = OUT + rows.to(tl.int64)[:, None] * stride_o + (cols - c0)[None, :]
        tl.store(optr, out.to(OUT.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


# ----------------------------------------------------------------------------- launchers
def _config(H, E):
    interp = INTERPRET or not H.is_cuda
    if interp and not INTERPRET:
        raise RuntimeError("catalog: impl='triton' on CPU tensors needs TRITON_INTERPRET=1 set "
                           "before import; use impl='torch' instead")
    fp32 = E.dtype == torch.float32
    cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_D=32) if interp else dict(GPU_CONFIG)
    if fp32 and not interp:
        cfg["BLOCK_D"] = 32                                                   # fp32: 2x the bytes
    cfg.update(EVEN_D=H.shape[1] % cfg["BLOCK_D"] == 0, UPCAST=interp,
               PREC="ieee" if (fp32 or interp) else "tf32")                  # fp32 inputs: no tf32
    return cfg


def _prep(H, E, targets, exclude, cfg):
    """Contiguous inputs, int32 targets, and the exclusions as (row, id) pairs sorted by the
    (M-tile, N-tile) they fall in, with CSR offsets XP [mt*nt + 1] (padding 0 is not listed)."""
    M, N = H.shape[0], E.shape[0]
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    mt, nt = triton.cdiv(M, BM), triton.cdiv(N, BN)
    xp = torch.zeros(mt * nt + 1, dtype=torch.int32, device=H.device)
    xr = xc = torch.zeros(1, dtype=torch.int32, device=H.device)
    if exclude is not None and exclude.numel():
        ex = exclude.long()
        r = torch.arange(M, device=H.device)[:, None].expand_as(ex)
        key = torch.where((ex > 0) & (ex < N), (r // BM) * nt + ex // BN, mt * nt).flatten()
        key, order = torch.sort(key)                                           # pads: last bucket
        xr, xc = r.flatten()[order].to(torch.int32), ex.flatten()[order].to(torch.int32)
        xp[1:] = torch.bincount(key, minlength=mt * nt + 1)[:mt * nt].cumsum(0)
    H = H.to(E.dtype).contiguous()                       # tl.dot takes one dtype: E's (the big one)
    return H, E.contiguous(), targets.to(torch.int32).contiguous(), (xr, xc, xp), nt


def _triton_stats(H, E, targets, exclude, tau, loss):
    """-> lse [M], target logit [M], pessimistic count [M] (int64), via the fused kernel."""
    cfg = _config(H, E)
    H, E, tgt, X, nt = _prep(H, E, targets, exclude, cfg)
    M, D = H.shape
    N, BM = E.shape[0], cfg["BLOCK_M"]
    mt, inv_tau = triton.cdiv(M, BM), 1.0 / tau
    tz = torch.empty(M, dtype=torch.float32, device=H.device)
    _target_kernel[(mt,)](H, E, tgt, tz, M, D, H.stride(0), E.stride(0), inv_tau,
                          **{k: v for k, v in cfg.items() if k != "BLOCK_N"})
    # split the catalog into ~SPLIT_WAVES programs per SM (so the last wave is short); the split
    # count only changes the order of the deterministic merge below, never the answer
    sms = torch.cuda.get_device_properties(H.device).multi_processor_count if H.is_cuda else 1
    splits = max(1, min(nt, triton.cdiv(SPLIT_WAVES * sms, mt) if H.is_cuda else 3))
    tps = triton.cdiv(nt, splits)
    splits = triton.cdiv(nt, tps)
    pm = torch.empty(splits, M, dtype=torch.float32, device=H.device)
    ps, pc = torch.empty_like(pm), torch.empty(splits, M, dtype=torch.int32, device=H.device)
    _stats_kernel[(mt, splits)](H, E, tgt, tz, *X, pm, ps, pc, M, N, D, nt, tps,
                                H.stride(0), E.stride(0), inv_tau, LOSS=loss, **cfg)
    mx = pm.max(0).values                                                      # merge, step 2
    lse = mx + torch.log((ps * torch.exp(pm - mx)).sum(0))                     # log 0 = -inf: empty
    return lse, tz, pc.sum(0, dtype=torch.long)


def _triton_chunks(H, E, targets, exclude, tau, grad=False, lse=None, scale=None):
    """Yield (c0, c1, out) with out [M, c1-c0] from _chunk_kernel (logits, or dz when grad)."""
    cfg = _config(H, E)
    if "num_warps" in cfg:
        cfg["num_warps"] = CHUNK_WARPS                   # one tile per program: 4 warps were faster
    H, E, tgt, X, nt = _prep(H, E, targets, exclude, cfg)
    M, D = H.shape
    N, BM, BN = E.shape[0], cfg["BLOCK_M"], cfg["BLOCK_N"]
    dt = E.dtype if (grad and H.is_cuda) else torch.float32                    # dz feeds cuBLAS
    nc = max(BN, (CHUNK_BYTES * (4 if H.is_cuda else 1)) // (M * dt.itemsize) // BN * BN)
    buf = torch.empty(M, min(nc, N), dtype=dt, device=H.device)
    for c0 in range(0, N, nc):
        c1 = min(N, c0 + nc)
        grid = (triton.cdiv(M, BM), triton.cdiv(c1 - c0, BN))
        _chunk_kernel[grid](H, E, tgt, *X, lse if grad else buf, scale if grad else buf, buf,
                            M, N, D, nt, c0, c1, c0 // BN, H.stride(0), E.stride(0),
                            buf.stride(0), 1.0 / tau, GRAD=grad, **cfg)
        yield c0, c1, buf[:, :c1 - c0]


def _triton_grads(H, E, targets, exclude, tau, lse, scale, need_dE):
    dH = torch.zeros(H.shape, dtype=torch.float32, device=H.device)
    dE = torch.empty_like(E) if need_dE else None
    for c0, c1, dz in _triton_chunks(H, E, targets, exclude, tau, True, lse, scale):
        dH += (dz @ E[c0:c1].to(dz.dtype)).float()                             # fp32 across chunks
        if need_dE and dz.dtype == E.dtype:
            torch.mm(dz.T, H.to(dz.dtype), out=dE[c0:c1])                      # each row once
        elif need_dE:
            dE[c0:c1] = dz.T @ H.to(dz.dtype)
    return dH, dE


# ----------------------------------------------------------------------------- autograd + public
def _stats(impl, H, E, t, exclude, tau, loss, topk=0):
    """-> lse, target logit, count, topk scores, topk ids (torch or triton path)."""
    if impl == "triton":
        lse, tz, cnt = _triton_stats(H, E, t, exclude, tau, loss)
        ts = ti = None
        if topk:
            _, _, ts, ti = _scan_chunks(_triton_chunks(H, E, t, exclude, tau), t, tz, H.shape[0],
                                        topk, stats=False)
        return lse, tz, cnt, ts, ti
    exact = not loss
    gdt, cdt = _dtypes(H, exact)
    tz = ((H.to(gdt) * E[t].to(gdt)).sum(1) * (1.0 / tau)).to(cdt)             # [M]
    lse, cnt, ts, ti = _scan_chunks(_torch_chunks(H, E, t, exclude, tau, loss, exact), t, tz,
                                    H.shape[0], topk)
    return lse, tz, cnt, ts, ti


class _CatalogLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, H, E, targets, exclude, tau, impl):
        lse, tz, *_ = _stats(impl, H, E, targets, exclude, tau, loss=True)
        ctx.save_for_backward(H, E, targets, exclude, lse)
        ctx.tau, ctx.impl = tau, impl
        return lse - tz                                                        # [M] fp32

    @staticmethod
    def backward(ctx, g):
        H, E, targets, exclude, lse = ctx.saved_tensors
        scale = g.to(lse.dtype) / ctx.tau                                      # [M]
        grads = _triton_grads if ctx.impl == "triton" else _torch_grads
        dH, dE = grads(H, E, targets, exclude, ctx.tau, lse, scale, ctx.needs_input_grad[1])
        return dH.to(H.dtype), dE, None, None, None, None


def catalog_stats(H, E, targets, exclude=None, tau=1.0, topk=0, impl="auto"):
    """CatalogStats(lse [M], target_logit [M], rank [M] int64, topk_scores/ids [M,k] or None)."""
    impl = pick_impl(impl, H, E)
    with torch.no_grad():
        if impl == "reference":
            return catalog_stats_reference(H, E, targets, exclude, tau, topk)
        t = targets.long()
        ex = None if exclude is None or not exclude.numel() else exclude.long()
        lse, tz, cnt, ts, ti = _stats(impl, H.detach(), E.detach(), t, ex, tau, False, topk)
        t_excl = t == 0
        if ex is not None:
            t_excl |= (ex == t[:, None]).any(1)
        rank = torch.where(t_excl, torch.full_like(cnt, E.shape[0]), cnt)
        return CatalogStats(lse, tz, rank, ts, ti)


def catalog_loss(H, E, targets, exclude=None, tau=1.0, reduction="mean", impl="auto"):
    """-log softmax(target) over non-excluded items (+ the target); differentiable in H and E."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean|sum|none, got {reduction!r}")
    impl = pick_impl(impl, H, E)
    if impl == "reference":
        return catalog_loss_reference(H, E, targets, exclude, tau, reduction)
    ex = None if exclude is None or not exclude.numel() else exclude.long()
    return _reduce(_CatalogLoss.apply(H, E, targets.long(), ex, float(tau), impl), reduction)
