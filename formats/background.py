"""Saves off the training path: the data is copied now, encoded and written in the background.

`Snapshot` copies tensors (and QTensors' codes + absmax) into host buffers, one copy per
tensor: CUDA tensors into pinned memory with asynchronous copies and one synchronize per
device. The copy is what a caller waits for (the stall); its buffers come from a pool that
keeps those of finished saves, so a training loop that saves the same state again and again
copies into memory that is already mapped (first-touch page faults cost as much as the copy).
The pool keeps at most as many idle bytes as were ever in flight at once; `release_buffers`
empties it.

`submit` runs the encode-and-write on one background thread, in submission order, so saves
to the same path land in order; a blocking save to a path waits for the pending background
saves to it (`wait_for`, called by every atomic save). A failure is set on the returned
`SaveFuture`; one that nobody reads is logged when the future is collected or when the
interpreter exits, and the interpreter waits for pending saves before it exits. Each write
is atomic (formats/atomic.py): a process killed mid-save leaves the previous file.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures

import torch

from ..codec import QTensor
from ..codec.native import _fresh

__all__ = ["SaveFuture", "Snapshot", "release_buffers", "submit", "wait_all", "wait_for"]

logger = logging.getLogger("q8")


class SaveFuture(Future):
    """The outcome of a background save: `result()` returns None once the file is in place,
    or raises what the save raised. A failure that is never read (`result()` or
    `exception()`) is logged when the future is collected or at interpreter exit."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._observed = False

    def result(self, timeout: float | None = None) -> None:
        self._observed = True
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._observed = True
        return super().exception(timeout)

    def _report_unobserved(self) -> None:
        if self.done() and not self.cancelled() and not self._observed:
            self._observed = True
            error = Future.exception(self, 0)
            if error is not None:
                logger.error(
                    "q8: the background save to %s failed and nobody read its error: %s: %s",
                    self.path,
                    type(error).__name__,
                    error,
                )

    def __del__(self) -> None:
        self._report_unobserved()


class _BufferPool:
    """Host buffers (uint8) by (bytes, pinned), reused across snapshots."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[tuple[int, bool], list[torch.Tensor]] = {}
        self._free_bytes = self._in_use = self._peak = 0

    def take(self, nbytes: int, pinned: bool) -> torch.Tensor:
        with self._lock:
            self._in_use += nbytes
            self._peak = max(self._peak, self._in_use)
            free = self._free.get((nbytes, pinned))
            if free:
                self._free_bytes -= nbytes
                return free.pop()
        if pinned:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return _fresh(nbytes, torch.uint8)

    def give(self, buffers: list[tuple[torch.Tensor, bool]]) -> None:
        with self._lock:
            for buf, pinned in buffers:
                self._in_use -= buf.numel()
                self._free.setdefault((buf.numel(), pinned), []).append(buf)
                self._free_bytes += buf.numel()
            for key in list(self._free):  # idle bytes stay within the most ever in flight
                while self._free_bytes > self._peak and self._free[key]:
                    self._free_bytes -= self._free[key].pop().numel()
                if not self._free[key]:
                    del self._free[key]

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._free_bytes, self._peak = 0, self._in_use


_POOL = _BufferPool()


def release_buffers() -> None:
    """Free the host buffers kept for the next asynchronous save (pinned ones included)."""
    _POOL.clear()


class Snapshot:
    """Copies of `tensors` (name -> tensor or QTensor) that later in-place updates of the
    originals cannot change, on the CPU. `release()` hands the buffers back to the pool."""

    def __init__(self, tensors: Mapping[str, torch.Tensor | QTensor]) -> None:
        self._buffers: list[tuple[torch.Tensor, bool]] = []
        devices: set[torch.device] = set()
        self.tensors = {name: self._copy(x, devices) for name, x in tensors.items()}
        for device in devices:  # the asynchronous copies to pinned memory have landed
            torch.cuda.current_stream(device).synchronize()

    def _copy(self, x: torch.Tensor | QTensor, devices: set) -> torch.Tensor | QTensor:
        if isinstance(x, QTensor):
            codes, absmax = self._copy(x.codes, devices), self._copy(x.absmax, devices)
            return QTensor(codes, absmax, x.code, x.blocksize, x.shape, x.dtype)
        x = x.detach()
        if x.device.type not in ("cpu", "cuda"):
            return x.to("cpu", copy=True)
        cuda = x.device.type == "cuda"
        buf = _POOL.take(x.numel() * x.element_size(), pinned=cuda)
        self._buffers.append((buf, cuda))
        out = buf.view(x.dtype).view(x.shape)
        out.copy_(x, non_blocking=cuda)
        if cuda:
            devices.add(x.device)
        return out

    def release(self) -> None:
        self.tensors = {}
        _POOL.give(self._buffers)
        self._buffers = []


_LOCK = threading.Lock()
_PENDING: dict[str, list[SaveFuture]] = {}  # by real path
_UNREAD: weakref.WeakSet[SaveFuture] = weakref.WeakSet()
_EXECUTOR: ThreadPoolExecutor | None = None
_IN_SAVE_THREAD = threading.local()


def _key(path: str | os.PathLike) -> str:
    return os.path.realpath(path)


def _executor() -> ThreadPoolExecutor:
    global _EXECUTOR
    with _LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="q8-save")
            # Runs before concurrent.futures shuts its pools down at exit (threading's exit
            # hooks run last registered first), so the pending saves can still use them.
            threading._register_atexit(_at_exit)
    return _EXECUTOR


def submit(path: str | os.PathLike, write: Callable[[], None], snapshot: Snapshot) -> SaveFuture:
    """Run `write()` (which saves `snapshot` to `path`) on the background save thread, after
    every save submitted before it; the snapshot's buffers go back to the pool afterwards."""
    key, future = _key(path), SaveFuture(os.fspath(path))
    with _LOCK:
        _PENDING.setdefault(key, []).append(future)
    _UNREAD.add(future)

    def run() -> None:
        error = None
        if future.set_running_or_notify_cancel():
            _IN_SAVE_THREAD.active = True
            try:
                write()
            except BaseException as e:  # handed to the caller through the future
                error = e
            finally:
                _IN_SAVE_THREAD.active = False
        snapshot.release()
        with _LOCK:
            _PENDING[key].remove(future)
            if not _PENDING[key]:
                del _PENDING[key]
        if future.cancelled():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    _executor().submit(run)
    return future


def wait_for(path: str | os.PathLike) -> None:
    """Block until the background saves pending for `path` are done (a blocking save waits
    here so that it lands after them). No-op on the save thread itself."""
    if getattr(_IN_SAVE_THREAD, "active", False):
        return
    with _LOCK:
        pending = list(_PENDING.get(_key(path), ()))
    if pending:
        wait_futures(pending)


def wait_all() -> None:
    """Block until every pending background save is done (errors stay in their futures)."""
    with _LOCK:
        pending = [f for futures in _PENDING.values() for f in futures]
    wait_futures(pending)


def _at_exit() -> None:
    wait_all()
    for future in list(_UNREAD):
        future._report_unobserved()
