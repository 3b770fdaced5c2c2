"""What ``$SVDEXP_CACHE`` holds, how big it may grow, and how a write that does not fit is handled (issue 16).

:mod:`svdexp.cache.store` writes every entry through :func:`write_entry`; ``svdexp-cache`` (:mod:`svdexp.cache.cli`)
lists and clears entries with :func:`scan`. This module imports neither torch nor the models, so the command
line stays fast.

Layout: one top-level folder per kind of entry. ``stats`` (calibration statistics), ``svd`` (decompositions),
``dense_ppl`` and ``dense_zeroshot`` (the dense model's metrics; kind "dense"), ``zeroshot_responses``
(lm-eval's answers; kind "responses") and ``models`` (packaged GGUF models converted to Hugging Face folders).
An entry is the files of one key (``<key>.safetensors``, ``<key>.json``; lm-eval's ``<key>_rank0.db`` and its
description ``<key>.json``), or one folder under ``models``. ``models.json`` maps the weights' fingerprints to
the model names runs gave them (``svdexp-cache --model NAME``). Hidden files are writes in progress, or left by
a killed one.

Last use: every read or write of an entry sets its modification time to now (``os.utime``). There is no index
to lock or to lose: any number of processes, on any number of hosts sharing the filesystem, keep it, and sizes
come from ``stat``.

Budget: ``cache.max_gb``, else ``$SVDEXP_CACHE_MAX_GB``, else 20 (GB of 10^9 bytes). When a write would take
the cache past it, the least recently used entries are evicted first, until it fits. Never evicted: the
entries this process read or wrote in this run (:func:`install_budget` starts a run), and those that any
process used in the last :data:`RECENT_USE_S` seconds, which another job of a sweep may be between writing and
reading (a running job refreshes the last use of its own entries every :data:`HEARTBEAT_S` while it uses the
cache). If the write cannot fit without evicting those, it is skipped, with one warning line per run.

No room: a write that fails because the disk or the quota is full (ENOSPC, EDQUOT, EFBIG) is skipped, with one
warning line per run; its temporary file is removed, the run goes on and computes what it did not cache.

Concurrency: an entry is written to a temporary file of a unique name in the same folder and renamed over its
final name (atomic on POSIX filesystems, NFS included), so a reader sees a whole old file, a whole new one or
none; entries carry their key (and tensor entries a checksum), checked on every read. Two writers of one key
leave one valid entry, whichever renamed last.
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import math
import os
import re
import secrets
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from svdexp.faults import atomic_write

log = logging.getLogger("svdexp.cache")

GB = 10**9
DEFAULT_MAX_GB = 20.0
ENV_MAX_GB = "SVDEXP_CACHE_MAX_GB"
RECENT_USE_S = 3600.0        # entries used this recently, by any process, are never evicted
HEARTBEAT_S = 300.0          # how often a running job refreshes the last use of the entries it holds
RESCAN_S = 60.0              # the budget's view of the cache is read again from disk at least this often
RESCAN_OVER_S = 5.0          # ... and when a write does not fit, if the view is older than this

# top-level folder -> kind (svdexp-cache --kind)
FOLDER_KINDS = {"stats": "stats", "svd": "svd", "models": "models", "dense_ppl": "dense",
                "dense_zeroshot": "dense", "zeroshot_responses": "responses"}
KINDS = ("stats", "svd", "models", "dense", "responses")
MODELS_INDEX = "models.json"
NO_ROOM = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG) if code)
_KEY = re.compile(r"[0-9a-f]{32}")


def cache_root() -> Path:
    """Where svdexp keeps what it computes once (``$SVDEXP_CACHE``, default ~/.cache/svdexp): statistics,
    decompositions, converted models, the dense model's metrics, lm-eval's answers, the runs' scratch files."""
    return Path(os.environ.get("SVDEXP_CACHE", Path.home() / ".cache" / "svdexp"))


def resolve_max_gb(max_gb: float | None = None) -> tuple[float, str]:
    """The budget in GB and where it comes from: ``cache.max_gb`` when set, else ``$SVDEXP_CACHE_MAX_GB``,
    else 20. :class:`~svdexp.errors.ConfigError` for an environment value that is not a number > 0."""
    if max_gb is not None:
        return float(max_gb), "cache.max_gb"
    raw = os.environ.get(ENV_MAX_GB, "").strip()
    if not raw:
        return DEFAULT_MAX_GB, "default"
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value > 0:
        from svdexp.errors import ConfigError

        raise ConfigError(f"{ENV_MAX_GB}={raw!r} is not allowed; set a number of gigabytes > 0 (or unset it: "
                          f"{DEFAULT_MAX_GB:g}).")
    return value, ENV_MAX_GB


# -- entries on disk ----------------------------------------------------------------------------------------

