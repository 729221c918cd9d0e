"""Catalog softmax for the item head (arXiv 2505.16994, §3.1 scores; §3.2 rank reward and item loss):
stats, pessimistic rank, top-k and loss over all N items, never writing the [M, N] logits.

Math. User states H [M,d], item table E [N,d] (row j = item id j; row 0 = padding), targets t [M],
per-row excluded ids X [M,Xc] (0-padded, duplicates allowed), temperature tau:
    z[m,j]   = H[m] . E[j] / tau       (fp32 logits, fp64 for fp64 inputs; z[m,t[m]] by the same
                                        arithmetic as every other item, so identical items tie exactly)
    A[m]     = {j : j != 0, j not in X[m]}                     (the items row m may be scored on)
    lse[m]   = log sum_{j in A[m]} exp z[m,j]                  (-inf if A[m] is empty)
    rank[m]  = #{j in A[m], j != t[m] : z[m,j] >= z[m,t[m]]}   (0-based, pessimistic: ties count
               against the target); rank = N (never a hit, reward 0) if t[m] is not in A[m], or if
               the row's target logit or lse is not finite (a NaN/inf state or item scores last)
    topk     = the k largest z[m,j] over j in A[m], with their ids
    loss[m]  = lse'[m] - z[m,t[m]],  lse' over A[m] + {t[m]}   (the positive is never masked)
Exclusion happens before the max and the sum (masked to -inf), never by subtracting excluded mass
afterwards, so it stays exact when excluded items hold nearly all of the probability.
Stable online form over tiles: running max mx and s = sum exp(z - mx); two partial states merge at
mx = max(mx1, mx2): s = s1 exp(mx1 - mx) + s2 exp(mx2 - mx). mx and ls = log s are kept apart, never
summed into lse before use: for a peaked row (z_t = mx, s = 1 + 1e-6) lse = mx + ls rounds ls away,
while logp_t = (z_t - mx) - ls keeps it.
Backward of loss with upstream g [M]:  dz[m,j] = g[m] (p[m,j] - 1[j = t[m]]) / tau on A'[m], 0
elsewhere, p = exp((z - mx) - ls), and p_t - 1 = expm1(logp_t) (no cancellation); dH = dz @ E,
dE = dz^T @ H. Frozen table (E without grad, the LoRA case): dH = g/tau (q + expm1(logp_t) E[t]) with
q[m] = sum_{j in A'[m], j != t} p[m,j] E[j] accumulated in the forward, so the PyTorch paths need no
backward pass over E at all (2 GEMM-sized passes in all instead of 3).

Paths (impl=), GEMM passes for stats / loss fwd / fwd + dH (frozen E) / fwd + dH + dE:
- reference: materialises [M,N] (the spec), by the torch path's formula (_logits, fp64 GEMMs).
- torch: tiles = all M rows x catalog chunks of CHUNK_BYTES; CPU and fallback. The target logits are
  the diagonals of the same formula on H x E[t] (128-row blocks). 1 / 1 / 2 / 4 passes.
- chunked: tiles = row blocks x the whole catalog (WORKSPACE_BYTES of logits per block, kernels/
  __init__.py), the target logit read from the same GEMM output; dE summed over row blocks by addmm_
  in E's dtype. Same code as torch, only the tiling and the GEMM dtype differ. 1 / 1 / 2 / 4 passes.
- triton: grid (M-tiles, catalog splits); each program streams its slice of E through tl.dot tiles
  keeping online (max, sumexp, count) per row; a second step merges the [splits, M] partials
  (deterministic, no atomics). Exclusions are (row, id) pairs sorted by tile on the host, so a tile
  compares only the ~1 pair that falls in it. The target logit comes from a [BM, BN] tile of the same
  shape, tl.dot steps and precision, so an item identical to the target ties exactly.
  Top-k: a chunk kernel writes masked fp32 logits per catalog chunk, torch.topk merges them.
  Backward: per catalog chunk, a kernel recomputes z and writes dz (E's dtype), then cuBLAS GEMMs
  for the gradients asked for: dH += dz @ E_c (fp32 sum over chunks), dE_c = dz^T @ H (each row
  once). 1 / 1 / 3 / 4 passes (q would need a [BM, d] accumulator per program: too big for d=2048).
Precision of z, which ranks, top-k, lse and the loss all read (fp64 inputs: fp64 on every path):
- reference, torch, chunked, on any device: stats (ranks, top-k) -> fp64 GEMMs rounded to fp32, then
  scaled by 1/tau. A BLAS may round positions of one GEMM differently (MKL's fp32 GEMV does for its
  last N % 8 columns; a cuBLAS stream-K split sums tiles in other orders), and the torch path's target
  logits come from other GEMMs: fp64 sums rounded to fp32 agree. Losses and gradients -> fp32 GEMMs (on
  CUDA under torch's own fp32 matmul setting, ieee unless the caller enabled TF32: process-wide state,
  never flipped here). Except chunked on CUDA half inputs: GEMMs in E's dtype (cuBLAS), logits upcast
  to fp32 per block (ranks at that precision: auto never picks it for stats).
- triton on CUDA: bf16 / fp16 inputs -> tensor cores in that dtype, fp32 accumulation. fp32 inputs (the
  item table of reward and evaluation) -> FP32_DOT["cuda"] (env R2EC_CATALOG_FP32_DOT): "tf32x3" (the
  default: tensor cores, each operand split into two tf32 parts, 3 products, fp32 accumulation: about
  fp32 accuracy), "tf32" (one product of 10-bit-mantissa operands: ~1e-3 relative, the fastest) or
  "ieee" (fp32 FMAs, no tensor cores).
- triton under the interpreter (CPU): fp32 products and sums; FP32_DOT["cpu"] = "tf32" (tests force it)
  first rounds both operands to tf32 in the kernel (nearest, ties away; tensor cores may truncate).
On every path the target's logit comes out of the same arithmetic as every item's (torch: the _logits
formula; chunked: the same GEMM; triton: the same tiles and precision), so its exact twin ties with it.
Napkin (H100, M=4,096, N=1,000,000, d=2,048, bf16): one z pass is 16.8 TFLOP = 21.5 ms at the
measured 780 TFLOP/s; triton measured fwd 39.5 ms, fwd+dH+dE 126 ms (floor 86 ms), 4.1 GiB above the
inputs (the dE it returns); naive fp32 logits 160 ms / 46 GiB.
"""
import os
from collections import namedtuple

