"""Download the organisers' DCASE Task 2 archives from Zenodo, verify them, unpack them safely.

For one year, part and machine type: read the Zenodo record's file list and MD5 checksums
(records API), pick the archives of that machine type by name, download each to a `.part`
file (resumed with an HTTP Range request after an interruption), check its MD5, and unpack it
into the layout data.py reads:

    dev    dev_data_<m>.zip (2020-21), dev_<m>.zip (2022+)        -> dcase<Y>/dev_data/<m>/...
    train  eval_data_train_<m>.zip (2020), eval_data_<m>_train.zip -> dcase<Y>/eval_data/<m>/...
    eval   eval_data_test_<m>.zip (2020), eval_data_<m>_test.zip   -> dcase<Y>/eval_data/<m>/...
    truth  (2020 only) eval_data_list.csv                          -> dcase2020/eval_data/

Safety: every member name is checked before anything is written (no absolute names, no `..`,
no links); the archive is unpacked into a hidden temporary folder beside its destination and
its folders are then renamed into place, so a crash never leaves a folder that looks complete.
A marker per archive (`.asd_download/<archive>.json`) records the verified checksum, so a
second run finds everything done and downloads nothing.

Left out: the 2021+ ground-truth tables, which the organisers publish in their evaluator
repositories on GitHub, not on Zenodo (clone the evaluator; `evaluate --ground-truth` reads it).
"""
import hashlib
import http.client
import json
import os
import re
import shutil
import stat
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

import data

ZENODO_URL = "https://zenodo.org"   # the records API lives at <url>/api/records/<id>
ZENODO_URL_ENV = "ASD_ZENODO_URL"   # environment variable that overrides it (tests, mirrors)
CHUNK = 1 << 20                     # bytes read per step of a download and of an MD5
TIMEOUT = 60                        # seconds without data before a request fails
RETRIES = 3                         # attempts per file; each resumes where the last stopped
PROGRESS_EVERY = 0.5                # seconds between progress lines
MARKER_DIR = ".asd_download"        # per-archive markers, below the destination folder
PART_FOLDERS = {"dev": "dev", "train": "eval", "eval": "eval", "truth": "eval"}


class DownloadError(OSError):
    """A download, checksum or archive that asd cannot use; the message says which and why."""


# --------------------------------------------------------------------------------------------
# The Zenodo records API: which files a record holds, their sizes, checksums and addresses

def record_files(record_id, *, base_url=None):
    """The files of one Zenodo record: [{"key", "size", "md5", "url"}]. Reads the newer API
    answer (key, checksum "md5:<hex>", links.self) and the older one (filename, filesize,
    links.download)."""
    base = (base_url or os.environ.get(ZENODO_URL_ENV) or ZENODO_URL).rstrip("/")
    url = f"{base}/api/records/{record_id}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            answer = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise DownloadError(f"{url}: cannot read the record's file list ({e}); check the "
                            f"network or --zenodo-url") from e
    files = []
    for f in answer.get("files") or []:
        checksum = str(f.get("checksum", ""))
        links = f.get("links", {})
        files.append({"key": f.get("key") or f.get("filename"),
                      "size": int(f.get("size", f.get("filesize", -1))),
                      "md5": checksum.split(":", 1)[1] if ":" in checksum else checksum,
                      "url": links.get("self") or links.get("download")})
    if not files or not all(f["key"] and f["url"] and f["md5"] for f in files):
        raise DownloadError(f"{url}: no usable 'files' list (key, checksum, links) in the answer")
    return files


REVISION = re.compile(r"^(?P<stem>.+?)(?:_r(?P<rev>\d+))?\.zip$")   # eval_data_X_train_r2.zip


def archives_of(files, machine):
    """The zip archives of one machine type: those whose name, split at '_', holds the machine
    type as a word (dev_data_fan.zip, eval_data_fan_test.zip). Where a record holds revisions
    (eval_data_3DPrinter_train.zip and ..._train_r2.zip), only the latest is taken."""
    latest = {}
    for f in files:
        match = REVISION.match(f["key"])
        if match and machine in f["key"][:-len(".zip")].split("_"):
            rev = int(match["rev"] or 0)
            if match["stem"] not in latest or rev > latest[match["stem"]][0]:
                latest[match["stem"]] = (rev, f)
    return [f for _, f in latest.values()]


