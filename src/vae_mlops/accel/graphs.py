"""A training step recorded once as a CUDA graph and replayed: its Python and kernel launches paid once."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

GRAPH_WARMUP = 3  # eager calls before the capture: they create the optimiser's state


class CudaGraphStep:
    """`step(*inputs)` replayed as one CUDA graph on static copies of its inputs.

    The first `GRAPH_WARMUP` calls run `step` eagerly on a side stream, as capture requires; the
    next one records it (every tensor it allocates, the gradients included, then lives in the
    graph's pool) and every later call copies its inputs into the static buffers and replays.
    `step` must do the same work on every call (full batches only) and return a tensor.
    """

    def __init__(self, step: Callable[..., Tensor]) -> None:
        self.step = step
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[Tensor, ...] | None = None
        self.out: Tensor | None = None

    def __call__(self, *inputs: Tensor) -> Tensor:
        if self.static is None:
            self.static = tuple(t.clone() for t in inputs)
        for buf, value in zip(self.static, inputs):
            buf.copy_(value)
        if self.graph is not None:
            self.graph.replay()
            return self.out
        self.calls += 1
        if self.calls <= GRAPH_WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(*self.static)
            torch.cuda.current_stream().wait_stream(side)
            return out
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.out = self.step(*self.static)
        self.graph = graph
        graph.replay()
        return self.out
