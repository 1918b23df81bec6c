"""The allocator-trace replay of ``bench.memory_breakdown``: the peak and what was alive then, by allocation site."""

from deepcompressor.bench.memory_breakdown import allocation_site, peak_breakdown

OWN = [{"filename": "/x/site-packages/torch/nn/functional.py", "line": 1, "name": "linear"},
       {"filename": "/repo/deepcompressor/kernels/w4a4.py", "line": 42, "name": "act"}]
OTHER = [{"filename": "/x/torch/cuda/graphs.py", "line": 7, "name": "capture"}]


def _alloc(addr, size, frames):
    return {"action": "alloc", "addr": addr, "size": size, "frames": frames}


def _free(addr):
    return {"action": "free_completed", "addr": addr}


def test_allocation_site_prefers_this_projects_frames():
    assert allocation_site(OWN) == "kernels/w4a4.py:42 act"
    assert allocation_site(OTHER) == "/x/torch/cuda/graphs.py:7 capture"
    assert allocation_site([]) == "<allocated before recording>"


def test_peak_breakdown_finds_the_peak_and_groups_the_live_blocks():
    gib = 2**30
    events = [_alloc(1, 2 * gib, OWN), _alloc(2, gib, OTHER), _free(2), _alloc(3, gib, OWN), _alloc(4, gib, OTHER),
              _free(3), _free(4)]
    whole = peak_breakdown(events)
    assert whole["peak_gib"] == 4.0
    assert whole["sites"] == [{"site": "kernels/w4a4.py:42 act", "gib": 3.0},
                              {"site": "/x/torch/cuda/graphs.py:7 capture", "gib": 1.0}]
    # From event 5 on (block 3 freed): block 1 stays alive from before, with block 4.
    late = peak_breakdown(events, start=5)
    assert late["peak_gib"] == 3.0 and late["other_gib"] == 0.0
