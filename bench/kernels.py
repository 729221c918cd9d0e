"""Kernel benchmarks: the catalog softmax and the token log-probs (kernels/) against naive PyTorch and the
peer libraries (Liger-Kernel, Cut Cross-Entropy): time, peak memory, error, the napkin math (FLOPs, bytes, %
of the measured peak) and the kernels issue's targets. A measured run also records the fastest bounded-memory
path in kernels/dispatch.json, which impl="auto" follows. Protocol and latest results: bench/README.md.

    python bench/kernels.py                  # CPU: reference / torch / chunked, 7 modes; the dispatch table
    python bench/kernels.py --gpu            # CUDA: tests, peaks, naive / ours chunked + triton / peers
    python bench/kernels.py --gpu --dry      # the --gpu orchestration at tiny sizes on CPU
    python bench/kernels.py --gpu --out DIR  # also the results table (row by row), JSON rows and log in DIR
"""
import argparse
import datetime
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
import traceback

T_IMPORT = time.time()   # a run from the command line counts --budget-s from here: torch's import included
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # first: `import kernels` is the project's package, not this file

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

import common  # noqa: E402
import kernels  # noqa: E402
from kernels.catalog import catalog_loss, catalog_stats  # noqa: E402
from kernels.logprobs import token_logprobs  # noqa: E402

GB = 1024 ** 3
RESULTS = os.path.join(ROOT, "bench", "results")
# GPU sizes: (op, label, dims). Catalog: M users x N items; logprob: T tokens x V vocab (Qwen2.5 vocab).
# Large sizes first: they carry the comparisons, and --budget-s skips what is left, not them.
GPU_SIZES = [("catalog", "large", dict(M=4096, N=1_000_000, d=2048, X=20)),
             ("logprob", "large", dict(M=16_384, N=151_936, d=2048)),
             ("catalog", "small", dict(M=1024, N=200_000, d=2048, X=20)),
             ("logprob", "small", dict(M=4096, N=50_000, d=2048))]
DRY_SIZES = [("catalog", "small", dict(M=8, N=1001, d=24, X=5)),
             ("logprob", "small", dict(M=16, N=300, d=24)),
             ("catalog", "large", dict(M=12, N=2001, d=40, X=5)),
             ("logprob", "large", dict(M=33, N=517, d=40))]
OPS, CASE_IMPLS = ("catalog", "logprob"), ("reference", "torch", "chunked")


# ----------------------------------------------------------------------------- shared (bench/step.py too)
def versions():
    v = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "liger_kernel", "cut_cross_entropy"):
        try:
            v[mod] = getattr(__import__(mod), "__version__", "?")
        except Exception:
            pass
    return v


def machine(dev):
    """The CPU model or CUDA device name (what kernels/dispatch.json keys on)."""
    return kernels.device_kind(dev).split(":", 1)[1]


def save_results(results_dir, out, name, text):
    """Write text to results_dir/name (atomic), copy it into `out` (if given), print it; returns the path."""
    path = os.path.join(results_dir, name)
    common.atomic_write(path, text)
    if out:
        os.makedirs(out, exist_ok=True)
        shutil.copy(path, out)
    print(text)
    print(f"\nwritten: {path}")
    return path


def loadavg():
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"load average at the end: {load} on {os.cpu_count()} cores"


# ----------------------------------------------------------------------------- inputs and small helpers
def make_inputs(op, M, N, d, X=0, device="cpu", dtype=torch.float32, seed=0):
    """Random inputs with logits ~ N(0, 2^2). catalog: H [M,d], E [N,d], targets [M] in 1..N-1,
    exclude [M,X] random ids (0 = padding allowed). logprob: hidden [M,d], W [N,d], tokens [M]."""
    g = torch.Generator(device=device).manual_seed(seed)
    A = torch.randn(M, d, generator=g, device=device, dtype=dtype)
    B = torch.randn(N, d, generator=g, device=device, dtype=dtype).mul_(2.0 / d ** 0.5)
    t = torch.randint(1 if op == "catalog" else 0, N, (M,), generator=g, device=device)
    ex = torch.randint(0, N, (M, X), generator=g, device=device) if op == "catalog" and X else None
    return A, B, t, ex


def nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def relerr(out, ref):
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def fmt(x, spec=".1f"):
    return x if isinstance(x, str) else "-" if x is None else format(x, spec)


# ----------------------------------------------------------------------------- the dispatch table
DISPATCH_MARGIN = 0.05   # a path other than the default rule's must win by this much to be recorded


def fastest(ms, default):
    """The impl to record from measured {impl: ms}: the fastest, unless the default rule's impl (torch on
    CPU, triton on CUDA) is within DISPATCH_MARGIN of it (a timing-noise win changes nothing)."""
    best = min(ms, key=ms.get)
    return default if default in ms and ms[best] > (1 - DISPATCH_MARGIN) * ms[default] else best


def write_dispatch(path, entries):
    """Merge measured entries {key: entry} into the dispatch table (kernels.DISPATCH_FILE), atomically."""
    try:
        with open(path) as f:
            old = json.load(f)["entries"]
    except (OSError, ValueError, KeyError):
        old = []
    merged = {e["key"]: e for e in old}
    merged.update(entries)
    about = ("impl='auto' choices measured by bench/kernels.py (on CPU; with --gpu on CUDA). key = device "
             "kind|table dtype|op ('logprob+entropy': the call also returns the entropy)|grads|decade of "
             "rows*N*d; impl = the fastest bounded-memory path measured (ms per candidate alongside). No "
             "entry for a call: for a logprob+entropy call the logprob entry, else the default rule of "
             "kernels.pick_impl.")
    table = dict(about=about, entries=sorted(merged.values(), key=lambda e: e["key"]))
    common.atomic_write(path, json.dumps(table, indent=1) + "\n")


# ----------------------------------------------------------------------------- CPU: one case per process
# CPU modes -> GEMM FLOPs per row in units of M*N*d (the same count for every impl of a mode)
# "+ent" (log-probs only): the same call returning the entropy too, which train.py only logs (no gradient):
# the call training makes, with dispatch entries of its own
CPU_MODES = {"fwd": 2, "lossfwd": 2, "frozen": 6, "fwdbwd": 8, "fwd+ent": 2, "frozen+ent": 6,
             "fwdbwd+ent": 8}
