"""Fused kernels for the two hot spots of R2ec.

catalog.py  -- softmax / rank / top-k over the whole item catalog (item head)
logprobs.py -- log-probs (and entropy) of generated tokens through the LM head

Each public function takes impl="auto"|"triton"|"torch"|"reference"; "auto" picks
Triton on CUDA tensors, the Triton interpreter on CPU tensors when TRITON_INTERPRET=1
was set before import, and the chunked PyTorch path otherwise.
"""
import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except Exception:  # triton missing or broken: PyTorch paths still work
    HAS_TRITON = False


def pick_impl(impl, *tensors):
    """Resolve impl="auto" to a concrete path for these tensors."""
    if impl not in ("auto", "triton", "torch", "reference"):
        raise ValueError(f"impl must be auto|triton|torch|reference, got {impl!r}")
    if impl != "auto":
        if impl == "triton" and not HAS_TRITON:
            raise RuntimeError("impl='triton' asked for but triton is not importable")
        return impl
    on_cuda = all(t.is_cuda for t in tensors)
    if HAS_TRITON and (on_cuda or (INTERPRET and not any(t.is_cuda for t in tensors))):
        return "triton"
    return "torch"