import torch

from . import (HAS_TRITON, INTERPRET, check_float, check_ids, check_int, check_scale, grads_key,
               pick_impl, workspace_rows)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from . import expm1 as _expm1

CatalogStats = namedtuple("CatalogStats", "lse target_logit rank topk_scores topk_ids")
CHUNK_BYTES = 64 << 20   # torch path: scratch per catalog chunk (fp32 logits + item rows); x4 on a GPU
# H100: 128x128 tiles, d streamed in 64-wide steps (bf16) through a 3-stage pipeline
GPU_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=64, num_warps=8, num_stages=3)
# Triton tl.dot precision for fp32 inputs by device type (docstring: "Precision of z"). CUDA: tensor
# cores at about fp32 accuracy (tf32x3), so fp32-level ranks and the CUDA tests' fp32 tolerances hold
FP32_DOT = {"cuda": os.environ.get("R2EC_CATALOG_FP32_DOT", "tf32x3"), "cpu": "ieee"}
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


def _dtypes(impl, H, E, exact):
    """(GEMM dtype, logits dtype) of the PyTorch paths (module docstring, "Precision of z"). exact
    (stats, the reference): fp32 GEMMs run in fp64, rounded to fp32, so twins get bit-identical logits."""
    cdt = torch.promote_types(H.dtype, torch.float32)                          # fp64 stays fp64
    if impl == "chunked" and E.is_cuda and E.dtype in (torch.bfloat16, torch.float16):
        return E.dtype, cdt
    return (torch.float64, cdt) if exact and cdt == torch.float32 else (cdt, cdt)


