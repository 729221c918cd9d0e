"""
Data: raw interactions -> next-item samples, split in time order, cached.

    python data.py --dataset synthetic                      # seeded toy data, < 2 s
    python data.py --dataset ml-100k                        # default real dataset
    python data.py --dataset amazon-2023:Video_Games --data-dir ~/amazon
    python data.py --dataset csv:path/to/dir                # your own data

Protocol (the paper's experimental setup, arXiv 2505.16994 §4, as its reference code builds it):
per user, interactions sorted by timestamp, ties broken by
blake2b(user raw id, item raw id) (never by item-id order). Every interaction at position
i >= 1 is a sample: history = the previous min(i, H) items, oldest first, left-padded with 0;
target = item i. Samples are sorted globally by (target time, same tie key) and split
80/10/10 in that order (train = first int(0.8 S), valid = up to int(0.9 S), test = rest).
`--split loo` (leave-one-out: each user's last sample -> test, second-to-last -> valid) is an
option, never the default. Item ids 1..N follow the sorted raw ids (numeric sort if every raw
id is an integer, of any size); 0 is padding. The catalog is the set of items that have
interactions. Timestamps are int64 unix seconds everywhere.

Data formats (what `--dataset` accepts):
- `ml-100k`, `ml-1m`, `ml-latest-small`, ... (`--data-dir DIR` holding one of): MovieLens
  `u.data` (tab: user item rating timestamp) + `u.item` (`|`, latin-1); `ratings.dat` +
  `movies.dat` (`::`, latin-1); `ratings.csv` (userId,movieId,rating,timestamp) + `movies.csv`
  (movieId,title,genres); or RecBole atomic `<name>.inter` + `<name>.item`. Without
  `--data-dir`, ml-100k is read from an installed `recbole` package
  (`pip install --no-deps recbole==1.2.1`). Titles carry the year; description = genre list.
- `amazon-2023:<Category>` (`--data-dir DIR`): `<Category>.csv[.gz]` (5-core rating-only,
  `user_id,parent_asin,rating,timestamp`, timestamp in ms) + `meta_<Category>.jsonl[.gz]`.
  Documented filters (counts printed): items need a title (HTML-unescaped, no `<span id`,
  > 1 character, <= 20 words) and a numeric price; interactions of removed items or items
  absent from the metadata are dropped; window [2022-10-01, 2023-10-01), start moved back
  3 months while it holds < 10,000 items (never before the data's start).
- `csv:<dir>`: `interactions.csv` with header `user,item,timestamp[,rating]` (timestamp = unix
  seconds, int or float; rating optional, 0 = unknown) and `items.csv` with header
  `item,title[,description]` (UTF-8, standard CSV quoting; other columns are refused). Every
  interacted item must have a non-empty title in items.csv; items without interactions are
  ignored (count printed); a repeated identical item row is ignored, a conflicting one refused.
Bad input raises DataError with one line "file:line: problem" (timestamps must fall in
[1970, 2100) once in seconds; ratings must be finite numbers; every row has exactly the
header's fields); the CLI prints it and exits 2, and nothing is written.
Cache: data/<slug>/<key>/ (override the root with R2EC_DATA_ROOT or cache_dir=), keyed by the
input files (path, size, blake2b of the bytes: an edit that keeps size and mtime still
rebuilds) and every protocol parameter; written fsynced to `<key>.tmp<PID>`, then renamed.
An unreadable cache is rebuilt (one notice line); leftovers of killed builds are removed.
"""
import argparse, calendar, csv, datetime, gzip, hashlib, html, importlib.util, json, math, os
import re, shutil, sys, time, zlib
from dataclasses import dataclass

import numpy as np

PROTOCOL_VERSION = 1  # bump when samples, filters or the synthetic generator change
ROOT = os.path.dirname(os.path.abspath(__file__))
AMAZON_WINDOW = ("2022-10-01", "2023-10-01")  # [start, end) UTC
AMAZON_MIN_ITEMS = 10_000  # move the window start back 3 months while fewer items
ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
TIME_RANGE = (0, 4102444800)  # accepted timestamps, unix seconds: [1970-01-01, 2100-01-01)
SYNTH_MAX = 1_000_000  # synthetic: most users / items (the generator is a Python loop)
ML_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
             "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
             "Romance", "Sci-Fi", "Thriller", "War", "Western"]  # u.item flag order

# Domain words used by model.py's prompts; looked up by longest name prefix.
DOMAINS = {
    "": {"item": "item", "items": "items", "verb": "purchase"},
    "ml-": {"item": "movie", "items": "movies", "verb": "watch"},
    "synthetic": {"item": "movie", "items": "movies", "verb": "watch"},
    "amazon-2023:Video_Games": {"item": "video game", "items": "video games", "verb": "play"},
    "amazon-2023:CDs_and_Vinyl": {"item": "CD or vinyl", "items": "CDs and vinyl", "verb": "purchase"},
    "amazon-2023:Musical_Instruments": {"item": "musical instrument", "items": "musical instruments",
                                        "verb": "purchase"},
}


# ----------------------------------------------------------------------------- shared helpers
# Every CLI of the project (data, train, eval, baselines, bench) uses these: one user-error type,
# one parser that prints `error: ...` on one line and exits 2, one slug, one atomic write, one JSONL
# log, and the few collectives a run under torchrun needs (section "distributed" below).

class UserError(Exception):
    """A user-facing problem: CLIs print `error: <msg>` on one line and exit 2 (no traceback)."""


class DataError(UserError):
    """A user-facing data problem: one line naming the file/line and what is wrong."""


class CLIParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line `error: <prog>: ...` and exit code 2 (no usage dump)."""

    def error(self, message):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)

    def parse_saved(self, saved, path, required=(), skip=("resume", "preset")):
        """A saved config (e.g. a checkpoint's run_config.json at `path`) back through this parser: types, ranges
        and choices checked like the command line; a damaged or edited file is refused in one line naming it.
        A key in `required` must be present; another flag missing from the file takes its default."""
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
    """Call fn(*args); a UserError becomes `error: <msg>` on stderr and exit code 2. Launched by torchrun,
    the process joins its group first and leaves it at the end (init_distributed)."""
    init_distributed()
    try:
        return fn(*args)
    except UserError as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        sys.exit(2)
    finally:
        close_distributed()


def _number(kind, lo=None, lo_open=False, hi=None):
    """argparse type: int/float in a range; the message names the accepted range."""
    def parse(text):
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
    """A dataset name as a folder/file name: ml-100k -> ml-100k, csv:/a/b -> csv-a-b."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "dataset"


def fsync_dir(path):
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    """Write str/bytes to path via a fsynced temp file + rename: readers see the old or the new file."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(d)


REPORTERS = ("none", "tensorboard", "wandb")   # train.py --report-to, as in HF Trainer and TRL


def reporter(kind, logdir=None):
    """None, or f(record) sending a record's numbers (keyed by its "step") to TensorBoard or wandb. Both are
    optional packages, imported only when asked; wandb runs offline unless WANDB_MODE says otherwise. With
    logdir=None only checks that the package is there (UserError otherwise)."""
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
        return lambda rec: [w.add_scalar(k, v, rec["step"]) for k, v in rec.items() if isinstance(v, (int, float))
                            and not isinstance(v, bool)] and w.flush()
    run = wandb.init(project="r2ec", dir=logdir, mode=os.environ.get("WANDB_MODE", "offline"))
    return lambda rec: run.log({k: v for k, v in rec.items() if isinstance(v, (int, float))}, step=rec["step"])


def jsonl_logger(path, report_to="none"):
    """log(record, line=None): append a JSON record to path (flushed), print the line above any progress
    bar, and send step records to --report-to. Under torchrun only the main process logs."""
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
# `torchrun --nproc_per_node N train.py ...` starts N processes and gives each RANK, WORLD_SIZE and
# LOCAL_RANK; run_cli() joins them into one group: NCCL carries CUDA tensors, gloo CPU tensors (and
# every tensor on a machine without CUDA). Without torchrun, or with N = 1, there is no group and every
# helper below returns at once: the single-process path runs no collective at all.

def world():
    """Number of processes (torchrun's WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank():
    return int(os.environ.get("RANK", "0"))


def is_main():
    """True on the one process that prints, logs and writes checkpoints (rank 0)."""
    return rank() == 0


def init_distributed():
    """Join torchrun's process group (once); the other processes' stdout goes to /dev/null."""
    if world() == 1:
        return
    import torch
    import torch.distributed as dist
    if not dist.is_initialized():
        cuda, local = torch.cuda.is_available(), int(os.environ.get("LOCAL_RANK", "0"))
        if cuda and local < torch.cuda.device_count():   # one GPU per process (eval.pick_device agrees)
            torch.cuda.set_device(local)
        # generous timeout: the others wait at a barrier while rank 0 builds a large dataset's cache
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    if not is_main():
        sys.stdout = open(os.devnull, "w")


def close_distributed():
    if world() > 1:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def rank_slice(n):
    """This process's contiguous share of n things (n a multiple of world())."""
    return slice(rank() * n // world(), (rank() + 1) * n // world())


def barrier():
    if world() > 1:
        import torch
        torch.distributed.all_reduce(torch.zeros(1))   # a CPU tensor: gloo, whatever the device


def main_first(fn, *args, **kw):
    """fn(*args, **kw) on the main process first (it builds the caches: dataset, tokenizer, converted
    GGUF), then on the others, which read them."""
    if not is_main():
        barrier()
    out = fn(*args, **kw)
    if is_main():
        barrier()
    return out


def all_reduce(x, op="sum"):
    """Sum (op="max": maximum) over the processes: a tensor in place (returned), or a dict of numbers
    (-> a new dict; a CPU float64 tensor under the hood)."""
    if world() == 1 or isinstance(x, dict) and not x:
        return x
    import torch
    import torch.distributed as dist
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
    """Every process's tensor t, concatenated along dim 0 in rank order. The sizes may differ: dim 0 freely,
    the other dims (a padded sequence length) are zero-padded at their end to the largest. Dicts and tuples
    of tensors: gathered entry by entry."""
    if world() == 1:
        return t
    if isinstance(t, (dict, tuple)):
        return {k: all_gather(v) for k, v in t.items()} if isinstance(t, dict) else tuple(map(all_gather, t))
    import torch
    import torch.distributed as dist
    shape = torch.tensor(t.shape, device=t.device)
    shapes = [torch.zeros_like(shape) for _ in range(world())]
    dist.all_gather(shapes, shape)
    n, big = [int(s[0]) for s in shapes], torch.stack(shapes).amax(0).tolist()
    x = t.to(torch.uint8) if t.dtype == torch.bool else t   # not every backend carries bool
    pad = [p for d in reversed(range(t.dim())) for p in (0, big[d] - t.shape[d])]
    out = [x.new_empty(big) for _ in n]
    dist.all_gather(out, torch.nn.functional.pad(x, pad).contiguous())
    return torch.cat([o[:k] for o, k in zip(out, n)]).to(t.dtype)


def all_reduce_grads(params):
    """Sum every parameter's gradient over the processes. Each process weighted its micro-batch losses by
    their share of the GLOBAL batch, so the sum is the gradient one process would have accumulated."""
    if world() == 1:
        return
    import torch
    import torch.distributed as dist
    has = all_reduce(torch.tensor([float(p.grad is not None) for p in params]), "max")   # a grad anywhere
    for p, h in zip(params, has.tolist()):
        if h:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)


def domain_for(name):
    return dict(DOMAINS[max((p for p in DOMAINS if name.startswith(p)), key=len)])


@dataclass
class Split:
    user: np.ndarray         # int64 [S]
    hist: np.ndarray         # int64 [S,H] oldest->newest, left-padded with 0
    hist_rating: np.ndarray  # float32 [S,H]
    hist_time: np.ndarray    # int64 [S,H]
    target: np.ndarray       # int64 [S]
    rating: np.ndarray       # float32 [S]
    time: np.ndarray         # int64 [S]

    def __len__(self):
        return len(self.target)


FIELDS = ["user", "hist", "hist_rating", "hist_time", "target", "rating", "time"]
SPLITS = ["train", "valid", "test"]


@dataclass
class Dataset:
    name: str
    num_items: int
    num_users: int
    items: list
    domain: dict
    train: Split
    valid: Split
    test: Split
    stats: dict
    history: int

    def split(self, name):
        if name not in SPLITS:
            raise DataError(f"unknown split '{name}' (choose {', '.join(SPLITS)})")
        return getattr(self, name)

    @property
    def titles(self):
        return [""] + [it["title"] for it in self.items[1:]]

    def train_counts(self):
        return np.bincount(self.train.target, minlength=self.num_items + 1).astype(np.int64)


# ----------------------------------------------------------------------------- reading files

def _rows(path, sep, encoding="utf-8"):
    """Yield (line number, fields) of a text file (.gz transparently); sep "csv" = CSV quoting.
    Blank lines are skipped; read/decompress/decode problems become one-line DataErrors."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding=encoding, newline="") as f:
            if sep == "csv":
                reader = csv.reader(f)
                for row in reader:
                    if row:
                        yield reader.line_num, row
            else:
                for ln, line in enumerate(f, 1):
                    line = line.rstrip("\r\n")
                    if line.strip():
                        yield ln, (line.split(sep) if sep else line)
    except gzip.BadGzipFile:
        raise DataError(f"{path}: not a gzip file (drop the .gz suffix if it is plain text)") from None
    except (EOFError, zlib.error):
        raise DataError(f"{path}: gzip stream is truncated or corrupt") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not {encoding} text (wrong file or encoding?)") from None
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV ({e})") from None
    except OSError as e:  # unreadable, a directory, I/O error
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _num(s, path, ln, what):
    try:
        v = float(s)
    except (TypeError, ValueError):
        raise DataError(f"{path}:{ln}: {what} {s!r} is not a number") from None
    if not math.isfinite(v):
        raise DataError(f"{path}:{ln}: {what} {s!r} is not finite")
    return v


def _table(path, sep, cols, encoding="utf-8", header=True, optional=None):
    """Yield (line number, {column: stripped value}). header=True: the first row names the
    columns (RecBole 'name:type' cells too) and must contain `cols`; with `optional` given, any
    other column is refused. header=False: `cols` are positional. Every row has exactly as many
    fields as the header: a longer row is an unquoted separator, not data to drop."""
    rows = _rows(path, sep, encoding)
    names = cols
    if header:
        accepted = ",".join(cols) + "".join(f"[,{c}]" for c in optional or [])
        ln, row = next(rows, (None, None))
        if row is None:
            raise DataError(f"{path}: file is empty (expected a header line: {accepted})")
        names = [c.split(":")[0].strip().lstrip("\ufeff") for c in row]
        shown = ",".join(row)[:80]
        for col in cols:
            if col not in names:
                raise DataError(f"{path}:{ln}: missing column '{col}' (header is {shown!r}; expected "
                                f"a header line {accepted})")
        dup = next((c for k, c in enumerate(names) if c in names[:k]), None)
        if dup is not None:
            raise DataError(f"{path}:{ln}: column '{dup}' appears twice in the header")
        extra = [c for c in names if c not in cols and c not in (optional or [])]
        if optional is not None and extra:
            raise DataError(f"{path}:{ln}: unknown column '{extra[0]}' (accepted header: {accepted})")
    for ln, f in rows:
        if len(f) != len(names):
            why = "truncated row or wrong format?" if len(f) < len(names) else \
                "a separator inside an unquoted field?" if sep == "csv" else "wrong format?"
            raise DataError(f"{path}:{ln}: expected {len(names)} fields ({','.join(names[:6])}), "
                            f"got {len(f)} ({why})")
        yield ln, {k: v.strip() for k, v in zip(names, f)}


def _item(raw_id, title, description="", average_rating=None, rating_number=None):
    return {"raw_id": raw_id, "title": title, "description": description,
            "average_rating": average_rating, "rating_number": rating_number}


class Raw:
    """Parsed interactions (one entry per row) + item metadata keyed by raw id.
    time_unit: timestamp units per second in the file (Amazon: 1000, ms); stored as read."""
    def __init__(self, path, meta_path, filters=None, time_unit=1):
        self.path, self.meta_path, self.filters, self.time_unit = path, meta_path, filters or {}, time_unit
        self.users, self.items, self.ratings, self.times, self.lines, self.meta = [], [], [], [], [], {}
        self.meta_lines = {}

    def add(self, ln, user, item, rating, ts):
        if not user or not item:
            raise DataError(f"{self.path}:{ln}: empty {'user' if not user else 'item'} id")
        r = _num(rating, self.path, ln, "rating")
        if abs(r) > 3.4e38:  # stored as float32
            raise DataError(f"{self.path}:{ln}: rating {rating!r} is out of range")
        t = _num(ts, self.path, ln, "timestamp")
        if not TIME_RANGE[0] <= t / self.time_unit < TIME_RANGE[1]:
            unit = "unix milliseconds" if self.time_unit == 1000 else "unix seconds"
            ms = self.time_unit == 1 and TIME_RANGE[0] <= t / 1000 < TIME_RANGE[1]
            raise DataError(f"{self.path}:{ln}: timestamp {ts!r} is not a date in [1970, 2100) "
                            f"(expected {unit}{'; this looks like milliseconds' if ms else ''})")
        self.users.append(user); self.items.append(item); self.lines.append(ln)
        self.ratings.append(r); self.times.append(int(t))

    def put(self, ln, iid, title, description=""):
        if not iid:
            raise DataError(f"{self.meta_path}:{ln}: empty item id")
        if not title:
            raise DataError(f"{self.meta_path}:{ln}: empty title for item {iid!r}")
        if iid in self.meta:
            old = self.meta[iid]
            if (old["title"], old["description"]) != (title, description):
                raise DataError(f"{self.meta_path}:{ln}: item {iid!r} repeats line {self.meta_lines[iid]} "
                                f"with a different title or description ({title[:40]!r} vs "
                                f"{old['title'][:40]!r})")
            k = "repeated identical item rows (ignored)"
            self.filters[k] = self.filters.get(k, 0) + 1
            return
        self.meta[iid], self.meta_lines[iid] = _item(iid, title, description), ln

    def check(self):
        """Every interacted item must be in the metadata (MovieLens/csv refuse; Amazon filters)."""
        if not self.items:
            raise DataError(f"{self.path}: no interactions (empty file?)")
        if not self.meta:
            raise DataError(f"{self.meta_path}: no items (empty file?)")
        missing = [k for k, it in enumerate(self.items) if it not in self.meta]
        if missing:
            k = missing[0]
            raise DataError(f"{self.path}:{self.lines[k]}: {len(missing)} interactions refer to items "
                            f"absent from {self.meta_path} (first: item {self.items[k]!r})")
        used = set(self.items)
        unused = sum(1 for k in self.meta if k not in used)
        if unused:
            self.filters["metadata items without interactions (not in catalog)"] = unused
        return self


# ----------------------------------------------------------------------------- sources

def _genres(names):
    names = [g for g in names if g and not g.startswith("(")]  # "(no genres listed)"
    return "Genres: " + ", ".join(names) + "." if names else ""


def _movielens_files(d, name):
    """(layout, interactions file, item file) of the MovieLens copy in directory d."""
    j = lambda f: os.path.join(d, f)
    if os.path.isfile(j("u.data")) or os.path.isfile(j("u.item")):
        return "u.data", j("u.data"), j("u.item")
    if os.path.isfile(j("ratings.dat")):
        return "dat", j("ratings.dat"), j("movies.dat")
    if os.path.isfile(j("ratings.csv")):
        return "csv", j("ratings.csv"), j("movies.csv")
    try:
        cands = [x for x in sorted(os.listdir(d)) if x.endswith(".inter")]
    except OSError as e:
        raise DataError(f"{d}: cannot list the folder ({e.strerror or e})") from None
    if not cands:
        raise DataError(f"{d}: no MovieLens files (expected u.data+u.item, ratings.dat+movies.dat, "
                        f"ratings.csv+movies.csv, or RecBole {name}.inter+{name}.item)")
    base = f"{name}.inter" if f"{name}.inter" in cands else cands[0]
    return "recbole", j(base), j(base[:-6] + ".item")


def _movielens(layout, path, meta_path):
    """Parse one of the MovieLens layouts (see _movielens_files)."""
    UIRT = ["user", "item", "rating", "timestamp"]
    raw = Raw(path, meta_path)
    if layout == "u.data":
        for ln, r in _table(raw.path, "\t", UIRT, header=False):
            raw.add(ln, r["user"], r["item"], r["rating"], r["timestamp"])
        for ln, r in _table(raw.meta_path, "|", ["id", "title", "date", "video", "url"] + ML_GENRES,
                            "latin-1", header=False):
            raw.put(ln, r["id"], r["title"], _genres([g for g in ML_GENRES if r[g] == "1"]))
    elif layout == "dat":
        for ln, r in _table(raw.path, "::", UIRT, "latin-1", header=False):
            raw.add(ln, r["user"], r["item"], r["rating"], r["timestamp"])
        for ln, r in _table(raw.meta_path, "::", ["id", "title", "genres"], "latin-1", header=False):
            raw.put(ln, r["id"], r["title"], _genres(r["genres"].split("|")))
    elif layout == "csv":
        for ln, r in _table(raw.path, "csv", ["userId", "movieId", "rating", "timestamp"]):
            raw.add(ln, r["userId"], r["movieId"], r["rating"], r["timestamp"])
        for ln, r in _table(raw.meta_path, "csv", ["movieId", "title"]):
            raw.put(ln, r["movieId"], r["title"], _genres(r.get("genres", "").split("|")))
    else:
        for ln, r in _table(raw.path, "\t", ["user_id", "item_id", "timestamp"]):
            raw.add(ln, r["user_id"], r["item_id"], r.get("rating", 0), r["timestamp"])
        for ln, r in _table(raw.meta_path, "\t", ["item_id"]):
            title, year = r.get("movie_title", r.get("title", "")), r.get("release_year", "")
            title = f"{title} ({year})" if re.fullmatch(r"\d{4}", year) and title else title
            raw.put(ln, r["item_id"], title, _genres(r.get("class", "").split()))
    return raw.check()


def _recbole_dir(name):
    """The MovieLens copy bundled with an installed recbole package, located WITHOUT importing it."""
    spec = importlib.util.find_spec("recbole")
    for base in (spec.submodule_search_locations or []) if spec else []:
        d = os.path.join(base, "dataset_example", name)
        if os.path.isfile(os.path.join(d, f"{name}.inter")):
            return d
    return None


def _clean(s):
    """HTML-unescape, strip tags, non-ASCII -> spaces, collapse whitespace."""
    s = re.sub(r"<[^>]*>", " ", html.unescape(s))
    return " ".join(re.sub(r"[^\x00-\x7f]", " ", s).split())


AMAZON_FILTERS = ["items without metadata", "title missing", "title contains '<span id'",
                  "title <= 1 character", "title > 20 words", "price missing or not a number"]


def _amazon_problem(o):
    """Which of the documented item filters removes metadata object o (None = keep)."""
    t = o.get("title")
    if not isinstance(t, str) or not t.strip():
        return "title missing"
    if "<span id" in html.unescape(t):
        return "title contains '<span id'"
    if len(_clean(t)) <= 1:
        return "title <= 1 character"
    if len(_clean(t).split()) > 20:
        return "title > 20 words"
    try:
        ok = not isinstance(o.get("price"), bool) and math.isfinite(float(o.get("price")))
    except (TypeError, ValueError):
        ok = False
    return None if ok else "price missing or not a number"


def _amazon_files(cat, d):
    """The ratings and metadata files of category `cat` in directory d (plain or .gz)."""
    pick = lambda base: next((os.path.join(d, base + z) for z in ("", ".gz")
                              if os.path.isfile(os.path.join(d, base + z))), None)
    url = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_2023"
    for base, u in ((f"{cat}.csv", f"{url}/benchmark/5core/rating_only/{cat}.csv.gz"),
                    (f"meta_{cat}.jsonl", f"{url}/raw/meta_categories/meta_{cat}.jsonl.gz")):
        if pick(base) is None:
            raise DataError(f"{d}: missing {base}[.gz]; download {u} into it")
    return pick(f"{cat}.csv"), pick(f"meta_{cat}.jsonl")


def _finite(x):
    """A JSON number that is finite (not bool, NaN or Infinity), else None."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _amazon(path, meta_path, verbose):
    from tqdm import tqdm
    raw = Raw(path, meta_path, dict.fromkeys(AMAZON_FILTERS, 0), time_unit=1000)
    bar = lambda it, p: tqdm(it, desc=f"read {os.path.basename(p)}", disable=not verbose, mininterval=2)
    for ln, r in bar(_table(raw.path, "csv", ["user_id", "parent_asin", "rating", "timestamp"]), raw.path):
        raw.add(ln, r["user_id"], r["parent_asin"], r["rating"], r["timestamp"])
    needed, rejected, drop = set(raw.items), set(), raw.filters
    for ln, line in bar(_rows(raw.meta_path, None), raw.meta_path):
        try:
            o = json.loads(line)
        except ValueError:
            raise DataError(f"{raw.meta_path}:{ln}: not valid JSON (is this a JSON-lines file?)") from None
        if not isinstance(o, dict) or "parent_asin" not in o:
            raise DataError(f"{raw.meta_path}:{ln}: expected a JSON object with 'parent_asin'")
        a = str(o["parent_asin"])
        if a not in needed or a in raw.meta or a in rejected:
            continue  # not rated, or a repeated row (the first is kept)
        why = _amazon_problem(o)
        if why:
            drop[why] += 1
            rejected.add(a)
            continue
        desc = o.get("description") or []
        paras = dict.fromkeys(x for x in map(_clean, map(str, desc if isinstance(desc, list) else [desc])) if x)
        ar, rn = _finite(o.get("average_rating")), _finite(o.get("rating_number"))
        raw.meta[a] = _item(a, _clean(o["title"]), " ".join(" ".join(paras).split()[:100]),
                            ar, None if rn is None else int(rn))
    drop["items without metadata"] = len(needed) - len(raw.meta) - len(rejected)
    items, ts = np.asarray(raw.items), np.asarray(raw.times, np.int64) // 1000  # ms -> s
    keep = np.fromiter((a in raw.meta for a in raw.items), bool, len(items))
    drop["interactions of removed items"] = int((~keep).sum())
    # Time window [start, end): start moved back 3 months while it holds too few items.
    utc = lambda day: calendar.timegm(day.timetuple())
    start, end = datetime.date.fromisoformat(AMAZON_WINDOW[0]), datetime.date.fromisoformat(AMAZON_WINDOW[1])
    t0 = int(ts[keep].min()) if keep.any() else 0
    while True:
        s = max(utc(start), t0)
        win = keep & (ts >= s) & (ts < utc(end))
        if len(np.unique(items[win])) >= AMAZON_MIN_ITEMS or s <= t0:
            break
        m = start.year * 12 + start.month - 1 - 3
        start = datetime.date(m // 12, m % 12 + 1, 1)
    drop[f"interactions outside window [{time.strftime('%Y-%m-%d', time.gmtime(s))}, {end})"] = \
        int((keep & ~win).sum())
    idx = np.flatnonzero(win)
    if not len(idx):
        raise DataError(f"{raw.path}: no interactions left after the filters ({drop})")
    raw.users, raw.items = [raw.users[k] for k in idx], [raw.items[k] for k in idx]
    raw.ratings, raw.times, raw.lines = np.asarray(raw.ratings)[idx], ts[idx], [raw.lines[k] for k in idx]
    used = set(raw.items)
    raw.meta = {a: m for a, m in raw.meta.items() if a in used}
    return raw


def _csv(d):
    raw = Raw(os.path.join(d, "interactions.csv"), os.path.join(d, "items.csv"))
    for ln, r in _table(raw.path, "csv", ["user", "item", "timestamp"], optional=["rating"]):
        raw.add(ln, r["user"], r["item"], r.get("rating", 0), r["timestamp"])
    for ln, r in _table(raw.meta_path, "csv", ["item", "title"], optional=["description"]):
        raw.put(ln, r["item"], r["title"], r.get("description", ""))
    return raw.check()


ADJ = ["Crimson", "Silent", "Golden", "Broken", "Hidden", "Midnight", "Frozen", "Burning", "Lost",
       "Electric", "Velvet", "Iron", "Wild", "Distant", "Hollow", "Scarlet", "Quiet", "Savage",
       "Paper", "Emerald"]
NOUN = ["Harbor", "Empire", "Garden", "River", "Promise", "Frontier", "Mirror", "Kingdom", "Signal",
        "Orchard", "Highway", "Lantern", "Canyon", "Circus", "Tide", "Station", "Letter", "Forest",
        "Engine", "Island"]
GENRES = ["drama", "comedy", "thriller", "romance", "sci-fi", "western", "horror", "documentary"]
SYNTH_MIN_ITEMS = 2 * len(GENRES)  # every genre cycle needs >= 2 items


def _synthetic_params(kw):
    """--num-users/--num-items/--seed of the synthetic data, checked (None = the default)."""
    p = {}
    for k, default, lo, hi, flag in (("num_users", 600, 1, SYNTH_MAX, "--num-users"),
                                     ("num_items", 400, SYNTH_MIN_ITEMS, SYNTH_MAX, "--num-items"),
                                     ("seed", 0, 0, 2**63 - 1, "--seed")):
        v = kw.get(k)
        v = default if v is None else v
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
            raise DataError(f"synthetic: {flag} {v!r} must be an integer in [{lo:,}, {hi:,}]")
        p[k] = int(v)
    return p


def _synthetic(num_users=600, num_items=400, seed=0):
    """Planted structure: each user likes 2 of 8 genres; the next item is the current item's
    fixed successor (a cycle within its genre) w.p. 0.6, a popular liked-genre item w.p. 0.3,
    a popular item otherwise. A sequence model can learn ~60% hits; popularity cannot."""
    rng = np.random.default_rng(seed)
    N, U, G = num_items, num_users, len(GENRES)
    genre = rng.permutation(np.arange(N) % G)
    succ = np.empty(N, np.int64)
    for g in range(G):
        m = rng.permutation(np.flatnonzero(genre == g))
        succ[m] = np.roll(m, -1)
    pop = rng.permutation(1.0 / np.arange(1, N + 1) ** 0.8)
    cdf_all = np.cumsum(pop) / pop.sum()
    members = [np.flatnonzero(genre == g) for g in range(G)]
    cdf_g = [np.cumsum(pop[m]) / pop[m].sum() for m in members]
    draw = lambda g: members[g][min(np.searchsorted(cdf_g[g], rng.random()), len(members[g]) - 1)]
    quality = np.clip(rng.normal(3.5, 0.5, N), 1.5, 4.8)
    us, its, rs, ts = [], [], [], []
    t_start = 946684800  # 2000-01-01
    for u in range(U):
        likes = rng.choice(G, 2, replace=False)
        n = int(rng.integers(20, 41))
        cur, t = draw(likes[0]), t_start + int(rng.integers(0, 2 * 365 * 86400))
        seen = []
        for k in range(n):
            if k:
                r = rng.random()
                for _ in range(5):  # popular draws: avoid re-picking recently seen items
                    nxt = (succ[cur] if r < 0.6 else draw(likes[int(rng.integers(2))]) if r < 0.9
                           else min(np.searchsorted(cdf_all, rng.random()), N - 1))
                    if nxt not in seen[-20:]:
                        break
                cur = nxt
                t += 60 + int(rng.exponential(86400))
            seen.append(cur)
            liked = genre[cur] in likes
            rs.append(float(np.clip(round(quality[cur] + 0.7 * liked + rng.normal(0, 0.6)), 1, 5)))
            us.append(str(u + 1)); its.append(str(cur + 1)); ts.append(t)
    combos = rng.permutation(len(ADJ) * len(NOUN))
    meta = {}
    for i in range(N):
        a, b = divmod(int(combos[i % len(combos)]), len(NOUN))
        part = f" {i // len(combos) + 1}" if i >= len(combos) else ""
        title = f"{ADJ[a]} {NOUN[b]}{part} ({int(rng.integers(1950, 2021))})"
        desc = f"A {GENRES[genre[i]]} film about a {ADJ[a].lower()} {NOUN[b].lower()}."
        meta[str(i + 1)] = _item(str(i + 1), title, desc, round(float(quality[i]), 1),
                                 int(pop[i] * 1000) + 1)
    raw = Raw("synthetic", "synthetic")
    raw.users, raw.items, raw.ratings, raw.times = us, its, rs, ts
    used = set(its)
    raw.meta = {k: v for k, v in meta.items() if k in used}
    return raw


# ----------------------------------------------------------------------------- samples

def _index(raw_ids):
    """Unique raw ids in sorted order (numeric if all are integers) and each entry's 0-based code.
    Numeric order uses Python ints, so ids beyond int64 sort correctly instead of overflowing
    (ids over 4,000 digits, which Python will not convert, keep string order)."""
    uniq, codes = np.unique(np.asarray(raw_ids, dtype=str), return_inverse=True)
    ids = uniq.tolist()
    if all(re.fullmatch(r"-?\d{1,4000}", s) for s in ids):
        order = np.array(sorted(range(len(ids)), key=lambda k: int(ids[k])), np.int64)  # stable
        rank = np.empty_like(order); rank[order] = np.arange(len(order))
        uniq, codes = uniq[order], rank[codes]
    return uniq.tolist(), codes.reshape(-1).astype(np.int64)


def tie_key(user_raw, item_raw):
    """Stable 63-bit hash of (user, item) raw ids: breaks timestamp ties without item-id order."""
    h = hashlib.blake2b(f"{user_raw}\x1f{item_raw}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def _physical_memory():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no check
        return 0


def _build(raw, H, split):
    if not raw.items:
        raise DataError(f"{raw.path}: dataset is empty")
    user_ids, u = _index(raw.users)
    item_ids, it = _index(raw.items)
    it = it + 1  # 0 = padding
    tie = np.fromiter((tie_key(a, b) for a, b in zip(raw.users, raw.items)), np.int64, len(it))
    r, t = np.asarray(raw.ratings, np.float32), np.asarray(raw.times, np.int64)
    o = np.lexsort((r, tie, t, u))  # per user: time, then tie key (rating only for exact dups)
    u, it, r, t, tie = u[o], it[o], r[o], t[o], tie[o]
    n = len(u)
    starts = np.r_[0, np.flatnonzero(np.diff(u)) + 1]
    pos = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))  # position within user
    j = np.flatnonzero(pos >= 1)  # one sample per interaction with a predecessor
    j = j[np.lexsort((tie[j], t[j]))]  # global order: target time, then tie key (stable)
    if not len(j):
        raise DataError(f"{raw.path}: no samples (every user has fewer than 2 interactions)")
    need, mem = len(j) * H * 48, _physical_memory()  # [S,H] arrays + temporaries, bytes
    if mem and need > mem // 2:
        raise DataError(f"--history {H}: {len(j):,} samples x {H} would need ~{need / 2**30:,.0f} GiB "
                        f"(this machine has {mem / 2**30:,.0f} GiB); use a smaller --history")
    off = np.arange(H, 0, -1)  # column c holds the interaction `H - c` steps back
    idx = j[:, None] - off[None, :]  # [S,H]
    ok = off[None, :] <= pos[j][:, None]
    idx = np.where(ok, idx, 0)
    arr = {"user": u[j], "hist": np.where(ok, it[idx], 0), "hist_rating": np.where(ok, r[idx], 0),
           "hist_time": np.where(ok, t[idx], 0), "target": it[j], "rating": r[j], "time": t[j]}
    S = len(j)
    if split == "temporal":
        a, b = int(0.8 * S), int(0.9 * S)
        parts = [np.arange(a), np.arange(a, b), np.arange(b, S)]
    else:  # leave-one-out: per user, last sample -> test, second-to-last -> valid
        uj = arr["user"]
        back = np.empty(S, np.int64)  # 0 = user's last sample, 1 = second to last, ...
        last = {}
        for k in range(S - 1, -1, -1):
            back[k] = last.get(uj[k], -1) + 1
            last[uj[k]] = back[k]
        parts = [np.flatnonzero(back >= 2), np.flatnonzero(back == 1), np.flatnonzero(back == 0)]
    dt = {"hist_rating": np.float32, "rating": np.float32}
    splits = {s: Split(**{f: np.ascontiguousarray(arr[f][p]).astype(dt.get(f, np.int64)) for f in FIELDS})
              for s, p in zip(SPLITS, parts)}
    items = [{}] + [raw.meta[k] for k in item_ids]
    in_hist = (arr["hist"] == arr["target"][:, None]).any(1)
    words = np.array([len(x["title"].split()) for x in items[1:]])
    stats = {"users": len(user_ids), "items": len(item_ids), "interactions": n,
             "samples": {s: len(splits[s]) for s in SPLITS},
             "mean_history": float((arr["hist"] > 0).sum(1).mean()),
             "density": n / (len(user_ids) * len(item_ids)),
             "target_in_history": int(in_hist.sum()), "target_in_history_pct": 100 * float(in_hist.mean()),
             "time_span": [time.strftime("%Y-%m-%d", time.gmtime(int(x))) for x in (t.min(), t.max())],
             "title_words_mean": float(words.mean()), "title_words_max": int(words.max()),
             "with_description": sum(1 for x in items[1:] if x["description"]),
             "filters": raw.filters}
    return len(user_ids), items, splits, stats


# ----------------------------------------------------------------------------- cache + entry point

def _resolve(name, data_dir, kw, verbose):
    """-> (slug, input files for the cache key, synthetic parameters, parse function).
    Everything checkable without parsing is checked here, before any folder is created."""
    data_dir = os.path.expanduser(data_dir) if data_dir else None
    if name == "synthetic":
        p = _synthetic_params(kw)
        return f"synthetic-u{p['num_users']}-i{p['num_items']}-s{p['seed']}", [], p, lambda: _synthetic(**p)
    if name.startswith("ml-"):
        d = data_dir or _recbole_dir(name)
        if d is None:
            raise DataError(f"{name} not found: run `pip install --no-deps recbole==1.2.1`, or pass "
                            f"--data-dir DIR with u.data and u.item from {ML100K_URL}"
                            if name == "ml-100k" else
                            f"{name} not found: unzip https://files.grouplens.org/datasets/movielens/"
                            f"{name}.zip and pass --data-dir DIR")
        if not os.path.isdir(d):
            raise DataError(f"--data-dir {d}: not a directory")
        layout, path, meta = _movielens_files(d, name)
        return name, [path, meta], None, lambda: _movielens(layout, path, meta)
    if name.startswith("amazon-2023:") and len(name) > 12:
        cat = name.split(":", 1)[1]
        if not data_dir or not os.path.isdir(data_dir):
            raise DataError(f"{name}: pass --data-dir DIR holding {cat}.csv.gz and meta_{cat}.jsonl.gz "
                            f"(https://amazon-reviews-2023.github.io)")
        path, meta = _amazon_files(cat, data_dir)
        return f"amazon-2023_{cat}", [path, meta], None, lambda: _amazon(path, meta, verbose)
    if name.startswith("csv:") and len(name) > 4:
        d = os.path.abspath(os.path.expanduser(name[4:]))
        if not os.path.isdir(d):
            raise DataError(f"{name}: directory {d} not found")
        slug = f"csv_{os.path.basename(d)}_{hashlib.sha1(d.encode()).hexdigest()[:8]}"
        return slug, [os.path.join(d, "interactions.csv"), os.path.join(d, "items.csv")], None, \
            lambda: _csv(d)
    raise DataError(f"unknown dataset '{name}' (choose synthetic, ml-100k, ml-1m, "
                    f"amazon-2023:<Category>, or csv:<dir>)")


def _root(kw):
    return kw.get("cache_dir") or os.environ.get("R2EC_DATA_ROOT") or os.path.join(ROOT, "data")


def _fingerprint(path):
    """[path, size, blake2b of the bytes] of an input file, read in 1 MiB blocks (ml-100k ~5 ms, about
    1-2 s per GB): unlike size + mtime, it changes on an edit whose mtime was restored (cp -p, rsync -t,
    tar), so a stale cache is never read."""
    h, size = hashlib.blake2b(digest_size=16), 0
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
                size += len(block)
    except OSError:  # missing or unreadable: the parser reports it
        return [os.path.abspath(path), None]
    return [os.path.abspath(path), size, h.hexdigest()]


def _pid_alive(pid):
    """Whether process `pid` exists (our own counts; unknown = alive, so nothing is removed)."""
    if os.name != "posix" or pid == os.getpid():
        return True  # (on Windows os.kill(pid, 0) would terminate the process)
    if not 0 < pid < 2**31:
        return False
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def _remove_leftovers(base):
    """Remove `<key>.tmp<PID>` / `<key>.old<PID>` folders of builds that were killed. Only those
    whose PID is no longer a live process: a concurrent build's temp folder is never touched."""
    try:
        names = os.listdir(base)
    except OSError:
        return
    for n in names:
        m = re.fullmatch(r"[0-9a-f]{16}\.(?:tmp|old)(\d{1,12})", n)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(os.path.join(base, n), ignore_errors=True)


def _read_cache(path, name, key, history):
    """The Dataset cached in `path`; any missing/truncated/inconsistent file raises."""
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    with open(os.path.join(path, "items.json")) as f:
        items = json.load(f)
    with np.load(os.path.join(path, "arrays.npz")) as z:  # allow_pickle=False: plain arrays only
        splits = {s: Split(**{f: z[f"{s}__{f}"] for f in FIELDS}) for s in SPLITS}
    if meta["key"] != key or len(items) != meta["num_items"] + 1:
        raise ValueError("meta.json does not match the key or items.json")
    for s, sp in splits.items():
        if sp.hist.shape != (len(sp), history) or any(len(getattr(sp, f)) != len(sp) for f in FIELDS):
            raise ValueError(f"{s} arrays have inconsistent shapes")
    return Dataset(name, meta["num_items"], meta["num_users"], items, meta["domain"], **splits,
                   stats=meta["stats"], history=history)


def _write_synced(path, write):
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _write_cache(path, key, ds, replace):
    """Write ds into `<path>.tmp<PID>` (every file fsynced), then rename it to `path` in one step:
    readers see no cache or a whole one. replace: move an existing `path` aside first."""
    tmp = f"{path}.tmp{os.getpid()}"
    meta = {"name": ds.name, "num_items": ds.num_items, "num_users": ds.num_users, "key": key,
            "domain": ds.domain, "stats": ds.stats}
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        _write_synced(os.path.join(tmp, "arrays.npz"), lambda f: np.savez(
            f, **{f"{s}__{x}": getattr(ds.split(s), x) for s in SPLITS for x in FIELDS}))
        _write_synced(os.path.join(tmp, "items.json"), lambda f: f.write(json.dumps(ds.items).encode()))
        _write_synced(os.path.join(tmp, "meta.json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))
        fsync_dir(tmp)
        if replace and os.path.isdir(path):
            old = f"{path}.old{os.getpid()}"
            try:
                os.rename(path, old)
            except OSError:
                pass  # another process moved it first
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, path)
        except OSError:
            if not os.path.isfile(os.path.join(path, "meta.json")):
                raise
            # else another process finished the same build first: keep its copy
        fsync_dir(os.path.dirname(path))
    except OSError as e:
        raise DataError(f"cache folder {os.path.dirname(path)}: cannot write ({e.strerror or e}); "
                        f"point R2EC_DATA_ROOT at a writable folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; removed on any failure


def load_dataset(name, data_dir=None, history=20, rebuild=False, verbose=True, split="temporal", **kw):
    """Build (or load from cache) the dataset `name`; see the module docstring for sources."""
    if isinstance(history, bool) or not isinstance(history, (int, np.integer)) or history < 1:
        raise DataError(f"--history {history!r}: must be an integer >= 1")
    if split not in ("temporal", "loo"):
        raise DataError(f"--split {split}: choose temporal or loo")
    history = int(history)
    slug, files, params, parse = _resolve(str(name), data_dir, kw, verbose)
    proto = {"version": PROTOCOL_VERSION, "name": name, "history": history, "split": split,
             "amazon_window": list(AMAZON_WINDOW), "amazon_min_items": AMAZON_MIN_ITEMS}
    inputs = [proto, params, [_fingerprint(f) for f in files]]  # each input file's bytes hashed once
    key = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]
    base = os.path.join(_root(kw), re.sub(r"[^A-Za-z0-9._-]", "_", slug))
    path = os.path.join(base, key)
    _remove_leftovers(base)
    if not rebuild and os.path.isdir(path):
        try:
            ds = _read_cache(path, name, key, history)
        except Exception as e:  # any damage to a cache we wrote (truncated, edited, lost) -> rebuild
            why = (str(e).splitlines() or [""])[0][:160]
            print(f"notice: cache {path} was unreadable ({type(e).__name__}: {why}); rebuilding",
                  file=sys.stderr)
            rebuild = True
        else:
            if verbose:
                print(format_stats(ds) + f"\n(cached: {path})")
            return ds
    t0 = time.time()
    num_users, items, splits, stats = _build(parse(), history, split)
    stats["protocol"] = proto
    ds = Dataset(name, len(items) - 1, num_users, items, domain_for(name), **splits, stats=stats,
                 history=history)
    _write_cache(path, key, ds, replace=rebuild)
    if verbose:
        print(format_stats(ds) + f"\n(built in {time.time() - t0:.1f}s: {path})")
    return ds


def train_indices(step, B, n, seed):
    """Training samples of step `step`: positions step*B .. step*B+B-1 of a seeded permutation per epoch.
    A pure function of (step, seed), so a resumed run draws exactly the users the interrupted one would."""
    pos = np.arange(step * B, step * B + B)
    out = np.empty(B, dtype=np.int64)
    for ep in np.unique(pos // n):
        sel = pos // n == ep
        out[sel] = np.random.default_rng([seed, int(ep)]).permutation(n)[pos[sel] % n]
    return out


def load_for_run(cfg, data_dir=None, verbose=True):
    """The dataset of a run config (train.py's flags or a checkpoint's run_config.json)."""
    kw = {"num_users": cfg["synthetic_users"], "num_items": cfg["synthetic_items"]} \
        if cfg["dataset"] == "synthetic" else {}
    return main_first(load_dataset, cfg["dataset"], data_dir=data_dir or cfg.get("data_dir"),
                      history=cfg["history"], verbose=verbose and is_main(), **kw)


def format_stats(ds):
    s, p = ds.stats, ds.stats.get("protocol", {})
    n = s["samples"]
    split = "leave-one-out" if p.get("split") == "loo" else "temporal 80/10/10 by target time"
    lines = [f"dataset {ds.name} | protocol v{p.get('version')}: per-user time order, ties by "
             f"blake2b(user, item), H={ds.history}, split {split}, item ids = sorted raw ids"]
    for k, v in s.get("filters", {}).items():
        lines.append(f"  filter: {k}: {v:,} removed")
    lines += [f"users {s['users']:,} | items {s['items']:,} | interactions {s['interactions']:,} | "
              f"density {100 * s['density']:.2f}% | {s['time_span'][0]} .. {s['time_span'][1]}",
              f"samples {sum(n.values()):,}: train {n['train']:,} / valid {n['valid']:,} / "
              f"test {n['test']:,} | mean history length {s['mean_history']:.2f}",
              f"targets also in their own history window: {s['target_in_history']:,} "
              f"({s['target_in_history_pct']:.2f}%)",
              f"titles: {s['title_words_mean']:.1f} words mean, {s['title_words_max']} max | "
              f"with description {s['with_description']:,} | domain {ds.domain}"]
    return "\n".join(lines)


def main(argv=None):
    ap = CLIParser(description="Prepare a dataset (the paper's protocol, arXiv 2505.16994 §4 setup) "
                               "and print its statistics.")
    ap.add_argument("--dataset", default="ml-100k",
                    help="synthetic | ml-100k | ml-1m | amazon-2023:<Category> | csv:<dir>")
    ap.add_argument("--data-dir", default=None, help="directory holding the raw files")
    ap.add_argument("--history", type=pos_int, default=20, help="history window H: the most recent items a sample keeps")
    ap.add_argument("--split", default="temporal", choices=["temporal", "loo"],
                    help="temporal 80/10/10 by target time (default, the paper's setup) or leave-one-out")
    ap.add_argument("--rebuild", action="store_true", help="ignore the cache and rebuild")
    # synthetic data
    ap.add_argument("--num-users", type=pos_int, default=600, help="synthetic: number of users")
    ap.add_argument("--num-items", type=pos_int, default=400,
                    help=f"synthetic: number of items (>= {SYNTH_MIN_ITEMS})")
    ap.add_argument("--seed", type=nonneg_int, default=0, help="synthetic: random seed")
    args = ap.parse_args(argv)
    run_cli(lambda: load_dataset(args.dataset, args.data_dir, args.history, args.rebuild, split=args.split,
                                 num_users=args.num_users, num_items=args.num_items, seed=args.seed))


if __name__ == "__main__":
    main()
