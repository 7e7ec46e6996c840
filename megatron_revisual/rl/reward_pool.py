"""Score rewards in worker processes with a per-sample timeout; a bad sample never stops a batch.

Rule-based rewards run arbitrary model output through sympy (math-verify), which can hang or
blow up on adversarial LaTeX. Threads cannot be stopped and ``concurrent.futures`` pools cannot
kill one stuck task, so this pool keeps one pipe per worker process, sends it one sample at a
time, and knows which sample each worker holds and since when:

- the reward raises                -> that sample scores 0, counted in ``num_errors``;
- it runs past ``timeout_s``       -> the worker is SIGKILLed and replaced, the sample scores 0,
                                      counted in ``num_timeouts``;
- the worker dies (segfault, exit) -> the sample scores 0, counted in ``num_crashes``, replaced;
- it returns NaN/inf or no number  -> scores 0, counted in ``num_errors``.

So a batch takes at most about ``ceil(N / workers) * timeout_s`` plus restarts. Workers start
with ``forkserver`` by default: forking a trainer that has initialised CUDA is unsafe, and
``spawn`` re-imports everything per worker. Scripts that create a pool need the
``if __name__ == "__main__":`` guard, as with any multiprocessing start method but fork.

Usage::

    with RewardPool.for_config(RewardConfig(), num_workers=2, timeout_s=10.0) as pool:
        result = pool.score([RewardSample(response=r, ground_truth=g) for r, g in batch])
    result.overall, result.metrics()
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection, wait
from typing import Any

from megatron_revisual.rl.rewards import RewardConfig, compute_reward, warmup

__all__ = ["RewardBatchResult", "RewardPool"]

logger = logging.getLogger(__name__)

RewardFn = Callable[[Any], "dict[str, float] | float"]


@dataclass
class RewardBatchResult:
    """Per-sample scores (``{"overall": 0.0}`` for failed samples) and failure accounting."""

    scores: list[dict[str, float]]
    failures: dict[int, str] = field(default_factory=dict)
    num_errors: int = 0
    num_timeouts: int = 0
    num_crashes: int = 0
    seconds: float = 0.0

    @property
    def overall(self) -> list[float]:
        return [s["overall"] for s in self.scores]

    @property
    def num_failed(self) -> int:
        return self.num_errors + self.num_timeouts + self.num_crashes

    def metrics(self) -> dict[str, float]:
        """Mean of each term over the samples that have it, failure counts and throughput."""
        out: dict[str, float] = {}
        keys = sorted({k for s in self.scores for k in s})
        for key in keys:
            values = [s[key] for s in self.scores if key in s]
            out[f"reward/{key}"] = sum(values) / len(values)
        out["reward/errors"] = float(self.num_errors)
        out["reward/timeouts"] = float(self.num_timeouts)
        out["reward/crashes"] = float(self.num_crashes)
        out["reward/samples_per_s"] = len(self.scores) / self.seconds if self.seconds > 0 else 0.0
        return out


def _worker_main(conn: Connection, fn: RewardFn, warm: Callable[[], None] | None) -> None:
    # Ctrl-C goes to the whole process group; the parent decides what happens to its workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if warm is not None:
        try:
            warm()
        except Exception:  # a broken warm-up shows up as errors on real samples instead
            pass
    conn.send(("ready", -1, None))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        row, sample = message
        try:
            reply = ("ok", row, fn(sample))
        except BaseException as exc:  # any failure of a reward is that sample's 0
            reply = ("error", row, f"{type(exc).__name__}: {exc}"[:1000])
        try:
            conn.send(reply)
        except Exception as exc:  # e.g. an unpicklable return value
            conn.send(("error", row, f"reward result could not be sent back: {exc}"[:1000]))


class _Worker:
    def __init__(self, ctx: Any, fn: RewardFn, warm: Callable[[], None] | None) -> None:
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child_conn, fn, warm), daemon=True)
        self.proc.start()
        child_conn.close()  # so that the worker's death reads as EOF here
        self.conn: Connection = parent_conn
        self.ready = False
        self.row: int | None = None
        self.since = time.monotonic()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=10)
        self.conn.close()


class RewardPool:
    """Process pool that scores samples with ``fn`` under a per-sample timeout.

    ``fn(sample)`` returns a float or a dict with an ``"overall"`` float; it and the samples must
    be picklable (a module-level function or a ``functools.partial`` of one).
    """

    def __init__(
        self,
        fn: RewardFn,
        *,
        num_workers: int = 2,
        timeout_s: float = 10.0,
        start_method: str = "forkserver",
        warmup_fn: Callable[[], None] | None = None,
        startup_timeout_s: float = 120.0,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self._fn = fn
        self._warm = warmup_fn
        self._timeout_s = timeout_s
        self._startup_timeout_s = startup_timeout_s
        self._ctx = mp.get_context(start_method)
        self._workers = [self._spawn() for _ in range(num_workers)]

    @classmethod
    def for_config(cls, config: RewardConfig, **kwargs: Any) -> RewardPool:
        """A pool scoring ``RewardSample``s with ``compute_reward(sample, config)``."""
        kwargs.setdefault("warmup_fn", partial(warmup, config.grader))
        return cls(partial(compute_reward, config=config), **kwargs)

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self._fn, self._warm)

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (idle ones exit on their own; busy ones are killed)."""
        for w in self._workers:
            try:
                if w.row is None:
                    w.conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 5.0
        for w in self._workers:
            w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            w.kill()
        self._workers = []

    def score(self, samples: Sequence[Any]) -> RewardBatchResult:
        """Score every sample; never raises for a sample's failure (see the module docstring).

        Raises RuntimeError only if a worker cannot even start within ``startup_timeout_s``.
        """
        if not self._workers:
            raise RuntimeError("RewardPool is closed")
        start = time.monotonic()
        result = RewardBatchResult(scores=[{"overall": 0.0} for _ in samples])
        todo = deque(range(len(samples)))
        while todo or any(w.row is not None for w in self._workers):
            for w in self._workers:
                if w.ready and w.row is None and todo:
                    w.row = todo.popleft()
                    w.since = time.monotonic()
                    w.conn.send((w.row, samples[w.row]))
            self._wait_and_collect(result)
            self._enforce_deadlines(result)
        result.seconds = time.monotonic() - start
        if result.num_failed:
            logger.warning(
                "rewards: %d of %d samples scored 0 (%d errors, %d timeouts, %d crashes)",
                result.num_failed,
                len(samples),
                result.num_errors,
                result.num_timeouts,
                result.num_crashes,
            )
        return result

    def _wait_and_collect(self, result: RewardBatchResult) -> None:
        now = time.monotonic()
        deadlines = [
            w.since + (self._timeout_s if w.ready else self._startup_timeout_s)
            for w in self._workers
            if w.row is not None or not w.ready
        ]
        timeout = max(0.0, min(deadlines) - now) if deadlines else 0.0
        by_conn = {w.conn: i for i, w in enumerate(self._workers)}
        for conn in wait(list(by_conn), timeout=timeout):
            i = by_conn[conn]  # type: ignore[index]
            w = self._workers[i]
            try:
                kind, row, payload = w.conn.recv()
            except (EOFError, OSError):
                self._replace(i, result, crashed=True)
                continue
            if kind == "ready":
                w.ready = True
                continue
            w.row = None
            if kind == "error":
                self._fail(result, row, payload, "errors")
                continue
            scores = _as_scores(payload)
            if isinstance(scores, str):
                self._fail(result, row, scores, "errors")
            else:
                result.scores[row] = scores

    def _enforce_deadlines(self, result: RewardBatchResult) -> None:
        now = time.monotonic()
        for i, w in enumerate(self._workers):
            if w.row is not None and now - w.since > self._timeout_s:
                self._fail(result, w.row, f"timed out after {self._timeout_s:g} s", "timeouts")
                w.row = None
                self._replace(i, result, crashed=False)
            elif not w.ready and now - w.since > self._startup_timeout_s:
                w.kill()
                raise RuntimeError(
                    f"reward worker did not start within {self._startup_timeout_s:g} s "
                    f"(start method {self._ctx.get_start_method()!r})"
                )

    def _replace(self, i: int, result: RewardBatchResult, *, crashed: bool) -> None:
        w = self._workers[i]
        w.kill()
        if crashed:
            if not w.ready:
                raise RuntimeError(
                    f"reward worker exited during start-up (exit code {w.proc.exitcode}); "
                    "is the reward function importable from a fresh process?"
                )
            if w.row is not None:
                self._fail(result, w.row, f"worker died (exit code {w.proc.exitcode})", "crashes")
        self._workers[i] = self._spawn()

    @staticmethod
    def _fail(result: RewardBatchResult, row: int, reason: str, kind: str) -> None:
        result.scores[row] = {"overall": 0.0}
        result.failures[row] = reason
        setattr(result, f"num_{kind}", getattr(result, f"num_{kind}") + 1)


def _as_scores(value: Any) -> dict[str, float] | str:
    """The reward's return value as a score dict, or the reason it is unusable."""
    scores = {"overall": value} if isinstance(value, int | float) else value
    if not isinstance(scores, dict) or "overall" not in scores:
        return f"reward returned {type(value).__name__}, expected a float or a dict with 'overall'"
    try:
        scores = {str(k): float(v) for k, v in scores.items()}
    except (TypeError, ValueError):
        return "reward returned non-numeric scores"
    if not all(math.isfinite(v) for v in scores.values()):
        return f"reward returned a non-finite score: {scores}"
    return scores
