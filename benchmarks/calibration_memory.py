"""Observer memory and speed on long calibration runs.

Feeds N batches of 32x128x768 heavy-tailed activations (Student-t with outlier channels)
through each observer, each run in a fresh subprocess, and reports the peak RSS growth over the
process's resident memory before the first batch (the RSS high-water mark is reset there via
/proc/self/clear_refs, so data generation does not hide the observer's temporaries; freed heap
left resident by generation can still be reused without counting), and the time per batch
(updates only; the final range computation is not timed). Goal: growth independent of N (flat
from 200 to 2,000 batches) and below 64 MB per observed tensor.

    python benchmarks/calibration_memory.py                 # 200 and 2000 batches
    python benchmarks/calibration_memory.py --quick         # 20 and 200 batches
    python benchmarks/calibration_memory.py --batches 50 500
Writes benchmarks/results/calibration_memory.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

OBSERVERS = ("minmax", "ema_minmax", "percentile", "mse", "kl")
SHAPE = (32, 128, 768)
POOL = 4  # distinct batches generated up front and rescaled per step (generation is not what we measure)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_record import make_record, write_record  # noqa: E402


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    raise KeyError(key)


def _reset_peak() -> bool:
    """Reset the process's RSS high-water mark (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def run_one(observer: str, batches: int, threads: int) -> dict[str, float]:
    """Run in this process: returns peak RSS growth (MB) and seconds per batch."""
    import torch

    import ptqkit as pq
    from ptqkit.observers import make_observer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    pool = []
    for _ in range(POOL):
        x = torch.distributions.StudentT(3.0).sample(SHAPE)
        x[..., :8] *= 40.0  # outlier channels
        pool.append(x)
    spec = pq.QuantSpec(qtype="uint8", symmetric=False, observer=observer)
    obs = make_observer(spec)
    batch = torch.empty(SHAPE)  # the input buffer is allocated before measuring, like the pool
    obs.update(pool[0][:1])  # allocate the observer's state before measuring
    # Growth = high-water mark during the loop minus resident memory before it: the observer's
    # state and per-batch temporaries. Without clear_refs, fall back to the prior high-water mark.
    exact = _reset_peak()
    base = _status_mb("VmRSS") if exact else _peak_rss_mb()
    start = time.perf_counter()
    for i in range(batches):
        torch.mul(pool[i % POOL], 1.0 + 0.001 * (i % 17), out=batch)
        obs.update(batch)
    seconds = time.perf_counter() - start
    obs.qparams()
    peak = _status_mb("VmHWM") if exact else _peak_rss_mb()
    state_bytes = sum(t.numel() * t.element_size() for t in obs.state()[0].values())
    return {
        "peak_rss_growth_mb": peak - base,
        "peak_measure": "VmHWM reset" if exact else "ru_maxrss",
        "ms_per_batch": 1000 * seconds / batches,
        "state_kb": state_bytes / 1024,
    }


def _write(path: Path, rows: list[dict], threads: int) -> None:
    table = [[r["observer"], r["batches"], f"{r['peak_rss_growth_mb']:.1f}", f"{r['ms_per_batch']:.1f}", f"{r['state_kb']:.1f}"] for r in rows]
    write_record(path, make_record(
        "calibration_memory", f"observer memory and time by calibration length (batches of {SHAPE}, {threads} threads)",
        ["observer", "batches", "peak RSS growth MB", "ms/batch", "state KB"], table,
        data={"shape": SHAPE, "threads": threads, "machine": platform.machine(), "rows": rows}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--batches", type=int, nargs="+", default=None, help="batch counts to compare"
    )
    parser.add_argument("--quick", action="store_true", help="20 and 200 batches")
    parser.add_argument("--observers", nargs="+", default=list(OBSERVERS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "calibration_memory.json"
    )
    parser.add_argument("--child", nargs=2, metavar=("OBSERVER", "BATCHES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        sys.stdout.write(
            json.dumps(run_one(args.child[0], int(args.child[1]), args.threads)) + "\n"
        )
        return 0
    counts = args.batches or ([20, 200] if args.quick else [200, 2000])
    rows = []
    for observer in args.observers:
        for n in counts:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    observer,
                    str(n),
                    "--threads",
                    str(args.threads),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"observer": observer, "batches": n, **result})
            sys.stdout.write(
                f"{observer:<11} {n:>6} batches  peak RSS growth {result['peak_rss_growth_mb']:8.1f} MB  "
                f"{result['ms_per_batch']:8.1f} ms/batch  state {result['state_kb']:8.1f} KB\n"
            )
            sys.stdout.flush()
            _write(
                args.out, rows, args.threads
            )  # after every row: a long run that is cut short keeps its numbers
    sys.stdout.write(f"wrote {args.out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
