"""PyTorch twin of examples/op_bench.rs: times F.linear on the CPU with the same flags.

    tools/fixtures/.venv-ref/bin/python tools/bench/torch_ops.py --op linear --m 8192 --k 320 \
        --n 320 --dtype bf16 --runs 10 --warmup 2
    tools/fixtures/.venv-ref/bin/python tools/bench/torch_ops.py --suite unet-linears --dtype f32

One line per shape (`linear m= k= n= median_s= gflops=`), then
`SUMMARY median_s=<sum of medians> gflops=<GFLOP/s over the suite> isa=torch-<cpu capability>`.
Threads are set to the core count. `--isa` and `--impl` are accepted for flag compatibility
and ignored (torch picks its own path; its capability is printed).
"""

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

UNET_LINEARS = [
    (8192, 320, 320),
    (154, 768, 320),
    (8192, 320, 2560),
    (8192, 1280, 320),
    (2048, 640, 640),
    (154, 768, 640),
    (2048, 640, 5120),
    (2048, 2560, 640),
    (512, 1280, 1280),
    (154, 768, 1280),
    (512, 1280, 10240),
    (512, 5120, 1280),
    (128, 1280, 1280),
    (128, 1280, 10240),
    (128, 5120, 1280),
    (2, 320, 1280),
    (2, 1280, 1280),
]
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def values(n, seed):
    i = torch.arange(n, dtype=torch.int64)
    v = ((i * 2654435761 + seed) % (1 << 32)) >> 8
    return v.to(torch.float64) / (1 << 24) - 0.5


def time_linear(m, k, n, dtype, runs, warmup):
    x = values(m * k, 1).reshape(m, k).to(dtype)
    w = values(n * k, 2).reshape(n, k).to(dtype)
    b = values(n, 3).to(dtype)
    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            t = time.perf_counter()
            F.linear(x, w, b)
            if i >= warmup:
                times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--op", default="linear", choices=["linear"])
    p.add_argument("--m", type=int, default=8192)
    p.add_argument("--k", type=int, default=320)
    p.add_argument("--n", type=int, default=320)
    p.add_argument("--suite", choices=["unet-linears"])
    p.add_argument("--dtype", default="f32", choices=list(DTYPES))
    p.add_argument("--isa")
    p.add_argument("--impl")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    cap = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu capability {cap}")
    shapes = UNET_LINEARS if a.suite else [(a.m, a.k, a.n)]
    total_s = total_gflop = 0.0
    for m, k, n in shapes:
        s = time_linear(m, k, n, DTYPES[a.dtype], a.runs, a.warmup)
        gflop = 2 * m * k * n / 1e9
        print(f"linear m={m} k={k} n={n} median_s={s:.6f} gflops={gflop / s:.1f}")
        total_s += s
        total_gflop += gflop
    print(f"SUMMARY median_s={total_s:.6f} gflops={total_gflop / total_s:.1f} isa=torch-{cap}")


if __name__ == "__main__":
    main()