MODE_TEXT = {"fwd": "catalog_stats / token_logprobs, no grad", "lossfwd": "catalog_loss, no grad",
             "frozen": "loss + grad of the rows (H / hidden), table frozen", "fwdbwd": "loss + grads of both",
             "+ent": "token_logprobs(return_entropy=True), the loss on the log-probs only (train.py's call)"}


def split_mode(mode):
    """'frozen+ent' -> ('frozen', True)."""
    return mode.split("+")[0], mode.endswith("+ent")


def dispatch_grads(op, mode):
    """The dispatch-table 'grads' field a CPU mode measures (kernels.grads_key; 'stats' = catalog_stats)."""
    fwd = "stats" if op == "catalog" else "fwd"
    return {"fwd": fwd, "lossfwd": "fwd", "frozen": "dX", "fwdbwd": "dX+dW"}[split_mode(mode)[0]]


def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def reset_peak_rss():
    """Reset the RSS high-water mark; returns the baseline RSS in bytes (or None: use getrusage)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmRSS") * 1024
    except OSError:
        return None


def peak_rss_growth(base):
    if base is not None:
        return _status_kb("VmHWM") * 1024 - base
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # fallback: absolute, not a growth


def cpu_fn(op, impl, mode, A, B, t, ex):
    """The measured call (modes: CPU_MODES / MODE_TEXT); returns its outputs (+ent: the entropy last)."""
    mode, ent = split_mode(mode)
    if op == "catalog" and mode == "fwd":
        with torch.no_grad():
            s = catalog_stats(A, B, t, exclude=ex, impl=impl)
        return s.lse, s.target_logit, s.rank
    with torch.set_grad_enabled(mode not in ("fwd", "lossfwd")):
        if op == "catalog":
            loss, extra = catalog_loss(A, B, t, exclude=ex, impl=impl), ()
        else:
            out = token_logprobs(A, B, t, return_entropy=ent, impl=impl)
            lp, extra = (out[0], (out[1].detach(),)) if ent else (out, ())
            loss = lp if mode == "fwd" else -lp.mean()
    if mode in ("fwd", "lossfwd"):
        return (loss,) + extra
    return (loss.detach(),) + tuple(torch.autograd.grad(loss, [A, B] if mode == "fwdbwd" else [A])) + extra


def _set_allocator(mmap_threshold, trim_threshold=None):
    """glibc: serve blocks above mmap_threshold by mmap (and give back what is cached now). 1 MiB for the
    memory call, so the RSS high-water mark measures what the op holds rather than what the allocator
    hoards; then 32 MiB / 64 MiB trim (glibc's own dynamic ceiling) for the timed calls."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD
        if trim_threshold:
            libc.mallopt(-1, trim_threshold)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
    except Exception:
        pass


def cpu_case(op, impl, mode, dims, repeats=1):
    """One case in this process: libraries warmed up at a tiny size, inputs, one call whose peak memory is
    measured against a baseline taken after the inputs exist, then `repeats` timed calls."""
    M, N, d, X = dims["M"], dims["N"], dims["d"], dims.get("X", 0)
    dx, dw = split_mode(mode)[0] in ("frozen", "fwdbwd"), split_mode(mode)[0] == "fwdbwd"
    a, b, tt, e = make_inputs(op, 4, 64, 8, min(X, 3), seed=1)
    cpu_fn(op, impl, mode, a.requires_grad_(dx), b.requires_grad_(dw), tt, e)
    A, B, t, ex = make_inputs(op, M, N, d, X)
    A.requires_grad_(dx), B.requires_grad_(dw)
    _set_allocator(1 << 20)
    gc.collect()
    base = reset_peak_rss()
    out = cpu_fn(op, impl, mode, A, B, t, ex)
    growth = peak_rss_growth(base)
    method = "VmHWM" if base is not None else "ru_maxrss (absolute)"
    # fingerprint (after the memory reading): compared across impls by the parent and the tests
    fp = [o.double().sum().item() if o.dim() <= 1 else o.double().norm().item() for o in out]
    out_bytes = nbytes(*out)
    del out
    _set_allocator(32 << 20, 64 << 20)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = cpu_fn(op, impl, mode, A, B, t, ex)
        times.append(time.perf_counter() - t0)
        del out
    in_bytes, ms = nbytes(A, B, t, ex), statistics.median(times) * 1e3
    return dict(op=op, impl=impl, mode=mode, dims=dims, ms=ms, min_ms=min(times) * 1e3,
                times_ms=[x * 1e3 for x in times], gflops=CPU_MODES[mode] * M * N * d / ms / 1e6,
                in_bytes=in_bytes, needed_bytes=in_bytes + out_bytes,
                peak_bytes=in_bytes + growth if method == "VmHWM" else growth, rss_method=method,
                fingerprint=fp, threads=torch.get_num_threads())


def cpu_cases():
    """(op, mode, impl) in table order. The materialised reference runs where it is the comparison (fwd,
    fwd+bwd); frozen and loss-forward rows compare chunked with torch. +ent modes: log-probs only."""
    skip = {"catalog": ("fwd+ent", "frozen+ent", "fwdbwd+ent"), "logprob": ("lossfwd",)}
    ref = lambda mode: ("reference",) if split_mode(mode)[0] in ("fwd", "fwdbwd") else ()  # noqa: E731
    return [(op, mode, impl) for op in OPS for mode in CPU_MODES if mode not in skip[op]
            for impl in ref(mode) + ("torch", "chunked")]


def cpu_table(res, cases, dims):
    ok = lambda k: k in res and "error" not in res[k]  # noqa: E731
    lines = ["| op | dims | mode | impl | ms (median) | ms / torch | GFLOP/s | peak GiB | needed GiB | "
             "peak / needed | peak / ref peak | extra / ref extra | agrees | peak / own fwd+bwd peak |",
             "|" + "---|" * 14]
    for op, mode, impl in cases:
        r, dimstr = res[op, impl, mode], " ".join(f"{k}={v}" for k, v in dims[op].items())
        if "error" in r:
            lines.append(f"| {op} | {dimstr} | {mode} | {impl} | error: {r['error']} |" + " |" * 9)
            continue
        base, ent = split_mode(mode)
        ref, tor = (op, "reference", mode), (op, "torch", mode)
        fb = (op, impl, "fwdbwd+ent" if ent else "fwdbwd")
        cells = [f"{r['ms'] / res[tor]['ms']:.2f}" if ok(tor) else "-", "-", "-", "-", ""]
        cmp = ref if ok(ref) and impl != "reference" else tor if ok(tor) and impl == "chunked" else None
        if cmp:
            pairs = zip(r["fingerprint"], res[cmp]["fingerprint"])
            same = all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in pairs)
            cells[3] = ("yes" if same else "NO") + (" (vs torch)" if cmp == tor else "")
        if ok(ref) and impl != "reference":
            # workspace: what each path holds beyond the inputs, outputs and grads it must have
            rp = res[ref]
            extra = max(0, r["peak_bytes"] - r["needed_bytes"]) / max(1, rp["peak_bytes"]
                                                                        - rp["needed_bytes"])
            cells[1:3] = [f"{r['peak_bytes'] / rp['peak_bytes']:.3f}", f"{extra:.3f}"]
        if base in ("lossfwd", "frozen") and ok(fb):
            cells[4] = f"{r['peak_bytes'] / res[fb]['peak_bytes']:.3f}"
        lines.append(f"| {op} | {dimstr} | {mode} | {impl} | {r['ms']:.0f} | {cells[0]} | "
                     f"{r['gflops']:.1f} | {r['peak_bytes'] / GB:.3f} | {r['needed_bytes'] / GB:.3f} | "
                     f"{r['peak_bytes'] / r['needed_bytes']:.2f} | " + " | ".join(cells[1:]) + " |")
    floor = lambda op, m: res[op, "torch", m]["needed_bytes"] / res[op, "reference", m]["peak_bytes"]  # noqa
    floors = [f"{op} {m} {floor(op, m):.3f}" for op in OPS for m in ("fwd", "fwdbwd")
              if ok((op, "torch", m)) and ok((op, "reference", m))]
    if floors:
        lines.append("\nneeded / reference peak, the lowest 'peak / ref peak' any path that holds its "
                     "inputs, outputs and grads can reach (the item table is as big as the logits when "
                     "d = M): "
                     + ", ".join(floors))
    return lines