def _logits(H, E, gdt, cdt, tau):
    """z = H E^T / tau as every PyTorch path computes it, the targets' logits included: the GEMM in gdt,
    rounded to cdt, then scaled by 1/tau in cdt. One rounding order: an item identical to the target
    ties with it exactly."""
    return (H.to(gdt) @ E.to(gdt).T).to(cdt).mul_(1.0 / tau)


def _logits_reference(H, E, tau):
    return _logits(H, E, *_dtypes("reference", H, E, True), tau)               # [M, N]


def _rank(cnt, t_excl, tz, lse, N):
    """Pessimistic rank; N (a miss) for excluded targets and non-finite rows."""
    miss = t_excl | ~torch.isfinite(tz) | ~torch.isfinite(lse)
    return torch.where(miss, torch.full_like(cnt, N), cnt)


def catalog_stats_reference(H, E, targets, exclude=None, tau=1.0, topk=0):
    M, N = H.shape[0], E.shape[0]
    logits = _logits_reference(H, E, tau)
    excl = _excluded_mask(M, N, exclude, H.device)
    t = targets.long()
    tgt = logits.gather(1, t[:, None]).squeeze(1)                             # [M]
    masked = logits.masked_fill(excl, float("-inf"))
    lse = torch.logsumexp(masked, dim=1)
    beats = (masked >= tgt[:, None]) & ~excl
    beats.scatter_(1, t[:, None], False)
    rank = _rank(beats.sum(1), excl.gather(1, t[:, None]).squeeze(1), tgt, lse, N)
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


