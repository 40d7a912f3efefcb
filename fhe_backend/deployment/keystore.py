"""Where the FHE server keeps uploaded evaluation keys: the key-store interface and a folder store.

The HTTP application (`fhe_backend.deployment.server`) talks to keys only through `KeyStore`:

* `add(record, data, quota)`: store new keys atomically, refusing them when the model's quota
  (`KeyQuota`: keys and bytes per model) would be exceeded;
* `record(key_id)`, `data(key_id)`: read a key's metadata and its serialized bytes;
* `delete(key_id)`, `quarantine(key_id, reason)`: remove keys, or set aside keys that made a
  computation crash so that they are never loaded again (kept for inspection);
* `expire(now)`: delete keys past their expiry; `check()`: raise `KeyStoreUnavailable` when keys
  cannot be stored (used at start-up and by ``GET /health``).

`FolderKeyStore` keeps ``<key_id>.evk`` (Concrete's serialization) and ``<key_id>.json`` (a
`KeyRecord`) in one folder, which every worker process, a restarted server, or other machines
mounting the same folder share. Another store (e.g. one backed by a Ray object store, where no
shared file system exists) implements the same methods; the application needs nothing else.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, List, Optional

KEY_ID_PATTERN = r"^[A-Za-z0-9_\-]{32,64}$"


class KeyStoreError(Exception):
    """Base of the key-store errors (the application maps each one to an HTTP answer)."""


class UnknownKey(KeyStoreError):
    """No keys are stored under this id (never uploaded, deleted or expired)."""


class QuarantinedKey(KeyStoreError):
    """These keys made a computation crash and are set aside; the message says why."""

    def __init__(self, message: str, record: "KeyRecord"):
        super().__init__(message)
        self.record = record


class QuotaExceeded(KeyStoreError):
    """Storing the keys would exceed the model's quota of keys or bytes."""


class KeyStoreUnavailable(KeyStoreError):
    """Keys cannot be stored (missing or read-only folder, full disk, ...)."""


@dataclass
class KeyRecord:
    """What is known about stored keys besides their bytes (JSON-serializable)."""

    key_id: str
    model: str
    module: str
    input_shape: str
    size: int
    created: float
    expires: Optional[float] = None  # epoch seconds; None: never
    owner: Optional[str] = None  # SHA-256 of the API key that uploaded them; None: no authentication
    quarantined: Optional[str] = None  # why the keys were set aside

    def target(self) -> dict:
        """The (model, module, input shape) these keys were uploaded for."""
        return {"model": self.model, "module": self.module, "input_shape": self.input_shape}

    def expired(self, now: float) -> bool:
        """Whether the keys are past their expiry at `now` (epoch seconds)."""
        return self.expires is not None and now >= self.expires


@dataclass(frozen=True)
class KeyQuota:
    """Limits on the keys stored for one model (None: unlimited)."""

    max_keys: Optional[int] = None
    max_bytes: Optional[int] = None


def new_key_id() -> str:
    """An unguessable key id (256 random bits, URL-safe)."""
    return secrets.token_urlsafe(32)


class KeyStore(ABC):
    """Storage of uploaded evaluation keys shared by every worker of a server (see the module doc)."""

    @abstractmethod
    def check(self) -> None:
        """Raise `KeyStoreUnavailable` (saying what and how to fix) when keys cannot be stored."""

    @abstractmethod
    def add(self, record: KeyRecord, data: bytes, quota: KeyQuota) -> None:
        """Store `data` under `record.key_id` atomically; `QuotaExceeded` when over `quota`."""

    @abstractmethod
    def record(self, key_id: str) -> KeyRecord:
        """The record of live keys; `UnknownKey` (also when expired), `QuarantinedKey`."""

    @abstractmethod
    def data(self, key_id: str) -> bytes:
        """The serialized keys of `key_id`; `UnknownKey` when they are gone."""

    @abstractmethod
    def delete(self, key_id: str) -> None:
        """Remove keys (quarantined ones too); `UnknownKey` when there are none."""

    @abstractmethod
    def quarantine(self, key_id: str, reason: str) -> None:
        """Set keys aside for good (they are never loaded again), recording `reason`."""

    @abstractmethod
    def records(self) -> Iterator[KeyRecord]:
        """Every stored record (live, expired and quarantined)."""

    def expire(self, now: Optional[float] = None) -> int:
        """Delete keys past their expiry; returns how many were deleted."""
        now = time.time() if now is None else now
        count = 0
        for record in list(self.records()):
            if record.expired(now):
                try:
                    self.delete(record.key_id)
                    count += 1
                except UnknownKey:
                    pass  # another worker deleted them first
        return count


