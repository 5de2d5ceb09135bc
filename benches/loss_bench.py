"""Benchmark of the top-K forward-KL loss with the bucket tail: Rust kernel vs torch.

Times forward + backward (``values.mean().backward()``) in one process, at equal threads
(``torch.set_num_threads(n)`` and ``logitcache.set_num_threads(n)``), for
* ``torch ref``: the straightforward torch implementation of the same loss (log_softmax,
  gather, the rest bucket as a logsumexp over the complement, autograd backward);
* ``lc torch``: ``logitcache.losses.sparse_kd_loss(..., backend="torch")`` when that module
  exists ("n/a" otherwise);
* ``rust``: ``logitcache._loss_kernels.rust_sparse_kd`` (the fused kernel; its forward
  computes the gradient, backward scales it in place).

It reports each time, the speedup over ``torch ref``, the fraction of the memory-bandwidth
roofline the Rust path reaches (the kernel must read the logits once and write the gradient
once: ``2 * N * V * itemsize`` bytes at the machine's copy bandwidth, measured here with a
large tensor copy at the same thread count), and the peak memory beyond the gradient itself
(each configuration runs once more in a fresh subprocess: the peak RSS during the call,
VmHWM after resetting it through /proc/self/clear_refs, or ``ru_maxrss`` without /proc,
minus the RSS before and the gradient's size).

Run: ``python benches/loss_bench.py`` (``--quick`` for one small configuration).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import torch

import logitcache
from logitcache._loss_kernels import rust_sparse_kd

N_ROWS = 512
K = 64
VOCABS = (32768, 128256)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

try:
    from logitcache import losses as lc_losses  # merged in from the torch-path branch
except ImportError:
    lc_losses = None


def make_inputs(
    n: int, v: int, k: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student logits and a top-k teacher target, built without any [n, v] temporary (so
    that the memory probe's high-water mark is not set before the measured call)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=dtype) * 3
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    # Teacher log-probabilities by rank, summing to ~0.9 (the rest bucket holds 0.1).
    p = torch.softmax(-torch.arange(k, dtype=torch.float64) / 8, -1) * 0.9
    logprobs = p.log().float().expand(n, k).contiguous()
    return z, ids, logprobs


def torch_ref(z: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """Per-row KL(P || Q) over the K ids + rest bucket, written the obvious way in torch."""
    logq = torch.log_softmax(z, dim=-1, dtype=torch.float32)
    lq_s = logq.gather(-1, ids)
    lq_rest = logq.scatter(-1, ids, float("-inf")).logsumexp(-1)
    p_s = logprobs.exp()
    p_rest = (1 - p_s.sum(-1)).clamp_min(0)
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-10).log() - lq_rest), 0.0)
    return (p_s * (logprobs - lq_s)).sum(-1) + rest


def rust(z: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    valid = torch.ones(z.shape[0], dtype=torch.bool)
    return rust_sparse_kd(
        z,
        ids,
        logprobs,
        valid,
        divergence="forward_kl",
        tail="bucket",
        temperature=1.0,
        teacher_temperature=1.0,
        beta=0.5,
        alpha=0.1,
    )


def lc_torch(z: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    assert lc_losses is not None
    return lc_losses.sparse_kd_loss(z, ids, logprobs, reduction="none", backend="torch")


PATHS: dict[str, Callable[..., torch.Tensor]] = {
    "torch_ref": torch_ref,
    "lc_torch": lc_torch,
    "rust": rust,
}


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    logitcache.set_num_threads(n)


def fwd_bwd(fn: Callable[..., torch.Tensor], z, ids, logprobs) -> tuple[float, float]:
    """Seconds of the forward and of the backward of ``fn(...).mean()``."""
    leaf = z.detach().requires_grad_(True)
    t0 = time.perf_counter()
    loss = fn(leaf, ids, logprobs).mean()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    assert leaf.grad is not None and leaf.grad.shape == z.shape
    del leaf, loss
    gc.collect()
    return t1 - t0, t2 - t1


def time_paths(
    fns: dict[str, Callable[..., torch.Tensor]], z, ids, logprobs, repeats: int
) -> dict[str, tuple[float, float]]:
    """Fastest forward and forward+backward seconds of each path over `repeats` rounds,
    after one warm-up each. The paths alternate within a round, so that load from other
    processes falls on all of them alike; the minimum is the least disturbed run."""
    for fn in fns.values():
        fwd_bwd(fn, z, ids, logprobs)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            runs[name].append(fwd_bwd(fn, z, ids, logprobs))
    return {name: (min(f for f, _ in r), min(f + b for f, b in r)) for name, r in runs.items()}


def copy_bandwidth(threads: int, nbytes: int = 512 << 20) -> float:
    """Bytes per second of a large tensor copy (read + write counted), best of 5."""
    set_threads(threads)
    src = torch.ones(nbytes // 4)
    dst = torch.zeros(nbytes // 4)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _rss_and_reset_peak() -> int:
    """Current RSS; on Linux also resets the peak (VmHWM) to it, so that the peak measured
    next is this call's, not one left by importing torch or building the inputs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmRSS")
    except OSError:  # no /proc: fall back to the high-water mark so far
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss() -> int:
    try:
        return _status_bytes("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def probe_memory(path: str, v: int, dtype_name: str, threads: int) -> int:
    """Run in a fresh process: peak RSS growth of one forward+backward minus the gradient."""
    set_threads(threads)
    fn = PATHS[path]
    # Warm up thread pools and kernels on a tiny problem first.
    fwd_bwd(fn, *make_inputs(4, 256, 8, DTYPES[dtype_name], seed=1))
    z, ids, logprobs = make_inputs(N_ROWS, v, K, DTYPES[dtype_name])
    gc.collect()
    before = _rss_and_reset_peak()
    leaf = z.detach().requires_grad_(True)
    fn(leaf, ids, logprobs).mean().backward()
    after = _peak_rss()
    return after - before - leaf.grad.numel() * leaf.grad.element_size()


def peak_extra_mib(path: str, v: int, dtype_name: str, threads: int) -> float:
    # glibc would otherwise keep freed large blocks (here: the input's temporaries) and hand
    # them to the next allocation, hiding it from the RSS; a fixed mmap threshold maps and
    # unmaps every large block.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(
        [sys.executable, __file__, "--probe", path, str(v), dtype_name, str(threads)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"] / 2**20


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{model}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"logitcache {logitcache.__version__}"
    )


def fmt_ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small configuration")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    parser.add_argument("--probe", nargs=4, metavar=("PATH", "V", "DTYPE", "THREADS"))
    args = parser.parse_args()
    if args.probe:
        path, v, dtype_name, threads = args.probe
        extra = probe_memory(path, int(v), dtype_name, int(threads))
        print(json.dumps({"peak_extra_bytes": extra}))
        return

    all_threads = os.cpu_count() or 1
    thread_counts = sorted({1, all_threads})
    vocabs = (4096,) if args.quick else VOCABS
    print(f"machine: {machine()}")
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print(f"N = {N_ROWS} rows, K = {K}, forward KL, bucket tail, values.mean().backward()")
    bandwidth = {t: copy_bandwidth(t) for t in thread_counts}
    for t, bw in bandwidth.items():
        print(f"copy bandwidth, {t} thread(s): {bw / 1e9:.1f} GB/s (read + write)")
    print()
    header = (
        "| V | dtype | threads | torch ref fwd+bwd (ms) | lc torch fwd+bwd (ms) | "
        "rust fwd (ms) | rust fwd+bwd (ms) | rust speedup | lc torch speedup | "
        "roofline, rust fwd | roofline, rust fwd+bwd | peak extra MiB torch ref | "
        "peak extra MiB lc torch | peak extra MiB rust |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for v in vocabs:
        for dtype_name, dtype in DTYPES.items():
            z, ids, logprobs = make_inputs(N_ROWS, v, K, dtype)
            for threads in thread_counts:
                set_threads(threads)
                fns = {"torch_ref": torch_ref, "rust": rust}
                if lc_losses is not None:
                    fns["lc_torch"] = lc_torch
                times = time_paths(fns, z, ids, logprobs, args.repeats)
                ref = times["torch_ref"][1]
                lc = times["lc_torch"][1] if "lc_torch" in times else None
                rust_fwd, rust_total = times["rust"]
                roofline = 2 * z.numel() * z.element_size() / bandwidth[threads]
                mem_ref = mem_lc = mem_rust = "n/a"
                if not args.no_memory:
                    mem_ref = f"{peak_extra_mib('torch_ref', v, dtype_name, threads):.0f}"
                    mem_rust = f"{peak_extra_mib('rust', v, dtype_name, threads):.1f}"
                    if lc_losses is not None:
                        mem_lc = f"{peak_extra_mib('lc_torch', v, dtype_name, threads):.0f}"
                lc_speedup = "n/a" if lc is None else f"{ref / lc:.2f}x"
                print(
                    f"| {v} | {dtype_name} | {threads} | {fmt_ms(ref)} | {fmt_ms(lc)} | "
                    f"{fmt_ms(rust_fwd)} | {fmt_ms(rust_total)} | {ref / rust_total:.2f}x | "
                    f"{lc_speedup} | {roofline / rust_fwd:.0%} | {roofline / rust_total:.0%} | "
                    f"{mem_ref} | {mem_lc} | {mem_rust} |",
                    flush=True,
                )
            del z, ids, logprobs
            gc.collect()
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
