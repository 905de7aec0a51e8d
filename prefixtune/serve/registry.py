"""Per-tenant prefix registry: files on a (possibly shared) disk, and an LRU of loaded prefixes.

Layout: ``<root>/<tenant-dir>/<name>.safetensors``, where ``<tenant-dir>`` is ``t-`` + a hash of the
tenant name (tenant names never become paths). A name exists only within its tenant: tenant A's
"foo" and tenant B's "foo" are unrelated entries, so no tenant can reach another's prefixes.

The directory is the only source of truth, so several servers (replicas) can share it:

- Writes go to a unique ``*.tmp`` file in the same directory, are fsynced, validated, then
  ``os.replace``d over the final name (and the directory fsynced). A crash leaves either the old
  entry or the new one, plus at most a ``*.tmp`` file; two writers of one name leave one complete
  file, the last renamed. Files are never modified in place.
- Every use of a prefix opens its file and compares a version stamp (inode, size, mtime) with the
  loaded copy's; a replaced file has a new inode, so every replica serves a new or replaced
  prefix from its next request after the writer's 2xx, and a deleted one is 404 there too.
  Opening (rather than ``stat``) also revalidates NFS's attribute cache (close-to-open).
- Startup removes only ``*.tmp`` files older than ``STALE_TMP_S``: younger ones may be another
  replica's upload in progress.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..prefix import Prefix

log = logging.getLogger("prefixtune.serve")

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SUFFIX = ".safetensors"
STALE_TMP_S = 600.0  # an upload's temp file lives for the seconds it takes to write and check it


class NotFound(KeyError):
    pass


class InvalidPrefix(ValueError):
    pass


def valid_name(name: str) -> bool:
    return bool(NAME_RE.match(name)) and name not in (".", "..")


def tenant_dir_name(tenant: str) -> str:
    return "t-" + hashlib.sha256(tenant.encode()).hexdigest()[:24]


@dataclass
class Entry:
    tenant: str
    name: str
    path: Path
    length: int
    bytes: int
    created: float


def _stamp(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _open_stamp(path: Path) -> tuple:
    """The version stamp of the file ``path`` names now; raises NotFound if there is none."""
    try:
        with open(path, "rb") as f:
            return _stamp(os.fstat(f.fileno()))
    except (FileNotFoundError, NotADirectoryError):
        raise NotFound(path.name) from None


def _header_length(path: Path) -> int:
    """The prefix length written in a prefix file's header (for listings; uses read it all)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(min(size, 1 << 20)))
    return int(json.loads(header["__metadata__"]["prefixtune"])["length"])


def _fsync_dir(path: Path) -> None:
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