# ----------------------------------------------------------------------------- torch and chunked
def _tiles(impl, H, E, t, exclude, tau, loss, exact=False, tz=None):
    """Yield (r0, r1, c0, c1, z, Ec, tr, tc): masked logits z [r1-r0, c1-c0] of one tile, its item rows
    Ec (GEMM dtype), and the local (row, column) of the targets inside it. torch: all rows x catalog
    chunks; chunked: row blocks x the whole catalog, writing the target logits into tz from the tile."""
    (M, d), N = H.shape, E.shape[0]
    gdt, cdt = _dtypes(impl, H, E, exact)
    Eg = None
    if impl == "chunked":   # every tile spans the whole catalog: cast the table once (fp32: a no-op)
        rows, cols, Eg = workspace_rows(H.device, N * (gdt.itemsize + 4)), N, E.to(gdt)
    else:
        rows = max(1, M)
        cols = max(1, (CHUNK_BYTES * (4 if H.is_cuda else 1)) // (gdt.itemsize * (M + d)))
    for r0 in range(0, M, rows):
        r1 = min(M, r0 + rows)
        Hr, tt = H[r0:r1].to(gdt), t[r0:r1]
        ex = None if exclude is None else exclude[r0:r1]
        for c0 in range(0, N, cols):
            c1 = min(N, c0 + cols)
            Ec = E[c0:c1].to(gdt) if Eg is None else Eg                       # [c, d]
            z = _logits(Hr, Ec, gdt, cdt, tau)                                 # [r, c]
            tr = ((tt >= c0) & (tt < c1)).nonzero(as_tuple=True)[0]
            tc = tt[tr] - c0
            if tz is not None:
                tz[r0:r1] = z.gather(1, tt[:, None] - c0).squeeze(1)           # whole rows here
            keep = z[tr, tc] if loss else None
            if c0 == 0:
                z[:, 0] = float("-inf")                                        # padding item
            if ex is not None:
                r, x = ((ex >= c0) & (ex < c1)).nonzero(as_tuple=True)
                z[r, ex[r, x] - c0] = float("-inf")
            if loss:
                z[tr, tc] = keep                                               # positive stays in
            yield r0, r1, c0, c1, z, Ec, tr, tc


def _merge_topk(ts, ti, r0, r1, c0, z, k):
    """Fold the top-k of tile z (columns from c0) into ts, ti [M, k] for rows r0:r1."""
    v, i = z.topk(min(k, z.shape[1]), dim=1)
    v, j = torch.cat([ts[r0:r1], v], 1).topk(k, dim=1)
    ti[r0:r1] = torch.cat([ti[r0:r1], i + c0], 1).gather(1, j)
    ts[r0:r1] = v


def _scan(impl, H, E, t, exclude, tau, loss, topk=0, want_q=False):
    """One pass over the tiles -> mx, ls, target logit, count, topk scores/ids, q (see the math)."""
    (M, d), N = H.shape, E.shape[0]
    gdt, cdt = _dtypes(impl, H, E, not loss)
    dev, k = H.device, min(topk, N)
    if impl == "chunked":
        tz = torch.empty(M, dtype=cdt, device=dev)                             # filled by _tiles
    else:   # the targets as a catalog chunk, by the tiles' formula: diagonals of 128-row blocks
        tz = torch.zeros(M, dtype=cdt, device=dev)
        for r0 in range(0, M, 128):
            tz[r0:r0 + 128] = _logits(H[r0:r0 + 128], E[t[r0:r0 + 128]], gdt, cdt, tau).diagonal()
    mx = torch.full((M,), -1e30, dtype=cdt, device=dev)    # finite floor: no -inf - -inf = nan
    s, cnt = torch.zeros(M, dtype=cdt, device=dev), torch.zeros(M, dtype=torch.long, device=dev)
    ts = torch.full((M, k), float("-inf"), dtype=cdt, device=dev) if k else None
    ti = torch.zeros(M, k, dtype=torch.long, device=dev) if k else None
    q = torch.zeros(M, d, dtype=cdt, device=dev) if want_q else None
    for r0, r1, c0, c1, z, Ec, tr, tc in _tiles(impl, H, E, t, exclude, tau, loss, not loss,
                                                tz if impl == "chunked" else None):
        zt = tz[r0:r1]
        cnt[r0:r1] += (z >= zt[:, None]).sum(1)
        cnt[r0 + tr] -= (z[tr, tc] >= zt[tr]).long()                           # not the target itself
        if k:
            _merge_topk(ts, ti, r0, r1, c0, z, k)
        m_new = torch.maximum(mx[r0:r1], z.max(1).values)
        a = torch.exp(mx[r0:r1] - m_new)
        e = z.sub_(m_new[:, None]).exp_()                                      # [r, c], 0 if masked
        s[r0:r1] = s[r0:r1] * a + e.sum(1)
        mx[r0:r1] = m_new
        if want_q:
            e[tr, tc] = 0.0                                                    # q leaves the target out
            q[r0:r1] = q[r0:r1] * a[:, None] + (e.to(gdt) @ Ec).to(cdt)
    ls = torch.log(s)
    return mx, ls, tz, cnt, ts, ti, (q / s[:, None] if want_q else None)


def _torch_grads(impl, H, E, t, exclude, tau, mx, ls, scale, need_dH, need_dE):
    """dH [M,d] (fp32) and dE [N,d] (GEMM dtype, summed over row blocks by addmm_), None when not
    asked for; tile by tile."""
    gdt, cdt = _dtypes(impl, H, E, False)
    dH = torch.zeros(H.shape, dtype=cdt, device=H.device) if need_dH else None
    dE = torch.zeros(E.shape, dtype=gdt, device=H.device) if need_dE else None
    for r0, r1, c0, c1, z, Ec, tr, tc in _tiles(impl, H, E, t, exclude, tau, loss=True):
        lp = z.sub_(mx[r0:r1, None]).sub_(ls[r0:r1, None])                     # log p [r, c]
        lpt = lp[tr, tc]
        p = lp.exp_()                                                          # 0 where excluded
        p[tr, tc] = torch.expm1(lpt)                                           # p_t - 1, exactly
        dz = p.mul_(scale[r0:r1, None]).to(gdt)                                # [r, c]
        if need_dH:
            dH[r0:r1] += (dz @ Ec).to(cdt)
        if need_dE:
            dE[c0:c1].addmm_(dz.T, H[r0:r1].to(gdt))
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
                if PREC == "tf32":   # the interpreter ignores input_precision: round as tensor cores read
                    h = _round_tf32(h)
                    e = _round_tf32(e)
            acc = tl.dot(h, tl.trans(e), acc, input_precision=PREC)
            hp += BLOCK_D
            ep += BLOCK_D
        return acc * inv_tau

    @triton.jit
    def _round_tf32(x):
        """x rounded to tf32 (10 mantissa bits; nearest, ties away from zero); inf and nan kept."""
        r = ((x.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)
        return tl.where(tl.abs(x) < float("inf"), r, x)

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
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
        # The diagonal of a [BM, BN] tile whose column j is row j's target: the same tile shape and
        # tl.dot/BLOCK_D steps as the stats kernel, so an item identical to the target gets the very
        # same fp32 logit (ties are exact).
        tl.static_assert(BLOCK_N >= BLOCK_M)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        j = tl.arange(0, BLOCK_N)
        cmask = (j < BLOCK_M) & (tl.program_id(0) * BLOCK_M + j < M)
        tgt = tl.load(TGT + tl.program_id(0) * BLOCK_M + j, mask=cmask, other=0)
        z = _tile_logits(H, E, rows, tgt, rmask, cmask, D, stride_h, stride_e, inv_tau,
                         BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, UPCAST, PREC)
        diag = tl.arange(0, BLOCK_M)[:, None] == j[None, :]
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
    def _chunk_kernel(H, E, TGT, XR, XC, XP, MX, LS, SCALE, OUT, M, N, D, n_tiles, c0, c1, tile0,
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
            mx = tl.load(MX + rows, mask=rmask, other=0.0)
            ls = tl.load(LS + rows, mask=rmask, other=float("inf"))             # dead rows: p = 0
            sc = tl.load(SCALE + rows, mask=rmask, other=0.0)
            lp = (z - mx[:, None]) - ls[:, None]                                # log p, 0 if excluded
            # p - 1 at the target as expm1(log p): no cancellation when p_t is close to 1
            is_t = cols[None, :] == tgt[:, None]
            out = tl.where(is_t, _expm1(lp), tl.exp2(lp * 1.4426950408889634)) * sc[:, None]
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
    # half inputs: their own dtype on tensor cores (the interpreter: exact fp32 products of them)
    prec = FP32_DOT["cpu" if interp else "cuda"] if fp32 else "ieee" if interp else "tf32"
    if prec not in ("ieee", "tf32", "tf32x3"):
        raise ValueError(f"catalog: FP32_DOT (R2EC_CATALOG_FP32_DOT) must be ieee|tf32|tf32x3, got {prec!r}")
    cfg.update(EVEN_D=H.shape[1] % cfg["BLOCK_D"] == 0, UPCAST=interp, PREC=prec)
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
    """-> mx, ls = log sumexp(z - mx), target logit [M], pessimistic count [M] (int64)."""
    cfg = _config(H, E)
    H, E, tgt, X, nt = _prep(H, E, targets, exclude, cfg)
    M, D = H.shape
    N, BM = E.shape[0], cfg["BLOCK_M"]
    mt, inv_tau = triton.cdiv(M, BM), 1.0 / tau
    tz = torch.empty(M, dtype=torch.float32, device=H.device)
    _target_kernel[(mt,)](H, E, tgt, tz, M, D, H.stride(0), E.stride(0), inv_tau, **cfg)
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
    ls = torch.log((ps * torch.exp(pm - mx)).sum(0))                           # log 0 = -inf: empty
    return mx, ls, tz, pc.sum(0, dtype=torch.long)


def _triton_chunks(H, E, targets, exclude, tau, grad=False, mx=None, ls=None, scale=None):
    """Yield (c0, c1, out) with out [M, c1-c0] from _chunk_kernel (logits, or dz when grad)."""
    cfg = _config(H, E)
    if "num_warps" in cfg:
        cfg["num_warps"] = CHUNK_WARPS                   # one tile per program: 4 warps were faster
    H, E, tgt, X, nt = _prep(H, E, targets, exclude, cfg)
    M, D = H.shape
    N, BM, BN = E.shape[0], cfg["BLOCK_M"], cfg["BLOCK_N"]
    dt = E.dtype if (grad and H.is_cuda) else torch.float32                    # dz feeds cuBLAS
    nc = max(BN, (CHUNK_BYTES * (4 if H.is_cuda else 1)) // (M * dt.itemsize) // BN * BN)
    buf = torch.empty(M * min(nc, N), dtype=dt, device=H.device)
    for c0 in range(0, N, nc):
        c1 = min(N, c0 + nc)
        out = buf[:M * (c1 - c0)].view(M, c1 - c0)        # contiguous: no padding for a GEMM to read
        grid = (triton.cdiv(M, BM), triton.cdiv(c1 - c0, BN))
        _chunk_kernel[grid](H, E, tgt, *X, *((mx, ls, scale) if grad else (out, out, out)), out,
                            M, N, D, nt, c0, c1, c0 // BN, H.stride(0), E.stride(0),
                            out.stride(0), 1.0 / tau, GRAD=grad, **cfg)
        yield c0, c1, out


def _triton_grads(H, E, targets, exclude, tau, mx, ls, scale, need_dH, need_dE):
    dH = torch.zeros(H.shape, dtype=torch.float32, device=H.device) if need_dH else None
    dE = torch.empty_like(E) if need_dE else None
    for c0, c1, dz in _triton_chunks(H, E, targets, exclude, tau, True, mx, ls, scale):
        if need_dH:
            dH += (dz @ E[c0:c1].to(dz.dtype)).float()                         # fp32 across chunks
        if need_dE and dz.dtype == E.dtype:
            torch.mm(dz.T, H.to(dz.dtype), out=dE[c0:c1])                      # each row once
        elif need_dE:
            dE[c0:c1] = dz.T @ H.to(dz.dtype)
    return dH, dE


# ----------------------------------------------------------------------------- autograd + public
def _stats(impl, H, E, t, exclude, tau, loss, topk=0, want_q=False):
    """-> mx, ls, target logit, count, topk scores, topk ids, q (any non-reference path)."""
    if impl != "triton":
        return _scan(impl, H, E, t, exclude, tau, loss, topk, want_q)
    mx, ls, tz, cnt = _triton_stats(H, E, t, exclude, tau, loss)
    ts = ti = None
    if topk:
        k = min(topk, E.shape[0])
        ts = torch.full((H.shape[0], k), float("-inf"), device=H.device)
        ti = torch.zeros(H.shape[0], k, dtype=torch.long, device=H.device)
        for c0, c1, z in _triton_chunks(H, E, t, exclude, tau):
            _merge_topk(ts, ti, 0, H.shape[0], c0, z, k)
    return mx, ls, tz, cnt, ts, ti, None


class _CatalogLoss(torch.autograd.Function):
    @staticmethod
    # under CUDA autocast: inputs in fp32 and autocast off inside, in the forward and the backward alike (the
    # backward recomputes the forward's tiles, so both must round the same way)
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, H, E, targets, exclude, tau, impl, frozen):
        # frozen: only dH will be asked for; the PyTorch paths then accumulate q in this pass
        want_q = frozen and impl != "triton"
        mx, ls, tz, *_, q = _stats(impl, H, E, targets, exclude, tau, True, want_q=want_q)
        ctx.save_for_backward(H, E, targets, exclude, mx, ls, tz, q)
        ctx.tau, ctx.impl = tau, impl
        return (mx - tz) + ls                                                  # [M] fp32

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g):
        H, E, t, exclude, mx, ls, tz, q = ctx.saved_tensors
        need_dH, need_dE = ctx.needs_input_grad[:2]
        scale = g.to(mx.dtype) / ctx.tau                                       # [M]
        if q is not None and not need_dE:   # dH = g/tau (q + (p_t - 1) E_t): no pass over E
            dH, dE = scale[:, None] * (q + torch.expm1((tz - mx) - ls)[:, None] * E[t].to(q.dtype)), None
        elif ctx.impl == "triton":
            dH, dE = _triton_grads(H, E, t, exclude, ctx.tau, mx, ls, scale, need_dH, need_dE)
        else:
            dH, dE = _torch_grads(ctx.impl, H, E, t, exclude, ctx.tau, mx, ls, scale, need_dH, need_dE)
        return (None if dH is None else dH.to(H.dtype), None if dE is None else dE.to(E.dtype),
                None, None, None, None, None)


def _check(fn, H, E, targets, exclude, tau):
    """Validate the arguments (one-line ValueErrors); -> tau as a float, exclude as int64 or None."""
    check_float(fn, "H", H, 2)
    check_float(fn, "E", E, 2)
    if H.shape[1] != E.shape[1]:
        raise ValueError(f"{fn}: H [M,d] and E [N,d] must share d, got {list(H.shape)} and {list(E.shape)}")
    check_int(fn, "targets", targets, H.shape[:1])
    if exclude is not None:
        if exclude.dim() != 2 or exclude.shape[0] != H.shape[0]:
            raise ValueError(f"{fn}: exclude must have shape [M={H.shape[0]}, X], got {list(exclude.shape)}")
        check_int(fn, "exclude", exclude, exclude.shape)
    tau = check_scale(fn, "tau", tau)
    check_ids(fn, ("targets", targets, E.shape[0]), ("exclude", exclude, E.shape[0]))
    return tau, None if exclude is None or not exclude.numel() else exclude.long()


def _resolve(impl, H, E, grads):
    impl = pick_impl(impl, H, E, op="catalog", grads=grads)
    fp64 = H.dtype == torch.float64 or E.dtype == torch.float64
    return "torch" if impl == "triton" and fp64 else impl                 # no fp64 tensor-core path


def catalog_stats(H, E, targets, exclude=None, tau=1.0, topk=0, impl="auto"):
    """CatalogStats(lse [M], target_logit [M], rank [M] int64, topk_scores/ids [M,k] or None)."""
    tau, ex = _check("catalog_stats", H, E, targets, exclude, tau)
    # ranks must not depend on the batch: auto never picks the chunked path, whose half GEMMs on CUDA
    # round the logits to E's dtype by a kernel that cuBLAS picks by the batch size
    picked = _resolve(impl, H, E, "stats")
    impl = "torch" if impl == "auto" and picked == "chunked" else picked
    with torch.no_grad():
        if impl == "reference":
            return catalog_stats_reference(H, E, targets, exclude, tau, topk)
        t = targets.long()
        mx, ls, tz, cnt, ts, ti, _ = _stats(impl, H.detach(), E.detach(), t, ex, tau, False, topk)
        lse = mx + ls
        t_excl = t == 0
        if ex is not None:
            t_excl |= (ex == t[:, None]).any(1)
        return CatalogStats(lse, tz, _rank(cnt, t_excl, tz, lse, E.shape[0]), ts, ti)


def catalog_loss(H, E, targets, exclude=None, tau=1.0, reduction="mean", impl="auto"):
    """-log softmax(target) over non-excluded items (+ the target); differentiable in H and E. Only the
    gradients asked for are computed (E without grad: no dE work, and a cheaper dH)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"catalog_loss: reduction must be mean|sum|none, got {reduction!r}")
    tau, ex = _check("catalog_loss", H, E, targets, exclude, tau)
    grads = grads_key(H, E)
    impl = _resolve(impl, H, E, grads)
    if impl == "reference":
        return catalog_loss_reference(H, E, targets, exclude, tau, reduction)
    return _reduce(_CatalogLoss.apply(H, E, targets.long(), ex, tau, impl, grads == "dX"), reduction)
