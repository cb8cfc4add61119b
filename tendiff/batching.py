"""Concurrent purifications as one batch: a server on 2 cores serves many visitors at once.

Requests that share a key (model and sampler settings) and arrive within ``window_s`` of each
other, or while no batch of theirs is running yet, are stacked and purified together by one
worker thread; each caller streams the frames of its own rows. With per-image seeds
(:func:`tendiff.diffusion.purify` takes a seed per image) a request's result is the one it would
get alone, whoever it shared the batch with.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Hashable, Iterator

import torch

_DONE = object()


@dataclass
class _Slot:
    start: int
    stop: int
    out: queue.Queue = field(default_factory=queue.Queue)


@dataclass
class _Batch:
    images: list[torch.Tensor] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    slots: list[_Slot] = field(default_factory=list)

    def add(self, images: torch.Tensor, seeds: list[int]) -> _Slot:
        start = sum(len(x) for x in self.images)
        self.images.append(images)
        self.seeds += seeds
        slot = _Slot(start, start + len(images))
        self.slots.append(slot)
        return slot


def rows(step, start: int, stop: int):
    """A batched dataclass step with every tensor field cut to rows start:stop."""
    return replace(step, **{f.name: getattr(step, f.name)[start:stop] for f in fields(step)
                            if isinstance(getattr(step, f.name), torch.Tensor)})


class Batcher:
    """Runs concurrent ``run(images, seeds)`` generators with the same key as one batch."""

    def __init__(self, window_s: float = 0.01, max_rows: int = 32):
        self.window_s, self.max_rows = window_s, max_rows
        self._lock = threading.Lock()
        self._open: dict[Hashable, _Batch] = {}
        self.batches: list[int] = []  # rows per batch run, newest last (bounded): what batching achieved

    def stream(self, key: Hashable, images: torch.Tensor, seeds: list[int],
               run: Callable[[torch.Tensor, list[int]], Iterator]) -> Iterator:
        """Yield the steps of ``run`` for ``images`` (with one seed per row), possibly computed in a
        batch with other callers' images; an error in the batch is raised in every caller."""
        with self._lock:
            batch = self._open.get(key)
            lead = batch is None or sum(len(x) for x in batch.images) + len(images) > self.max_rows
            if lead:
                batch = self._open[key] = _Batch()
            slot = batch.add(images, list(seeds))
        if lead:
            threading.Thread(target=self._run, args=(key, batch, run), daemon=True).start()
        while (item := slot.out.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item

    def _run(self, key, batch: _Batch, run) -> None:
        time.sleep(self.window_s)  # let concurrent requests join
        with self._lock:
            if self._open.get(key) is batch:
                del self._open[key]  # closed: later requests start a batch of their own
        self.batches = (self.batches + [len(batch.seeds)])[-1000:]
        try:
            for step in run(torch.cat(batch.images), batch.seeds):
                for slot in batch.slots:
                    slot.out.put(rows(step, slot.start, slot.stop))
            for slot in batch.slots:
                slot.out.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - every caller must hear of it
            for slot in batch.slots:
                slot.out.put(exc)
