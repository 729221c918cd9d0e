"""data.py's downloads (ml-100k / ml-1m from GroupLens, amazon-2023 --download) against a loopback HTTP
server this file starts on 127.0.0.1: verified, atomic, a killed run's leftovers removed, and every failure
one line that leaves nothing half-written. No test reaches any other address; each takes well under 2 s."""
import calendar
import gzip
import hashlib
import http.server
import io
import json
import os
import re
import socket
import threading
import time
import zipfile

import pytest

import data
from data import DataError, load_dataset

UDATA = "".join(f"{u}\t{i}\t{r}\t{881250949 + k}\n"
                for k, (u, i, r) in enumerate([(3, 10, 4), (3, 1, 5), (7, 2, 3), (7, 1, 4), (7, 10, 2)]))
UITEM = "".join(f"{i}|{t}|01-Jan-1995||http://x|" + "|".join(["0"] * 5 + ["1"] + ["0"] * 13) + "\n"
                for i, t in ((1, "Crimson Harbor (1987)"), (2, "Silent River (1990)"),
                             (10, "Paper Tide (1999)")))


def ml_zip(name="ml-100k"):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(f"{name}/u.data", UDATA)
        z.writestr(f"{name}/u.item", UITEM)
        z.writestr(f"{name}/README", "tiny test copy\n")
    return buf.getvalue()


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


@pytest.fixture
def server():
    """files: path -> bytes; modes: path -> "truncate" (sends half the body) | "hang"; requests: paths."""
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            srv.requests.append(self.path)
            body, mode = srv.files.get(self.path), srv.modes.get(self.path)
            if mode == "hang":
                release.wait(10)  # bounded: the fixture releases it at teardown
                return
            if body is None:
                return self.send_error(404)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) // 2] if mode == "truncate" else body)

    srv = Server(("127.0.0.1", 0), Handler)
    srv.files, srv.modes, srv.requests = {}, {}, []
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    release.set()
    srv.shutdown()
    srv.server_close()
    t.join(5)


@pytest.fixture
def env(tmp_path, monkeypatch, server):
    """recbole looks absent; the data root is tmp; downloads go to the loopback server; a short timeout."""
    monkeypatch.setattr(data, "_recbole_dir", lambda name: None)
    monkeypatch.setenv("R2EC_DATA_ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("R2EC_DOWNLOAD_URL", server.url)
    monkeypatch.setenv("R2EC_AMAZON_URL", server.url + "/amazon")
    monkeypatch.setenv("R2EC_DOWNLOAD_TIMEOUT", "0.5")
    for var in ("no_proxy", "NO_PROXY"):  # never through an http_proxy: loopback only
        monkeypatch.setenv(var, "*")
    return tmp_path / "root" / "downloads"


def publish(monkeypatch, server, name="ml-100k", body=None):
    body = ml_zip(name) if body is None else body
    server.files[f"/{name}.zip"] = body
    monkeypatch.setitem(data.GROUPLENS_MD5, name, hashlib.md5(body).hexdigest())
    return body


def files_under(d):
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs) \
        if os.path.isdir(d) else []


@pytest.mark.parametrize("name", ["ml-100k", "ml-1m"])
def test_grouplens_download_verifies_unpacks_and_loads(env, server, monkeypatch, name):
    publish(monkeypatch, server, name)
    ds = load_dataset(name, verbose=False)
    assert ds.num_users == 2 and ds.titles == ["", "Crimson Harbor (1987)", "Silent River (1990)",
                                               "Paper Tide (1999)"]
    assert files_under(env) == [f"{name}/README", f"{name}/u.data", f"{name}/u.item"]  # no zip, part or tmp
    assert server.requests == [f"/{name}.zip"]
    load_dataset(name, verbose=False, rebuild=True)  # the unpacked copy is reused: nothing fetched again
    assert len(server.requests) == 1


def test_data_dir_then_package_come_before_a_download(env, server, monkeypatch, tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "u.data").write_text(UDATA)
    (d / "u.item").write_text(UITEM)
    assert load_dataset("ml-100k", data_dir=str(d), verbose=False).num_users == 2
    monkeypatch.setattr(data, "_recbole_dir", lambda name: str(d))
    assert load_dataset("ml-100k", verbose=False).num_users == 2
    assert server.requests == [] and not env.exists()


def test_a_killed_runs_leftovers_are_removed(env, server, monkeypatch, capsys):
    body = publish(monkeypatch, server)
    dead = 999999999  # no such PID
    part = env / f"ml-100k.tmp{dead}" / f"ml-100k.zip.tmp{dead}" / "ml-100k.zip"
    part.parent.mkdir(parents=True)
    part.write_bytes(body[:100])  # what a run killed while downloading leaves
    (env / f"ml-100k.tmp{dead}" / "ml-100k").mkdir()  # ... or while unpacking
    assert load_dataset("ml-100k").num_users == 2
    assert files_under(env) == ["ml-100k/README", "ml-100k/u.data", "ml-100k/u.item"]
    assert os.listdir(env) == ["ml-100k"]
    assert f"downloading {server.url}/ml-100k.zip" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["truncated", "checksum", "404", "hang", "no network", "not a zip"])
