"""GPU time of short calls as the model runs them: inside a CUDA graph, without the host's launch gaps."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["graph_time_ms"]


def graph_time_ms(calls: list[Callable[[], object]], device: torch.device, replays: int = 5,
                  target_calls: int = 96) -> float:
    """Median time per call of ``calls`` (e.g. one layer on several copies of its weights, so they come from HBM)
    captured together in one CUDA graph that runs them ``target_calls / len(calls)`` times (on CPU: wall time of
    plain calls). Warm-up runs first, outside capture, on a side stream."""
    rounds = max(1, target_calls // len(calls))
    if device.type != "cuda":
        for call in calls:
            call()
        times = []
        for _ in range(replays):
            start = time.perf_counter()
            for call in calls:
                call()
            times.append((time.perf_counter() - start) * 1e3 / len(calls))
        return statistics.median(times)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for call in calls:
        call()
    end.record()
    end.synchronize()
    # Slow calls need fewer rounds: about 20 ms of work per replay (an upper bound, host gaps included).
    rounds = max(1, min(rounds, round(20.0 / max(start.elapsed_time(end), 1e-3))))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for call in calls:
                call()
    graph.replay()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (rounds * len(calls)))
    del graph
    return statistics.median(times)