@dataclass
class Entry:
    """One cache entry: the files of one key in one top-level folder, or one folder (``models``)."""

    folder: str                 # top-level folder, e.g. "dense_ppl"
    key: str
    paths: list[Path]
    size: int                   # bytes (st_size; a folder's: its files')
    last_use: float             # the newest modification time of its files (set on every use)
    is_dir: bool = False
    temp: bool = False          # a write in progress, or left by a killed one

    @property
    def kind(self) -> str:
        return FOLDER_KINDS.get(self.folder, self.folder)

    @property
    def ident(self) -> tuple[str, str]:
        return self.folder, self.key

    def name(self, root: Path) -> str:
        """Where it is, relative to the cache folder (``folder/key*`` for several files)."""
        if len(self.paths) == 1:
            return str(self.paths[0].relative_to(root))
        return f"{self.folder}/{self.key}*"


def _file_key(name: str) -> str:
    match = _KEY.match(name)
    return match.group(0) if match else name.split(".", 1)[0] or name


def _is_temp(name: str) -> bool:
    return name.startswith(".") or re.search(r"\.tmp\d+", name) is not None


def _tree_size(path: str) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for file in files:
            try:
                total += os.lstat(os.path.join(folder, file)).st_size
            except OSError:
                pass
    return total


def _scan_folder(folder: Path) -> list[Entry]:
    try:
        children = list(os.scandir(folder))
    except OSError:
        return []
    groups: dict[str, Entry] = {}
    for child in children:
        try:
            is_dir = child.is_dir(follow_symlinks=False)
            st = child.stat(follow_symlinks=False)
        except OSError:          # removed meanwhile
            continue
        temp = _is_temp(child.name)
        key = child.name if (is_dir or temp) else _file_key(child.name)
        size = _tree_size(child.path) if is_dir else st.st_size
        entry = groups.get(key)
        if entry is None:
            groups[key] = Entry(folder.name, key, [Path(child.path)], size, st.st_mtime, is_dir, temp)
        else:
            entry.paths.append(Path(child.path))
            entry.size += size
            entry.last_use = max(entry.last_use, st.st_mtime)
    return list(groups.values())


def scan(root: str | Path | None = None) -> list[Entry]:
    """Every entry under ``root`` (default :func:`cache_root`); ``[]`` when it does not exist. Top-level
    files (``models.json``), hidden folders and symbolic links to folders are not entries."""
    root = Path(root) if root is not None else cache_root()
    try:
        tops = list(os.scandir(root))
    except OSError:
        return []
    entries = []
    for top in tops:
        if top.name.startswith(".") or not top.is_dir(follow_symlinks=False):
            continue
        entries.extend(_scan_folder(Path(top.path)))
    return entries


def _safetensors_metadata(path: Path) -> dict:
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        if length > 100 * 2**20:
            return {}
        return json.loads(fh.read(length)).get("__metadata__") or {}


def entry_description(entry: Entry) -> dict | None:
    """The description an entry was keyed by (safetensors metadata, or the JSON entry's), if readable."""
    for path in sorted(entry.paths):
        try:
            if path.suffix == ".safetensors":
                description = json.loads(_safetensors_metadata(path).get("description") or "null")
            elif path.suffix == ".json":
                with open(path, encoding="utf-8") as fh:
                    description = json.load(fh).get("description")
            else:
                continue
        except (OSError, ValueError, AttributeError, struct.error):
            continue
        if isinstance(description, dict):
            return description
    return None


def entry_model(entry: Entry) -> str | None:
    """The fingerprint of the weights an entry belongs to (``None``: not recorded, e.g. an SVD keyed by the
    matrix's bytes); for ``models`` folders, see :func:`read_model_index`."""
    if entry.is_dir or entry.temp:
        return None
    description = entry_description(entry)
    model = description.get("model") if description else None
    return str(model) if model else None


def remove_entry(entry: Entry) -> bool:
    """Delete an entry; a folder is renamed aside first, so that nobody sees half of it. True when removed
    (or already gone)."""
    ok = True
    for path in entry.paths:
        try:
            if entry.is_dir:
                aside = path.with_name(f".evict-{path.name}-{os.getpid()}-{secrets.token_hex(3)}")
                os.rename(path, aside)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                path.unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            log.debug("svdexp: could not remove cache entry %s: %s", path, err)
            ok = False
    return ok


# -- models.json: fingerprint -> name -------------------------------------------------------------------------

def read_model_index(root: str | Path | None = None) -> dict[str, str]:
    """``{fingerprint: model name}`` as recorded by runs (``{}`` when absent or unreadable)."""
    path = (Path(root) if root is not None else cache_root()) / MODELS_INDEX
    try:
        with open(path, encoding="utf-8") as fh:
            index = json.load(fh)
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in index.items()} if isinstance(index, dict) else {}


