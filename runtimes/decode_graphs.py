"""The torch backend's decode step (one new token) captured as CUDA graphs.

A graph replays fixed shapes and addresses, so a captured step reads its inputs from static
buffers (token, position, the cache length) and attends over a fixed span of the arena: the first
`bucket` rows, with the rows at or past the cache length masked out. Spans are powers of two (at
least MIN_BUCKET, at most the arena's capacity), so a 128K arena needs at most ~10 graphs and a
step reads at most twice the rows it needs. The step also writes its new key/value row into the
arena at the length held in a static buffer, so a replay is the whole step.

The capture mechanism is injected: CUDAGraphCapture on a GPU; the tests use an eager stand-in that
runs the same function on every replay, which checks the bookkeeping (static buffers refreshed
before each replay, one capture per span, outputs read from the static outputs) on CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MIN_BUCKET = 256


def bucket(length: int, capacity: int) -> int:
    """The arena span a step at cache length `length` attends over: rows [0, length] must fit
    (the step's own row is `length`)."""
    need = length + 1
    if need > capacity:
        raise ValueError(f"a decode step at length {length} does not fit an arena of {capacity} rows")
    span = max(MIN_BUCKET, 1 << (need - 1).bit_length())
    return min(span, capacity)


class CUDAGraphCapture:
    """torch.cuda.CUDAGraph: warm up on a side stream (allocations and lazy init happen outside
    the capture), then capture. Each graph keeps its own memory pool (a few spans' intermediates:
    small next to the arena), so no replay can overwrite another graph's static outputs."""

    def capture(self, fn: Callable[[], object]):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # warm-up: the same step on the same inputs writes the same row, so it is harmless
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = fn()
        return graph.replay, outputs


class DecodeGraphs:
    """Static inputs, one captured step per span, replay.

    step(span, ids, positions, length) -> outputs: runs one decode step attending over arena rows
    [0, span) with rows >= length masked, writing its row at `length`; its tensor arguments are
    this object's static buffers and its outputs are what a replay refreshes.
    """

    def __init__(self, step: Callable, device: torch.device, capture=None):
        self.step, self.capture = step, capture or CUDAGraphCapture()
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.length = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[Callable, object]] = {}  # span -> (replay, static outputs)

    def run(self, token: int, position: int, length: int, capacity: int):
        """One decode step: refresh the static inputs, capture this span's graph on first use, replay."""
        self.ids.fill_(token)
        self.positions.fill_(position)
        self.length.fill_(length)
        span = bucket(length, capacity)
        if span not in self.graphs:
            self.graphs[span] = self.capture.capture(lambda: self.step(span, self.ids, self.positions, self.length))
        replay, outputs = self.graphs[span]
        replay()
        return outputs