# --------------------------------------------------------------------------------------------
# Download with resume, then MD5

def fetch(url, dest, *, size, show=True):
    """Download url to dest + '.part', resuming a partial file with a Range request, then
    rename it to dest. size: the record's byte count (-1 unknown). Returns dest."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, RETRIES + 1):
        have = part.stat().st_size if part.exists() else 0
        if size >= 0 and have > size:
            part.unlink()                        # longer than the record says: start afresh
            have = 0
        if size < 0 or have < size:
            try:
                _get(url, part, have, size, show)
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                if attempt == RETRIES:
                    raise DownloadError(f"{url}: download failed after {RETRIES} attempts "
                                        f"({e}); run again to resume from {part}") from e
                continue
        got = part.stat().st_size
        if size < 0 or got == size:
            os.replace(part, dest)
            return dest
    raise DownloadError(f"{url}: got {part.stat().st_size} of {size} bytes after {RETRIES} "
                        f"attempts; run again to resume from {part}")


def _get(url, part, have, size, show):
    """One request: bytes from `have` on, appended to `part` (or it afresh if the server
    ignores the Range header and sends everything)."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        if have and response.status != 206:      # 200: the whole file again, not the rest
            have = 0
        with open(part, "ab" if have else "wb") as f:
            progress = Progress(part.name[:-len(".part")], have, size, show)
            while chunk := response.read(CHUNK):
                f.write(chunk)
                progress.update(len(chunk))
            progress.done()


class Progress:
    """Bytes, rate and time left of one download, on one line of stderr."""

    def __init__(self, name, start, total, show):
        self.name, self.done_bytes, self.total, self.show = name, start, total, show
        self.t0, self.last, self.start = time.monotonic(), 0.0, start

    def update(self, n):
        self.done_bytes += n
        now = time.monotonic()
        if self.show and now - self.last >= PROGRESS_EVERY:
            self.last = now
            print(f"\r{self.line(now)}", end="", file=sys.stderr, flush=True)

    def line(self, now):
        rate = (self.done_bytes - self.start) / max(now - self.t0, 1e-9)      # bytes/s
        if self.total < 0 or rate <= 0:
            return f"{self.name}  {self.done_bytes / 1e6:.1f} MB  {rate / 1e6:.1f} MB/s"
        left = int((self.total - self.done_bytes) / rate)                       # seconds
        return (f"{self.name}  {self.done_bytes / 1e6:.1f}/{self.total / 1e6:.1f} MB  "
                f"{rate / 1e6:.1f} MB/s  {left // 3600:02d}:{left % 3600 // 60:02d}:"
                f"{left % 60:02d} left")

    def done(self):
        if self.show:
            print(f"\r{self.line(time.monotonic())}", file=sys.stderr, flush=True)