def cpu_main(args):
    dims = {"catalog": dict(M=args.M, N=args.N, d=args.d, X=args.X),
            "logprob": dict(M=args.T, N=args.V, d=args.d)}
    flags = [str(x) for x in ("--M", args.M, "--N", args.N, "--d", args.d, "--X", args.X, "--T", args.T,
                              "--V", args.V, "--repeats", args.repeats)]
    cases, res, t_start = cpu_cases(), {}, time.time()
    for op, mode, impl in tqdm(cases, desc="cpu cases", file=sys.stderr, disable=None):
        cmd = [sys.executable, os.path.abspath(__file__), "--case", f"{op}:{impl}:{mode}", "--json"] + flags
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:  # a crashed case (e.g. killed for memory) is reported, not fatal
            res[op, impl, mode] = dict(error=(p.stderr.strip().splitlines() or [f"rc={p.returncode}"])[-1])
        else:
            res[op, impl, mode] = json.loads(p.stdout.strip().splitlines()[-1])
    total_s = time.time() - t_start
    lines = cpu_table(res, cases, dims)
    # the measured dispatch entries: fastest bounded-memory path per (op, entropy, grads)
    date, entries = datetime.date.today().isoformat(), {}
    for op, mode in dict.fromkeys((op, mode) for op, mode, _ in cases):
        ms = {i: round(res[op, i, mode]["min_ms"], 1) for i in ("torch", "chunked")
              if "min_ms" in res[op, i, mode]}
        if ms:
            D = dims[op]
            key = kernels.dispatch_key(kernels.device_kind("cpu"), torch.float32, op,
                                       dispatch_grads(op, mode), D["M"], D["N"], D["d"],
                                       entropy=split_mode(mode)[1])
            entries[key] = dict(key=key, impl=fastest(ms, "torch"), ms=ms, dims=D, date=date,
                                source="python bench/kernels.py",
                                threads=res[op, "torch", mode].get("threads"))
    where = f" (written to {args.dispatch_file})" if args.dispatch_file else " (not written)"
    lines.append(f"\nimpl='auto' dispatch entries measured here{where}:")
    lines += [f"- `{k}` -> {e['impl']} (min ms: {e['ms']})" for k, e in entries.items()]
    if args.dispatch_file and entries:
        write_dispatch(args.dispatch_file, entries)
        kernels.dispatch_table.cache_clear()
    cpu = machine("cpu")
    threads = next((r["threads"] for r in res.values() if "threads" in r), "?")
    head = [f"# CPU benchmark: {cpu}, {os.cpu_count()} cores, {date}", "",
            f"versions: {json.dumps(versions())}; torch threads: {threads}", "",
            "fp32. Modes: " + "; ".join(f"{m} = {t}" for m, t in MODE_TEXT.items()) + ". Impls: "
            "reference (materialised logits), torch (small-scratch chunked path), chunked (row blocks x "
            f"the whole catalog / vocabulary, <= {kernels.WORKSPACE_BYTES['cpu'] >> 20} MiB of logits "
            f"per block). {args.repeats} timed call(s) per case after a tiny-size warm-up and the memory "
            "call, each case in its own process. GFLOP/s counts "
            + ", ".join(f"{c}MNd ({m})" for m, c in CPU_MODES.items()) + " for every row of a mode. "
            "Peak = input bytes + growth of VmHWM over the baseline taken after the inputs exist, in an "
            "untimed first call with glibc's mmap threshold at 1 MiB (32 MiB for the timed calls); needed "
            "= exact bytes of inputs + outputs + grads; extra = peak - needed (workspace). agrees: the "
            "outputs' sums / norms equal the reference's (or torch's) to 1e-4 relative. 'peak / own "
            "fwd+bwd peak': the frozen-table and loss-forward rows against the same path with both "
            "grads. Dispatch: the fastest of torch / chunked by the min over the timed calls, unless "
            f"torch (the default rule) is within {DISPATCH_MARGIN:.0%}. Shared machine: timings are "
            "noisy.", "",
            f"total wall time: {total_s:.0f} s; {loadavg()}", "", ""]
    save_results(args.results_dir, args.out, f"cpu-{common.slug(cpu.lower())}-{date}.md",
                 "\n".join(head + lines) + "\n")
    return dict(res=res, entries=entries)


