"""Plumbing every file shares (nanochat's common.py): one-line user errors (UserError, CLIParser, run_cli,
number types), crash-safe writes, the JSONL log, torchrun's collectives, device and thread helpers, Phases,
warn_once and the prompt template's words (arXiv 2505.16994, §3.1). It imports no project file but kernels."""
import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
from datetime import timedelta

import torch

REPORTERS = ("none", "tensorboard", "wandb")   # train.py --report-to, as in HF Trainer and TRL
_THREADS = {}     # fit_threads' state
_warned = set()   # warn_once's keys

class UserError(Exception):
    """A user-facing problem: CLIs print `error: <msg>` on one line and exit 2 (no traceback)."""

class ModelError(UserError):
    """A user-facing model or checkpoint problem (one line)."""

class CLIParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line `error: <prog>: ...` and exit code 2 (no usage dump)."""

    def error(self, message):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)

    def parse_saved(self, saved, path, required=(), skip=("resume", "preset")):
        """A saved config (a run_config.json at `path`) checked like the command line: an edited or damaged
        file is refused in one line naming it. Keys in `required` must be there; other flags default."""
        defaults = vars(self.parse_args([]))
        missing = [k for k in required if k not in saved]
        if missing:
            raise UserError(f"{path}: key {missing[0]!r} is missing; use a file written by this program")
        argv = [x for k in defaults if k not in skip and saved.get(k) is not None and saved[k] is not False
                for x in [f"--{k.replace('_', '-')}"] + ([] if saved[k] is True else [str(saved[k])])]

        def refuse(msg):
            raise UserError(f"{path}: {msg}; the file was edited or damaged")
        error, self.error = self.error, refuse
        try:
            return {**saved, **vars(self.parse_args(argv))}
        finally:
            self.error = error

def run_cli(fn, *args):
    """fn(*args); a UserError -> `error: <msg>` on stderr, exit 2. Under torchrun the process joins the group
    first (NCCL for CUDA tensors, gloo for CPU; only rank 0 keeps its stdout) and leaves it at the end."""
    if world() > 1:
        # imported before init: torch.distributed.nn (transformers imports it) binds group.WORLD as default
        # arguments, and bound to the group they keep gloo's threads past destroy_process_group into exit (abort)
        dist = __import__("torch.distributed.nn").distributed
        if not dist.is_initialized():
            cuda, local = torch.cuda.is_available(), int(os.environ.get("LOCAL_RANK", "0"))
            if cuda and local < torch.cuda.device_count():   # one GPU per process (pick_device agrees)
                torch.cuda.set_device(local)
            # generous timeout: the others wait at a barrier while rank 0 builds a large dataset's cache
            dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timedelta(hours=2))
        sys.stdout = sys.stdout if is_main() else open(os.devnull, "w")
    try:
        return fn(*args)
    except UserError as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        sys.exit(2)
    finally:
        if world() > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

def _number(kind, lo=None, lo_open=False, hi=None):
    def parse(text):   # argparse type: int/float in a range; the message names the range
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if lo is not None and (v <= lo if lo_open else v < lo) or hi is not None and v > hi:
            rng = f"{'>' if lo_open else '>='} {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"{text} must be {rng}")
        return v
    parse.__name__ = kind.__name__   # argparse names the type in its messages
    return parse

pos_int, nonneg_int = _number(int, 1), _number(int, 0)
pos_float, nonneg_float, unit_float = _number(float, 0, True), _number(float, 0), _number(float, 0, hi=1)

def slug(name):
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "dataset"   # csv:/a/b -> csv-a-b

def fsync_dir(path):
    with contextlib.suppress(OSError):   # makes a rename inside path durable, where folders can be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

def fsync_tree(d):
    for f in os.listdir(d):
        with open(os.path.join(d, f), "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(d)

def check_out_dir(path, flag):
    """Refuse an output folder that could not be created or written, before any work is done."""
    p = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)   # the nearest existing ancestor: where the first mkdir would happen
    if not os.path.isdir(p):
        raise UserError(f"{flag} {path}: {p} is a file, not a folder; choose another {flag}")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: folder {p} is not writable; choose another {flag}")

def atomic_write(path, content):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)   # readers see the old or the new file, never half of one
    fsync_dir(d)

def reporter(kind, logdir=None):
    """None, or f(record) sending a record's numbers at its "step" to TensorBoard or wandb (offline unless
    WANDB_MODE says otherwise). Optional packages, imported only when asked; logdir=None only checks them."""
    if kind == "none":
        return None
    try:
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
        else:
            import wandb
    except ImportError:
        raise UserError(f"--report-to {kind}: pip install {kind} (an optional package)") from None
    if logdir is None:
        return None
    if kind == "tensorboard":
        w = SummaryWriter(os.path.join(logdir, "tensorboard"))
        return lambda rec: [w.add_scalar(k, v, rec["step"]) for k, v in rec.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)] and w.flush()
    run = wandb.init(project="r2ec", dir=logdir, mode=os.environ.get("WANDB_MODE", "offline"))
    return lambda r: run.log({k: v for k, v in r.items() if isinstance(v, (int, float))}, step=r["step"])

def jsonl_logger(path, report_to="none"):
    """log(record, line=None): record -> path (flushed) and --report-to; line printed above progress bars."""
    if not is_main():
        return lambda rec, line=None: None
    from tqdm import tqdm
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    f, send = open(path, "a"), reporter(report_to, os.path.dirname(path) or ".")

    def log(rec, line=None):
        print(json.dumps(rec), file=f, flush=True)
        if send and "step" in rec:
            send(rec)
        if line:
            tqdm.write(line)
    return log


# ----------------------------------------------------------------------------- distributed
# torchrun sets RANK, WORLD_SIZE, LOCAL_RANK; without it (or with 1 process) every helper returns at once
def world():
    return int(os.environ.get("WORLD_SIZE", "1"))

def rank():
    return int(os.environ.get("RANK", "0"))

def is_main():
    return rank() == 0   # the one process that prints, logs and writes checkpoints

def show_progress():
    return is_main() and sys.stderr.isatty()   # progress bars: a log file gets the log lines only

def rank_slice(n):
    return slice(rank() * n // world(), (rank() + 1) * n // world())   # n a multiple of world()

def barrier():
    if world() > 1:
        torch.distributed.all_reduce(torch.zeros(1))   # a CPU tensor: gloo, whatever the device

def main_first(fn, *args, **kw):
    """fn on the main process first (it builds the caches: dataset, tokenizer, GGUF), then on the others."""
    if not is_main():
        barrier()
    out = fn(*args, **kw)
    if is_main():
        barrier()
    return out

def all_reduce(x, op="sum"):
    """Sum (or "max") over the processes: a tensor in place, or a dict of numbers (one float64 CPU tensor)."""
    if world() == 1 or isinstance(x, dict) and not x:
        return x
    dist = torch.distributed
    o = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    if isinstance(x, dict):
        keys = sorted(x)
        t = torch.tensor([float(x[k]) for k in keys], dtype=torch.float64)
        dist.all_reduce(t, o)
        return {k: type(x[k])(v) for k, v in zip(keys, t.tolist())}
    dist.all_reduce(x, o)
    return x

def any_rank(flag):
    """True on every process if flag is True on any: a decision read off a clock must be the same on all."""
    return bool(flag) if world() == 1 else all_reduce({"f": float(bool(flag))}, "max")["f"] > 0

def all_gather(t):
    """Every process's t (tensor, or a dict/tuple of them) concatenated along dim 0 in rank order. Sizes may
    differ: the other dims (a padded sequence length) are zero-padded at their end to the largest."""
    if world() == 1:
        return t
    if isinstance(t, (dict, tuple)):
        return {k: all_gather(v) for k, v in t.items()} if isinstance(t, dict) else tuple(map(all_gather, t))
    dist = torch.distributed
    shape = torch.tensor(t.shape, device=t.device)
    shapes = [torch.zeros_like(shape) for _ in range(world())]
    dist.all_gather(shapes, shape)
    n, big = [int(s[0]) for s in shapes], torch.stack(shapes).amax(0).tolist()
    x = t.to(torch.uint8) if t.dtype == torch.bool else t   # not every backend carries bool
    pad = [p for d in reversed(range(t.dim())) for p in (0, big[d] - t.shape[d])]
    out = [x.new_empty(big) for _ in n]
    dist.all_gather(out, torch.nn.functional.pad(x, pad).contiguous())
    return torch.cat([o[:k] for o, k in zip(out, n)]).to(t.dtype)

def all_reduce_grads(params, bucket_bytes=25 << 20):
    """Sum the gradients over the processes (each weighted its losses by its share of the GLOBAL batch), in
    flat ~25 MiB buckets (DDP's size): a few collectives a step, not ~500 (one a tensor, 36-layer LoRA)."""
    if world() == 1:
        return
    has = all_reduce(torch.tensor([float(p.grad is not None) for p in params]), "max")   # a grad anywhere
    buckets = {}   # (dtype, device) -> [[grad, ...], ...], each list's bytes <= bucket_bytes (or one tensor)
    for p, h in zip(params, has.tolist()):
        if h:
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad
            bs = buckets.setdefault((p.grad.dtype, p.grad.device), [[]])
            if bs[-1] and (sum(g.numel() for g in bs[-1]) + p.numel()) * p.grad.element_size() > bucket_bytes:
                bs.append([])
            bs[-1].append(p.grad)
    for b in (b for bs in buckets.values() for b in bs):
        flat = torch.cat([g.reshape(-1) for g in b])   # summing the bucket is summing each of its tensors
        torch.distributed.all_reduce(flat)
        for g, f in zip(b, flat.split([g.numel() for g in b])):
            g.copy_(f.view_as(g))


# ----------------------------------------------------------------------------- device and threads
def pick_device(name):
    """auto: cuda if there, else cpu. Under torchrun cuda is cuda:LOCAL_RANK, whatever index was asked for."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and "LOCAL_RANK" in os.environ:
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: use auto, cpu or cuda[:i]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name

def check_kernels(impl, device, flag="--kernels"):
    """Refuse impl='triton' up front without Triton and CUDA (or TRITON_INTERPRET=1, set before start)."""
    from kernels import HAS_TRITON, INTERPRET
    need = "a CUDA device (or TRITON_INTERPRET=1 for the interpreter)" if HAS_TRITON else "the triton package"
    if impl == "triton" and not (HAS_TRITON and (device.startswith("cuda") or INTERPRET)):
        raise UserError(f"{flag} triton needs {need}; use {flag} auto")

def autocast(device):
    """CUDA: bf16 autocast around every forward (fp32 tiny weights and LoRA adapters stay fp32); CPU: off."""
    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)

def fit_threads(device="cpu", window=1.0):
    """CPU: set torch's threads to the cores others left free since the last call (/proc/stat, per `window` s;
    never above the start count; returned): 2 OpenMP threads on 2 cores, one busy, wait on each other at every
    op (RecPO step 1.2 s -> 11 s). Off on CUDA, off Linux, in a partial CPU set, and if R2EC_FIT_THREADS=0."""
    st = _THREADS
    if not st:
        try:
            with open("/proc/stat") as f:
                ncpu = sum(1 for ln in f if ln[:3] == "cpu" and ln[3].isdigit())
            cpus = len(os.sched_getaffinity(0))
        except (OSError, AttributeError):
            ncpu, cpus = 0, -1
        st.update(on=ncpu == cpus and os.environ.get("R2EC_FIT_THREADS", "1") != "0", cpus=cpus,
                  max=torch.get_num_threads(), last=None)
    if not st["on"] or not str(device).startswith("cpu"):
        return torch.get_num_threads()
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")   # the machine's non-idle, non-iowait seconds
    t = os.times()
    now = (time.time(), busy, t.user + t.system)
    last = st["last"]
    if last is None or now[0] - last[0] >= window:
        st["last"] = now
        if last is not None:
            others = max(0.0, (now[1] - last[1]) - (now[2] - last[2])) / (now[0] - last[0])   # busy elsewhere
            n = max(1, min(st["max"], round(st["cpus"] - others)))
            if n != torch.get_num_threads():
                torch.set_num_threads(n)
    return torch.get_num_threads()

class Phases:
    """Wall time per named phase, CUDA-synced at both ends (train.py logs it, bench/step.py reads it)."""

    def __init__(self, cuda=False):
        self.cuda, self.s = cuda, {}

    @contextlib.contextmanager
    def __call__(self, name):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - t0

def warn_once(key, msg):
    if key not in _warned and is_main():   # torchrun: rank 0 alone prints
        _warned.add(key)
        print(f"warning: {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------- the prompt template's words
ANCHOR = "<answer>"
KNOWLEDGE_FACT = "{a} is followed by {b}."   # a knowledge corpus sentence (data.Dataset.relation)
ITEM_TOKEN = "<|i{}|>"   # the tiny backbone's one token per item (--item-tokens): written before its title

def format_dt(seconds):
    """Time before the target: >= 1 day "3d 4.0h", >= 1 hour "5h 12.0min", else "7.5min"."""
    s = max(0, int(seconds))
    m10 = round(s / 6)   # integer tenths of a minute, rounded once: never "60.0min" or "24.0h"
    if m10 < 600:
        return f"{m10 / 10:.1f}min"
    if m10 < 600 * 24:
        h, r = divmod(m10, 600)
        return f"{h}h {r / 10:.1f}min"
    d, r = divmod(round(s / 360), 240)   # tenths of an hour
    return f"{d}d {r / 10:.1f}h"

def user_instruction(domain):
    return (f"Analyze in depth and finally recommend next {domain['item']} I might {domain['verb']} inside "
            f"<answer> and </answer>.\nFor example, <answer>a {domain['item']}</answer>.\n\n"
            f"Below is my historical {domain['items']} and ratings (out of 5):\n")
