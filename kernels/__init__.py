"""Fused kernels for the two hot spots of R2ec (arXiv 2505.16994: item head §3.1, RecPO §3.2).

catalog.py  -- softmax / rank / top-k / loss over the whole item catalog (item head)
logprobs.py -- log-probs (and entropy) of generated tokens through the LM head

Both public functions take impl=:
    reference  materialises the logits (the spec the tests compare with)
    torch      chunked PyTorch in fp32 (fp64 for fp64 inputs), small scratch; CPU and fallback
    chunked    row blocks x the WHOLE catalog / vocabulary, logits materialised per block in fp32
               (bf16/fp16 GEMM output on CUDA), plain matmuls forward and backward (catalog ranks:
               fp64 GEMMs rounded to fp32, as torch); the block holds at most WORKSPACE_BYTES of logits
    triton     fused Triton kernels (CUDA; CPU tensors under TRITON_INTERPRET=1, set before import)
    auto       pick_impl: triton under TRITON_INTERPRET=1 (the tests); else the entry that bench/kernels.py
               measured for this machine kind, dtype, op (log-probs: with or without entropy), gradients
               and size in dispatch.json; else triton on CUDA and torch otherwise
Argument checks: every public function checks shapes, dtypes and scales on entry and raises a one-line
ValueError naming the argument. Id ranges (targets, excluded ids, tokens) cost one device sync per call;
CHECK_IDS = False (or R2EC_SKIP_ID_CHECKS=1 in the environment) skips only those. Out-of-range ids are
undefined behaviour then (the Triton path would read out of bounds).
"""
import functools
import json
import math
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CHECK_IDS = os.environ.get("R2EC_SKIP_ID_CHECKS", "0") != "1"
WORKSPACE_BYTES = {"cpu": 256 << 20, "cuda": 2 << 30}   # impl="chunked": logits per row block
IMPLS = ("auto", "triton", "torch", "chunked", "reference")
DISPATCH_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dispatch.json")

try:
    import triton
    HAS_TRITON = True
except Exception:  # triton missing or broken: PyTorch paths still work
    HAS_TRITON = False


# ----------------------------------------------------------------------------- argument checks
def check_float(fn, name, x, ndim=None):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{fn}: {name} must be a floating-point tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{fn}: {name} must have {ndim} dims, got shape {list(x.shape)}")


def check_int(fn, name, x, shape):
    if not isinstance(x, torch.Tensor) or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        got = getattr(x, "dtype", type(x).__name__)
        raise ValueError(f"{fn}: {name} must be an integer tensor, got {got}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} must have shape {list(shape)}, got {list(x.shape)}")


def check_scale(fn, name, v):
    """A temperature: finite and > 0. Returns it as a Python float."""
    try:
        v = float(v)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{fn}: {name} must be a number, got {v!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{fn}: {name} must be finite and > 0, got {v}")
    return v


def check_ids(fn, *items):
    """items: (name, ids, hi): every id in [0, hi). One device sync for all of them; off without CHECK_IDS."""
    items = [(n, x, hi) for n, x, hi in items if x is not None and x.numel()]
    if not CHECK_IDS or not items:
        return
    lims = torch.stack([torch.stack([x.min(), x.max()]).long() for _, x, _ in items]).tolist()
    for (name, _, hi), (lo, up) in zip(items, lims):
        if lo < 0 or up >= hi:
            raise ValueError(f"{fn}: {name} must hold ids in [0, {hi}), got ids in [{lo}, {up}]")


# ----------------------------------------------------------------------------- dispatch
def grads_key(X, W):
    """Which gradients a call will need: 'fwd' (none), 'dX' (table W frozen), 'dX+dW'."""
    if not torch.is_grad_enabled() or not (X.requires_grad or W.requires_grad):
        return "fwd"
    return "dX+dW" if W.requires_grad else "dX"


@functools.lru_cache(maxsize=None)
def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or "unknown"


def device_kind(dev):
    """'cuda:<device name>' or 'cpu:<model name>': a table entry is only used on the machine kind it was
    measured on."""
    dev = torch.device(dev)
    if dev.type == "cuda":
        return "cuda:" + torch.cuda.get_device_name(dev)
    return f"{dev.type}:{_cpu_model()}"


def dispatch_key(kind, dtype, op, grads, rows, N, d, entropy=False):
    """Entry key; the size bucket is the decade of rows*N*d (= GEMM FLOPs / 2). entropy: the call also
    returns the entropy (training's log-prob call), op 'logprob+entropy'; keys without it are calls
    without entropy, so entries written before the field existed keep their meaning."""
    bucket = int(math.floor(math.log10(max(1, rows * N * d))))
    op = f"{op}+entropy" if entropy else op
    return f"{kind}|{str(dtype).replace('torch.', '')}|{op}|{grads}|1e{bucket}"


@functools.lru_cache(maxsize=None)
def dispatch_table():
    """{key: impl} from DISPATCH_FILE (written by bench/kernels.py from its measurements)."""
    try:
        with open(DISPATCH_FILE) as f:
            return {e["key"]: e["impl"] for e in json.load(f)["entries"]}
    except (OSError, ValueError, KeyError):
        return {}


def pick_impl(impl, *tensors, op=None, grads=None, entropy=False):
    """Resolve impl="auto" for these tensors (X rows first, then the table W).
    auto: under TRITON_INTERPRET=1 with CPU tensors, triton (the interpreter: tests); else the measured
    entry of dispatch_table() for (device kind, W dtype, op, entropy asked for, grads, size bucket) when
    there is one (asked for entropy and no entry: the entry without it); else triton on CUDA and torch
    otherwise."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be {'|'.join(IMPLS)}, got {impl!r}")
    if impl != "auto":
        if impl == "triton" and not HAS_TRITON:
            raise RuntimeError("impl='triton' asked for but triton is not importable")
        return impl
    on_cuda = all(t.is_cuda for t in tensors)
    if HAS_TRITON and INTERPRET and not any(t.is_cuda for t in tensors):
        return "triton"
    if op is not None and len(tensors) >= 2:
        X, W = tensors[0], tensors[1]
        key = (device_kind(W.device), W.dtype, op, grads or "fwd",
               X.numel() // max(1, X.shape[-1]), W.shape[0], W.shape[-1])
        # an entropy call with no entry of its own takes the entry of the same call without the entropy
        for ent in dict.fromkeys((bool(entropy), False)):
            hit = dispatch_table().get(dispatch_key(*key, ent))
            if hit is not None and (hit != "triton" or (HAS_TRITON and on_cuda)):
                return hit
    return "triton" if HAS_TRITON and on_cuda else "torch"


def workspace_rows(dev, per_row_bytes):
    """impl="chunked": rows per block so that a block's logits fit WORKSPACE_BYTES."""
    budget = WORKSPACE_BYTES.get(torch.device(dev).type, WORKSPACE_BYTES["cpu"])
    return max(1, budget // max(1, per_row_bytes))


if HAS_TRITON:
    import triton.language as tl

    @triton.jit
    def expm1(x):
        """exp(x) - 1 without cancellation near 0 (the interpreter has no libdevice): a 5-term series
        for |x| < 0.1 (relative error < 2e-8), exp(x) - 1 beyond."""
        poly = x * (1.0 + x * (0.5 + x * (0.16666666666666666 + x * (0.041666666666666664
                                                                   + x * 0.008333333333333333))))
        return tl.where(tl.abs(x) < 0.1, poly, tl.exp(x) - 1.0)
