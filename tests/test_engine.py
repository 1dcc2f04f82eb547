"""The shared engine: balanced chunks, exact forward counts, batch-size independence."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator

import pytest
import torch
from conftest import tiny, tiny_input

from convlens.engine import Engine, split
from convlens.model import as_model
from convlens.targets import Class


def test_split_is_balanced_and_complete():
    assert list(split(50, 8)) == [(0, 7), (7, 14), (14, 21), (21, 29), (29, 36), (36, 43), (43, 50)]
    assert list(split(3, 64)) == [(0, 3)]
    assert list(split(0, 4)) == []
    for n in range(1, 40):
        for b in range(1, 12):
            chunks = list(split(n, b))
            assert chunks[0][0] == 0 and chunks[-1][1] == n
            assert all(0 < stop - start <= b for start, stop in chunks)
            assert all(a[1] == b_[0] for a, b_ in itertools.pairwise(chunks))


def test_split_is_lazy():
    # a list of 10^12 bounds would not fit in memory: the chunks are made one at a time
    chunks = split(10**12, 1)
    assert isinstance(chunks, Iterator)  # the old list would not fail here: it would not end
    assert next(chunks) == (0, 1) and next(chunks) == (1, 2)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_scores_stream_chunks_and_count_forwards(batch_size):
    model, x = tiny(), tiny_input(1)
    engine = Engine(as_model(model), batch_size, progress=False)
    made = []

    def make(start, stop):
        made.append(stop - start)
        return x.expand(stop - start, -1, -1, -1) * torch.arange(start, stop).view(-1, 1, 1, 1)

    scores = engine.scores(10, make, Class(2))
    expected = model(x * torch.arange(10).view(-1, 1, 1, 1))[:, 2].detach()
    torch.testing.assert_close(scores, expected)
    assert engine.forwards == 10 and max(made) <= batch_size and sum(made) == 10


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_batch_size_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="batch_size"):
        Engine(as_model(tiny()), bad)


def test_default_batch_size_follows_the_allocator_setting(monkeypatch):
    from convlens import engine

    monkeypatch.setitem(engine._KEPT, "active", False)
    assert engine.default_batch_size(32) == 8 and engine.default_batch_size(4) == 4
    monkeypatch.setitem(engine._KEPT, "active", True)
    assert engine.default_batch_size(32) == 32


def test_keep_freed_memory_takes_effect_on_linux_glibc(monkeypatch):
    import sys

    from convlens import allocator, engine
    from convlens.engine import keep_freed_memory, keeping_freed_memory

    monkeypatch.setitem(engine._KEPT, "active", False)  # restored after the test
    try:
        if sys.platform.startswith("linux"):  # this project's machines: glibc
            assert keep_freed_memory() is True and keeping_freed_memory()
        else:
            assert keep_freed_memory() is False
    finally:  # the thresholds freed_memory_kept leaves
        engine._set_thresholds(32 << 20, allocator.KEPT_AFTER)


def test_freed_memory_is_kept_during_explain_only(monkeypatch):
    import sys

    import convlens as cl
    from convlens import engine

    monkeypatch.setitem(engine._KEPT, "active", False)  # as in a fresh process
    seen = []
    real = engine.default_batch_size
    monkeypatch.setattr(
        "convlens.engine.default_batch_size",
        lambda preferred: seen.append(engine.keeping_freed_memory()) or real(preferred),
    )
    e = cl.explain(tiny(), tiny_input(), "occlusion", window=4, stride=4, progress=False)
    linux = sys.platform.startswith("linux")
    assert seen == [linux]
    assert e.params["batch_size"] == (16 if linux else 8)
    assert not engine.keeping_freed_memory()
    with engine.freed_memory_kept() as kept:
        assert kept is linux and engine.keeping_freed_memory() is linux
        with engine.freed_memory_kept() as inner:  # nested: still kept, left to the outer
            assert inner is linux
        assert engine.keeping_freed_memory() is linux
    assert not engine.keeping_freed_memory()


def test_calls_leave_at_most_kept_after_of_freed_memory_in_all(monkeypatch):
    """Freed memory up to KEPT_AFTER, summed over calls, stays for the next call (no page
    faults for it again); beyond it, or where resident memory cannot be read, it goes back to
    the system."""
    from convlens import allocator

    monkeypatch.setitem(allocator._KEPT, "active", False)
    monkeypatch.setattr(allocator, "_set_thresholds", lambda mmap, trim: True)  # any platform
    monkeypatch.setattr(allocator, "_LEFT", [0])
    trims = []
    monkeypatch.setattr(allocator, "_trim", lambda: trims.append(1))
    half = allocator.KEPT_AFTER // 2
    # (resident on entering, on leaving) of each outermost block
    calls = [(100, 100 + half), (100 + half, 100 + 2 * half), (50, 51), (0, half), (7, 0)]
    readings = iter(value for call in calls for value in call)
    monkeypatch.setattr(allocator, "_resident", lambda: next(readings))
    seen = []
    for _ in range(len(calls)):
        with allocator.freed_memory_kept(), allocator.freed_memory_kept():
            pass  # nested: measured from the outer block's entry to its exit
        seen.append(len(trims))
    # half, then KEPT_AFTER in all: kept; one byte more: returned; then unreadable twice
    assert seen == [0, 0, 1, 2, 3]


def test_a_long_call_returns_its_freed_memory(monkeypatch):
    from convlens import allocator

    monkeypatch.setitem(allocator._KEPT, "active", False)
    monkeypatch.setattr(allocator, "_set_thresholds", lambda mmap, trim: True)
    monkeypatch.setattr(allocator, "_LEFT", [0])
    trims = []
    monkeypatch.setattr(allocator, "_trim", lambda: trims.append(1))
    monkeypatch.setattr(allocator, "_resident", lambda: 100)  # nothing left behind
    clock = iter([0.0, allocator.LONG_BLOCK, 10.0, 10.0 + allocator.LONG_BLOCK + 0.01])
    monkeypatch.setattr(allocator, "_clock", lambda: next(clock))
    with allocator.freed_memory_kept():
        pass
    assert trims == []  # as long as LONG_BLOCK: kept
    with allocator.freed_memory_kept():
        pass
    assert trims == [1]  # longer: returned


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")
def test_memory_a_call_frees_beyond_kept_after_goes_back_to_the_system():
    from convlens import allocator

    before = allocator._resident()
    with allocator.freed_memory_kept():
        big = torch.ones(3 * allocator.KEPT_AFTER // 4)  # 3x KEPT_AFTER bytes, resident
        assert allocator._resident() - before > 2 * allocator.KEPT_AFTER
        del big
    assert allocator._resident() - before < allocator.KEPT_AFTER


def test_what_the_engine_remembers_of_a_model_does_not_keep_it_alive():
    import gc
    import weakref

    import convlens as cl

    model = tiny()
    cl.explain(model, tiny_input(1), "gradcam")
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None
