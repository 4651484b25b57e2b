"""Dynamic batching: concurrent requests share one model call.

The pattern of Triton's dynamic batcher and LitServe: each request puts its item on a queue
and awaits a future; one collector task takes the first item, waits at most ``max_wait_s`` for
more (up to ``max_batch``), and runs the whole list as one call of ``run_batch`` in a worker
thread, off the event loop; up to ``workers`` batches run side by side, as ``predict`` runs them
(:func:`~kidney_edge.runtime.predict.execution_layout`). While batches run, new requests queue
up, so under load the next batch is already full when a worker is free again and nobody waits
the ``max_wait_s``.
When the caller says no other item is on its way (``arriving``), the collector does not wait at
all: a lone request is not delayed for partners that cannot come.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from kidney_edge.runtime.serve.limits import ServerBusy

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class Batched(Generic[Result]):
    """One item's result and how it was computed."""

    result: Result
    batch_size: int  # items in the model call this one rode in
    queue_s: float  # from submit to the start of its batch
    run_s: float  # the batch's run_batch time, shared by every item in it


class DynamicBatcher(Generic[Item, Result]):
    """Runs ``run_batch(items) -> results`` (same length, same order) on batches of submitted items.

    Start it inside the event loop that will call :meth:`submit` and stop it there. An exception
    from ``run_batch`` is given to every item of that batch.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Item]], Sequence[Result]],
        *,
        max_batch: int,
        max_wait_s: float,
        workers: int = 1,
        arriving: Callable[[], int] | None = None,
    ) -> None:
        """``workers``: batches run side by side, each in its own thread (``run_batch`` must be
        thread-safe then). ``arriving()``: how many items are on their way to :meth:`submit`
        (e.g. still being decoded); None: unknown, always wait up to ``max_wait_s`` for a fuller
        batch."""
        self._run_batch = run_batch
        self._arriving = arriving
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.workers = workers
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="kidney-edge-infer")
        self._queue: asyncio.Queue[tuple[Item, float, asyncio.Future[Batched[Result]]]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()  # batches in the executor now
        self.batches = 0  # model calls so far
        self.outstanding = 0  # submitted items without a result yet

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="kidney-edge-batcher")

    async def stop(self) -> None:
        tasks = [task for task in (self._task, *self._running) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        while self._queue is not None and not self._queue.empty():
            _, _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(_shutting_down())
        self.executor.shutdown(wait=True)

    async def submit(self, item: Item) -> Batched[Result]:
        """Queue ``item`` and wait for its batch to run."""
        if self._queue is None or not self.running:
            raise RuntimeError("the batcher is not running; call start() in the serving event loop")
        future: asyncio.Future[Batched[Result]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, time.perf_counter(), future))
        self.outstanding += 1
        try:
            return await future
        finally:
            self.outstanding -= 1

    async def _collect(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        free_workers = asyncio.Semaphore(self.workers)

        def finished(task: asyncio.Task[None]) -> None:
            self._running.discard(task)
            free_workers.release()

        while True:
            await free_workers.acquire()  # collect only when a worker can take the batch at once
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                if self._arriving is not None and self._arriving() <= 0:
                    break  # nobody else is coming: do not wait for them
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:  # builtins.TimeoutError from Python 3.11
                    break
            live = [entry for entry in batch if not entry[2].done()]  # clients that gave up
            if not live:
                free_workers.release()
                continue
            task = loop.create_task(self._run(loop, live))
            self._running.add(task)
            task.add_done_callback(finished)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list) -> None:
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(
                self.executor, self._run_batch, [item for item, _, _ in batch]
            )
        except (Exception, asyncio.CancelledError) as exc:
            failure = _shutting_down() if isinstance(exc, asyncio.CancelledError) else exc
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(failure)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        finally:
            self.batches += 1
        run_s = time.perf_counter() - started
        assert len(results) == len(batch), "run_batch must return one result per item"
        for (_, queued, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(Batched(result, len(batch), started - queued, run_s))


def _shutting_down() -> Exception:
    return ServerBusy("the server is shutting down; retry on another instance or after it restarts")