# ----------------------------------------------------------------------------- GPU
class Log:
    """print + append to OUT/bench-log.txt line by line (a killed run still leaves its log). md(*lines): the
    same for the markdown results files (md_to starts them empty), each line also flushed and fsynced there
    as soon as it is known: a run cut by `timeout` leaves every finished row, and .ci/gpu, which reads the
    output as it comes, sees the rows as they are measured."""

    def __init__(self, out_dir):
        self.f, self.md_paths = None, []
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            self.f = open(os.path.join(out_dir, "bench-log.txt"), "a", buffering=1)

    def __call__(self, *a):
        s = " ".join(str(x) for x in a)
        tqdm.write(s)
        if self.f:
            self.f.write(s + "\n")

    def md_to(self, *paths):
        self.md_paths = [p for p in paths if p]
        for p in self.md_paths:
            os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
            open(p, "w").close()

    def md(self, *lines):
        for p in self.md_paths:
            with open(p, "a") as f:
                f.write("".join(f"{ln}\n" for ln in lines))
                f.flush()
                os.fsync(f.fileno())
        for ln in lines:
            self(ln)
        sys.stdout.flush()


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, dev, warmup, reps, budget_s=None):
    """Median ms of up to `reps` calls after up to `warmup` calls; CUDA events around each call on GPU.
    Past budget_s seconds (warm-up included) it stops: no more warm-up, no timed call after the first."""
    t0 = time.time()
    over = lambda: budget_s is not None and time.time() - t0 > budget_s  # noqa: E731
    for _ in range(warmup):
        if over():
            break
        fn()
    sync(dev)
    ts = []
    for _ in range(reps):
        if dev.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            ts.append(s.elapsed_time(e))
        else:
            t1 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t1) * 1e3)
        if over():
            break
    return statistics.median(ts)


def measure_peaks(dev, dry):
    """bf16 matmul TFLOP/s (n^3 GEMM) and device-to-device copy GB/s (read + write bytes); tiny on CPU."""
    small = dry or dev.type != "cuda"
    n, dt = (256, torch.float32) if small else (8192, torch.bfloat16)
    a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
    mm_ms = time_ms(lambda: a @ b, dev, 3, 5 if small else 20)
    x = torch.randn((1 << 20) if small else (1 << 29), device=dev, dtype=dt)  # 1 GiB bf16 on GPU
    y = torch.empty_like(x)
    cp_ms = time_ms(lambda: y.copy_(x), dev, 3, 5 if small else 20)
    return dict(matmul_tflops=2 * n ** 3 / mm_ms / 1e9, copy_gbs=2 * nbytes(x) / cp_ms / 1e6, matmul_n=n)


def run_cuda_tests(log, timeout):
    files = [f for f in ("tests/test_catalog.py", "tests/test_logprobs.py", "tests/test_kernels_robust.py",
                         "tests/test_ties.py") if os.path.exists(os.path.join(ROOT, f))]
    if not files:
        return "no test files found"
    env = dict(os.environ, R2EC_TEST_DEVICE="cuda")
    env.pop("TRITON_INTERPRET", None)  # real Triton compilation
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"] + files
    log("$ R2EC_TEST_DEVICE=cuda " + " ".join(cmd[1:]))
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        out = (p.stdout + p.stderr).strip()
    except subprocess.TimeoutExpired as e:
        got = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
        out = f"{got}\nTIMEOUT after {timeout:.0f} s"
    if log.f:
        log.f.write(out + "\n")
    return (out.splitlines() or ["(no output)"])[-1]


def load_peers(dev):
    """name -> loss_fn(H, E, targets, reduction) or a string saying why it is skipped."""
    peers = {}
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as liger
        peers["liger"] = lambda H, E, t, r: liger(H, E, t, reduction=r).float()
    except Exception as e:
        peers["liger"] = f"skipped: liger_kernel not importable ({type(e).__name__})"
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
        peers["cce"] = lambda H, E, t, r: cce(H, E, t, reduction=r).float()  # default filter_eps="high"
        peers["cce-exact"] = lambda H, E, t, r: cce(H, E, t, reduction=r, filter_eps=None).float()
    except Exception as e:
        peers["cce"] = f"skipped: cut_cross_entropy not importable ({type(e).__name__})"
    if dev.type != "cuda":  # --dry: keep the peer plumbing exercised with a clearly named stand-in
        peers = {k: v if isinstance(v, str) else "skipped: needs CUDA" for k, v in peers.items()}
        peers["dry-peer (naive, no mask)"] = lambda H, E, t, r: naive_loss(H, E, t, None, r)
    return peers


def naive_loss(H, E, t, ex, reduction):
    """What most code does: materialise fp32 logits [M,N], mask, cross-entropy."""
    z = (H @ E.T).float()                                                  # [M,N] fp32
    if ex is not None:
        z[:, 0] = float("-inf")                                            # padding item
        z.scatter_(1, torch.where(ex == t[:, None], 0, ex), float("-inf"))  # never mask the target
    return F.cross_entropy(z, t, reduction=reduction)


