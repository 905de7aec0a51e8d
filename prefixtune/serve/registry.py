"""Per-tenant prefix registry: files on disk, written atomically, and an LRU of loaded prefixes.

Layout: ``<root>/<tenant-dir>/<name>.safetensors``, where ``<tenant-dir>`` is ``t-`` + a hash of the
tenant name (tenant names never become paths). A name exists only within its tenant: tenant A's
"foo" and tenant B's "foo" are unrelated entries, so no tenant can reach another's prefixes.

Writes go to a unique ``*.tmp`` file in the same directory, are fsynced, validated, then
``os.replace``d over the final name (and the directory fsynced): a crash at any point leaves either
the old entry or the new one, plus at most a ``*.tmp`` file, which startup removes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..prefix import Prefix

log = logging.getLogger("prefixtune.serve")

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SUFFIX = ".safetensors"


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
    def __init__(self, root: str | Path, model, tenants: set[str], max_in_memory: int = 64):
        self.root = Path(root)
        self.model = model
        self.max_in_memory = max(1, int(max_in_memory))
        self._lock = threading.RLock()
        self._index: dict[tuple[str, str], Entry] = {}
        self._cache: OrderedDict[tuple[str, str], Prefix] = OrderedDict()
        self.loads_from_disk = 0
        self.root.mkdir(parents=True, exist_ok=True)
        self._scan(tenants)

    # -- startup -------------------------------------------------------------------------------
    def _scan(self, tenants: set[str]) -> None:
        for tmp in self.root.rglob("*.tmp"):  # leftovers of an interrupted upload (kill -9)
            log.warning("removing leftover partial upload %s", tmp)
            tmp.unlink(missing_ok=True)
        for tenant in sorted(tenants):
            d = self.root / tenant_dir_name(tenant)
            if not d.is_dir():
                continue
            for path in sorted(d.glob("*" + SUFFIX)):
                name = path.name[: -len(SUFFIX)]
                if not valid_name(name):
                    continue
                try:
                    prefix = self._validate(path)
                except InvalidPrefix as e:
                    log.warning("skipping invalid prefix file %s: %s", path, e)
                    continue
                key = (tenant, name)
                self._index[key] = Entry(tenant, name, path, prefix.length, path.stat().st_size, path.stat().st_mtime)
                self._remember(key, prefix)

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
        except InvalidPrefix:
            raise
        except Exception as e:
            msg = str(e).replace(str(path), "upload")
            raise InvalidPrefix(msg) from e
        return prefix

    def _remember(self, key, prefix: Prefix) -> None:
        self._cache[key] = prefix
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_in_memory:
            self._cache.popitem(last=False)  # evicted: reloaded from disk on next use

    def _dir(self, tenant: str) -> Path:
        d = self.root / tenant_dir_name(tenant)
        d.mkdir(parents=True, exist_ok=True)
        return d

    # -- API -----------------------------------------------------------------------------------
    def put(self, tenant: str, name: str, data: bytes) -> tuple[Entry, bool]:
        """Validate and store ``data`` (an exported prefix file) as ``name``. Returns (entry, created)."""
        if not valid_name(name):
            raise InvalidPrefix(f"invalid prefix name {name!r}: use 1-64 of [A-Za-z0-9._-]")
        d = self._dir(tenant)
        tmp = d / f".{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            prefix = self._validate(tmp)
            final = d / (name + SUFFIX)
            with self._lock:
                os.replace(tmp, final)
                _fsync_dir(d)
                key = (tenant, name)
                created = key not in self._index
                st = final.stat()
                entry = Entry(tenant, name, final, prefix.length, st.st_size, st.st_mtime)
                self._index[key] = entry
                self._remember(key, prefix)
            return entry, created
        finally:
            tmp.unlink(missing_ok=True)

    def get(self, tenant: str, name: str) -> Prefix:
        key = (tenant, name)
        with self._lock:
            entry = self._index.get(key)
            if entry is None:
                raise NotFound(name)
            prefix = self._cache.get(key)
            if prefix is not None:
                self._cache.move_to_end(key)
                return prefix
            prefix = self._validate(entry.path)
            self.loads_from_disk += 1
            self._remember(key, prefix)
            return prefix

    def delete(self, tenant: str, name: str) -> None:
        key = (tenant, name)
        with self._lock:
            entry = self._index.pop(key, None)
            if entry is None:
                raise NotFound(name)
            self._cache.pop(key, None)
            entry.path.unlink(missing_ok=True)
            _fsync_dir(entry.path.parent)

    def list(self, tenant: str) -> list[Entry]:
        with self._lock:
            return sorted((e for (t, _), e in self._index.items() if t == tenant), key=lambda e: e.name)

    def stats(self) -> dict:
        with self._lock:
            return {"registered": len(self._index), "in_memory": len(self._cache), "loads_from_disk": self.loads_from_disk}
