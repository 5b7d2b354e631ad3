"""Downloads against a small Zenodo stand-in that the tests start on 127.0.0.1 (http.server in a
thread, stopped after each test): the records API answer (new and old format), zip archives
made here, HTTP Range requests. Cases: a good archive (unpacked into the layout data.py reads;
a second run does nothing), a corrupt one (MD5 mismatch: clear error, nothing unpacked), a
truncated one (resumed with a Range request), a malicious one (path traversal: refused), and a
crash while moving the unpacked folders into place (the next run repairs it)."""
import hashlib
import http.server
import io
import json
import re
import threading
import zipfile

import pytest

import asd
import data
import download

YEAR = 2023
RECORD = data.YEARS[YEAR].records["dev"]
SERVER_LIFETIME = 120  # seconds after which a forgotten server stops itself


def make_zip(members):
    """A zip archive in memory: {member name: bytes}; names are taken as given, '../' too."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, content in members.items():
            zf.writestr(zipfile.ZipInfo(name), content)
    return buffer.getvalue()


def machine_zip(machine, n=3):
    """An archive as the organisers pack one machine type: <machine>/train/, <machine>/test/."""
    members = {f"{machine}/train/section_00_source_train_normal_{i:04d}_a_1.wav": bytes([i]) * 999
               for i in range(n)}
    members |= {f"{machine}/test/section_00_source_test_anomaly_{i:04d}_a_1.wav": b"x" * (i + 5)
                for i in range(n)}
    members[f"{machine}/attributes_00.csv"] = b"file_name,a\n"
    return make_zip(members)


class Zenodo(http.server.BaseHTTPRequestHandler):
    """GET /api/records/<id> -> the record's JSON; GET /files/<name> -> bytes, with Range."""
    def do_GET(self):
        site = self.server.site
        site["log"].append((self.path, self.headers.get("Range")))
        match = re.match(r"^/api/records/(\d+)$", self.path)
        if match and int(match[1]) in site["records"]:
            return self._send(200, json.dumps(site["records"][int(match[1])]).encode())
        name = self.path.removeprefix("/files/")
        if name not in site["blobs"]:
            return self._send(404, b"not found")
        body, start = site["blobs"][name], 0
        if self.headers.get("Range"):
            start = int(re.match(r"bytes=(\d+)-", self.headers["Range"])[1])
        if name in site["truncate_once"]:          # promise everything, send half, hang up
            site["truncate_once"].remove(name)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) // 2])
            self.close_connection = True
            return
        self._send(206 if start else 200, body[start:])

    def _send(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):       # keep the test output quiet
        pass


