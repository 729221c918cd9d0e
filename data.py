"""
Data: raw interactions -> next-item samples, split in time order, cached.

    python data.py --dataset synthetic:60x40        # seeded toy data, <users>x<items>, < 2 s
    python data.py --dataset ml-100k                # default real dataset
    python data.py --dataset amazon-2023:Video_Games --data-dir ~/amazon [--download]
    python data.py --dataset csv:path/to/dir        # your own data

Protocol (arXiv 2505.16994 §4, as its reference code builds it): per user, interactions sorted by timestamp,
ties broken by blake2b(user raw id, item raw id) (never by item-id order). Every interaction at position
i >= 1 is a sample: history = the previous min(i, H) items, oldest first, left-padded with 0; target = item i.
Samples are sorted globally by (target time, same tie key) and split 80/10/10 in that order (train = first
int(0.8 S), valid = up to int(0.9 S), test = rest); `--split loo` (each user's last sample -> test, the one
before -> valid) is an option, never the default. Item ids 1..N follow the sorted raw ids (numeric if every
raw id is an integer, of any size); 0 is padding. The catalog is the set of items that have interactions.
Timestamps are int64 unix seconds everywhere.

Formats (`--dataset`; one FORMATS entry each, picked by the longest name prefix; details in README.md):
- `synthetic[:<users>x<items>]` (`synthetic` = synthetic:600x400; `--seed`): planted data, see _synthetic.
- `synthetic-knowledge:<users>x<items>[:no-corpus]` (`--seed`; train.py's too): the knowledge world, see
  _knowledge; its items' `followed_by` is the LM stage's corpus (Dataset.relation); :no-corpus drops it.
- `ml-100k`, `ml-1m`, `ml-latest-small`, ...: `--data-dir DIR` holding MovieLens `u.data` + `u.item`,
  `ratings.dat` + `movies.dat`, `ratings.csv` + `movies.csv`, or RecBole's `<name>.inter` + `<name>.item`
  (see _movielens). Else ml-100k from an installed `recbole` (`pip install --no-deps recbole==1.2.1`), else
  ml-100k / ml-1m downloaded from GroupLens (env R2EC_DOWNLOAD_URL), md5-checked against GROUPLENS_MD5,
  unpacked once into <root>/downloads/<name>/. Titles carry the year; description = genre list.
- `amazon-2023:<Category>` (`--data-dir DIR`): `<Category>.csv[.gz]` (5-core rating-only, timestamps in ms)
  + `meta_<Category>.jsonl[.gz]`; `--download` fetches the missing ones (env R2EC_AMAZON_URL; each gzip file
  is read through: no checksum is published). Filters (counts printed; docs/design.md): items need a title
  (HTML-unescaped, no `<span id`, > 1 character, <= 20 words) and a numeric price; interactions of removed or
  metadata-less items are dropped; window [2022-10-01, 2023-10-01), start moved back 3 months while it holds
  < 10,000 items (never before the data's start).
- `csv:<dir>`: `interactions.csv` (header `user,item,timestamp[,rating]`, unix seconds, rating 0 = unknown)
  + `items.csv` (header `item,title[,description]`; UTF-8, CSV quoting, other columns refused). Every
  interacted item needs a title; unused items are ignored (count printed), as is a repeated identical row
  (a conflicting one is refused).
Each failure is one DataError line ("file:line: problem", or a download's URL and what went wrong: HTTP
error, truncation, checksum, no answer in R2EC_DOWNLOAD_TIMEOUT=30 s, no network); the CLI prints it and
exits 2. Nothing half-written is left: downloads go to `<file>.tmp<PID>/`, are checked, then renamed.
Cache: data/<slug>/<key>/ (root: R2EC_DATA_ROOT or cache_dir=), keyed by every protocol parameter and the
input files (path, size, blake2b of the bytes: an edit that keeps size and mtime still rebuilds), written
fsynced to `<key>.tmp<PID>`, then renamed. An unreadable cache is rebuilt (one notice line); leftovers of
killed builds and downloads are removed.
"""
import calendar, contextlib, csv, datetime, functools, gzip, hashlib, html, importlib.util, json, math, os
import re, shutil, sys, time, zipfile, zlib
from dataclasses import dataclass

import numpy as np

from common import (KNOWLEDGE_FACT, CLIParser, UserError, fsync_dir, fsync_tree, is_main, main_first,
                    nonneg_int, pos_int, run_cli)