def md5_of(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Safe unpacking: check every name first, unpack beside the destination, rename into place

def check_members(archive, zf):
    """Refuse an archive with any member that would land outside the folder it is unpacked
    in (absolute names, drive letters, '..') or that is a link. Returns the members to unpack
    (macOS resource folders skipped)."""
    members = []
    for info in zf.infolist():
        name = info.filename
        parts = PurePosixPath(name).parts
        if (name.startswith(("/", "\\")) or "\\" in name or re.match(r"^[A-Za-z]:", name)
                or ".." in parts or stat.S_ISLNK(info.external_attr >> 16)):
            raise DownloadError(f"{archive}: refusing to unpack, member '{name}' would land "
                                f"outside the data folder (absolute path, '..' or a link)")
        if parts and parts[0] != "__MACOSX":
            members.append(info)
    if not members:
        raise DownloadError(f"{archive}: empty archive")
    return members


def unpack(archive, dest):
    """Unpack archive into dest: every member checked first, then unpacked into a hidden
    temporary folder inside dest, then each top-level entry (<machine>/train, ...) renamed
    into place. Returns the entries placed, relative to dest."""
    archive, dest = Path(archive), Path(dest)
    tmp = dest / f".tmp_{archive.stem}"
    shutil.rmtree(tmp, ignore_errors=True)             # left by a crash: start it again
    try:
        with zipfile.ZipFile(archive) as zf:
            members = check_members(archive, zf)
            tmp.mkdir(parents=True)
            for info in members:
                zf.extract(info, tmp)
    except zipfile.BadZipFile as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DownloadError(f"{archive}: not a readable zip archive ({e}); delete it and "
                            f"run again") from e
    entries = _check_free(dest, _entries(tmp), tmp, archive)
    _write_marker(dest, archive.name, {"status": "moving", "entries": entries})
    for entry in entries:
        (dest / entry).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / entry, dest / entry)
    shutil.rmtree(tmp)
    return entries


def _entries(tmp):
    """What to move: <top>/<child> for every top-level folder, a top-level file itself."""
    entries = []
    for top in sorted(tmp.iterdir()):
        children = sorted(top.iterdir()) if top.is_dir() else [top]
        entries += [str(c.relative_to(tmp)) for c in children]
    return entries


def _check_free(dest, entries, tmp, archive):
    """Entries to move: a file already there with the same bytes (a table two archives of one
    machine type share) is left as it is; anything else already there is an error."""
    free = []
    for entry in entries:
        there = dest / entry
        if not there.exists():
            free.append(entry)
        elif not (there.is_file() and there.read_bytes() == (tmp / entry).read_bytes()):
            raise DownloadError(f"{there}: already there and not from {archive.name}; move it "
                                f"away (or delete it) and run again")
    return free


# --------------------------------------------------------------------------------------------
# Markers: an archive is done when its marker holds its verified MD5

def _marker_path(dest, name):
    return Path(dest) / MARKER_DIR / f"{name}.json"


def _write_marker(dest, name, obj):
    data.write_text(_marker_path(dest, name), json.dumps(obj, indent=1) + "\n")


def _read_marker(dest, name):
    path = _marker_path(dest, name)
    return json.loads(path.read_text()) if path.exists() else {}


def _undo_half_move(dest, name):
    """A crash while renaming left some entries in place: remove them, to unpack again."""
    marker = _read_marker(dest, name)
    if marker.get("status") == "moving":
        for entry in marker["entries"]:
            target = Path(dest) / entry
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        _marker_path(dest, name).unlink()


# --------------------------------------------------------------------------------------------
# One file, one part, one year

def get_file(f, dest, *, unzip=True, keep=False, show=True):
    """Download, verify and (for a zip) unpack one record file into dest, unless its marker
    says that was done with this checksum. Returns "done" (nothing to do) or "fetched"."""
    dest = Path(dest)
    if _read_marker(dest, f["key"]).get("md5") == f["md5"]:
        return "done"
    _undo_half_move(dest, f["key"])
    path = dest / ".downloads" / f["key"]
    kept = path.exists() and md5_of(path) == f["md5"]       # kept, or left by a crash
    if not kept:
        path = fetch(f["url"], path, size=f["size"], show=show)
    got = md5_of(path) if not kept else f["md5"]
    if got != f["md5"]:
        path.unlink()
        raise DownloadError(f"{path}: MD5 {got} differs from the record's {f['md5']}; the "
                            f"download is corrupt and was deleted, nothing unpacked; run again")
    if unzip:
        entries = unpack(path, dest)
    else:
        entries = [f["key"]]
        os.replace(path, dest / f["key"])
    _write_marker(dest, f["key"], {"status": "done", "md5": got, "size": f["size"],
                                   "entries": entries})
    if unzip and not keep:
        path.unlink()
    return "fetched"


