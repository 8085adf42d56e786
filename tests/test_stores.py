"""Streaming stores (fastbn/backends/stores.py): what they write, what they compile to, and
when the cpu backend uses them (bitwise the same results either way)."""

from __future__ import annotations

import platform
import re

import numpy as np
import pytest
from numba import njit

import reference as ref
from fastbn.backends import cpu, cpu_kernels, stores
from fastbn.backends.stores import (LINE_BYTES, STAGE_BYTES, line_span, stack_stage, store,
                                    store_streaming, store_streaming_line, stream_lines)


@njit
def _fill_1d(out, values, streaming):
    for i in range(values.size):
        store(out, i, values[i], streaming)


@njit
def _fill_2d(out, values, streaming):
    for r in range(values.shape[0]):
        for c in range(values.shape[1]):
            store(out, (r, c), values[r, c], streaming)


@njit
def _fill_ordinary(out, values):
    for i in range(values.size):
        out[i] = values[i]


@njit
def _streamed_item(out, at, value):
    store_streaming(out, at, value)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.uint16])
@pytest.mark.parametrize("streaming", [False, True])
def test_store_writes_every_element_in_both_modes(dtype, streaming):
    values = (np.arange(7 * 33) * 3 % 101).astype(dtype)
    out = np.zeros_like(values)
    _fill_1d(out, values, streaming)
    np.testing.assert_array_equal(out, values)
    grid = values.reshape(7, 33)
    out = np.zeros_like(grid)
    _fill_2d(out, grid, streaming)
    np.testing.assert_array_equal(out, grid)


def test_store_streaming_casts_to_the_array_dtype_and_refuses_bad_indices():
    out = np.zeros(3, np.float32)
    _streamed_item(out, 1, 2.5)  # a float64 value into float32
    np.testing.assert_array_equal(out, [0.0, 2.5, 0.0])
    with pytest.raises(Exception, match="store_streaming"):
        _streamed_item(np.zeros((2, 2)), 1, 1.0)  # one index for a 2-D array


def test_streaming_path_compiles_to_nontemporal_stores_and_the_ordinary_one_still_vectorizes():
    values = np.arange(256, dtype=np.float32)
    _fill_1d(np.empty_like(values), values, True)
    _fill_ordinary(np.empty_like(values), values)
    signature = next(sig for sig in _fill_1d.signatures if sig[0].dtype.name == "float32")
    flagged = _fill_1d.inspect_llvm(signature)
    assert "!nontemporal" in flagged
    vector_store = re.compile(r"store <\d+ x float>")
    # the branch on the flag is hoisted out of the loop: the ordinary loop is vector code, as
    # it is without the flag
    assert vector_store.search(_fill_ordinary.inspect_llvm(_fill_ordinary.signatures[0]))
    assert any(vector_store.search(line) and "nontemporal" not in line
               for line in flagged.splitlines())
    if platform.machine() in ("x86_64", "AMD64"):
        assert "movnt" in _fill_1d.inspect_asm(signature)


@njit
def _copy_streamed(values, out):
    """out[:] = values, its whole lines with streaming stores (as the kernels write them)."""
    stage = stack_stage(out)
    head, end = line_span(out)
    out[:head] = values[:head]
    for start in range(head, end, stage.size):
        stop = min(start + stage.size, end)
        stage[:stop - start] = values[start:stop]
        stream_lines(stage, stop - start, out, start)
    out[end:] = values[end:]
    return head, end, stage.size


@njit
def _scale_shift(x, scale, shift, y, streaming):
    cpu_kernels.scale_shift_run_as(x, None, scale, shift, False, y, streaming)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.uint16])
@pytest.mark.parametrize("size", [0, 5, 31, 64, 1000, 5003])
def test_streamed_lines_write_every_element_at_every_alignment(dtype, size):
    itemsize = np.dtype(dtype).itemsize
    lanes = LINE_BYTES // itemsize
    values = (np.arange(size) * 3 % 101).astype(dtype)
    buffer = np.zeros(size + 2 * lanes, dtype)
    for offset in range(lanes + 1):
        out = buffer[offset:offset + size]
        buffer[:] = 0
        head, end, stage_size = _copy_streamed(values, out)
        np.testing.assert_array_equal(out, values)
        assert not buffer[:offset].any() and not buffer[offset + size:].any()
        assert stage_size == STAGE_BYTES // itemsize
        assert 0 <= head <= end <= size and (end - head) % lanes == 0
        if head < end:
            assert (out.ctypes.data + head * itemsize) % LINE_BYTES == 0
            assert head < lanes and size - end < lanes