@pytest.fixture
def zenodo():
    """A running stand-in: site["blobs"] (what /files/ serves), site["records"], site["log"];
    publish(...) adds a record. Shut down when the test ends (or after SERVER_LIFETIME)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Zenodo)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    server.site = {"blobs": {}, "records": {}, "log": [], "truncate_once": set(), "url": url}
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    guard = threading.Timer(SERVER_LIFETIME, server.shutdown)
    guard.start()
    yield server.site
    guard.cancel()
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def publish(site, record, blobs, *, md5=None, old_format=False):
    """Serve blobs ({name: bytes}) as one record; md5: {name: checksum to claim}."""
    files = []
    for name, body in blobs.items():
        site["blobs"][name] = body
        digest = (md5 or {}).get(name, hashlib.md5(body).hexdigest())
        link = f"{site['url']}/files/{name}"
        files.append({"filename": name, "filesize": len(body), "checksum": digest,
                      "links": {"download": link}} if old_format else
                     {"key": name, "size": len(body), "checksum": f"md5:{digest}",
                      "links": {"self": link}})
    site["records"][record] = {"id": record, "files": files}


def get(site, tmp_path, machine="fan", **kw):
    return download.download(YEAR, data_root=tmp_path, part="dev", machines=[machine],
                             base_url=site["url"], show=False, **kw)


def dev_dir(tmp_path):
    return data.part_dir(tmp_path, YEAR, "dev")


def file_requests(site):
    return [(path, rng) for path, rng in site["log"] if path.startswith("/files/")]


@pytest.mark.parametrize("old_format", [False, True])
def test_good_archive_unpacks_into_the_layout_and_a_second_run_does_nothing(zenodo, tmp_path,
                                                                             old_format):
    publish(zenodo, RECORD, {"dev_fan.zip": machine_zip("fan"),
                             "dev_valve.zip": machine_zip("valve")}, old_format=old_format)
    assert get(zenodo, tmp_path) == {"dev_fan.zip": "fetched"}
    clips = data.list_clips(dev_dir(tmp_path), year=YEAR, machine="fan", split="train")
    assert len(clips) == 3 and clips[1].path.read_bytes() == bytes([1]) * 999
    assert (dev_dir(tmp_path) / "fan/attributes_00.csv").exists()
    assert not (dev_dir(tmp_path) / "valve").exists()           # only the machine asked for
    leftovers = [p.name for p in dev_dir(tmp_path).iterdir() if p.name.startswith(".tmp")]
    assert leftovers == [] and not list((dev_dir(tmp_path) / ".downloads").iterdir())
    assert file_requests(zenodo) == [("/files/dev_fan.zip", None)]
    zenodo["log"].clear()
    assert get(zenodo, tmp_path) == {"dev_fan.zip": "done"}       # verified before: nothing
    assert file_requests(zenodo) == []


def test_corrupt_archive_is_refused_and_nothing_is_unpacked(zenodo, tmp_path):
    good = machine_zip("fan")
    publish(zenodo, RECORD, {"dev_fan.zip": good})
    zenodo["blobs"]["dev_fan.zip"] = good[:100] + bytes([good[100] ^ 1]) + good[101:]  # 1 bit
    with pytest.raises(download.DownloadError, match=r"dev_fan\.zip: MD5 .* differs") as e:
        get(zenodo, tmp_path)
    assert "nothing unpacked" in str(e.value) and "\n" not in str(e.value)
    assert not (dev_dir(tmp_path) / "fan").exists()
    assert [p for p in dev_dir(tmp_path).rglob("*") if p.is_file()] == []   # no zip, no .part
    zenodo["blobs"]["dev_fan.zip"] = good                               # mirror repaired
    assert get(zenodo, tmp_path) == {"dev_fan.zip": "fetched"}


def test_truncated_download_is_resumed_with_a_range_request(zenodo, tmp_path):
    body = machine_zip("fan", n=40)
    publish(zenodo, RECORD, {"dev_fan.zip": body})
    zenodo["truncate_once"].add("dev_fan.zip")
    assert get(zenodo, tmp_path) == {"dev_fan.zip": "fetched"}
    first, second = file_requests(zenodo)
    assert first == ("/files/dev_fan.zip", None)
    assert second == ("/files/dev_fan.zip", f"bytes={len(body) // 2}-")   # only the rest
    assert len(data.list_clips(dev_dir(tmp_path), year=YEAR, machine="fan", split="test")) == 40


def test_partial_file_of_an_interrupted_run_is_resumed(zenodo, tmp_path):
    body = machine_zip("fan", n=40)
    publish(zenodo, RECORD, {"dev_fan.zip": body})
    part = dev_dir(tmp_path) / ".downloads" / "dev_fan.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(body[:1000])
    assert get(zenodo, tmp_path) == {"dev_fan.zip": "fetched"}
    assert file_requests(zenodo) == [("/files/dev_fan.zip", "bytes=1000-")]


@pytest.mark.parametrize("evil", ["../evil.txt", "fan/../../evil.txt", "/tmp/evil.txt",
                                  "C:/evil.txt"])
def test_path_traversal_is_refused_before_anything_is_written(zenodo, tmp_path, evil):
    members = {"fan/train/section_00_source_train_normal_0000_a_1.wav": b"ok", evil: b"owned"}
    publish(zenodo, RECORD, {"dev_fan.zip": make_zip(members)})
    with pytest.raises(download.DownloadError, match=rf"refusing to unpack, member '{evil}'"):
        get(zenodo, tmp_path)
    assert not (dev_dir(tmp_path) / "fan").exists()
    assert not list(tmp_path.rglob("evil.txt"))
    assert not list(dev_dir(tmp_path).glob(".tmp*"))


def test_crash_while_moving_into_place_is_repaired_by_the_next_run(zenodo, tmp_path,
                                                                   monkeypatch):
    publish(zenodo, RECORD, {"dev_fan.zip": machine_zip("fan")})
    real_replace, moves = download.os.replace, []

    def crash_on_second_folder(src, dst):
        if "/.tmp_" in str(src):
            moves.append(dst)
            if len(moves) == 2:
                raise OSError("simulated crash")
        return real_replace(src, dst)
    monkeypatch.setattr(download.os, "replace", crash_on_second_folder)
    with pytest.raises(OSError, match="simulated crash"):
        get(zenodo, tmp_path)
    monkeypatch.setattr(download.os, "replace", real_replace)
    marker = json.loads((dev_dir(tmp_path) / ".asd_download/dev_fan.zip.json").read_text())
    assert marker["status"] == "moving"                  # not "done": the run knows
    assert get(zenodo, tmp_path, keep=True) == {"dev_fan.zip": "fetched"}
    assert len(data.list_clips(dev_dir(tmp_path), year=YEAR, machine="fan", split="test")) == 3
    assert (dev_dir(tmp_path) / ".downloads/dev_fan.zip").exists()      # --keep-archives


def test_folder_not_from_the_archive_is_never_overwritten(zenodo, tmp_path):
    publish(zenodo, RECORD, {"dev_fan.zip": machine_zip("fan")})
    mine = dev_dir(tmp_path) / "fan" / "train"
    mine.mkdir(parents=True)
    (mine / "my_own.wav").write_bytes(b"mine")
    with pytest.raises(download.DownloadError, match=r"fan/train: already there"):
        get(zenodo, tmp_path)
    assert [p.name for p in mine.iterdir()] == ["my_own.wav"]


def test_archives_of_picks_a_machine_types_files_and_the_latest_revision():
    files = [{"key": k} for k in ("dev_data_ToyCar.zip", "dev_data_ToyConveyor.zip",
                                  "eval_data_3DPrinter_train.zip",
                                  "eval_data_3DPrinter_train_r2.zip", "eval_data_fan_test.zip",
                                  "README.md")]
    assert [f["key"] for f in download.archives_of(files, "ToyCar")] == ["dev_data_ToyCar.zip"]
    assert [f["key"] for f in download.archives_of(files, "3DPrinter")] == [
        "eval_data_3DPrinter_train_r2.zip"]
    assert download.archives_of(files, "valve") == []


def test_cli_download_through_the_environment_url_and_its_errors(zenodo, tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.setenv(download.ZENODO_URL_ENV, zenodo["url"])
    publish(zenodo, RECORD, {"dev_fan.zip": machine_zip("fan")})
    run = ["download", "--year", YEAR, "--part", "dev", "--data-root", tmp_path]
    assert asd.main([*run, "--machine", "fan"]) == 0
    assert "MB/s" in capsys.readouterr().err                       # progress: bytes, rate, left
    assert asd.main([*run, "--machine", "fan", "--quiet"]) == 0
    assert "verified earlier" in capsys.readouterr().out
    assert asd.main([*run, "--machine", "valve", "--quiet"]) == 2   # not in the record
    err = capsys.readouterr().err.strip()
    assert f"record {RECORD}" in err and "no archive of 'valve'" in err and "\n" not in err
    assert asd.main([*run, "--machine", "toaster"]) == 2
    assert "unknown machine 'toaster'" in capsys.readouterr().err


def test_progress_line_shows_bytes_rate_and_time_left():
    progress = download.Progress("dev_fan.zip", 0, 10_000_000, show=False)
    progress.update(2_500_000)
    line = progress.line(progress.t0 + 1.0)
    assert line == "dev_fan.zip  2.5/10.0 MB  2.5 MB/s  00:00:03 left"


# --------------------------------------------------------------------------------------------
# Pre-trained weights (download --weights): a release asset, checked by sha256

def small_weights(monkeypatch, body):
    """WEIGHTS["mn04"] pointed at a small file with body's size and checksum."""
    monkeypatch.setitem(download.WEIGHTS, "mn04", dict(
        download.WEIGHTS["mn04"], size=len(body), sha256=hashlib.sha256(body).hexdigest()))
    return download.WEIGHTS["mn04"]["file"]


