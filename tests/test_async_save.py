"""Asynchronous saves: snapshot semantics, ordering, errors, exit and kills."""

from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import Future

import pytest
import q8
import torch
from q8.formats import background


@pytest.fixture
def hold_save_thread():
    """Keep the save thread busy until the returned event is set, so that the saves
    submitted meanwhile wait in the queue (everything a test does happens before them)."""
    gate = threading.Event()
    blocker = background.save_in_background(os.devnull, lambda _: gate.wait())
    yield gate
    gate.set()
    blocker.result()


def test_async_save_file_copies_before_returning(tmp_path, hold_save_thread):
    w, t = torch.randn(300, 70), torch.randn(70, 300).t()  # t: not contiguous
    qt = q8.quantize(torch.randn(8192), "dynamic", 256)
    expected_w, expected_t, expected_codes = w.clone(), t.clone(), qt.codes.clone()
    future = q8.async_save_file({"w": w, "t": t, "q": qt}, tmp_path / "m.q8", metadata={"step": "1"})
    assert isinstance(future, Future) and not future.done()
    w.add_(1.0)  # in-place updates after the call never reach the file
    t.add_(1.0)
    qt.codes.zero_()
    hold_save_thread.set()
    assert future.result(timeout=60) is None
    with q8.safe_open(tmp_path / "m.q8") as f:
        assert f.metadata() == {"step": "1"}
        assert torch.equal(f.get_tensor("w"), expected_w) and torch.equal(f.get_tensor("t"), expected_t)
        assert torch.equal(f.get_qtensor("q").codes, expected_codes)


def test_async_save_nested_state(tmp_path, hold_save_thread):
    m = torch.arange(10.0)
    obj = {"step": 3, "betas": (0.9, 0.99), "state": {0: {"m": m, "tied": m}}, "q": q8.quantize(torch.randn(4096))}
    future = q8.async_save(obj, tmp_path / "s.q8")
    m.zero_()
    hold_save_thread.set()
    future.result(timeout=60)
    out = q8.load(tmp_path / "s.q8")
    assert out["step"] == 3 and out["betas"] == (0.9, 0.99)
    assert torch.equal(out["state"][0]["m"], torch.arange(10.0)) and out["state"][0]["tied"] is out["state"][0]["m"]
    assert isinstance(out["q"], q8.QTensor)


def test_bad_arguments_raise_at_the_call(tmp_path):
    with pytest.raises(TypeError, match="'x'"):
        q8.async_save_file({"x": [1, 2]}, tmp_path / "m.q8")
    with pytest.raises(ValueError, match="blocksize"):
        q8.async_save_file({"x": torch.zeros(3)}, tmp_path / "m.q8", blocksize=3)
    w = torch.randn(10)
    with pytest.raises(ValueError, match="share memory"):
        q8.async_save_file({"a": w, "b": w[:5]}, tmp_path / "m.q8")
    with pytest.raises(TypeError, match="cannot store set"):
        q8.async_save({"x": {1, 2}}, tmp_path / "s.q8")
    assert not list(tmp_path.iterdir())


def test_saves_to_one_path_land_in_order(tmp_path, hold_save_thread):
    path = tmp_path / "m.q8"
    futures = [q8.async_save_file({"x": torch.full((1000,), float(i))}, path) for i in range(5)]
    blocking = threading.Thread(target=q8.save_file, args=({"x": torch.full((1000,), -1.0)}, path))
    blocking.start()
    blocking.join(timeout=0.5)
    assert blocking.is_alive()  # the blocking save waits for the pending ones
    hold_save_thread.set()
    blocking.join(timeout=60)
    assert all(f.result() is None for f in futures)
    assert torch.equal(q8.load_file(path)["x"], torch.full((1000,), -1.0))


def test_a_failure_is_raised_by_result(tmp_path):
    future = q8.async_save_file({"x": torch.zeros(3)}, tmp_path / "missing" / "m.q8")
    with pytest.raises(FileNotFoundError):
        future.result(timeout=60)
    assert isinstance(future.exception(), FileNotFoundError)


