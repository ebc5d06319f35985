"""What a crash leaves on disk: a recording proxy for the file store's I/O and a disk model.

A helper for test_power_loss.py and test_io_faults.py, not a test module.

The file store does its file I/O through the ``os`` module its modules import
(``engine/stores/file.py`` and its helpers), plus ``Path.mkdir``, ``Path.rename``,
``Path.unlink``, ``Path.lstat``, ``shutil.rmtree`` and group commit's ``syncfs``
(which syncs every file and folder at once). ``record_io`` swaps every
engine module's ``os`` and those methods for proxies that perform every call
for real and apply each one that changes the disk to a ``DiskModel``. The model
keeps, for every file and folder, what reads see (the page cache) apart from what
the disk holds (what a successful fsync or fdatasync wrote), so after any prefix of
the calls it can build the folder a crash at that moment could leave, under each of
the ``CRASH_MODELS``:

- ``lost``: a power cut; every unsynced write, new name and rename is lost;
- ``zeroed``: a power cut after the files' new sizes reached the disk but not their
  data: unsynced appends read as zeros;
- ``torn``: a power cut halfway through writing back: the first half of each
  unsynced write is on disk (an append's, or an overwrite's of reserved space);
- ``reordered``: the same, but the disk wrote the second half first (a drive's
  cache writes pages back in any order): a record's body without its header;
- ``names-first``: a power cut after the folders' new names and renames reached the
  disk but no unsynced file data did (ext4 ``data=writeback`` can do this);
- ``killed``: ``kill -9``; the page cache survives, so everything written is there.

A failed fsync follows Linux (PostgreSQL's 2018 "fsyncgate"): the dirty pages are
marked clean without reaching the disk, so reads still see the data but no later
fsync will ever write it. A store that retries the fsync and reports success is
caught by the ``lost`` image missing what it acknowledged.

The proxy also injects faults (``Fault``) at chosen calls, and fails loudly on a
call that changes the disk but that the model does not know, so a change to the
store's I/O cannot make these suites pass by no longer seeing it.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import os
import pathlib
import re
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import pytest

import engine
from engine.stores import group_sync

CRASH_MODELS: dict[str, tuple[str, str]] = {
    # name: (which names the folders hold, which bytes the files hold)
    "lost": ("disk", "disk"),
    "zeroed": ("disk", "zeroed"),
    "torn": ("disk", "torn"),
    "reordered": ("disk", "reordered"),
    "names-first": ("cache", "disk"),
    "killed": ("cache", "cache"),
}
"""The crash images ``DiskModel.image`` builds; see the module docstring."""

_UNMODELLED = frozenset(
    {
        "write",
        "mkdir",
        "rmdir",
        "rename",
        "renames",
        "symlink",
        "truncate",
        "makedirs",
        "removedirs",
        "writev",
        "pwritev",
        "sendfile",
        "copy_file_range",
        "posix_fallocate",
        "mknod",
        "mkfifo",
    }
)
"""os functions that change the disk in ways the model does not follow."""

_RUNS = re.compile(rb"\x01+")


@dataclass(eq=False)
class FileNode:
    """One file: what reads see, what the disk holds, and which bytes are unsynced."""

    cache: bytearray = field(default_factory=bytearray)
    disk: bytearray = field(default_factory=bytearray)
    dirty: bytearray = field(default_factory=bytearray)  # one flag per byte of ``cache``

    @classmethod
    def synced(cls, data: bytes) -> FileNode:
        return cls(bytearray(data), bytearray(data), bytearray(len(data)))

    def write(self, offset: int, chunk: bytes) -> None:
        end = offset + len(chunk)
        self.resize(max(end, len(self.cache)))
        self.cache[offset:end] = chunk
        self.dirty[offset:end] = b"\x01" * len(chunk)

    def resize(self, size: int) -> None:
        if size < len(self.cache):
            del self.cache[size:]
            del self.dirty[size:]
        else:
            grow = size - len(self.cache)
            self.cache.extend(bytes(grow))
            self.dirty.extend(b"\x01" * grow)

    def sync(self, ok: bool) -> None:
        """Write the dirty bytes back; a failed sync drops them (they stay in the cache)."""
        if ok:
            disk = bytearray(self.disk[: len(self.cache)])
            disk.extend(bytes(len(self.cache) - len(disk)))  # dropped pages read as zeros
            for run in _RUNS.finditer(bytes(self.dirty)):
                disk[run.start() : run.end()] = self.cache[run.start() : run.end()]
            self.disk = disk
        self.dirty = bytearray(len(self.cache))

    def image(self, kind: str) -> bytes:
        if kind == "cache":
            return bytes(self.cache)
        if kind == "disk":
            return bytes(self.disk)
        written = bytearray(
            byte if flag else 0 for byte, flag in zip(self.cache, self.dirty, strict=True)
        )
        if kind == "zeroed":
            disk = self.disk[: len(self.cache)]
            return bytes(disk) + bytes(len(self.cache) - len(disk))
        if kind in ("torn", "reordered"):
            # One half of each unsynced write inside the file's old length (reserved
            # space overwritten), then that half of what it grew by: the first half
            # (``torn``), or the second, the first half reading as zeros.
            first = kind == "torn"
            torn = bytearray(self.disk)
            inside = bytes(self.dirty[: min(len(self.disk), len(self.cache))])
            for run in _RUNS.finditer(inside):
                half = run.start() + (run.end() - run.start() + 1) // 2
                kept = slice(run.start(), half) if first else slice(half, run.end())
                torn[kept] = self.cache[kept]
            extra = written[len(self.disk) :]
            half = (len(extra) + 1) // 2
            grown = extra[:half] if first else bytes(half) + extra[half:]
            return bytes(torn) + bytes(grown)
        raise ValueError(kind)


@dataclass(eq=False)
class DirNode:
    """One folder: the names lookups see, and the names on disk."""

    cache: dict[str, Node] = field(default_factory=dict)
    disk: dict[str, Node] = field(default_factory=dict)

    def sync(self, ok: bool) -> None:
        if ok:
            self.disk = dict(self.cache)


Node = FileNode | DirNode


class DiskModel:
    """The folder ``root`` as the page cache shows it and as the disk holds it."""

    def __init__(self, root: Path, top: DirNode) -> None:
        self.root = root
        self.top = top
        self.fds: dict[int, tuple[Node, str]] = {}  # fd -> node, path

    @classmethod
    def of_folder(cls, root: Path) -> DiskModel:
        """Model ``root`` as it is now, all of it on disk (as after a clean shutdown)."""
        return cls(root, _read_tree(root))

    @classmethod
    def of_image(cls, root: Path, image: dict[str, bytes | None]) -> DiskModel:
        """Model a folder holding ``image``, all of it on disk (as after a reboot)."""
        top = DirNode()
        for name, data in sorted(image.items()):
            *parents, leaf = name.split("/")
            folder = top
            for part in parents:
                child = folder.cache[part]
                assert isinstance(child, DirNode)
                folder = child
            node: Node = DirNode() if data is None else FileNode.synced(data)
            folder.cache[leaf] = folder.disk[leaf] = node
        return cls(root, top)

    def after_kill(self, root: Path) -> DiskModel:
        """Copy this model as a new process finds it on ``root``: unsynced data still unsynced."""
        clone = copy.deepcopy(self)
        clone.root, clone.fds = root, {}
        return clone

    # -- what a crash leaves ----------------------------------------------------

    def image(self, crash_model: str) -> dict[str, bytes | None]:
        """Return relative path -> bytes (None for a folder) after a crash now."""
        names, data = CRASH_MODELS[crash_model]
        found: dict[str, bytes | None] = {}

        def walk(folder: DirNode, prefix: str) -> None:
            for name, node in sorted((folder.disk if names == "disk" else folder.cache).items()):
                path = f"{prefix}{name}"
                if isinstance(node, DirNode):
                    found[path] = None
                    walk(node, f"{path}/")
                else:
                    found[path] = node.image(data)

        walk(self.top, "")
        return found

    def check_matches(self) -> None:
        """Fail if the real folder differs from what the model says reads see."""
        actual = {
            name: (None if data is None else bytes(data))
            for name, data in _read_image(self.root).items()
        }
        modelled = self.image("killed")
        names = actual.keys() | modelled.keys()
        differ = sorted(
            name for name in names if actual.get(name, b"?") != modelled.get(name, b"?")
        )
        assert not differ, f"the store changed {differ} through a call this model does not see"

    # -- applying calls ---------------------------------------------------------

    def _locate(self, path: str | os.PathLike[str]) -> tuple[DirNode, str, str]:
        """Return the folder node holding ``path``, its last name, and the relative path."""
        relative = Path(path).relative_to(self.root)
        assert relative.parts, "the store root itself has no parent here"
        folder = self.top
        for part in relative.parts[:-1]:
            child = folder.cache[part]
            assert isinstance(child, DirNode)
            folder = child
        return folder, relative.parts[-1], str(relative)

    def node_at(self, path: str | os.PathLike[str]) -> Node | None:
        relative = Path(path).relative_to(self.root)
        node: Node | None = self.top
        for part in relative.parts:
            if not isinstance(node, DirNode):
                return None
            node = node.cache.get(part)
        return node

    def open(self, path: str | os.PathLike[str], fd: int, flags: int) -> bool:
        """Follow ``os.open``; return whether it changed anything."""
        node = self.node_at(path)
        changed = False
        if node is None:
            folder, name, _ = self._locate(path)
            node = folder.cache[name] = FileNode()
            changed = True
        if flags & os.O_TRUNC and isinstance(node, FileNode) and node.cache:
            node.resize(0)
            changed = True
        self.fds[fd] = (node, str(Path(path).relative_to(self.root)))
        return changed

    def sync_all(self, *, ok: bool) -> None:
        """Sync every file and folder the page cache holds (``syncfs``)."""

        def walk(folder: DirNode) -> None:
            folder.sync(ok)
            for node in folder.cache.values():
                if isinstance(node, DirNode):
                    walk(node)
                else:
                    node.sync(ok)

        walk(self.top)

    def file(self, fd: int) -> FileNode:
        node = self.fds[fd][0]
        assert isinstance(node, FileNode), f"fd {fd} is not a file"
        return node

    def label(self, fd: int) -> str:
        return self.fds[fd][1] if fd in self.fds else f"fd {fd}"

    def close(self, fd: int) -> None:
        self.fds.pop(fd, None)

    def rename(self, src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        source, old, _ = self._locate(src)
        target, new, _ = self._locate(dst)
        target.cache[new] = source.cache.pop(old)

    def link(self, src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        node = self.node_at(src)
        assert isinstance(node, FileNode), f"link of {src}: not a file"
        target, name, _ = self._locate(dst)
        target.cache[name] = node

    def mkdir(self, path: str | os.PathLike[str]) -> None:
        folder, name, _ = self._locate(path)
        folder.cache[name] = DirNode()

    def remove(self, path: str | os.PathLike[str]) -> None:
        folder, name, _ = self._locate(path)
        folder.cache.pop(name)


def _read_image(root: Path) -> dict[str, bytes | None]:
    found: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        found[name] = None if path.is_dir() else path.read_bytes()
    return found


def _read_tree(root: Path) -> DirNode:
    return DiskModel.of_image(root, _read_image(root)).top


def write_image(image: dict[str, bytes | None], root: Path) -> None:
    """Build a folder holding ``image`` at ``root`` (which must not exist)."""
    root.mkdir(mode=0o700)
    for name, data in sorted(image.items()):
        path = root / name
        if data is None:
            path.mkdir(mode=0o700)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)


# -- faults -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IoCall:
    """One I/O call the store made: its number in the recording, its name, its target."""

    index: int
    name: str
    target: str


@dataclass(frozen=True, slots=True)
class Fault:
    """What to do instead of a call: fail with ``code``, or (``short``) write half."""

    code: int = errno.EIO
    short: bool = False


FaultPlan = Callable[[IoCall], Fault | None]


def _error(code: int, call: IoCall) -> OSError:
    return OSError(code, f"{os.strerror(code)} (injected at {call.name} {call.target})")


# -- the recorder -----------------------------------------------------------------


@dataclass
class CrashPoint:
    """The disk after one call that changed it (or before any, for the first point)."""

    call: str
    model: DiskModel


class IoRecorder:
    """Perform the store's I/O for real, keep the model in step, and inject faults."""

    def __init__(self, model: DiskModel, faults: FaultPlan | None = None) -> None:
        self.model = model
        self.faults = faults
        self.calls: list[IoCall] = []
        self.points: list[CrashPoint] = [CrashPoint("(start)", copy.deepcopy(model))]
        self._lock = threading.RLock()

    def mark(self) -> int:
        """Return the index of the latest crash point: the disk as it is now."""
        return len(self.points) - 1

    def _call(self, name: str, target: str) -> Fault | None:
        call = IoCall(len(self.calls), name, target)
        self.calls.append(call)
        fault = self.faults(call) if self.faults is not None else None
        if fault is not None and not fault.short and name not in ("close", "fsync", "fdatasync"):
            raise _error(fault.code, call)  # fails before doing anything
        return fault

    def _changed(self, what: str) -> None:
        self.points.append(CrashPoint(what, copy.deepcopy(self.model)))

    def _target(self, path: Any) -> str:
        with contextlib.suppress(ValueError):
            return str(Path(path).relative_to(self.model.root))
        return str(path)

    # -- os functions ---------------------------------------------------------

    def open(self, path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        with self._lock:
            self._call("open", self._target(path))
            fd = os.open(path, flags, mode, **kwargs)
            if self.model.open(path, fd, flags):
                self._changed(f"open {self._target(path)}")
            return fd

    def close(self, fd: int) -> None:
        with self._lock:
            fault = self._call("close", self.model.label(fd))
            self.model.close(fd)
            os.close(fd)  # Linux closes the descriptor even when close reports an error
            if fault is not None:
                raise _error(fault.code, self.calls[-1])

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        with self._lock:
            chunk = bytes(data)
            fault = self._call("pwrite", self.model.label(fd))
            if fault is not None and fault.short:
                chunk = chunk[: max(1, len(chunk) // 2)]
            written = os.pwrite(fd, chunk, offset)
            self.model.file(fd).write(offset, chunk[:written])
            self._changed(f"pwrite {self.model.label(fd)} [{offset}:{offset + written}]")
            return written

    def ftruncate(self, fd: int, size: int) -> None:
        with self._lock:
            self._call("ftruncate", self.model.label(fd))
            os.ftruncate(fd, size)
            self.model.file(fd).resize(size)
            self._changed(f"ftruncate {self.model.label(fd)} to {size}")

    def _sync(self, name: str, fd: int, real: Callable[[int], None]) -> None:
        with self._lock:
            fault = self._call(name, self.model.label(fd))
            node = self.model.fds[fd][0]
            if fault is not None:
                node.sync(ok=False)  # the kernel drops the dirty pages: never written
                self._changed(f"{name} {self.model.label(fd)} FAILED")
                raise _error(fault.code, self.calls[-1])
            real(fd)
            node.sync(ok=True)
            self._changed(f"{name} {self.model.label(fd)}")

    def fsync(self, fd: int) -> None:
        self._sync("fsync", fd, os.fsync)

    def syncfs(self, fd: int) -> None:
        """Group commit's sync of the whole filesystem: every file and folder at once."""
        with self._lock:
            fault = self._call("syncfs", self.model.label(fd))
            if fault is not None:
                self.model.sync_all(ok=False)
                self._changed(f"syncfs {self.model.label(fd)} FAILED")
                raise _error(fault.code, self.calls[-1])
            _REAL_SYNCFS(fd)
            self.model.sync_all(ok=True)
            self._changed(f"syncfs {self.model.label(fd)}")

    def fdatasync(self, fd: int) -> None:
        self._sync("fdatasync", fd, os.fdatasync)

    def replace(self, src: Any, dst: Any) -> None:
        with self._lock:
            self._call("replace", f"{self._target(src)} -> {self._target(dst)}")
            os.replace(src, dst)
            self.model.rename(src, dst)
            self._changed(f"replace {self._target(src)} -> {self._target(dst)}")

    def link(self, src: Any, dst: Any) -> None:
        with self._lock:
            self._call("link", f"{self._target(src)} -> {self._target(dst)}")
            os.link(src, dst)
            self.model.link(src, dst)
            self._changed(f"link {self._target(src)} -> {self._target(dst)}")

    def unlink(self, path: Any) -> None:
        with self._lock:
            self._call("unlink", self._target(path))
            os.unlink(path)
            self.model.remove(path)
            self._changed(f"unlink {self._target(path)}")

    remove = unlink

    def read_only(self, name: str, target: str) -> None:
        """Count a call that changes nothing (a read, a stat) and inject its fault."""
        with self._lock:
            self._call(name, target)

    # -- shutil and pathlib ---------------------------------------------------

    def rmtree(self, path: Any, *args: Any, **kwargs: Any) -> None:
        with self._lock:
            self._call("rmtree", self._target(path))
            existed = os.path.lexists(path)
            shutil.rmtree(path, *args, **kwargs)
            if existed:
                self.model.remove(path)
                self._changed(f"rmtree {self._target(path)}")

    def path_mkdir(self, path: Path, mode: int, parents: bool, exist_ok: bool) -> None:
        with self._lock:
            self._call("mkdir", self._target(path))
            existed = path.is_dir()
            _REAL_MKDIR(path, mode, parents, exist_ok)
            if not existed:
                if parents and self.model.node_at(path.parent) is None:
                    raise AssertionError(f"mkdir -p of {path} is not modelled")
                self.model.mkdir(path)
                self._changed(f"mkdir {self._target(path)}")

    def path_rename(self, path: Path, target: Any) -> Path:
        with self._lock:
            self._call("rename", f"{self._target(path)} -> {self._target(target)}")
            renamed = _REAL_RENAME(path, target)
            self.model.rename(path, target)
            self._changed(f"rename {self._target(path)} -> {self._target(target)}")
            return renamed

    def in_root(self, path: Path) -> bool:
        try:
            path.relative_to(self.model.root)
        except ValueError:
            return False
        return True


_REAL_MKDIR = pathlib.Path.mkdir
_REAL_RENAME = pathlib.Path.rename
_REAL_LSTAT = pathlib.Path.lstat
_REAL_UNLINK = pathlib.Path.unlink
_REAL_SYNCFS = group_sync.syncfs


class _ReadHandle:
    """A file opened for reading through ``os.fdopen``, whose reads count as I/O calls."""

    def __init__(self, recorder: IoRecorder, handle: IO[bytes], label: str) -> None:
        self._recorder, self._handle, self._label = recorder, handle, label

    def read(self, size: int = -1) -> bytes:
        self._recorder.read_only("read", self._label)
        return self._handle.read(size)

    def __enter__(self) -> _ReadHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._handle.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


class _OsProxy:
    """Stands in for ``os`` inside engine/stores/file.py."""

    _READS = ("fstat", "pread", "read", "listdir", "stat", "lstat", "scandir", "lseek")

    def __init__(self, recorder: IoRecorder) -> None:
        self._recorder = recorder

    def __getattr__(self, name: str) -> Any:
        recorder = self._recorder
        if name in _UNMODELLED:
            raise AssertionError(f"os.{name} changes the disk and is not modelled by disk_model")
        if name in ("open", "close", "pwrite", "ftruncate", "fsync", "fdatasync"):
            return getattr(recorder, name)
        if name in ("replace", "link", "unlink", "remove"):
            return getattr(recorder, name)
        if name == "fdopen":
            return self._fdopen
        real = getattr(os, name)
        if name in self._READS:

            def counted(first: Any, *args: Any, **kwargs: Any) -> Any:
                target = (
                    recorder.model.label(first)
                    if isinstance(first, int)
                    else recorder._target(first)
                )
                recorder.read_only(name, target)
                return real(first, *args, **kwargs)

            return counted
        return real

    def _fdopen(self, fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if set(mode) - set("rb"):
            raise AssertionError(f"os.fdopen(mode={mode!r}) writes around the model")
        recorder = self._recorder
        label = recorder.model.label(fd)
        recorder.read_only("fdopen", label)
        return _ReadHandle(recorder, os.fdopen(fd, mode, *args, **kwargs), label)


class _ShutilProxy:
    def __init__(self, recorder: IoRecorder) -> None:
        self.rmtree = recorder.rmtree

    def __getattr__(self, name: str) -> Any:
        return getattr(shutil, name)


def _engine_modules() -> list[ModuleType]:
    """Every loaded module of the engine package: any of them may do the store's I/O."""
    prefix = f"{engine.__name__}."
    return [
        module
        for name, module in sorted(sys.modules.items())
        if module is not None and (name == engine.__name__ or name.startswith(prefix))
    ]


@contextlib.contextmanager
def record_io(model: DiskModel, faults: FaultPlan | None = None) -> Iterator[IoRecorder]:
    """Route the file store's I/O through an ``IoRecorder`` for the ``with`` block."""
    recorder = IoRecorder(model, faults)

    def mkdir(path: Path, mode: int = 0o777, parents: bool = False, exist_ok: bool = False) -> None:
        if recorder.in_root(path):
            recorder.path_mkdir(path, mode, parents, exist_ok)
        else:
            _REAL_MKDIR(path, mode, parents, exist_ok)

    def rename(path: Path, target: Any) -> Path:
        if recorder.in_root(path):
            return recorder.path_rename(path, target)
        return _REAL_RENAME(path, target)

    def unlink(path: Path, missing_ok: bool = False) -> None:
        if not recorder.in_root(path):
            _REAL_UNLINK(path, missing_ok)
        elif not missing_ok or os.path.lexists(path):
            recorder.unlink(path)

    def lstat(path: Path) -> os.stat_result:
        if recorder.in_root(path):
            recorder.read_only("lstat", recorder._target(path))
        return _REAL_LSTAT(path)

    with pytest.MonkeyPatch.context() as patch:
        for module in _engine_modules():
            if getattr(module, "os", None) is os:
                patch.setattr(module, "os", _OsProxy(recorder))
            if getattr(module, "shutil", None) is shutil:
                patch.setattr(module, "shutil", _ShutilProxy(recorder))
        patch.setattr(group_sync, "syncfs", recorder.syncfs)
        patch.setattr(pathlib.Path, "mkdir", mkdir)
        patch.setattr(pathlib.Path, "rename", rename)
        patch.setattr(pathlib.Path, "unlink", unlink)
        patch.setattr(pathlib.Path, "lstat", lstat)
        yield recorder