class FolderKeyStore(KeyStore):
    """Keys as files of one folder (shared between workers and machines): see the module doc.

    Files are written to a temporary name and renamed, the metadata last, so a reader sees
    either complete keys or none. Quota checks and writes hold an exclusive lock on
    ``.lock`` in the folder, so concurrent uploads from several workers cannot exceed a quota.
    """

    QUARANTINE = "quarantine"

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._lock = threading.Lock()

    # ---- the interface ------------------------------------------------------------------

    def check(self) -> None:
        """Create the folder when missing, then prove it writable with a probe file."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / self.QUARANTINE).mkdir(exist_ok=True)
            probe = self.folder / f".probe.{os.getpid()}.{threading.get_ident()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as error:
            raise KeyStoreUnavailable(
                f"the keys folder {self.folder} is not writable ({error.strerror or error}): create it, give "
                "the server's user write access, free disk space, or choose another --keys-dir"
            ) from error

    def add(self, record: KeyRecord, data: bytes, quota: KeyQuota) -> None:
        """Write ``<id>.evk`` then ``<id>.json`` (both via temporary files) under the folder lock."""
        data_path, meta_path = self._paths(record.key_id)
        try:
            with self._locked():
                self._check_quota(record, quota)
                _write_atomically(data_path, data)
                _write_atomically(meta_path, json.dumps(asdict(record)).encode())
        except OSError as error:
            try:
                data_path.unlink(missing_ok=True)
            except OSError:
                pass  # the folder itself is gone
            raise KeyStoreUnavailable(
                f"cannot store keys in {self.folder} ({error.strerror or error}): "
                "check the keys folder (permissions, free space)"
            ) from error

    def record(self, key_id: str) -> KeyRecord:
        """Read ``<id>.json``; expired keys are deleted on sight."""
        data_path, meta_path = self._paths(key_id)
        record = self._read_record(meta_path)
        if record is None:
            quarantined = self._read_record(self.folder / self.QUARANTINE / meta_path.name)
            if quarantined is not None:
                raise QuarantinedKey(
                    f"key_id '{key_id}' is quarantined: {quarantined.quarantined}; "
                    "upload fresh keys generated from this module's client.zip",
                    quarantined,
                )
            raise UnknownKey(f"unknown key_id '{key_id}': upload evaluation keys first (POST .../keys)")
        if record.expired(time.time()):
            try:
                self.delete(key_id)
            except UnknownKey:
                pass
            raise UnknownKey(
                f"key_id '{key_id}' has expired (the server keeps keys for a limited time, "
                "--key-ttl-seconds): upload the evaluation keys again"
            )
        if not data_path.is_file():
            raise UnknownKey(f"unknown key_id '{key_id}': its keys are gone; upload them again")
        return record

    def data(self, key_id: str) -> bytes:
        """The bytes of ``<id>.evk``."""
        data_path, _ = self._paths(key_id)
        try:
            return data_path.read_bytes()
        except FileNotFoundError:
            raise UnknownKey(f"unknown key_id '{key_id}': its keys are gone; upload them again") from None

    def delete(self, key_id: str) -> None:
        """Remove the files of `key_id` (metadata first, so readers stop seeing the keys at once)."""
        data_path, meta_path = self._paths(key_id)
        quarantined = self.folder / self.QUARANTINE
        found = False
        for path in (meta_path, data_path, quarantined / meta_path.name, quarantined / data_path.name):
            try:
                path.unlink()
                found = True
            except FileNotFoundError:
                pass
        if not found:
            raise UnknownKey(f"unknown key_id '{key_id}'")

    def quarantine(self, key_id: str, reason: str) -> None:
        """Move both files to ``quarantine/``, the reason recorded in the metadata."""
        data_path, meta_path = self._paths(key_id)
        target = self.folder / self.QUARANTINE
        record = self._read_record(meta_path)
        if record is None:
            return  # deleted or quarantined by another worker meanwhile
        record.quarantined = reason
        target.mkdir(exist_ok=True)
        _write_atomically(target / meta_path.name, json.dumps(asdict(record)).encode())
        meta_path.unlink(missing_ok=True)
        if data_path.exists():
            data_path.replace(target / data_path.name)

    def records(self) -> Iterator[KeyRecord]:
        """Records of the folder and of ``quarantine/``."""
        for folder in (self.folder, self.folder / self.QUARANTINE):
            for meta_path in sorted(folder.glob("*.json")):
                record = self._read_record(meta_path)
                if record is not None:
                    yield record

    # ---- helpers ------------------------------------------------------------------------

    def _check_quota(self, record: KeyRecord, quota: KeyQuota) -> None:
        if quota.max_keys is None and quota.max_bytes is None:
            return
        now = time.time()
        same_model = [
            r for r in self.records() if r.model == record.model and not r.quarantined and not r.expired(now)
        ]
        if quota.max_keys is not None and len(same_model) + 1 > quota.max_keys:
            raise QuotaExceeded(
                f"model '{record.model}' already has {len(same_model)} stored key sets, the "
                f"server's limit (--max-keys-per-model {quota.max_keys}): delete unused keys "
                "(DELETE .../keys/<key_id>) or wait for them to expire"
            )
        used = sum(r.size for r in same_model)
        if quota.max_bytes is not None and used + record.size > quota.max_bytes:
            raise QuotaExceeded(
                f"model '{record.model}' holds {used} bytes of keys; {record.size} more exceed the "
                f"server's limit (--max-key-bytes-per-model {quota.max_bytes}): delete unused keys "
                "(DELETE .../keys/<key_id>) or wait for them to expire"
            )

    def _locked(self):
        return _FolderLock(self.folder / ".lock", self._lock)

    def _paths(self, key_id: str):
        if not re.match(KEY_ID_PATTERN, key_id):  # ids become file names: never a path
            raise UnknownKey(f"unknown key_id '{key_id}'")
        return self.folder / f"{key_id}.evk", self.folder / f"{key_id}.json"

    @staticmethod
    def _read_record(meta_path: Path) -> Optional[KeyRecord]:
        try:
            return KeyRecord(**json.loads(meta_path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as error:
            raise KeyStoreUnavailable(
                f"cannot read key metadata {meta_path} ({error}): delete the file or restore it"
            ) from error


class _FolderLock:
    """An exclusive `flock` on a file of the folder (across processes) plus a thread lock."""

    def __init__(self, path: Path, thread_lock: threading.Lock):
        self.path, self.thread_lock = path, thread_lock
        self.handle: Optional[BinaryIO] = None

    def __enter__(self):
        import fcntl

        self.thread_lock.acquire()
        try:
            self.handle = open(self.path, "a+b")
            fcntl.flock(self.handle, fcntl.LOCK_EX)
        except BaseException:
            self.thread_lock.release()
            raise
        return self

    def __exit__(self, *_exc) -> None:
        import fcntl

        try:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
        finally:
            self.thread_lock.release()


def _write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file next to `path`, flush it to disk, rename it over `path`."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


__all__: List[str] = [
    "KeyStore",
    "FolderKeyStore",
    "KeyRecord",
    "KeyQuota",
    "KeyStoreError",
    "UnknownKey",
    "QuarantinedKey",
    "QuotaExceeded",
    "KeyStoreUnavailable",
    "new_key_id",
    "KEY_ID_PATTERN",
]