def test_download_failures_are_one_line_and_leave_nothing(env, server, monkeypatch, case):
    url = f"{server.url}/ml-100k.zip"
    if case == "no network":
        with socket.socket() as s:  # a loopback port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}/ml-100k.zip"
        monkeypatch.setenv("R2EC_DOWNLOAD_URL", url.rsplit("/", 1)[0])
    elif case != "404":
        publish(monkeypatch, server, body=b"not a zip at all" * 100 if case == "not a zip" else None)
    if case == "checksum":
        monkeypatch.setitem(data.GROUPLENS_MD5, "ml-100k", "0" * 32)
    server.modes["/ml-100k.zip"] = {"truncated": "truncate", "hang": "hang"}.get(case)
    with pytest.raises(DataError) as e:
        load_dataset("ml-100k", verbose=False)
    msg = str(e.value)
    want = {"truncated": r"truncated at [\d,]+ of [\d,]+ bytes",
            "checksum": "md5 [0-9a-f]{32} is not the published 0{32}",
            "404": "HTTP 404 Not Found", "hang": r"no answer in 0\.5 s", "no network": r"cannot connect \(",
            "not a zip": "cannot unpack"}[case]
    assert "\n" not in msg and re.search(want, msg), msg  # and it names the URL and what to do instead:
    assert url in msg and "--data-dir" in msg and "pip install --no-deps recbole==1.2.1" in msg, msg
    assert files_under(env) == []


def test_bad_timeout_setting(env, monkeypatch, server):
    publish(monkeypatch, server)
    monkeypatch.setenv("R2EC_DOWNLOAD_TIMEOUT", "soon")
    with pytest.raises(DataError, match="R2EC_DOWNLOAD_TIMEOUT=soon: expected a number of seconds > 0"):
        load_dataset("ml-100k", verbose=False)


def amazon_pair(cat="Video_Games"):
    rows = [("U1", "A1", 5.0, "2023-01-05"), ("U1", "A2", 4.0, "2023-01-06"), ("U2", "A2", 2.0, "2023-03-01"),
            ("U2", "A1", 1.0, "2023-03-02")]
    ms = lambda day: calendar.timegm(time.strptime(day, "%Y-%m-%d")) * 1000
    csv_text = "user_id,parent_asin,rating,timestamp\n" + "".join(f"{u},{a},{r},{ms(t)}\n"
                                                                  for u, a, r, t in rows)
    meta = "".join(json.dumps({"parent_asin": a, "title": t, "price": 9.5}) + "\n"
                   for a, t in (("A1", "Super Game"), ("A2", "Racing Pro")))
    return {f"/amazon/benchmark/5core/rating_only/{cat}.csv.gz": gzip.compress(csv_text.encode()),
            f"/amazon/raw/meta_categories/meta_{cat}.jsonl.gz": gzip.compress(meta.encode())}


def test_amazon_download_flag(env, server, tmp_path, capsys):
    server.files.update(amazon_pair())
    d = tmp_path / "am"
    data.main(["--dataset", "amazon-2023:Video_Games", "--download", "--data-dir", str(d)])
    assert sorted(os.listdir(d)) == ["Video_Games.csv.gz", "meta_Video_Games.jsonl.gz"]
    assert "users 2 | items 2 | interactions 4" in capsys.readouterr().out
    n = len(server.requests)
    ds = load_dataset("amazon-2023:Video_Games", data_dir=str(d), download=True, verbose=False)
    assert ds.titles == ["", "Super Game", "Racing Pro"] and len(server.requests) == n  # present: not fetched


def test_amazon_without_download_names_the_flag(env, server, tmp_path):
    with pytest.raises(DataError, match="add --download"):
        load_dataset("amazon-2023:Video_Games", data_dir=str(tmp_path), verbose=False)
    with pytest.raises(DataError, match="or add --download"):
        load_dataset("amazon-2023:Video_Games", download=True, verbose=False)  # no --data-dir
    assert server.requests == []


@pytest.mark.parametrize("case", ["truncated gzip", "404", "hang"])
def test_amazon_download_failures(env, server, tmp_path, case):
    files = amazon_pair()
    meta = next(p for p in files if "meta_" in p)
    if case == "truncated gzip":  # a whole HTTP body that is not a whole gzip file
        files[meta] = files[meta][:-12]
    elif case == "404":
        del files[meta]
    else:
        server.modes[meta] = "hang"
    server.files.update(files)
    d = tmp_path / "am"
    with pytest.raises(DataError) as e:
        load_dataset("amazon-2023:Video_Games", data_dir=str(d), download=True, verbose=False)
    msg = str(e.value)
    want = {"truncated gzip": "not a whole gzip file", "404": "HTTP 404", "hang": "no answer in 0.5 s"}[case]
    assert "\n" not in msg and want in msg and server.url + meta in msg, msg
    assert msg.endswith(f"; run again, or check the category name, or download it into {d}"), msg
    assert os.listdir(d) == ["Video_Games.csv.gz"]  # the whole first file stays; nothing half-written


def test_amazon_leftover_of_a_killed_download_is_removed(env, server, tmp_path):
    server.files.update(amazon_pair())
    d = tmp_path / "am"
    (d / "meta_Video_Games.jsonl.gz.tmp999999999").mkdir(parents=True)
    (d / "meta_Video_Games.jsonl.gz.tmp999999999" / "meta_Video_Games.jsonl.gz").write_bytes(b"\x1f\x8b")
    load_dataset("amazon-2023:Video_Games", data_dir=str(d), download=True, verbose=False)
    assert sorted(os.listdir(d)) == ["Video_Games.csv.gz", "meta_Video_Games.jsonl.gz"]
