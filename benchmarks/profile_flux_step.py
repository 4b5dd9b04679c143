"""Where one eager FLUX.1-dev-shaped transformer step spends its time, for one variant of bench_flux.py.

    python benchmarks/profile_flux_step.py --variant qtool-nf4 [--tiny] [--dry-run]

Builds the variant's transformer as bench_flux.py does (random weights, the same Linears quantized), makes 3 warm-up
steps, then prints: the CUDA-event time of 10 back-to-back steps, the wall time of 5 steps each synchronized, the
host time per step of 3 unsynchronized ones (a step whose host time nears its GPU time is host-bound: its timing
follows the host CPU's speed), and torch.profiler's top CUDA kernels and CPU ops over two steps. Prints only (no
CSV): a diagnostic, not a figure for the README. Run one variant per process, bnb's beside qtool's in one session.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> int:
    import bench_flux as bf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="qtool-nf4", choices=bf.VARIANTS)
    parser.add_argument("--tiny", action="store_true", help="a 1+1-block FLUX on the CPU (checks the script)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    args = parser.parse_args()
    size = bf.TINY if args.tiny else bf.DEV
    if args.dry_run:
        print(f"{args.variant}: {size.shape}, 3 warm-up steps, 10 event-timed, 5 synced, 3 host-timed, 2 profiled")
        return 0
    import torch

    device = torch.device("cpu" if args.tiny else "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    child_args = argparse.Namespace(steps=0, reps=10, warmup=3, seed=0, tiny=args.tiny, compile_fallback=False)
    rows = Path(f"/tmp/profile-flux-{args.variant}.jsonl")
    child = bf.Child(args=child_args, variant=args.variant, size=size, rows_file=rows)
    child.device, child.cuda = device, device.type == "cuda"
    model, _ = bf.build_transformer(child, bf.linear_maker(args.variant), bf.quantize_skip())
    inputs = bf.step_inputs(size, device)
    with torch.no_grad():
        for _ in range(3):
            model(**inputs)
        sync()
        events = bf.time_reps(child, lambda: model(**inputs), 10)
        walls = []
        for _ in range(5):
            sync()
            t = time.perf_counter()
            model(**inputs)
            sync()
            walls.append((time.perf_counter() - t) * 1e3)
        sync()
        t = time.perf_counter()
        for _ in range(3):
            model(**inputs)
        host = (time.perf_counter() - t) / 3 * 1e3
        sync()
        print(f"{args.variant}: events median {sorted(events)[len(events) // 2]:.1f} ms "
              f"{[round(e) for e in events]}; synced wall {[round(w) for w in walls]} ms; "
              f"host per step (3 unsynchronized) {host:.1f} ms", flush=True)  # fmt: skip
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if child.cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(2):
                model(**inputs)
            sync()
    table = prof.key_averages().table
    if child.cuda:
        print(table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60), flush=True)
    print(table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=60), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