PROTOCOL_VERSION = 1  # bump when samples, filters or the synthetic generator change
ROOT = os.path.dirname(os.path.abspath(__file__))
AMAZON_WINDOW = ("2022-10-01", "2023-10-01")  # [start, end) UTC
AMAZON_MIN_ITEMS = 10_000  # move the window start back 3 months while fewer items
GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens"  # env R2EC_DOWNLOAD_URL overrides
GROUPLENS_MD5 = {"ml-100k": "0e33842e24a9c977be4e0107933c0723",  # published next to each archive,
                 "ml-1m": "c4d9eecfca2ab87c1945afe126590906"}    # in <name>.zip.md5
AMAZON_URL = "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_2023"  # env R2EC_AMAZON_URL overrides
TIME_RANGE = (0, 4102444800)  # accepted timestamps, unix seconds: [1970-01-01, 2100-01-01)
SYNTH_MAX = 1_000_000  # synthetic: most users / items (the generator is a Python loop)
ML_GENRES = ("unknown Action Adventure Animation Children's Comedy Crime Documentary Drama Fantasy Film-Noir "
             "Horror Musical Mystery Romance Sci-Fi Thriller War Western").split()  # u.item flag order

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

class DataError(UserError):
    """A user-facing data problem: one line naming the file/line and what is wrong."""

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

    @functools.cached_property
    def relation(self):
        """[N + 1] the item each item is followed by, as its metadata states it (`followed_by`, a raw id: the
        knowledge corpus of synthetic-knowledge), 0: none or not in the catalog. All 0: the data has none."""
        return _relation(self.items)

    def train_counts(self):
        return np.bincount(self.train.target, minlength=self.num_items + 1).astype(np.int64)

# ----------------------------------------------------------------------------- reading files
def _rows(path, sep, encoding="utf-8"):
    """Yield (line number, fields) of a text file (.gz transparently); sep "csv" = CSV quoting.
    Blank lines are skipped; read/decompress/decode problems become one-line DataErrors."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding=encoding, newline="") as f:
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
    """Yield (line number, {column: stripped value}). header=True: the first row names the columns (RecBole
    'name:type' cells too) and must contain `cols`; with `optional` given, others are refused. header=False:
    `cols` are positional. Every row has exactly the header's fields (a longer one: an unquoted separator)."""
    rows, names = _rows(path, sep, encoding), cols
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
        unused = len(self.meta.keys() - set(self.items))
        if unused:
            self.filters["metadata items without interactions (not in catalog)"] = unused
        return self

# ----------------------------------------------------------------------------- sources
def _genres(names):
    names = [g for g in names if g and not g.startswith("(")]  # "(no genres listed)"
    return "Genres: " + ", ".join(names) + "." if names else ""

