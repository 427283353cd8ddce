"""Saves off the training path: the data is copied now, encoded and written in the background.

`Snapshot` copies tensors (and QTensors' codes + absmax, alone or in nested state) into
host buffers, one copy per tensor: CUDA tensors into pinned memory with asynchronous copies and one synchronize per
device. The copy is what a caller waits for (the stall); its buffers come from a pool that
keeps those of finished saves, so a training loop that saves the same state again and again
copies into memory that is already mapped (first-touch page faults cost as much as the copy).
The pool keeps at most as many idle bytes as were ever in flight at once; `release_buffers`
empties it.

`save_in_background` runs the encode-and-write on one background thread, in submission order, so saves
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
from typing import Any

import numpy
import torch

from ..codec import QTensor

__all__ = ["SaveFuture", "Snapshot", "release_buffers", "save_in_background", "wait_all", "wait_for"]

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
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)

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
    """A copy of `obj` (tensors and QTensors, alone or in nested dicts, lists and tuples)
    that later in-place updates of the original cannot change, on the CPU: `value`. Views
    of the same memory with the same layout (tied weights) share one copy; other values are
    kept as they are. `release()` hands the buffers back to the pool."""

    def __init__(self, obj: Any) -> None:
        self._buffers: list[tuple[torch.Tensor, bool]] = []
        self._copies: dict[tuple, torch.Tensor] = {}
        self._devices: set[torch.device] = set()
        self.value = self._copy(obj)
        for device in self._devices:  # the asynchronous copies to pinned memory have landed
            torch.cuda.current_stream(device).synchronize()
        del self._copies

    def _copy(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return self._tensor(x)
        if isinstance(x, QTensor):
            codes, absmax = self._tensor(x.codes), self._tensor(x.absmax)
            return QTensor(codes, absmax, x.code, x.blocksize, x.shape, x.dtype, x.row_length)
        if isinstance(x, Mapping):
            return {k: self._copy(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(self._copy(v) for v in x) if type(x) in (list, tuple) else x
        return x

    def _tensor(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.data_ptr(), x.dtype, tuple(x.shape), x.stride())
        if key in self._copies:
            return self._copies[key]
        x = x.detach().resolve_conj().resolve_neg()
        if x.device.type not in ("cpu", "cuda"):
            out = x.to("cpu", copy=True)
        else:
            cuda = x.device.type == "cuda"
            buf = _POOL.take(x.numel() * x.element_size(), pinned=cuda)
            self._buffers.append((buf, cuda))
            out = buf.view(x.dtype).view(x.shape)
            if cuda or not x.is_contiguous():
                out.copy_(x, non_blocking=cuda)
            else:  # one memcpy on this thread: no OpenMP team to start (slow on a busy machine)
                numpy.copyto(buf.numpy(), x.reshape(-1).view(torch.uint8).numpy())
            if cuda:
                self._devices.add(x.device)
        self._copies[key] = out
        return out

    def release(self) -> None:
        self.value = None
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


def save_in_background(path: str | os.PathLike, save: Callable[[Any], None], obj: Any = None) -> SaveFuture:
    """Copy the tensors of `obj` now (`Snapshot`), then call `save(copy)`, which writes
    `path`, on the background save thread after every save submitted before it; the copy's
    buffers go back to the pool afterwards."""
    snapshot = Snapshot(obj)
    key, future = _key(path), SaveFuture(os.fspath(path))
    with _LOCK:
        _PENDING.setdefault(key, []).append(future)
    _UNREAD.add(future)

    def run() -> None:
        error = None
        if future.set_running_or_notify_cancel():
            _IN_SAVE_THREAD.active = True
            try:
                save(snapshot.value)
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
