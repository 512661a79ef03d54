"""A data directory: the store, the secret keys and the daemon's run files.

Layout: ``pttd.sqlite3`` (+ ``-wal``, ``-shm``), ``keys/<public hex>.key`` (mode 0600,
directory 0700), and while a daemon runs ``run.json`` and ``lock``.
"""

from __future__ import annotations

import os

import platformdirs

from .errors import DataDirError, NotFound
from .keys import KeyStore
from .repo import Repository
from .store import Store

DB_NAME = "pttd.sqlite3"
KEYS_DIR = "keys"
ENV_HOME = "PTT_HOME"


def default_data_dir() -> str:
    """``$PTT_HOME``, else the platform's per-user data directory for pttd."""
    env = os.environ.get(ENV_HOME)
    if env:
        return os.path.expanduser(env)  # a literal ~ (a systemd Environment= line) means the same to pttd and pttctl
    return platformdirs.user_data_dir("pttd", appauthor=False)


def make_dir(path: str) -> None:
    """The directory of a data directory (0700), made if it does not exist."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise DataDirError(f"{path} exists and is not a directory")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise DataDirError(f"cannot create data directory {path}: {exc.strerror}") from None


def _sync_dir(path: str) -> None:
    """Make a rename in ``path`` durable (where directories can be synced)."""
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


class DataDir:
    def __init__(self, path: str, store: Store):
        self.path = path
        self.store = store
        self.keys = KeyStore(os.path.join(path, KEYS_DIR))

    @classmethod
    def init(cls, path: str, synchronous: str = "FULL", page_size: int = 0) -> DataDir:
        """Create a data directory with a new repository; refuse an initialized one."""
        path = os.path.abspath(path)
        db = os.path.join(path, DB_NAME)
        if os.path.exists(db):
            raise DataDirError(f"{path} is already a pttd data directory")
        make_dir(path)
        try:
            os.chmod(path, 0o700)  # made before by hand, perhaps readable by all: the store holds secrets
        except OSError as exc:
            raise DataDirError(f"cannot make data directory {path} private: {exc.strerror}") from None
        # Built under another name and renamed when complete: a failure or a kill halfway
        # (a full disk, say) leaves no store that init refuses and nothing can use.
        tmp = db + ".init"
        for leftover in (tmp, tmp + "-wal", tmp + "-shm"):
            if os.path.exists(leftover):
                os.remove(leftover)
        store = Store(tmp, synchronous=synchronous, create=True, page_size=page_size)
        try:
            repo = Repository.create(store, KeyStore(os.path.join(path, KEYS_DIR)))
            store.set_meta("default_repo", repo.id)
            store.execute("PRAGMA journal_mode=DELETE")  # all in the one file, to be renamed
        finally:
            store.close()
        os.replace(tmp, db)
        _sync_dir(path)
        return cls(path, Store(db, synchronous=synchronous))

    @classmethod
    def open(cls, path: str, synchronous: str = "FULL") -> DataDir:
        path = os.path.abspath(path)
        if not os.path.isdir(path):
            raise DataDirError(f"no data directory at {path} (create one with: pttctl --data-dir {path} init)")
        db = os.path.join(path, DB_NAME)
        if not os.path.exists(db):
            raise DataDirError(f"{path} is not a pttd data directory (create one with: pttctl --data-dir {path} init)")
        return cls(path, Store(db, synchronous=synchronous))

    @classmethod
    def open_or_init(cls, path: str, synchronous: str = "FULL", page_size: int = 0) -> tuple[DataDir, bool]:
        if os.path.exists(os.path.join(os.path.abspath(path), DB_NAME)):
            return cls.open(path, synchronous), False
        return cls.init(path, synchronous, page_size), True

    def close(self) -> None:
        self.store.close()

    def default_repo_id(self) -> str:
        repo_id = self.store.get_meta("default_repo")
        if repo_id is None:
            raise NotFound(f"data directory {self.path} has no repository of its own")
        return repo_id

    def repository(self, public_hex: str | None = None) -> Repository:
        return Repository.open(self.store, self.keys, public_hex or self.default_repo_id())
