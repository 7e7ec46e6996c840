"""The conversion's read-ahead thread: order, memory budget, errors, shutdown."""

from __future__ import annotations

import threading
import time

import pytest

from megatron_revisual.convert.prefetch import Prefetcher


class Recorder:
    """produce() that records how many bytes were held (started, not released) at each start."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes
        self.lock = threading.Lock()
        self.started: list[str] = []

    def produce(self, key: str) -> str:
        with self.lock:
            self.started.append(key)
        time.sleep(0.005)
        return key.upper()


def test_values_come_in_order_and_equal_the_serial_result():
    keys = [f"k{i}" for i in range(20)]
    rec = Recorder({k: 1 for k in keys})
    with Prefetcher(keys, produce=rec.produce, nbytes=lambda k: 1, budget_bytes=4) as ahead:
        got = [ahead.get(k) for k in keys]
    assert got == [k.upper() for k in keys]
    assert rec.started == keys  # each computed exactly once, in order


def test_the_thread_never_holds_more_than_the_budget():
    sizes = {"a": 10, "b": 3, "c": 3, "d": 3, "e": 9, "f": 1}
    keys = list(sizes)
    peaks: list[int] = []
    box: list[Prefetcher] = []
    constructed = threading.Event()

    def produce(key: str) -> str:
        constructed.wait()
        with box[0]._cond:  # what is held while this key is being computed
            peaks.append(sum(box[0]._held.values()))
        return key

    ahead = Prefetcher(keys, produce=produce, nbytes=sizes.__getitem__, budget_bytes=10)
    box.append(ahead)
    constructed.set()
    seen = []
    for k in keys:
        seen.append(ahead.get(k))
        time.sleep(0.02)  # the caller "writes"; the thread runs ahead meanwhile
    ahead.close()
    assert seen == keys
    # "a" alone is 10 (the whole budget): nothing else starts while the caller holds it;
    # afterwards b, c, d (9) fit together, e (9) waits until only it fits
    assert max(peaks) <= 10
    assert peaks[0] == 10


def test_a_value_larger_than_the_budget_still_gets_computed():
    with Prefetcher(["x", "y"], produce=str.upper, nbytes=lambda k: 100, budget_bytes=1) as ahead:
        assert ahead.get("x") == "X" and ahead.get("y") == "Y"


def test_an_error_is_raised_at_its_key_and_earlier_values_arrive():
    def produce(key: str) -> str:
        if key == "bad":
            raise ValueError("tensor 'bad' is truncated")
        return key

    with Prefetcher(
        ["ok", "bad", "never"], produce=produce, nbytes=lambda k: 1, budget_bytes=10
    ) as ahead:
        assert ahead.get("ok") == "ok"
        with pytest.raises(ValueError, match="tensor 'bad' is truncated"):
            ahead.get("bad")


def test_asking_out_of_order_names_the_expected_key():
    with Prefetcher(["a", "b"], produce=str.upper, nbytes=lambda k: 1, budget_bytes=2) as ahead:
        with pytest.raises(KeyError, match="asked for 'b', next is 'a'"):
            ahead.get("b")
        assert ahead.peek_next() == "a"


def test_close_stops_a_thread_that_waits_on_the_budget():
    ahead = Prefetcher(
        [str(i) for i in range(100)], produce=str, nbytes=lambda k: 5, budget_bytes=5
    )
    assert ahead.get("0") == "0"
    ahead.close()
    assert not ahead._thread.is_alive()


def test_duplicate_keys_are_refused():
    with pytest.raises(ValueError, match="unique"):
        Prefetcher(["a", "a"], produce=str, nbytes=lambda k: 1, budget_bytes=1)