def note_model(fingerprint: str, name: str, root: str | Path | None = None) -> None:
    """Record that the weights ``fingerprint`` are called ``name`` (``$SVDEXP_CACHE/models.json``), and count the
    converted model folder ``models/<name>``, if any, as used by this run. Best effort: never fails a run."""
    root = Path(root) if root is not None else cache_root()
    folder = root / "models" / name
    if folder.is_dir():
        _current().use(root, "models", name, [folder], touch=True)
    index = read_model_index(root)
    if index.get(fingerprint) == name:
        return
    index[fingerprint] = name
    data = json.dumps(index, indent=2, sort_keys=True).encode()
    try:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write(root / MODELS_INDEX, lambda tmp: write_bytes(tmp, data), "cache_write")
    except OSError as err:
        log.debug("svdexp: could not record the model name in %s: %s", root / MODELS_INDEX, err)


# -- the run's state ----------------------------------------------------------------------------------------

class _View:
    """The budget's picture of one cache folder: its entries and total size, read from disk now and then and
    kept up to date with this process's own writes and evictions."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.refresh()

    def refresh(self) -> None:
        self.entries = {entry.ident: entry for entry in scan(self.root)}
        self.total = sum(entry.size for entry in self.entries.values())
        self.at = time.monotonic()

    def age(self) -> float:
        return time.monotonic() - self.at

    def put(self, entry: Entry) -> None:
        self.drop(entry.ident)
        self.entries[entry.ident] = entry
        self.total += entry.size

    def drop(self, ident: tuple[str, str]) -> None:
        old = self.entries.pop(ident, None)
        if old is not None:
            self.total -= old.size


class CacheRun:
    """What one run does with the cache: its budget, the entries it uses (never evicted under it), the
    warnings already given, and the entries it could not write but must read back (kept aside)."""

    def __init__(self, max_gb: float | None = None) -> None:
        self.max_gb, self.source = resolve_max_gb(max_gb)
        self.budget = self.max_gb * GB
        self.in_use: dict[tuple[str, str, str], list[Path]] = {}
        self.warned: set[str] = set()
        self.views: dict[str, _View] = {}
        self.spilled: dict[str, Any] = {}
        self.skipped = 0
        self.evicted = 0
        self._spill_dir: str | None = None
        self._heartbeat = time.monotonic()

    # in use
    def use(self, root: Path, folder: str, key: str, paths: list[Path], touch: bool) -> None:
        self.in_use[(os.path.abspath(root), folder, key)] = list(paths)
        if touch:
            for path in paths:
                _touch(path)
        self.heartbeat()

    def uses(self, root: Path, entry: Entry) -> bool:
        return (os.path.abspath(root), entry.folder, entry.key) in self.in_use

    def heartbeat(self) -> None:
        """Refresh the last use of this run's entries now and then, so that other processes keep them."""
        if time.monotonic() - self._heartbeat < HEARTBEAT_S:
            return
        self._heartbeat = time.monotonic()
        for paths in self.in_use.values():
            for path in paths:
                _touch(path)

    def warn_once(self, tag: str, message: str) -> None:
        if tag not in self.warned:
            self.warned.add(tag)
            log.warning(message)

    # what could not be written, kept for this process
    def spill_dir(self) -> Path:
        if self._spill_dir is None:
            self._spill_dir = tempfile.mkdtemp(prefix="svdexp-spill-")
        return Path(self._spill_dir)

    def close(self) -> None:
        self.spilled.clear()
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None

    def view(self, root: Path) -> _View:
        key = os.path.abspath(root)
        view = self.views.get(key)
        if view is None or view.age() > RESCAN_S:
            view = self.views[key] = _View(Path(key))
        return view


_RUN: CacheRun | None = None


def _current() -> CacheRun:
    global _RUN
    if _RUN is None:
        _RUN = CacheRun()
    return _RUN


def current_run() -> CacheRun:
    """This process's cache state (created with the environment's budget if no run installed one)."""
    return _current()


def install_budget(max_gb: float | None = None) -> CacheRun:
    """Start a run: the budget ``max_gb`` (``None``: ``$SVDEXP_CACHE_MAX_GB``, else 20 GB), no entry in use yet,
    every warning armed again. Called by the runner at the start of each run."""
    global _RUN
    if _RUN is not None:
        _RUN.close()
    _RUN = CacheRun(max_gb)
    return _RUN


@atexit.register
def _close_at_exit() -> None:
    if _RUN is not None:
        _RUN.close()


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:      # gone, or someone else's file on a shared cache: its last use stays as it is
        pass


def is_shared(root: str | Path) -> bool:
    """Whether ``root`` is the shared cache (the budget applies), not a run's private folder."""
    return os.path.abspath(root) == os.path.abspath(cache_root())


# -- writing ------------------------------------------------------------------------------------------------