def test_a_misaligned_array_has_no_lines_to_stream():
    raw = np.zeros(8 * 100 + 1, np.uint8)
    out = raw[1:].view(np.float64)  # address not a multiple of 8
    values = np.arange(100, dtype=np.float64)
    head, end, _ = _copy_streamed(values, out)
    assert head == end == 100
    np.testing.assert_array_equal(out, values)


@njit
def _line_from(values, out):
    store_streaming_line(out, 0, values, 0)


def test_line_stores_refuse_strided_arrays():
    values = np.arange(32, dtype=np.float32)
    with pytest.raises(Exception, match="store_streaming_line"):
        _line_from(values[::2], np.zeros(16, np.float32))  # a strided source
    with pytest.raises(Exception, match="store_streaming_line"):
        _line_from(values[:16], np.zeros(32, np.float32)[::2])  # a strided destination


def test_float32_runs_stream_by_vector_line_stores_and_the_ordinary_loop_vectorizes():
    x = np.arange(1000, dtype=np.float32)
    _scale_shift(x, 2.0, 1.0, np.empty_like(x), True)
    ir = _scale_shift.inspect_llvm(_scale_shift.signatures[0])
    line = f"<{LINE_BYTES // 4} x float>"
    streamed = [s for s in ir.splitlines()
                if "!nontemporal" in s and s.lstrip().startswith("store")]
    assert streamed and all(line in s and f"align {LINE_BYTES}" in s for s in streamed)
    # the ordinary loop (taken when the flag is False, and to fill the stage) is vector code
    assert any(re.search(r"store <\d+ x float>", s) and "nontemporal" not in s
               for s in ir.splitlines())
    if platform.machine() in ("x86_64", "AMD64"):
        assert "vmovntps" in _scale_shift.inspect_asm(_scale_shift.signatures[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(37, 5), (64, 64), (9, 1000), (3, 17)])