def test_weights_are_fetched_checked_and_a_second_run_fetches_nothing(zenodo, tmp_path,
                                                                      monkeypatch, capsys):
    body = b"weights " * 1000
    name = small_weights(monkeypatch, body)
    zenodo["blobs"][name] = body
    argv = ["download", "--weights", "mn04", "--weights-url", f"{zenodo['url']}/files",
            "--data-root", tmp_path, "--quiet"]
    assert asd.main(argv) == 0
    assert (tmp_path / "weights" / name).read_bytes() == body
    assert "downloaded, verified" in capsys.readouterr().out
    zenodo["log"].clear()
    assert asd.main(argv) == 0 and file_requests(zenodo) == []
    assert "verified earlier" in capsys.readouterr().out


def test_weights_with_a_wrong_checksum_are_refused_and_removed(zenodo, tmp_path, monkeypatch):
    name = small_weights(monkeypatch, b"the published bytes")
    zenodo["blobs"][name] = b"other bytes, same len"[:len(b"the published bytes")]
    with pytest.raises(download.DownloadError, match=f"{name}: sha256 .* expected"):
        download.download_weights("mn04", dest_dir=tmp_path, base_url=f"{zenodo['url']}/files",
                                  show=False)
    assert list(tmp_path.iterdir()) == []             # nothing that could be loaded