def test_an_unread_failure_is_logged_when_collected(tmp_path, caplog):
    future = q8.async_save_file({"x": torch.zeros(3)}, tmp_path / "missing" / "m.q8")
    q8.async_save_file({}, tmp_path / "after.q8").result(timeout=60)  # the failed save's thread let go of it
    with caplog.at_level(logging.ERROR, logger="q8"):
        del future
        gc.collect()
    assert "missing/m.q8 failed and nobody read its error: FileNotFoundError" in caplog.text


def test_a_cancelled_save_writes_nothing(tmp_path, hold_save_thread):
    future = q8.async_save_file({"x": torch.zeros(3)}, tmp_path / "m.q8")
    assert future.cancel()
    hold_save_thread.set()
    q8.async_save_file({}, tmp_path / "after.q8").result(timeout=60)
    assert not (tmp_path / "m.q8").exists()


def test_snapshot_buffers_are_reused():
    q8.formats.release_buffers()
    tensors = {"a": torch.randn(1000), "b": torch.randn(10, 10)}
    first = background.Snapshot(tensors)
    pointers = {k: t.data_ptr() for k, t in first.value.items()}
    first.release()
    second = background.Snapshot(tensors)
    assert {k: t.data_ptr() for k, t in second.value.items()} == pointers
    assert all(torch.equal(second.value[k], tensors[k]) for k in tensors)
    second.release()
    assert background._POOL._free_bytes == 4000 + 400
    q8.formats.release_buffers()
    assert background._POOL._free_bytes == 0


def _run(code: str, tmp_path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_the_interpreter_waits_for_pending_saves_and_reports_unread_failures(tmp_path):
    proc = _run(
        """
        import q8, torch
        q8.async_save_file({"w": torch.arange(1 << 20, dtype=torch.float32)}, "m.q8")
        q8.async_save_file({"w": torch.zeros(3)}, "missing/m.q8")
        """,
        tmp_path,
    )
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert torch.equal(q8.load_file(tmp_path / "m.q8")["w"], torch.arange(1 << 20, dtype=torch.float32))
    assert "missing/m.q8 failed and nobody read its error" in err


def test_a_process_killed_mid_save_leaves_the_previous_file(tmp_path):
    q8.save_file({"w": torch.zeros(1000)}, tmp_path / "m.q8")
    proc = _run(
        """
        import sys, time, q8, torch
        from q8.formats.container import Writer
        close = Writer.close
        def stuck_close(self):  # the data is in the temporary file; the rename never comes
            print("writing", flush=True)
            time.sleep(600)
        Writer.close = stuck_close
        q8.async_save_file({"w": torch.ones(1000)}, "m.q8")
        time.sleep(600)
        """,
        tmp_path,
    )
    assert proc.stdout.readline() == "writing\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert torch.equal(q8.load_file(tmp_path / "m.q8")["w"], torch.zeros(1000))
    assert len(list(tmp_path.iterdir())) == 2  # the killed save's temporary file
    q8.save_file({"w": torch.ones(1000)}, tmp_path / "m.q8")  # removes it
    assert [p.name for p in tmp_path.iterdir()] == ["m.q8"]


def test_a_snapshot_copies_nested_state_and_keeps_ties():
    w = torch.randn(10)
    obj = {"a": w, "b": w.detach(), "l": [w[:5], (1, "x")], "q": q8.quantize(torch.randn(4096), row_length=64)}
    snapshot = background.Snapshot(obj)
    copy = snapshot.value
    assert copy["a"] is copy["b"] and copy["a"].data_ptr() != w.data_ptr()  # tied: one copy
    assert copy["l"][1] == (1, "x") and copy["q"].row_length == 64
    expected = w.clone()
    w.zero_()
    obj["l"].append(3)
    assert torch.equal(copy["a"], expected) and torch.equal(copy["l"][0], expected[:5]) and len(copy["l"]) == 2
    snapshot.release()
