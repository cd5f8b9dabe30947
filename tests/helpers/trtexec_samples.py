"""CONSTRUCTED samples of trtexec's output (the formats of trtexec 7.x/8.6/10; values invented).

Read by the parser tests (tests/test_targets_trtexec.py) and written by the FAKE measuring
trtexec of the `fake_gpu` fixture (tests/conftest.py), so both agree on one sample.
"""

from __future__ import annotations


# --- CONSTRUCTED samples (format of trtexec 8.6/10; values invented) -----------------
def _query(start: float, h2d: float, compute: float, d2h: float) -> dict[str, float]:
    """One --exportTimes entry: enqueue 0.1 ms from `start`, then H2D, compute, D2H back to back
    (compute starts when enqueue ends); latencyMs = the three, endToEndMs = start to end of D2H."""
    t = {"startEnqMs": start, "endEnqMs": start + 0.1, "startH2dMs": start, "endH2dMs": start + h2d,
         "startComputeMs": start + 0.1, "endComputeMs": start + 0.1 + compute}
    t.update(startD2hMs=t["endComputeMs"], endD2hMs=t["endComputeMs"] + d2h, h2dMs=h2d, computeMs=compute,
             d2hMs=d2h, latencyMs=h2d + compute + d2h, endToEndMs=t["endComputeMs"] + d2h - start)
    return {k: round(v, 6) for k, v in t.items()}


EXPORT_TIMES = [
    _query(10.0, 0.05, 0.5, 0.02),  # warm-up query: compute starts before --warmUp=200 ms, so it is dropped
    _query(201.0, 0.04, 0.4, 0.02),
    _query(202.0, 0.05, 0.5, 0.03),
    _query(203.0, 0.06, 0.6, 0.02),
]

# Older trtexec (7.x) named the transfers In/Out and had no latencyMs derivation change.
EXPORT_TIMES_OLD = [{"startInMs": 300.0, "endInMs": 300.1, "startComputeMs": 300.1, "endComputeMs": 300.9,
                     "startOutMs": 300.9, "endOutMs": 301.0, "inMs": 0.1, "computeMs": 0.8, "outMs": 0.1,
                     "latencyMs": 1.0, "endToEndMs": 1.0}]  # fmt: skip

EXPORT_PROFILE = [
    {"count": 120},
    {
        "name": "/c1/Conv + /Relu",
        "timeMs": 6.0,
        "averageMs": 0.05,
        "medianMs": 0.049,
        "percentage": 30.0,
    },
    {
        "name": "/c2/Conv + /Relu_1",
        "timeMs": 12.0,
        "averageMs": 0.1,
        "medianMs": 0.1,
        "percentage": 60.0,
    },
    {"name": "/fc/Gemm", "timeMs": 2.0, "averageMs": 0.0167, "percentage": 10.0},
]

SUMMARY_TRT10 = """\
[01/15/2025-10:02:11] [I] === Performance summary ===
[01/15/2025-10:02:11] [I] Throughput: 1987.25 qps
[01/15/2025-10:02:11] [I] Latency: min = 0.459961 ms, max = 0.912109 ms, mean = 0.502197 ms, median = 0.497803 ms, percentile(90%) = 0.521973 ms, percentile(95%) = 0.536133 ms, percentile(99%) = 0.604004 ms
[01/15/2025-10:02:11] [I] Enqueue Time: min = 0.0878906 ms, max = 0.228516 ms, mean = 0.103271 ms, median = 0.0998535 ms, percentile(90%) = 0.114258 ms, percentile(95%) = 0.121094 ms, percentile(99%) = 0.149414 ms
[01/15/2025-10:02:11] [I] H2D Latency: min = 0.0405273 ms, max = 0.0783691 ms, mean = 0.0447754 ms, median = 0.0441895 ms, percentile(90%) = 0.0478516 ms, percentile(95%) = 0.0495605 ms, percentile(99%) = 0.0561523 ms
[01/15/2025-10:02:11] [I] GPU Compute Time: min = 0.399414 ms, max = 0.821289 ms, mean = 0.437012 ms, median = 0.432129 ms, percentile(90%) = 0.453125 ms, percentile(95%) = 0.464844 ms, percentile(99%) = 0.524414 ms
[01/15/2025-10:02:11] [I] D2H Latency: min = 0.0161133 ms, max = 0.0419922 ms, mean = 0.0204102 ms, median = 0.0195312 ms, percentile(90%) = 0.0227051 ms, percentile(95%) = 0.0239258 ms, percentile(99%) = 0.0290527 ms
[01/15/2025-10:02:11] [I] Total Host Walltime: 3.00164 s
[01/15/2025-10:02:11] [I] Total GPU Compute Time: 2.60674 s
[01/15/2025-10:02:11] [I] Explanations of the performance metrics are printed in the verbose logs.
"""

# trtexec 8.x prints one percentile and an End-to-End line, without timestamps when piped.
SUMMARY_TRT8 = """\
[I] Throughput: 512.5 qps
[I] Latency: min = 1.8 ms, max = 2.9 ms, mean = 1.95 ms, median = 1.93 ms, percentile(99%) = 2.4 ms
[I] End-to-End Host Latency: min = 1.9 ms, max = 3.5 ms, mean = 2.1 ms, median = 2.05 ms, percentile(99%) = 2.9 ms
[I] GPU Compute Time: min = 1.7 ms, max = 2.7 ms, mean = 1.85 ms, median = 1.83 ms, percentile(99%) = 2.3 ms
[I] Total GPU Compute Time: 1.85 s
"""
