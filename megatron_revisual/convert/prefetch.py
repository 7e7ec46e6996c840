"""Computing the next tensors of a conversion while the current one is written.

A conversion alternates between reading + mapping a tensor (file reads, ``torch.cat``: they
release the GIL) and writing it (file writes, the final fsync). `Prefetcher` runs the first
part for the next keys on one background thread while the caller writes, so the two overlap on
a second core. Memory stays bounded: ``nbytes(key)`` is what computing a key may hold at its
peak (its inputs and its result: `PEAK_FACTOR` x the result for a read-then-concatenate); a key
counts against ``budget_bytes`` from the moment its computation starts until the caller asks for
the key after it (the caller has then written it), and the thread starts a key only while what
it holds plus that key fit the budget, or when it holds nothing (so progress never stops). With
the budget equal to the largest single result, the conversion's peak stays that of computing
its largest tensor alone, as without prefetching.

    with Prefetcher(names, produce=read_and_map, nbytes=peak_of, budget_bytes=largest) as ahead:
        for name in names:
            write(name, ahead.get(name))
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any

__all__ = ["PEAK_FACTOR", "Prefetcher"]

# reading the source tensor(s) and building the result (torch.cat, interleave, cast): both live
PEAK_FACTOR = 2


class Prefetcher:
    def __init__(
        self,
        keys: Sequence[Hashable],
        *,
        produce: Callable[[Any], Any],
        nbytes: Callable[[Any], int],
        budget_bytes: int,
        name: str = "prefetch",
    ) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes={budget_bytes} must be >= 0")
        self.keys = list(keys)
        if len(set(self.keys)) != len(self.keys):
            raise ValueError("Prefetcher keys must be unique")
        self._produce, self._nbytes, self.budget = produce, nbytes, budget_bytes
        self._cond = threading.Condition()
        self._ready: dict[Any, tuple[bool, Any]] = {}  # key -> (ok, value or exception)
        self._held: dict[Any, int] = {}  # computed, not yet released: key -> bytes
        self._next = 0  # index of the next key the caller may ask for
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- background thread ----------------------------------------------------------------------

    def _run(self) -> None:
        for key in self.keys:
            size = self._nbytes(key)
            with self._cond:
                while not self._stopped and self._held and sum(self._held.values()) + size > self.budget:
                    self._cond.wait()
                if self._stopped:
                    return
                self._held[key] = size
            try:
                result = (True, self._produce(key))
            except BaseException as e:  # handed to the caller at this key
                result = (False, e)
            with self._cond:
                self._ready[key] = result
                self._cond.notify_all()
                if not result[0]:
                    return

    # -- caller ---------------------------------------------------------------------------------

    def get(self, key: Hashable) -> Any:
        """The value of ``key``, which must be the next key in order; releases the previous one."""
        with self._cond:
            if self._next >= len(self.keys) or self.keys[self._next] != key:
                expected = self.keys[self._next] if self._next < len(self.keys) else "nothing"
                raise KeyError(f"prefetch order: asked for {key!r}, next is {expected!r}")
            if self._next > 0:
                self._held.pop(self.keys[self._next - 1], None)
                self._cond.notify_all()
            while key not in self._ready:
                self._cond.wait()
            ok, value = self._ready.pop(key)
            self._next += 1
        if not ok:
            raise value
        return value

    def peek_next(self) -> Hashable | None:
        return self.keys[self._next] if self._next < len(self.keys) else None

    def close(self) -> None:
        """Stop computing ahead and drop what was computed but not taken."""
        with self._cond:
            self._stopped = True
            self._ready.clear()
            self._held.clear()
            self._cond.notify_all()
        self._thread.join()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