def fp32_reference(H, E, t, ex, idx, budget_s):
    """Per-row loss [M], dH [M,d], dE[idx] of mean loss, fp32 on the upcast inputs, in row chunks
    of <= 1 GiB of logits. ex given: mask column 0 and ex (never the target). None past budget_s."""
    t0, M, N = time.time(), H.shape[0], E.shape[0]
    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    E32 = E.float()
    rows = torch.empty(M, device=H.device)
    dH = torch.empty(M, H.shape[1], device=H.device)
    dE = torch.zeros(len(idx), H.shape[1], device=H.device)
    mc = max(1, min(M, (1 << 28) // N))
    try:
        for s in range(0, M, mc):
            if time.time() - t0 > budget_s:
                return None
            h, tc = H[s:s + mc].float(), t[s:s + mc]
            z = h @ E32.T                                                   # [m,N]
            if ex is not None:
                z[:, 0] = float("-inf")
                z.scatter_(1, torch.where(ex[s:s + mc] == tc[:, None], 0, ex[s:s + mc]), float("-inf"))
            lse = torch.logsumexp(z, 1)
            rows[s:s + mc] = lse - z.gather(1, tc[:, None]).squeeze(1)
            p = z.sub_(lse[:, None]).exp_()                                 # softmax, in place
            p[torch.arange(len(tc), device=p.device), tc] -= 1.0
            p /= M                                                          # mean reduction
            dH[s:s + mc] = p @ E32
            dE += p[:, idx].T @ h
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return rows, dH, dE


# GPU modes -> textbook GEMM FLOPs in units of M*N*d, the same for every row so TFLOP/s compare:
# fwd = z; frozen = z + recompute + dH (table frozen); fb = z + recompute + dH + dE
GPU_MODES = {"fwd": 2, "frozen": 6, "fb": 8}
MODE_NAMES = {"fwd": "forward only", "frozen": "fwd + dX (table frozen)", "fb": "fwd + dX + dW"}
# GEMM passes (one pass = 2MNd) each impl really needs per mode: its floor at the measured matmul peak.
# naive / Liger keep or compute the logits gradient while the logits exist (no recompute); ours chunked
# (frozen: dX from the forward's q, entropy returned or not) and the fused Triton path recompute z in the
# backward, as does CCE. " +entropy" rows count as their impl.
GEMMS = {"naive": dict(fwd=1, frozen=2, fb=3), "ours (chunked)": dict(fwd=1, frozen=2, fb=4),
         "ours (torch)": dict(fwd=1, frozen=2, fb=4), "ours (triton)": dict(fwd=1, frozen=3, fb=4),
         "liger": dict(fwd=1, frozen=2, fb=3), "cce": dict(fwd=1, frozen=3, fb=4),
         "cce-exact": dict(fwd=1, frozen=3, fb=4), "dry-peer (naive, no mask)": dict(fwd=1, frozen=2, fb=3)}
# The kernels issue's targets for every case of ours: time <= 1.25x the minimal-GEMM floor (the fewest
# passes any method needs, MIN_GEMMS, at the measured matmul peak), >= 2x faster than naive, peak memory
# <= 1/10 of naive's
MIN_GEMMS = dict(fwd=1, frozen=2, fb=3)
TARGETS = dict(floor=1.25, speedup=2.0, memory=0.10)
TABLE_HEAD = ["| op | size | impl | mode | ms | TFLOP/s (% peak) | GEMM passes | floor ms | ms / floor | "
              f"ms / min floor (<= {TARGETS['floor']}x) | naive ms / ms (>= {TARGETS['speedup']:g}x) | "
              f"peak GiB | peak / naive peak (<= {TARGETS['memory']}) | err | note |", "|" + "---|" * 15]


def bench_row(name, loss_fn, A, B, ref, idx, dev, args, deadline=None):
    """Each mode of GPU_MODES for loss_fn(A, B, reduction): ms, peak bytes, rel. errors. Errors -> strings.
    Time-boxed: once the row has run --row-budget-s seconds, or the run reaches `deadline` (time.time(),
    from --budget-s), its remaining modes are skipped and its timing loops stop early (a slow peer cannot
    eat the run)."""
    r, t_row, budget = dict(impl=name), time.time(), getattr(args, "row_budget_s", None)
    end = min([e for e in (budget and t_row + budget, deadline) if e], default=None)
    Ag, Bg = A.detach().requires_grad_(), B.detach().requires_grad_()
    fns = {"fwd": lambda: loss_fn(A, B, "mean"),
           "frozen": lambda: torch.autograd.grad(loss_fn(Ag, B, "mean"), [Ag]),
           "fb": lambda: torch.autograd.grad(loss_fn(Ag, Bg, "mean"), [Ag, Bg])}
    for mode, fn in fns.items():
        if end is not None and time.time() >= end:
            why = f"--budget-s {args.budget_s:g}" if end == deadline else f"--row-budget-s {budget:g}"
            r[f"{mode}_ms"], r["note"] = "skipped", f"time-boxed: past {why}"
            continue
        try:
            with torch.set_grad_enabled(mode != "fwd"):
                fn()                                                        # compile / autotune
                sync(dev)
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
                out = fn()
                sync(dev)
                r[f"{mode}_peak"] = torch.cuda.max_memory_allocated() - base if dev.type == "cuda" else None
                if ref is not None and mode != "fwd":
                    errs = [relerr(out[0], ref[1])] + [relerr(g[idx], ref[2]) for g in out[1:]]
                    r[f"err_{mode}"] = max(errs)
                del out
                left = None if end is None else max(0.0, end - time.time())
                r[f"{mode}_ms"] = time_ms(fn, dev, args.warmup, args.reps, left)
                if ref is not None and mode == "fwd":
                    r["err_fwd"] = relerr(loss_fn(A, B, "none"), ref[0])
        except torch.OutOfMemoryError:
            r[f"{mode}_ms"] = r[f"{mode}_peak"] = "OOM"
        except Exception as e:
            r[f"{mode}_ms"] = f"error: {type(e).__name__}"
            r.setdefault("note", f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}")
            r["traceback"] = traceback.format_exc()
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return r


def bench_op(op, label, dims, dev, dtype, peers, impls, args, log, emit, deadline=None):
    """naive, ours (each impl; log-probs: also " +entropy", train.py's call), then the peers, at one size.
    emit(row) gets each row as soon as it is measured. Past `deadline`, what is left is skipped."""
    M, N, d = dims["M"], dims["N"], dims["d"]
    A, B, t, ex = make_inputs(op, M, N, d, dims.get("X", 0), device=dev, dtype=dtype)
    # dE is checked on a random row subset (plus every target row) to keep the reference small
    g = torch.Generator(device=dev).manual_seed(1)
    idx = torch.unique(torch.cat([t, torch.randint(0, N, (min(N, 32768),), device=dev, generator=g)]))
    refs = {}
    for key, e in (("plain", None), ("excl", ex)) if op == "catalog" else (("plain", None),):
        t0, refs[key] = time.time(), None
        budget = args.ref_budget_s if deadline is None else min(args.ref_budget_s, deadline - time.time())
        try:
            refs[key] = None if args.no_ref or budget <= 0 else fp32_reference(A, B, t, e, idx, budget)
        except torch.OutOfMemoryError:
            log("  fp32 reference: OOM")
        gc.collect()
        log(f"  fp32 reference ({key}): {'skipped' if refs[key] is None else f'{time.time() - t0:.1f} s'}")

    def ours(impl, entropy=False):
        if op == "catalog":
            return lambda H, E, r: catalog_loss(H, E, t, exclude=ex, reduction=r, impl=impl)

        def fn(H, E, r):   # entropy: returned as train.py asks for it, which only logs it (no gradient)
            out = token_logprobs(H, E, t, return_entropy=entropy, impl=impl)
            lp = out[0] if entropy else out
            return -lp.mean() if r == "mean" else -lp
        return fn
    naive = (lambda H, E, r: naive_loss(H, E, t, ex if op == "catalog" else None, r))         # noqa: E731
    ref_ours = refs.get("excl") if op == "catalog" else refs["plain"]
    todo = [("naive", naive, ref_ours)] + [(f"ours ({i})", ours(i), ref_ours) for i in impls]
    if op == "logprob":
        todo += [(f"ours ({i}) +entropy", ours(i, True), ref_ours) for i in impls]
    todo += [(name, fn if isinstance(fn, str) else (lambda H, E, r, fn=fn: fn(H, E, t, r)), refs["plain"])
             for name, fn in peers.items()]
    for name, fn, ref in todo:
        if isinstance(fn, str):
            r = dict(impl=name, note=fn)
        elif deadline is not None and time.time() >= deadline:
            r = dict(impl=name, note=f"skipped: past --budget-s {args.budget_s:g}")
        else:
            r = bench_row(name, fn, A, B, ref, idx, dev, args, deadline)
        r.update(op=op, label=label, dims=dims,
                 excl=op == "catalog" and (r["impl"] == "naive" or r["impl"].startswith("ours")))
        shown = [k for k in sorted(r) if k.endswith(("_ms", "_peak")) or k.startswith("err") or k == "note"]
        log(f"  {r['impl']}: " + ", ".join(f"{k}={fmt(r[k], '.4g')}" for k in shown))
        tb = r.pop("traceback", None)
        if tb and log.f:
            log.f.write(tb)
        emit(r)
    del A, B, t, ex, refs
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def comparisons(rows, op):
    """Lines comparing our fastest fwd+bwd path at the large size (without entropy, as naive and the peers)
    with naive and with the fastest peer."""
    rs = [r for r in rows if r["op"] == op and r["label"] == "large" and "+entropy" not in r["impl"]]
    timed = [r for r in rs if r["impl"].startswith("ours") and isinstance(r.get("fb_ms"), float)]
    if not timed:
        return [f"- {op}: ours has no fwd+bwd time"]
    ours, out = min(timed, key=lambda r: r["fb_ms"]), []
    nv = next((r for r in rs if r["impl"] == "naive"), {})
    if nv.get("fb_ms") == "OOM":
        out.append(f"- {op}: naive ran out of memory here; {ours['impl']} took {ours['fb_ms']:.2f} ms")
    elif isinstance(nv.get("fb_ms"), float):
        both = isinstance(ours.get("fb_peak"), int) and nv.get("fb_peak")
        mem = ours["fb_peak"] / nv["fb_peak"] if both else None
        out.append(f"- {op}: {ours['impl']} {ours['fb_ms']:.2f} ms = "
                   f"{nv['fb_ms'] / ours['fb_ms']:.2f}x faster than naive ({nv['fb_ms']:.2f} ms); "
                   f"peak memory {fmt(mem, '.3f')}x naive's")
    pe = [r for r in rs if r["impl"] in GEMMS and not r["impl"].startswith(("ours", "naive"))
          and isinstance(r.get("fb_ms"), float)]
    if pe:
        best = min(pe, key=lambda r: r["fb_ms"])
        out.append(f"- {op}: {ours['impl']} takes {ours['fb_ms'] / best['fb_ms']:.2f}x the time of the "
                   f"fastest peer, {best['impl']} ({best['fb_ms']:.2f} ms)")
    else:
        out.append(f"- {op}: no peer ran")
    return out


def napkin(op, label, dims, peak, dtype_name):
    """The napkin line of one size: one GEMM pass at the measured peak, the bytes floor, the logits' size."""
    M, N, d = dims["M"], dims["N"], dims["d"]
    tf, bw = peak["matmul_tflops"] * 1e12, peak["copy_gbs"] * 1e9
    by_b = 3 * (M + N) * d * (2 if dtype_name == "bf16" else 4)  # read inputs (twice for bwd) + write grads
    sizes = ", ".join(f"{k}={v:,}" for k, v in dims.items())
    return (f"- {op} {label} ({sizes}, {dtype_name}): one GEMM pass (2MNd) = "
            f"{2 * M * N * d / 1e12:.2f} TFLOP = {2 * M * N * d / tf * 1e3:.2f} ms at the measured peak; "
            f"bytes floor {by_b / bw * 1e3:.3f} ms (GEMM-bound); fp32 logits would be "
            f"{M * N * 4 / GB:.1f} GiB")


def target(x, limit, spec, judge, at_most=True, unit=""):
    """A ratio cell; on our rows with 'met', or by how much it misses the issue's limit."""
    cell = "-" if x is None else f"{x:{spec}}{unit}"
    if x is None or not judge:
        return cell
    met = x <= limit if at_most else x >= limit
    return f"{cell} met" if met else f"{cell}, misses by {abs(x - limit):{spec}}{unit}"


def row_lines(r, naive, peak):
    """Markdown rows (TABLE_HEAD) of one impl row, one per mode; the targets are judged on our rows."""
    M, N, d = r["dims"]["M"], r["dims"]["N"], r["dims"]["d"]
    note = "; ".join(x for x in (f"masks {r['dims'].get('X')} ids/row + pad" if r.get("excl") else "",
                                 r.get("note", "")) if x)
    head = f"| {r['op']} | {r['label']} | {r['impl']} |"
    if not any(f"{m}_ms" in r for m in GPU_MODES):
        return [head + " - |" * 11 + f" {note} |"]
    gib = lambda v: fmt(v / GB, ".2f") if isinstance(v, int) else fmt(v)  # noqa: E731
    base = r["impl"].split(" +")[0]
    judge, vs = base.startswith("ours"), r is not naive
    one = 2 * M * N * d / (peak["matmul_tflops"] * 1e12) * 1e3               # ms of one GEMM pass
    out = []
    for mode, units in GPU_MODES.items():
        ms, n, pk = r.get(f"{mode}_ms"), GEMMS.get(base, {}).get(mode), r.get(f"{mode}_peak")
        nms, npk = naive.get(f"{mode}_ms"), naive.get(f"{mode}_peak")
        timed = isinstance(ms, float)
        tflops = units * M * N * d / ms / 1e9 if timed else None
        rate = f"{tflops:.3g} ({100 * tflops / peak['matmul_tflops']:.0f}%)" if timed else "-"
        floor = n * one if n else None
        cells = [target(ms / (MIN_GEMMS[mode] * one) if timed else None, TARGETS["floor"], ".2f", judge,
                        unit="x"),
                 target(nms / ms if timed and vs and isinstance(nms, float) else None, TARGETS["speedup"],
                        ".2f", judge, at_most=False, unit="x"),
                 target(pk / npk if vs and isinstance(pk, int) and isinstance(npk, int) and npk > 0 else None,
                        TARGETS["memory"], ".3f", judge)]
        own = f"{ms / floor:.2f}x" if timed and floor else "-"
        out.append(f"{head} {MODE_NAMES[mode]} | {fmt(ms, '.2f')} | {rate} | {fmt(n, 'd')} | "
                   f"{fmt(floor, '.2f')} | {own} | {cells[0]} | {cells[1]} | {gib(pk)} | {cells[2]} | "
                   f"{fmt(r.get(f'err_{mode}'), '.1e')} | {note} |")
    return out


def gpu_dispatch(rows, kind, dtype):
    """Dispatch entries from the GPU rows: per (op, size, entropy, mode) the fastest of our paths."""
    found, entries, date = {}, {}, datetime.date.today().isoformat()
    for r in [r for r in rows if r["impl"].startswith("ours (") and "dims" in r]:
        ent = r["impl"].endswith("+entropy")
        for mode in [m for m in GPU_MODES if isinstance(r.get(f"{m}_ms"), float)]:
            D, ms = found.setdefault((r["op"], r["label"], ent, mode), (r["dims"], {}))
            ms[r["impl"].split(" +")[0][6:-1]] = round(r[f"{mode}_ms"], 2)
    for (op, _, ent, mode), (D, ms) in found.items():
        grads = {"fwd": "fwd", "frozen": "dX", "fb": "dX+dW"}[mode]              # catalog: the loss
        key = kernels.dispatch_key(kind, dtype, op, grads, D["M"], D["N"], D["d"], entropy=ent)
        entries[key] = dict(key=key, impl=fastest(ms, "triton"), ms=ms, dims=D, date=date,
                            source="bench/kernels.py --gpu")
    return entries


def gpu_main(args):
    if args.dry:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny ops: thread hand-offs cost more than the work on a busy CPU
        try:
            return _gpu_main(args, torch.device("cpu"), torch.float32, "fp32", ("chunked", "torch"),
                             DRY_SIZES)
        finally:
            torch.set_num_threads(threads)
    if not torch.cuda.is_available():
        raise common.UserError("--gpu needs a CUDA device (torch.cuda.is_available() is False); "
                               "use `python bench/kernels.py --gpu --dry` to check the orchestration on CPU")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise common.UserError("TRITON_INTERPRET=1 is set in the environment; unset it for --gpu (real "
                               "compilation)")
    return _gpu_main(args, torch.device("cuda"), torch.bfloat16, "bf16", ("chunked", "triton"), GPU_SIZES)


def _gpu_main(args, dev, dtype, dtype_name, impls, sizes):
    """The --gpu run. Written as it goes, so that a run cut by `timeout` keeps everything finished: the
    markdown rows (Markdown), OUT/bench-gpu.json and the dispatch entries after each size (atomic writes).
    Ends within about --budget-s (CUDA tests included): nothing starts past it, timing loops stop at it."""
    t_start, log = getattr(args, "t0", None) or time.time(), Log(args.out)
    deadline = t_start + args.budget_s
    if dev.type == "cuda":
        name = machine(dev)
        try:
            drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except Exception:
            drv = "?"
        mem = torch.cuda.get_device_properties(0).total_memory / GB
        desc = f"{name}, driver {drv}, CUDA {torch.version.cuda}, {mem:.0f} GiB"
    else:
        name, desc = "dry-cpu", "CPU (--dry: tiny sizes, impl=chunked and torch; numbers mean nothing)"
    date = datetime.date.today().isoformat()
    fname = f"{common.slug(name.lower())}-{date}.md"
    path = None if args.dry else os.path.join(args.results_dir, fname)
    log.md_to(path, args.out and os.path.join(args.out, fname))
    md = log.md
    md(f"# Kernel benchmark: {desc}, {date}", "", f"versions: {json.dumps(versions())}", "")
    if args.dry or args.no_tests:
        tests = f"skipped ({'--dry' if args.dry else '--no-tests'})"
    else:
        tests = run_cuda_tests(log, max(1.0, min(args.test_timeout, deadline - time.time())))
    md(f"CUDA test suite (real Triton compile): {tests} ({time.time() - t_start:.0f} s)", "")
    peak = measure_peaks(dev, args.dry)
    modes = "; ".join(f"{MODE_NAMES[m]} ({m}): {c}MNd" for m, c in GPU_MODES.items())
    md(f"measured peaks: matmul {peak['matmul_tflops']:.1f} TFLOP/s ({dtype_name} {peak['matmul_n']}^3), "
       f"device copy {peak['copy_gbs']:.0f} GB/s (read+write). Medians of {args.reps} timed calls after "
       f"{args.warmup + 2} warm-up calls (fewer past --row-budget-s {args.row_budget_s:g} s per row or "
       f"--budget-s {args.budget_s:g} s per run), CUDA events. Modes: {modes} of FLOPs for every row "
       "(TFLOP/s compare); GEMM passes = what the impl really runs (one pass = 2MNd), floor = passes at "
       "the measured matmul peak. ours (chunked) = row blocks x the whole catalog, cuBLAS; ours (triton) = "
       "the fused kernels; ' +entropy' = token_logprobs(return_entropy=True) with the loss on the log-probs "
       "only, the call train.py makes (it logs the entropy), against the same naive. Targets (the kernels "
       f"issue), judged on our rows: ms <= {TARGETS['floor']}x the minimal-GEMM floor (the fewest passes "
       f"any method needs: {', '.join(f'{m} {n}' for m, n in MIN_GEMMS.items())}), >= "
       f"{TARGETS['speedup']:g}x faster than naive, peak <= {TARGETS['memory']} of naive's; a miss says by "
       "how much. Peak = max_memory_allocated above the inputs. err = ||out-ref||/||ref|| vs fp32 on the "
       "upcast inputs (grad: max over dH, dE rows subset). cce = Cut Cross-Entropy defaults "
       "(filter_eps='high', approximate gradients); cce-exact = filter_eps=None. Peers mask nothing.")
    peers, rows, kind = load_peers(dev), [], kernels.device_kind(dev)
    for op, label, dims in sizes:
        md("", napkin(op, label, dims, peak, dtype_name), "", *TABLE_HEAD)
        done = []

        def emit(r):
            done.append(r)
            md(*row_lines(r, next((x for x in done if x["impl"] == "naive"), {}), peak))
        if time.time() >= deadline:
            log(f"{op} {label}: skipped (time budget)")
            emit(dict(op=op, label=label, dims=dims, impl="-",
                      note=f"skipped: past --budget-s {args.budget_s:g}"))
        else:
            log(f"{op} {label} {dims}:")
            try:  # one size failing outside a row (inputs, reference) must not lose the others
                bench_op(op, label, dims, dev, dtype, peers, impls, args, log, emit, deadline)
            except Exception as e:
                log(f"  failed: {type(e).__name__}: {e}")
                if log.f:
                    log.f.write(traceback.format_exc())
                emit(dict(op=op, label=label, dims=dims, impl="-", note=f"failed: {type(e).__name__}"))
        rows += done
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if args.out:
            js = json.dumps(dict(machine=desc, peak=peak, tests=tests, rows=rows), indent=1, default=str)
            common.atomic_write(os.path.join(args.out, "bench-gpu.json"), js)
        entries = {} if args.dry else gpu_dispatch(done, kind, dtype)
        if args.dispatch_file and entries:
            write_dispatch(args.dispatch_file, entries)
            kernels.dispatch_table.cache_clear()
            log(f"dispatch entries written to {args.dispatch_file}: "
                + ", ".join(f"{k} -> {e['impl']}" for k, e in entries.items()))
    md("", "Comparisons at the large sizes (fwd + dX + dW, our fastest path without entropy):",
       *[line for op in OPS for line in comparisons(rows, op)], "",
       f"total wall time: {time.time() - t_start:.0f} s")
    for p in log.md_paths:
        print(f"written: {p}")
    return dict(rows=rows, path=path)


# ----------------------------------------------------------------------------- command line
def case_arg(text):
    """--case op:impl:mode, checked (argparse type)."""
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in OPS or parts[1] not in CASE_IMPLS or parts[2] not in CPU_MODES:
        raise argparse.ArgumentTypeError(f"{text!r}: expected op:impl:mode with op {'|'.join(OPS)}, impl "
                                         f"{'|'.join(CASE_IMPLS)}, mode {'|'.join(CPU_MODES)}")
    return tuple(parts)


def get_parser():
    I, I0, F0, Fp = common.pos_int, common.nonneg_int, common.nonneg_float, common.pos_float
    p = common.CLIParser(prog="bench/kernels.py", description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--gpu", action="store_true", help="CUDA benchmark (tests, peaks, naive/ours/peers)")
    a("--dry", action="store_true", help="with --gpu: run its orchestration at tiny sizes on CPU")
    a("--case", type=case_arg, help="internal: run one CPU case op:impl:mode in this process")
    a("--json", action="store_true", help="with --case: print the result as one JSON line")
    # CPU sizes (catalog M x N, log-prob T x V, shared d)
    a("--M", type=I, default=256, help="catalog: users per batch")
    a("--N", type=I, default=1_000_000, help="catalog: items, >= 2 (targets are 1..N-1, 0 is padding)")
    a("--X", type=I0, default=20, help="catalog: excluded (history) ids per row")
    a("--T", type=I, default=2048, help="log-prob: tokens")
    a("--V", type=I, default=50_000, help="log-prob: vocabulary")
    a("--d", type=I, default=256, help="hidden size")
    a("--repeats", type=I, default=3, help="CPU: timed calls per case, after the memory call (libraries "
      "warmed up at a tiny size); the table gives the median, the dispatch uses the min")
    # GPU protocol
    a("--warmup", type=I0, default=2, help="GPU: warm-up calls before timing")
    a("--reps", type=I, default=7, help="GPU: timed calls (median reported)")
    a("--test-timeout", type=I, default=240, help="GPU: seconds allowed for the CUDA test suite (within "
      "--budget-s)")
    a("--no-tests", action="store_true", help="GPU: skip the CUDA test suite")
    a("--budget-s", type=F0, default=330, help="GPU: the whole run (CUDA tests included) ends within about "
      "this many seconds: no size, reference, row or mode starts past it, and timing loops stop at it")
    a("--ref-budget-s", type=F0, default=45, help="GPU: give up an fp32 reference after this long")
    a("--no-ref", action="store_true", help="GPU: skip the fp32 references (no error columns)")
    a("--row-budget-s", type=Fp, default=60, help="GPU: seconds one impl row may take (all its modes); past "
      "it, its timing loops stop early and its remaining modes are skipped")
    a("--dispatch-file", default=kernels.DISPATCH_FILE, help="where the measured impl='auto' entries go "
      "('' = not written; never with --dry)")
    # output
    a("--results-dir", default=RESULTS, help="where results .md go")
    a("--out", help="also write the results table (<device>-<date>.md, row by row), bench-gpu.json and the "
      "full log (bench-log.txt) into this dir")
    return p


def main(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    if args.N < 2:
        p.error(f"argument --N: {args.N} must be >= 2 (targets are 1..N-1, 0 is padding)")
    if args.dry and not args.gpu:
        p.error("--dry only applies to --gpu (the CPU benchmark is already safe to run)")
    if args.json and not args.case:
        p.error("--json only applies to --case")
    if args.case and args.gpu:
        p.error("--case runs one CPU case; drop --gpu")
    args.t0 = T_IMPORT if __name__ == "__main__" else time.time()
    return common.run_cli(run, args)


def run(args):
    if args.case:
        op, impl, mode = args.case
        dims = dict(M=args.M, N=args.N, d=args.d, X=args.X) if op == "catalog" else \
            dict(M=args.T, N=args.V, d=args.d)
        r = cpu_case(op, impl, mode, dims, args.repeats)
        print(json.dumps(r) if args.json else r)
        return r
    return gpu_main(args) if args.gpu else cpu_main(args)


if __name__ == "__main__":
    main()