def download(year, *, data_root, part="all", machines=None, base_url=None, keep=False,
             show=True):
    """Fetch, verify and unpack the archives of `year` for the chosen part(s) and machine
    types (default: every machine type that part lists). Returns {archive: "done"|"fetched"}."""
    spec = data.get_year(year)
    parts = [p for p in spec.records if part == "all" or p == part]
    if not parts:
        raise DownloadError(f"{year} has no '{part}' part; valid: {', '.join(spec.records)}, all")
    report = {}
    for p in parts:
        dest = data.part_dir(data_root, year, PART_FOLDERS[p])
        files = record_files(spec.records[p], base_url=base_url)
        chosen = (_truth_file(spec, files) if p == "truth"
                  else _chosen(spec, p, files, machines, part))
        for f in chosen:
            report[f["key"]] = get_file(f, dest, unzip=p != "truth", keep=keep, show=show)
            what = "verified earlier" if report[f["key"]] == "done" else "downloaded, verified"
            print(f"{f['key']}: {what} -> {dest}")
    return report


def _truth_file(spec, files):
    found = [f for f in files if f["key"] == data.EVAL_DATA_LIST]
    if not found:
        raise DownloadError(f"Zenodo record {spec.records['truth']} ({spec.year} truth) holds "
                            f"no {data.EVAL_DATA_LIST}; it holds: "
                            f"{', '.join(f['key'] for f in files)}")
    return found


def _chosen(spec, part, files, machines, asked):
    """The archives of the asked machine types in one record; a machine type the part does not
    list is an error when that part was asked for by name, skipped under --part all."""
    table = spec.dev if part == "dev" else spec.eval
    chosen = []
    for machine in machines or list(table):
        if machine not in table:
            if asked != "all":
                spec.sections(machine, "dev" if part == "dev" else "eval")   # raises, lists
            continue
        found = archives_of(files, machine)
        if not found:
            names = ", ".join(f["key"] for f in files)
            raise DownloadError(f"Zenodo record {spec.records[part]} ({spec.year} {part}) has "
                                f"no archive of '{machine}'; it holds: {names}")
        chosen += found
    return chosen


# --------------------------------------------------------------------------------------------
# Pre-trained weights (systems/encoder_knn.py): one release asset per name, checked by sha256
# before it takes its place, so a truncated or substituted file is never loaded as an encoder.

WEIGHTS = {
    "mn04": dict(file="mn04_as_mAP_432.pt", size=4066513,
                 sha256="899a8c6217063f6941793102a2780b3dd788ab11fce468d9cf5f0577c453321c",
                 url="https://github.com/fschmid56/EfficientAT/releases/download/v0.0.1/"
                     "mn04_as_mAP_432.pt"),      # EfficientAT mn04_as (MIT), 4.1 MB
}
WEIGHTS_URL_ENV = "ASD_WEIGHTS_URL"   # a folder address that replaces the release's (tests, mirrors)


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def download_weights(name, *, dest_dir, base_url=None, show=True):
    """Fetch WEIGHTS[name] into dest_dir (resumable, as the archives), check its sha256 and only
    then move it to its name. Returns (path, "done" | "fetched"): done when a verified copy is
    there already."""
    if name not in WEIGHTS:
        raise DownloadError(f"unknown weights '{name}'; valid: {', '.join(WEIGHTS)}")
    spec = WEIGHTS[name]
    dest = Path(dest_dir) / spec["file"]
    if dest.exists() and sha256_of(dest) == spec["sha256"]:
        return dest, "done"
    base = base_url or os.environ.get(WEIGHTS_URL_ENV)
    url = f"{base.rstrip('/')}/{spec['file']}" if base else spec["url"]
    unverified = fetch(url, dest.with_name(dest.name + ".unverified"), size=spec["size"],
                       show=show)
    got = sha256_of(unverified)
    if got != spec["sha256"]:
        unverified.unlink()
        raise DownloadError(f"{url}: sha256 {got}, expected {spec['sha256']}; the file was "
                            f"removed: run again, or fetch it from another mirror "
                            f"(${WEIGHTS_URL_ENV})")
    os.replace(unverified, dest)
    return dest, "fetched"