def no_room(err: BaseException) -> bool:
    """Whether ``err`` says the disk or the quota is full, or the file too large (ENOSPC, EDQUOT, EFBIG);
    safetensors reports those as ``SafetensorError("... (os error 28)")``."""
    if isinstance(err, OSError):
        return err.errno in NO_ROOM
    if isinstance(err, Exception):
        match = re.search(r"os error (\d+)", str(err))
        return match is not None and int(match.group(1)) in NO_ROOM
    return False


def write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def make_room(root: Path, folder: str, key: str, nbytes: int) -> bool:
    """Whether ``nbytes`` more for the entry ``folder/key`` fit in the budget, after evicting the least recently
    used entries that may go; warns once per run and returns False when they cannot fit."""
    run = _current()
    if not math.isfinite(run.budget):
        return True
    view = run.view(root)

    def excess() -> float:
        old = view.entries.get((folder, key))
        return view.total - (old.size if old else 0) + nbytes - run.budget

    if excess() <= 0:
        return True
    if view.age() > RESCAN_OVER_S:
        view.refresh()
        if excess() <= 0:
            return True
    need = excess()
    cutoff = time.time() - RECENT_USE_S
    candidates = sorted((e for e in view.entries.values()
                         if e.ident != (folder, key) and e.last_use < cutoff and not run.uses(root, e)),
                        key=lambda e: e.last_use)
    if sum(e.size for e in candidates) < need:
        run.skipped += 1
        run.warn_once("budget", (
            f"svdexp: cache budget of {run.max_gb:g} GB ({run.source}) reached in {root}: the entries left are in "
            f"use by this run or were used in the last {RECENT_USE_S / 60:.0f} min; {folder}/{key} and further "
            "entries that do not fit are not cached in this run (results are unaffected; raise cache.max_gb or "
            f"{ENV_MAX_GB}, or `svdexp-cache clear`)"))
        return False
    freed = 0
    for entry in candidates:
        if freed >= need:
            break
        remove_entry(entry)
        view.drop(entry.ident)
        freed += entry.size
        run.evicted += 1
        log.debug("svdexp: cache budget: evicted %s (%d bytes, last used %s)", entry.name(root), entry.size,
                  time.ctime(entry.last_use))
    return True


def write_entry(root: str | Path, folder: str, key: str, path: Path, nbytes: int,
                writer: Callable[[Path], None]) -> bool:
    """Write the entry ``folder/key`` at ``path`` (under ``root``) with ``writer(tmp)``, atomically, within the
    budget when ``root`` is the shared cache. False when skipped (no room in the budget or on the disk: one
    warning per run); other errors are raised, with no temporary file left behind."""
    run = _current()
    root = Path(root)
    run.heartbeat()
    shared = is_shared(root)
    if shared and not make_room(root, folder, key, nbytes):
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        size = atomic_write(path, writer, "cache_write")
    except BaseException as err:
        if not no_room(err):
            raise
        run.skipped += 1
        run.warn_once("no_room", (
            f"svdexp: no room to write the cache in {root} ({type(err).__name__}: {err}); entries that do not fit "
            "are not cached in this run (results are unaffected)"))
        return False
    run.use(root, folder, key, [path], touch=False)
    if shared:
        run.view(root).put(Entry(folder, key, [path], size, time.time()))
    return True


def read_entry(root: str | Path, folder: str, key: str, path: Path) -> None:
    """Record that this run read ``folder/key`` (its last use is now; never evicted under this run)."""
    _current().use(Path(root), folder, key, [path], touch=True)


def use_entry(folder: str, key: str, root: str | Path | None = None) -> None:
    """Count every file of ``folder/key`` (e.g. lm-eval's answers) as used by this run."""
    root = Path(root) if root is not None else cache_root()
    try:
        paths = [Path(p.path) for p in os.scandir(root / folder) if _file_key(p.name) == key]
    except OSError:
        paths = []
    _current().use(root, folder, key, paths, touch=True)


# -- entries that could not be written, kept for this process ------------------------------------------------

def spill(path: Path, save: Callable[[Path], None], value: Any, on_disk: bool) -> None:
    """Keep an entry that could not be written at ``path`` for the rest of this run: in a private temporary
    folder when ``on_disk`` (what ``calib.cache=false`` uses), else, or when that fails too, ``value`` in memory."""
    run = _current()
    if on_disk:
        dest = run.spill_dir() / f"{secrets.token_hex(4)}-{path.name}"
        try:
            save(dest)
            run.spilled[str(path)] = dest
            return
        except Exception:   # noqa: BLE001 - no room there either: memory
            try:
                dest.unlink()
            except OSError:
                pass
    run.spilled[str(path)] = value


def spilled(path: Path) -> Any:
    """What :func:`spill` kept for ``path`` (a file or the value), or ``None``."""
    return _current().spilled.get(str(path)) if _RUN is not None else None