def _download(url, dest, hint, verbose, md5=None):
    """url -> dest via `dest.tmp<PID>/` (a killed run's is removed by the next), checked against md5 (else
    read through as gzip: Amazon publishes no checksum), then renamed. Failures: one DataError, no file."""
    import http.client, urllib.error, urllib.request
    from tqdm import tqdm
    t = os.environ.get("R2EC_DOWNLOAD_TIMEOUT") or "30"
    if not re.fullmatch(r"\d+(\.\d*)?", t) or float(t) <= 0:
        raise DataError(f"R2EC_DOWNLOAD_TIMEOUT={t}: expected a number of seconds > 0")
    folder, tmp, h = os.path.dirname(dest), f"{dest}.tmp{os.getpid()}", hashlib.md5()
    part = os.path.join(tmp, os.path.basename(dest))
    _remove_leftovers(folder, re.escape(os.path.basename(dest)))
    try:
        os.makedirs(tmp, exist_ok=True)
        with urllib.request.urlopen(url, timeout=float(t)) as r, open(part, "wb") as f:
            total, have = r.length, 0  # length: the Content-Length header, None if not sent
            if verbose:
                print(f"downloading {url} -> {dest}", file=sys.stderr)
            with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(dest),
                      disable=None if verbose else True) as bar:  # None: shown on a terminal only
                while block := r.read(1 << 20):
                    have += f.write(block)
                    h.update(block), bar.update(len(block))
        fsync_tree(tmp)
        why = (f"truncated at {have:,} of {total:,} bytes" if total not in (None, have) else
               f"md5 {h.hexdigest()} is not the published {md5}" if md5 and h.hexdigest() != md5 else None)
        if why:
            raise DataError(f"{url}: {why}; run again, or {hint}")
        if md5 is None:  # a whole gzip file reads to its end
            with gzip.open(part) as g, open(os.devnull, "wb") as null:
                shutil.copyfileobj(g, null, 1 << 24)
        os.replace(part, dest)
        fsync_dir(folder)
    except (OSError, EOFError, zlib.error, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)  # URLError wraps the OSError
        why = (f"HTTP {e.code} {e.reason}" if isinstance(e, urllib.error.HTTPError) else
               f"no answer in {float(t):g} s (set R2EC_DOWNLOAD_TIMEOUT to wait longer)"
               if isinstance(reason, TimeoutError) else f"cannot connect ({reason}); check the network"
               if isinstance(e, urllib.error.URLError) else f"not a whole gzip file ({e})"
               if isinstance(e, (EOFError, zlib.error, gzip.BadGzipFile)) else f"download failed ({e})")
        raise DataError(f"{url}: {why}; run again, or {hint}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # empty after the rename; removed on any failure
    return dest

def _grouplens(name, kw):
    """GroupLens's archive of `name`: downloaded, md5-checked, unpacked once into <root>/downloads/<name>/."""
    base, md5 = os.path.join(_root(kw), "downloads"), GROUPLENS_MD5[name]
    d, url = os.path.join(base, name), f"{os.environ.get('R2EC_DOWNLOAD_URL') or GROUPLENS_URL}/{name}.zip"
    if os.path.isdir(d):
        return d
    hint = f"pass --data-dir DIR holding {url} unzipped" + \
        (", or `pip install --no-deps recbole==1.2.1`" if name == "ml-100k" else "")
    _remove_leftovers(base, re.escape(name))
    tmp = f"{d}.tmp{os.getpid()}"
    try:
        zip_path = _download(url, os.path.join(tmp, f"{name}.zip"), hint, kw.get("verbose"), md5)
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(tmp)
        fsync_tree(os.path.join(tmp, name))
        os.rename(os.path.join(tmp, name), d)  # the archive holds one folder, <name>/
        fsync_dir(base)
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(f"{url}: cannot unpack ({e}); run again, or {hint}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return d

def _movielens_files(name, rest, data_dir, kw):
    """FORMATS "ml-": the MovieLens copy in data_dir, else recbole's, else GroupLens's (downloaded)."""
    d = data_dir or _recbole_dir(name) or (_grouplens(name, kw) if name in GROUPLENS_MD5 else None)
    if d is None:
        raise DataError(f"{name} not found: unzip {GROUPLENS_URL}/{name}.zip and pass --data-dir DIR")
    if not os.path.isdir(d):
        raise DataError(f"--data-dir {d}: not a directory")
    j = lambda f: os.path.join(d, f)
    for ratings, movies in (("u.data", "u.item"), ("ratings.dat", "movies.dat"),
                            ("ratings.csv", "movies.csv")):
        if os.path.isfile(j(ratings)) or ratings == "u.data" and os.path.isfile(j(movies)):
            return name, [j(ratings), j(movies)], None
    try:
        cands = [x for x in sorted(os.listdir(d)) if x.endswith(".inter")]
    except OSError as e:
        raise DataError(f"{d}: cannot list the folder ({e.strerror or e})") from None
    if not cands:
        raise DataError(f"{d}: no MovieLens files (expected u.data+u.item, ratings.dat+movies.dat, "
                        f"ratings.csv+movies.csv, or RecBole {name}.inter+{name}.item)")
    base = f"{name}.inter" if f"{name}.inter" in cands else cands[0]
    return name, [j(base), j(base[:-6] + ".item")], None

def _movielens(path, meta_path):
    """Parse one of the MovieLens layouts, told apart by the ratings file's name (see _movielens_files)."""
    UIRT, layout, raw = ["user", "item", "rating", "timestamp"], os.path.basename(path), Raw(path, meta_path)
    if layout == "u.data":
        for ln, r in _table(raw.path, "\t", UIRT, header=False):
            raw.add(ln, r["user"], r["item"], r["rating"], r["timestamp"])
        for ln, r in _table(raw.meta_path, "|", ["id", "title", "date", "video", "url"] + ML_GENRES,
                            "latin-1", header=False):
            raw.put(ln, r["id"], r["title"], _genres([g for g in ML_GENRES if r[g] == "1"]))
    elif layout == "ratings.dat":
        for ln, r in _table(raw.path, "::", UIRT, "latin-1", header=False):
            raw.add(ln, r["user"], r["item"], r["rating"], r["timestamp"])
        for ln, r in _table(raw.meta_path, "::", ["id", "title", "genres"], "latin-1", header=False):
            raw.put(ln, r["id"], r["title"], _genres(r["genres"].split("|")))
    elif layout == "ratings.csv":
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

def _amazon_files(name, cat, d, kw):
    """FORMATS "amazon-2023:": category `cat`'s ratings and metadata files in data_dir d (plain or .gz);
    download=True fetches the missing ones first."""
    pick = lambda base: next((os.path.join(d, base + z) for z in ("", ".gz")
                              if os.path.isfile(os.path.join(d, base + z))), None)
    url = os.environ.get("R2EC_AMAZON_URL") or AMAZON_URL
    if not d or not (os.path.isdir(d) or kw.get("download")):
        raise DataError(f"{name}: pass --data-dir DIR holding {cat}.csv.gz and meta_{cat}.jsonl.gz "
                        f"(https://amazon-reviews-2023.github.io), or add --download")
    for base, u in ((f"{cat}.csv", f"{url}/benchmark/5core/rating_only/{cat}.csv.gz"),
                    (f"meta_{cat}.jsonl", f"{url}/raw/meta_categories/meta_{cat}.jsonl.gz")):
        if pick(base) is None and kw.get("download"):
            _download(u, os.path.join(d, base + ".gz"), f"check the category name, or download it into {d}",
                      kw.get("verbose"))
        elif pick(base) is None:
            raise DataError(f"{d}: missing {base}[.gz]; download {u} into it (or add --download)")
    return f"amazon-2023_{cat}", [pick(f"{cat}.csv"), pick(f"meta_{cat}.jsonl")], None

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
        paras = dict.fromkeys(filter(None, map(_clean, map(str, desc if isinstance(desc, list) else [desc]))))
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

def _csv_files(name, rest, data_dir, kw):
    """FORMATS "csv:": the folder named after the prefix; slug = its name + a hash of its absolute path."""
    d = os.path.abspath(os.path.expanduser(rest))
    if not os.path.isdir(d):
        raise DataError(f"{name}: directory {d} not found")
    slug = f"csv_{os.path.basename(d)}_{hashlib.sha1(d.encode()).hexdigest()[:8]}"
    return slug, [os.path.join(d, "interactions.csv"), os.path.join(d, "items.csv")], None

def _csv(path, meta_path):
    raw = Raw(path, meta_path)
    for ln, r in _table(raw.path, "csv", ["user", "item", "timestamp"], optional=["rating"]):
        raw.add(ln, r["user"], r["item"], r.get("rating", 0), r["timestamp"])
    for ln, r in _table(raw.meta_path, "csv", ["item", "title"], optional=["description"]):
        raw.put(ln, r["item"], r["title"], r.get("description", ""))
    return raw.check()

ADJ = ("Crimson Silent Golden Broken Hidden Midnight Frozen Burning Lost Electric Velvet Iron Wild Distant "
       "Hollow Scarlet Quiet Savage Paper Emerald").split()
NOUN = ("Harbor Empire Garden River Promise Frontier Mirror Kingdom Signal Orchard Highway Lantern Canyon "
        "Circus Tide Station Letter Forest Engine Island").split()
GENRES = ["drama", "comedy", "thriller", "romance", "sci-fi", "western", "horror", "documentary"]
SYNTH_MIN_ITEMS = 2 * len(GENRES)  # every genre cycle needs >= 2 items

def _synthetic_files(name, rest, data_dir, kw):
    """FORMATS "synthetic": `synthetic` (600x400) or `synthetic:<users>x<items>`, seed= (default 0) -> (slug,
    no files, the generator's parameters). Legacy num_users=/num_items= (None = default) size a plain one."""
    m = re.fullmatch(r":([1-9]\d*)x([1-9]\d*)", rest)
    form = (f"dataset {name!r}: expected synthetic or synthetic:<users>x<items>, users in "
            f"[1, {SYNTH_MAX:,}], items in [{SYNTH_MIN_ITEMS}, {SYNTH_MAX:,}] (e.g. synthetic:60x40)")
    if rest and not m or m and any(kw.get(k) is not None for k in ("num_users", "num_items")):
        raise DataError(form + (", and no num_users=/num_items=" if m else ""))
    given = {"num_users": int(m[1]), "num_items": int(m[2]), "seed": kw.get("seed")} if m else kw
    p = {}
    for k, default, lo, hi in (("num_users", 600, 1, SYNTH_MAX),
                               ("num_items", 400, SYNTH_MIN_ITEMS, SYNTH_MAX), ("seed", 0, 0, 2**63 - 1)):
        v = default if given.get(k) is None else given[k]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
            raise DataError(form if m and k != "seed" else
                            f"synthetic: {k} {v!r} must be an integer in [{lo}, {hi:,}]")
        p[k] = int(v)
    return f"synthetic-u{p['num_users']}-i{p['num_items']}-s{p['seed']}", [], p

def _synthetic(num_users=600, num_items=400, seed=0):
    """Planted: each user likes 2 of 8 genres; the next item is the current one's fixed successor (a cycle in
    its genre) w.p. 0.6, a popular liked-genre item w.p. 0.3, else a popular item: a sequence model can learn
    ~60% hits, popularity cannot."""
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
        cur, t, seen = draw(likes[0]), t_start + int(rng.integers(0, 2 * 365 * 86400)), []
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
    combos, meta = rng.permutation(len(ADJ) * len(NOUN)), {}
    for i in range(N):
        a, b = divmod(int(combos[i % len(combos)]), len(NOUN))
        part = f" {i // len(combos) + 1}" if i >= len(combos) else ""
        title = f"{ADJ[a]} {NOUN[b]}{part} ({int(rng.integers(1950, 2021))})"
        desc = f"A {GENRES[genre[i]]} film about a {ADJ[a].lower()} {NOUN[b].lower()}."
        meta[str(i + 1)] = _item(str(i + 1), title, desc, round(float(quality[i]), 1), int(pop[i] * 1000) + 1)
    raw = Raw("synthetic", "synthetic")
    raw.users, raw.items, raw.ratings, raw.times = us, its, rs, ts
    used = set(its)
    raw.meta = {k: v for k, v in meta.items() if k in used}
    return raw

KNOWLEDGE_MAX = (100_000, 20_000)   # synthetic-knowledge: most users, items (a draw scans the catalog)

def _knowledge_files(name, rest, data_dir, kw):
    """FORMATS "synthetic-knowledge:": `<users>x<items>[:no-corpus]`, seed= (train.py: its --seed)."""
    m = re.fullmatch(r"([1-9]\d*)x([1-9]\d*)(:no-corpus)?", rest)
    if not m or int(m[1]) > KNOWLEDGE_MAX[0] or not SYNTH_MIN_ITEMS <= int(m[2]) <= KNOWLEDGE_MAX[1]:
        raise DataError(f"dataset {name!r}: expected synthetic-knowledge:<users>x<items>[:no-corpus], users "
                        f"in [1, {KNOWLEDGE_MAX[0]:,}], items in [{SYNTH_MIN_ITEMS}, {KNOWLEDGE_MAX[1]:,}] "
                        f"(e.g. synthetic-knowledge:600x400)")
    seed = 0 if kw.get("seed") is None else kw["seed"]
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise DataError(f"synthetic-knowledge: seed {seed!r} must be an integer >= 0")
    p = {"num_users": int(m[1]), "num_items": int(m[2]), "seed": int(seed), "corpus": not m[3]}
    return f"synthetic-knowledge-u{m[1]}-i{m[2]}-s{seed}" + "-nocorpus" * bool(m[3]), [], p

def _knowledge(num_users=600, num_items=400, seed=0, corpus=True):
    """The planted-knowledge world (README, *The knowledge world*): what an LM could know about the items that
    the interactions mostly do not show. Items come out over two years, each with a genre, a popularity and
    a hidden relation: it is followed by an older item (released 30 to 365 days before it). A user's next
    item is the last one's successor w.p. 0.5 (never twice in a row), else a draw from their two genres
    (0.8) or any, weighted by popularity x (w.p. 0.8) recency (an e-fold per 15 days from release). Late
    samples follow the relation from NEW items, so most valid/test pairs never occur in train (stats print
    it). The corpus (items' `followed_by`) states every pair; corpus=False: the same world without it.
    Items are a function of (num_items, seed) only; users come from their own stream."""
    rng = np.random.default_rng([seed, 77, 0])
    N, G, span = num_items, len(GENRES), 720   # days
    release = np.sort(rng.uniform(-20, span + 10, N))
    lo, hi = np.searchsorted(release, release - 365), np.searchsorted(release, release - 30)
    succ = np.array([rng.integers(a, b) if b > a else (i + 1 + rng.integers(N - 1)) % N   # the first: any
                     for i, (a, b) in enumerate(zip(lo, hi))])
    genre = rng.integers(0, G, N)
    pop = rng.permutation(1.0 / np.arange(1, N + 1) ** 0.8)
    quality = np.clip(rng.normal(3.5, 0.5, N), 1.5, 4.8)
    combos, meta = rng.permutation(len(ADJ) * len(NOUN)), {}
    for i in range(N):
        a, b = divmod(int(combos[i % len(combos)]), len(NOUN))
        part = f" {i // len(combos) + 1}" if i >= len(combos) else ""
        meta[str(i + 1)] = _item(str(i + 1), f"{ADJ[a]} {NOUN[b]}{part} ({2000 + int(release[i] // 365)})",
                                 f"A {GENRES[genre[i]]} film.")
        if corpus:
            meta[str(i + 1)]["followed_by"] = str(succ[i] + 1)
    rng = np.random.default_rng([seed, 77, 1])
    us, its, rs, ts = [], [], [], []
    for u in range(num_users):
        likes = rng.choice(G, 2, replace=False)
        taste = pop * np.where(np.isin(genre, likes), 0.8 / 2, 0.2 / (G - 2))
        t, seen, hop = float(rng.uniform(0, span)), [], False
        for k in range(int(rng.integers(8, 21))):
            if k and not hop and rng.random() < 0.5 and succ[seen[-1]] not in seen:
                nxt, hop = int(succ[seen[-1]]), True
            else:
                fresh = np.exp(-np.abs(t - release) / 15.0) if rng.random() < 0.8 else 1.0
                w = taste * fresh * (release <= t + 3)
                w[seen] = 0
                nxt, hop = int(rng.choice(N, p=w / w.sum())) if w.sum() > 0 else int(rng.integers(N)), False
            seen.append(nxt)
            liked = genre[nxt] in likes
            rs.append(float(np.clip(round(quality[nxt] + 0.7 * liked + rng.normal(0, 0.6)), 1, 5)))
            us.append(str(u + 1)); its.append(str(nxt + 1))
            ts.append(946684800 + int(t * 86400))   # from 2000-01-01
            t += 0.01 + rng.exponential(1.5)
    raw = Raw("synthetic-knowledge", "synthetic-knowledge")
    raw.users, raw.items, raw.ratings, raw.times = us, its, rs, ts
    raw.meta = {k: v for k, v in meta.items() if k in set(its)}
    return raw

# Dataset formats: name prefix (the longest match; one ending in ':' needs more) -> (choices named in errors,
# files, parse): files(name, rest of the name, data_dir, kw) -> (cache slug, input files, parameters or None),
# parse(files, parameters, verbose) -> Raw. A new format is one entry, its files function and its parser.
FORMATS = {
    "synthetic": ("synthetic", _synthetic_files, lambda files, p, verbose: _synthetic(**p)),
    "synthetic-knowledge:": ("synthetic-knowledge:<users>x<items>", _knowledge_files,
                             lambda files, p, verbose: _knowledge(**p)),
    "ml-": ("ml-100k, ml-1m", _movielens_files, lambda files, p, verbose: _movielens(*files)),
    "amazon-2023:": ("amazon-2023:<Category>", _amazon_files, lambda files, p, v: _amazon(*files, v)),
    "csv:": ("csv:<dir>", _csv_files, lambda files, p, verbose: _csv(*files)),
}

# ----------------------------------------------------------------------------- samples
def _index(raw_ids):
    """Unique raw ids in sorted order (numeric if all are integers, as Python ints: beyond int64 too; ids over
    4,000 digits, which Python will not convert, keep string order) and each entry's 0-based code."""
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
    ok = off[None, :] <= pos[j][:, None]
    idx = np.where(ok, j[:, None] - off[None, :], 0)  # [S,H]
    arr = {"user": u[j], "hist": np.where(ok, it[idx], 0), "hist_rating": np.where(ok, r[idx], 0),
           "hist_time": np.where(ok, t[idx], 0), "target": it[j], "rating": r[j], "time": t[j]}
    S = len(j)
    if split == "temporal":
        a, b = int(0.8 * S), int(0.9 * S)
        parts = [np.arange(a), np.arange(a, b), np.arange(b, S)]
    else:  # leave-one-out: per user, last sample -> test, second-to-last -> valid
        uj, last = arr["user"], {}
        back = np.empty(S, np.int64)  # 0 = user's last sample, 1 = second to last, ...
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
             "with_description": sum(1 for x in items[1:] if x["description"]), "filters": raw.filters}
    if any("followed_by" in x for x in items[1:]):
        stats["knowledge"] = _knowledge_stats(items, splits)
    return len(user_ids), items, splits, stats

def _relation(items):
    """Dataset.relation of an item list: each item's `followed_by` raw id as an item id, 0 when absent."""
    ids = {it["raw_id"]: i for i, it in enumerate(items[1:], 1)}
    return np.array([0] + [ids.get(it.get("followed_by"), 0) for it in items[1:]], np.int64)

def _knowledge_stats(items, splits):
    """How much of the corpus's relation the interactions show: the valid/test targets that follow it from
    their last history item, and the share of those (last item, target) pairs no train sample shows."""
    rel = _relation(items)
    tr = splits["train"]
    seen = set(zip(tr.hist[:, -1].tolist(), tr.target.tolist()))   # left-padded: the newest is the last
    out = {"facts": int((rel > 0).sum())}
    for name, parts in (("valid", ["valid"]), ("test", ["test"]), ("valid+test", ["valid", "test"])):
        last = np.concatenate([splits[p].hist[:, -1] for p in parts])
        target = np.concatenate([splits[p].target for p in parts])
        hit = rel[last] == target
        new = [(a, b) not in seen for a, b in zip(last[hit].tolist(), target[hit].tolist())]
        out[name] = {"follow_pct": 100 * float(hit.mean()), "unseen_pct": 100 * float(np.mean(new or [0]))}
    return out

# ----------------------------------------------------------------------------- cache + entry point
def _resolve(name, data_dir, kw, verbose):
    """-> (name in the cache key, slug, input files, parameters, parse()), all checked before any folder is
    made. A format with parameters is keyed by its prefix + them (synthetic:60x40 keeps its pre-name key)."""
    prefix = max((p for p in FORMATS if name.startswith(p) and (name != p or p[-1] != ":")), key=len,
                 default=None)
    if prefix is None or name in FORMATS and name[-1] == ":":   # a bare "csv:" or "synthetic-knowledge:"
        *rest, last = [c for c, _, _ in FORMATS.values()]
        raise DataError(f"unknown dataset '{name}' (choose {', '.join(rest)}, or {last})")
    _, files_of, parse = FORMATS[prefix]
    slug, files, params = files_of(name, name[len(prefix):], data_dir and os.path.expanduser(data_dir),
                                   {**kw, "verbose": verbose})
    return name if params is None else prefix, slug, files, params, lambda: parse(files, params, verbose)

def _root(kw):
    return kw.get("cache_dir") or os.environ.get("R2EC_DATA_ROOT") or os.path.join(ROOT, "data")

def _fingerprint(path):
    """[path, size, blake2b of the bytes] of an input file, read in 1 MiB blocks (ml-100k ~5 ms, 1-2 s/GB)."""
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
    except OSError as e:  # EPERM: alive, another user's
        return not isinstance(e, ProcessLookupError)
    return True

def _remove_leftovers(base, stem=r"[0-9a-f]{16}"):
    """Remove the `<stem>.tmp<PID>` / `.old<PID>` folders of killed runs (never a live process's)."""
    try:
        names = os.listdir(base)
    except OSError:
        return
    for n in names:
        m = re.fullmatch(stem + r"\.(?:tmp|old)(\d{1,12})", n)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(os.path.join(base, n), ignore_errors=True)

def _read_cache(path, name, key, history):
    """The Dataset cached in `path`; any missing/truncated/inconsistent file raises."""
    with open(os.path.join(path, "meta.json")) as f, open(os.path.join(path, "items.json")) as g:
        meta, items = json.load(f), json.load(g)
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
            with contextlib.suppress(OSError):  # else another process moved it first
                os.rename(path, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, path)
        except OSError:  # fine if another process finished the same build first: its copy is kept
            if not os.path.isfile(os.path.join(path, "meta.json")):
                raise
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
    key_name, slug, files, params, parse = _resolve(str(name), data_dir, kw, verbose)
    if key_name == "synthetic-knowledge:":   # its seed is part of the world, so of its name (and baselines')
        name = f"{name} seed={params['seed']}"
    proto = {"version": PROTOCOL_VERSION, "name": key_name, "history": history, "split": split,
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
    name = cfg["dataset"]
    if name == "synthetic" and {"synthetic_users", "synthetic_items"} & set(cfg):  # sizes as keys
        name = f"synthetic:{cfg.get('synthetic_users', 600)}x{cfg.get('synthetic_items', 400)}"
    kw = {"seed": cfg.get("seed", 0)} if name.startswith("synthetic-knowledge:") else {}   # a world per seed
    return main_first(load_dataset, name, data_dir=data_dir or cfg.get("data_dir"), history=cfg["history"],
                      verbose=verbose and is_main(), **kw)

def format_stats(ds):
    s, p, n = ds.stats, ds.stats.get("protocol", {}), ds.stats["samples"]
    split = "leave-one-out" if p.get("split") == "loo" else "temporal 80/10/10 by target time"
    lines = [f"dataset {ds.name} | protocol v{p.get('version')}: per-user time order, ties by "
             f"blake2b(user, item), H={ds.history}, split {split}, item ids = sorted raw ids"]
    lines += [f"  filter: {k}: {v:,} removed" for k, v in s.get("filters", {}).items()]
    lines += [f"users {s['users']:,} | items {s['items']:,} | interactions {s['interactions']:,} | "
              f"density {100 * s['density']:.2f}% | {s['time_span'][0]} .. {s['time_span'][1]}",
              f"samples {sum(n.values()):,}: train {n['train']:,} / valid {n['valid']:,} / "
              f"test {n['test']:,} | mean history length {s['mean_history']:.2f}",
              f"targets also in their own history window: {s['target_in_history']:,} "
              f"({s['target_in_history_pct']:.2f}%)",
              f"titles: {s['title_words_mean']:.1f} words mean, {s['title_words_max']} max | "
              f"with description {s['with_description']:,} | domain {ds.domain}"]
    if "knowledge" in s:
        k = s["knowledge"]
        lines.append(f"knowledge corpus: {k['facts']:,} facts ({KNOWLEDGE_FACT!r}) | valid+test targets that "
                     f"follow it from the last history item: {k['valid+test']['follow_pct']:.1f}%, "
                     f"{k['valid+test']['unseen_pct']:.1f}% of those pairs never consecutive in train "
                     f"(valid {k['valid']['unseen_pct']:.1f}%, test {k['test']['unseen_pct']:.1f}%)")
    return "\n".join(lines)

def main(argv=None):
    ap = CLIParser(description="Prepare a dataset (the paper's protocol, arXiv 2505.16994 §4 setup) "
                               "and print its statistics.")
    ap.add_argument("--dataset", default="ml-100k",
                    help="synthetic[:<users>x<items>] | ml-100k | ml-1m | amazon-2023:<Category> | csv:<dir>")
    ap.add_argument("--data-dir", default=None, help="directory holding the raw files")
    ap.add_argument("--history", type=pos_int, default=20,
                    help="history window H: the most recent items a sample keeps")
    ap.add_argument("--split", default="temporal", choices=["temporal", "loo"],
                    help="temporal 80/10/10 by target time (default, the paper's setup) or leave-one-out")
    ap.add_argument("--rebuild", action="store_true", help="ignore the cache and rebuild")
    ap.add_argument("--seed", type=nonneg_int, default=0, help="synthetic: random seed")
    ap.add_argument("--download", action="store_true", help="amazon-2023: fetch its files into --data-dir")
    a = ap.parse_args(argv)
    run_cli(lambda: load_dataset(a.dataset, a.data_dir, a.history, a.rebuild, split=a.split, seed=a.seed,
                                 download=a.download))

if __name__ == "__main__":
    main()
