"""What the sandbox costs a python grader: one worker share of N samples, scored in one sandbox process, per mode.

    .venv/bin/python benchmarks/sandbox_overhead.py --samples 16 --repeats 20

Prints, per mode (``namespaces``, ``audit_hook_only``), the median and the 10th-90th percentile wall time of a
share, and the part of it that is starting the sandbox (an empty share of one trivial sample).
"""

from __future__ import annotations

import argparse
import statistics
import time

from rlft.graders.sandbox import PythonGraderLimits, run_sandboxed

SOURCE = "def grade(sample, item):\n    return float(sample['output_text'].strip() == item['answer'])"


def share_seconds(mode: str, num_samples: int, repeats: int) -> list[float]:
    limits = PythonGraderLimits(mode=mode)
    pairs = [({"output_text": str(i)}, {"answer": str(i % 3)}) for i in range(num_samples)]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        results = run_sandboxed(SOURCE, pairs, limits)
        times.append(time.perf_counter() - start)
        assert all(isinstance(r, float) for r in results), results
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"| mode | share of {args.samples} samples: median (p10-p90) | share of 1 sample: median |")
    print("|---|---|---|")
    for mode in ("namespaces", "audit_hook_only"):
        share_seconds(mode, 1, 2)  # warm the page cache
        full = sorted(share_seconds(mode, args.samples, args.repeats))
        one = share_seconds(mode, 1, args.repeats)
        p10, p90 = full[len(full) // 10], full[(9 * len(full)) // 10]
        print(f"| {mode} | {statistics.median(full) * 1e3:.0f} ms ({p10 * 1e3:.0f}-{p90 * 1e3:.0f}) | "
              f"{statistics.median(one) * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