def test_channels_last_rows_stream_bitwise_at_every_alignment(dtype, shape):
    """The rows' flat run streamed by lines (float32) or by element (float64), with the output
    at every element offset from a line boundary, split between threads' row ranges."""
    rng = np.random.default_rng(0)
    rows, C = shape
    x = rng.standard_normal(shape).astype(dtype).reshape(rows, C, 1)
    residual = rng.standard_normal(shape).astype(dtype).reshape(rows, C, 1)
    mean, var = rng.standard_normal(C), rng.uniform(0.5, 2.0, C)
    gamma, beta = rng.standard_normal(C), rng.standard_normal(C)
    kernel = cpu_kernels.SERIAL["scale_shift_channels_last"]
    itemsize = np.dtype(dtype).itemsize
    for offset in range(LINE_BYTES // itemsize):
        for res, relu in ((None, False), (residual, True)):
            expected = np.empty_like(x)
            kernel(x, mean, var, gamma, beta, 1e-5, res, relu, expected, np.empty(C), False, 3)
            raw = np.zeros(x.size + 2 * LINE_BYTES, dtype)
            start = (-raw.ctypes.data) % LINE_BYTES // itemsize + offset
            y = raw[start:start + x.size].reshape(x.shape)
            kernel(x, mean, var, gamma, beta, 1e-5, res, relu, y, np.empty(C), True, 3)
            np.testing.assert_array_equal(y, expected)
            assert not raw[:start].any() and not raw[start + x.size:].any()


@njit
def _scale_shift_rows(x, scale, shift, y, streaming):
    cpu_kernels.scale_shift_items_channels_last(x, None, scale, shift, False, 0, x.shape[0], y,
                                                streaming)


def test_float32_channels_last_rows_stream_by_vector_line_stores_and_still_vectorize():
    x = np.ones((50, 64), np.float32)
    _scale_shift_rows(x, np.ones(64), np.zeros(64), np.empty_like(x), True)
    ir = _scale_shift_rows.inspect_llvm(_scale_shift_rows.signatures[0])
    streamed = [s for s in ir.splitlines()
                if "!nontemporal" in s and s.lstrip().startswith("store")]
    assert streamed and all(f"<{LINE_BYTES // 4} x float>" in s and f"align {LINE_BYTES}" in s
                            for s in streamed)
    # the ordinary 2-D loop (flag False) and the stage's pieces are vector code
    assert any(re.search(r"store <\d+ x float>", s) and "nontemporal" not in s
               for s in ir.splitlines())


def test_float64_runs_stream_element_by_element():
    x = np.arange(1000, dtype=np.float64)
    _scale_shift(x, 2.0, 1.0, np.empty_like(x), True)
    signature = next(sig for sig in _scale_shift.signatures if sig[0].dtype.name == "float64")
    streamed = [s for s in _scale_shift.inspect_llvm(signature).splitlines()
                if "!nontemporal" in s and s.lstrip().startswith("store")]
    assert streamed and all(s.lstrip().startswith("store double") for s in streamed)


def test_streaming_threshold_follows_the_last_level_cache(monkeypatch):
    monkeypatch.setattr(stores, "l3_cache_bytes", lambda: 64 << 20)
    stores.streaming_from_bytes.cache_clear()
    try:
        assert stores.streaming_from_bytes() == {8: 32 << 20, 4: 128 << 20}
        monkeypatch.setattr(stores, "l3_cache_bytes", lambda: None)
        stores.streaming_from_bytes.cache_clear()
        assert stores.streaming_from_bytes() == {8: 16 << 20, 4: 64 << 20}
    finally:
        monkeypatch.undo()
        stores.streaming_from_bytes.cache_clear()
    assert cpu.STREAMING_FROM_BYTES == stores.streaming_from_bytes()


def test_serial_calls_never_stream(monkeypatch):
    monkeypatch.setattr(cpu, "_streams", lambda y3: pytest.fail("asked whether to stream"))
    x = np.ones((4, 3, 5))
    cpu.normalize(x, np.zeros(3), np.ones(3), None, None, 1e-5)  # below SERIAL_BELOW


def test_which_forward_outputs_stream(monkeypatch):
    monkeypatch.setattr(cpu, "STREAMING_FROM_BYTES", {8: 1024, 4: 512})
    planar, channels_last = (64, 1, 2), (128, 1, 1)  # 128 elements either way

    def streams(shape3, dtype):
        return cpu._streams(np.empty(shape3, dtype))
    assert streams(planar, np.float64) and streams(channels_last, np.float64)
    assert streams(planar, np.float32) and streams(channels_last, np.float32)
    assert not streams(channels_last, np.uint16)  # float16 bits: unmeasured, ordinary stores
    assert not streams((15, 1, 8), np.float64)  # 960 bytes: below float64's threshold
    assert not streams((15, 1, 8), np.float32)  # 480 bytes: below float32's threshold


SHAPES3 = [(5, 3, 37), (2, 4, 1000), (300, 5, 1), (11, 1030, 1)]


@pytest.mark.parametrize("threaded", [False, True])  # False: serially, as a forked child
@pytest.mark.parametrize("shape3", SHAPES3)
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("fused", ["plain", "relu", "residual+relu"])
def test_cpu_passes_with_streaming_stores_give_bitwise_the_same(monkeypatch, threaded, shape3,
                                                                dtype, fused):
    """The forward passes (eval, forward-train) with every output streamed against ordinary
    stores, and the backwards that follow (reading the streamed y for the ReLU mask)."""
    # Serially run (small) inputs never stream; a forked child runs the serial kernels with
    # the flag, so that is the serial path with streaming stores.
    monkeypatch.setattr(cpu, "SERIAL_BELOW", 0)
    monkeypatch.setattr(cpu_kernels, "PLANAR_CHUNK", 16)
    if not threaded:
        monkeypatch.setattr(cpu, "_forked_child", True)
    x = ref.random_array(shape3, dtype, 0, 3.0, 2.0)
    dy = ref.random_array(shape3, dtype, 1)
    residual = ref.random_array(shape3, dtype, 2) if "residual" in fused else None
    relu = "relu" in fused
    C = shape3[1]
    rng = np.random.default_rng(3)
    gamma, beta = rng.uniform(0.5, 2.0, C), rng.standard_normal(C)
    count = shape3[0] * shape3[2]

    def passes():
        results = list(cpu.normalize(x, np.full(C, 3.0), np.full(C, 4.0), gamma, beta, 1e-5,
                                     None, residual, relu))
        y3, mean, _, invstd, _ = cpu.forward_train(x, gamma, beta, 1e-5, None, None, 0.0, None,
                                                   residual, relu)
        y_for_mask = y3 if residual is not None else None
        dresidual = np.empty_like(x) if residual is not None else None
        results += [y3, *cpu.backward(dy, x, gamma, beta, mean, invstd, count, True, None, relu,
                                      y_for_mask, dresidual), dresidual]
        dgamma, dbeta = cpu.backward_reduce(dy, x, gamma, beta, mean, invstd, relu, y_for_mask)
        results.append(cpu.backward_elementwise(dy, x, gamma, beta, mean, invstd, dgamma,
                                                dbeta, count, True, None, relu, y_for_mask))
        return results

    ordinary = passes()
    monkeypatch.setattr(cpu, "_streams", lambda y3: True)  # every output, every dtype and layout
    streamed = passes()
    for got, expected in zip(streamed, ordinary):
        if expected is not None:
            np.testing.assert_array_equal(got, expected)