class Registry:
    def __init__(self, root: str | Path, model, max_in_memory: int = 64):
        self.root = Path(root)
        self.model = model
        self.max_in_memory = max(1, int(max_in_memory))
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], tuple[tuple, Prefix]] = OrderedDict()
        self._lengths: dict[tuple, int] = {}  # stamp -> prefix length, for listings
        self.loads_from_disk = 0
        self.root.mkdir(parents=True, exist_ok=True)
        now = time.time()
        for tmp in self.root.rglob("*.tmp"):  # leftovers of an interrupted upload (kill -9)
            try:
                if now - tmp.stat().st_mtime > STALE_TMP_S:
                    log.warning("removing leftover partial upload %s", tmp)
                    tmp.unlink(missing_ok=True)
            except FileNotFoundError:
                pass

    # -- helpers -------------------------------------------------------------------------------
    def _validate(self, path: Path) -> Prefix:
        try:
            prefix = Prefix.load(path)  # safetensors only: no pickle anywhere
            if not prefix.kv:
                raise ValueError("the file holds no prefix tensors")
            for placement, t in prefix.kv.items():
                if not bool(t.isfinite().all()):
                    raise ValueError(f"tensor {placement!r} holds NaN or infinite values")
            prefix.check_compatible(self.model)
        except Exception as e:
            msg = str(e).replace(str(path), "upload")
            raise InvalidPrefix(msg) from e
        return prefix

    def _remember(self, key, stamp: tuple, prefix: Prefix) -> None:
        with self._lock:
            self._cache[key] = (stamp, prefix)
            self._cache.move_to_end(key)
            if len(self._lengths) > 65536:  # stamps of replaced files accumulate; forget them now and then
                self._lengths.clear()
            self._lengths[stamp] = prefix.length
            while len(self._cache) > self.max_in_memory:
                self._cache.popitem(last=False)  # evicted: reloaded from disk on next use

    def _dir(self, tenant: str) -> Path:
        return self.root / tenant_dir_name(tenant)

    def _path(self, tenant: str, name: str) -> Path:
        if not valid_name(name):
            raise NotFound(name)
        return self._dir(tenant) / (name + SUFFIX)

    # -- API -----------------------------------------------------------------------------------
    def put(self, tenant: str, name: str, data: bytes) -> tuple[Entry, bool]:
        """Validate and store ``data`` (an exported prefix file) as ``name``. Returns (entry, created)."""
        if not valid_name(name):
            raise InvalidPrefix(f"invalid prefix name {name!r}: use 1-64 of [A-Za-z0-9._-]")
        d = self._dir(tenant)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                st = os.fstat(f.fileno())  # a rename keeps the inode and mtime: this is the new version's stamp
            prefix = self._validate(tmp)
            final = d / (name + SUFFIX)
            created = not final.exists()  # only for 201 vs 200: another replica may race us, harmlessly
            os.replace(tmp, final)
            _fsync_dir(d)
            self._remember((tenant, name), _stamp(st), prefix)
            return Entry(tenant, name, final, prefix.length, st.st_size, st.st_mtime), created
        finally:
            tmp.unlink(missing_ok=True)

    def get(self, tenant: str, name: str) -> Prefix:
        """The current version of the prefix (loaded again if its file changed since). NotFound if none."""
        key, path = (tenant, name), self._path(tenant, name)
        for _ in range(5):
            stamp = _open_stamp(path)
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None and hit[0] == stamp:
                    self._cache.move_to_end(key)
                    return hit[1]
            try:
                prefix = self._validate(path)
            except InvalidPrefix as e:
                if isinstance(e.__cause__, FileNotFoundError):
                    raise NotFound(name) from None
                raise
            if _open_stamp(path) == stamp:  # not replaced while loading: what we read is that version
                with self._lock:
                    self.loads_from_disk += 1
                self._remember(key, stamp, prefix)
                return prefix
        raise InvalidPrefix(f"prefix {name!r} kept changing while it was being read")

    def delete(self, tenant: str, name: str) -> None:
        try:
            self._path(tenant, name).unlink()
        except FileNotFoundError:
            raise NotFound(name) from None
        _fsync_dir(self._dir(tenant))
        with self._lock:
            self._cache.pop((tenant, name), None)

    def list(self, tenant: str) -> list[Entry]:
        entries = []
        for path in sorted(self._dir(tenant).glob("*" + SUFFIX)):
            name = path.name[: -len(SUFFIX)]
            if not valid_name(name):
                continue
            try:
                st = path.stat()
                stamp = _stamp(st)
                length = self._lengths.get(stamp)
                if length is None:
                    length = self._lengths[stamp] = _header_length(path)
            except FileNotFoundError:  # deleted by another replica meanwhile
                continue
            except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
                log.warning("skipping unreadable prefix file %s: %s", path, e)
                continue
            entries.append(Entry(tenant, name, path, length, st.st_size, st.st_mtime))
        return entries

    def stats(self) -> dict:
        registered = sum(1 for _ in self.root.glob("t-*/*" + SUFFIX))
        with self._lock:
            return {"registered": registered, "in_memory": len(self._cache), "loads_from_disk": self.loads_from_disk}
