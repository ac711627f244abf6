"""What every benchmark shares: the device's name, its measured matmul peak, counted FLOPs, peak
memory of one method run in its own process, and the report file every run is merged into.

FLOPs are counted by torch's own `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions
and attention, forward and backward, as dispatched), not estimated from parameter counts, so a
path that skips work (a shared prompt, a KV cache) is credited only with what it ran.

The peak is measured, not taken from a datasheet: a square float32 (CPU) or bfloat16 (GPU)
matmul at the thread count the benchmark uses, the best of a few repeats. On a GPU the fraction is
also given against the card's nominal dense bf16 peak (MFU as usually reported).
"""

from __future__ import annotations

import multiprocessing
import platform
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "reports" / "benchmarks"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.reporting import read_json, write_json  # noqa: E402

# Dense bf16 tensor-core peaks without sparsity, from NVIDIA's datasheets (SXM parts).
NOMINAL_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name and the cores this process may use."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu: {model}, {cores} cores"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype | None = None, size: int = 0, repeats: int = 5) -> dict:
    """The best achieved FLOP/s of a square matmul on `device` at the current thread count."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up: thread pool, kernels
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    flops = 2 * size**3
    out = {"dtype": str(dtype).replace("torch.", ""), "size": size, "threads": torch.get_num_threads(),
           "flop_per_second": flops / best}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        nominal = next((v for k, v in NOMINAL_BF16_PEAK.items() if k in name), None)
        out["nominal_bf16_flop_per_second"] = nominal
    return out


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch has FLOP formulas for the GPU attention kernels only: on a CPU, scaled_dot_product_attention
# dispatches to these two ops, which it would count as 0. Same formulas as the GPU kernels (the
# full score matrix, causal masking not subtracted), so CPU and GPU counts agree.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run `fn` once under torch's FLOP counter: its result and the FLOPs it dispatched."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    with counter:
        result = fn()
    return result, int(counter.get_total_flops())


def utilization(flops: float, seconds: float, peak: dict) -> dict:
    """Achieved FLOP/s and its fraction of the measured peak (and of the nominal one on a GPU)."""
    achieved = flops / seconds if seconds > 0 else 0.0
    out = {"flops": int(flops), "achieved_flop_per_second": achieved,
           "fraction_of_measured_peak": achieved / peak["flop_per_second"]}
    if peak.get("nominal_bf16_flop_per_second"):
        out["mfu_vs_nominal_bf16"] = achieved / peak["nominal_bf16_flop_per_second"]
    return out


def proc_status_mib(field: str) -> float:
    """A memory line of /proc/self/status (`VmRSS`: resident now, `VmHWM`: this process's own peak,
    unlike `ru_maxrss`, which a spawned child starts at its parent's), in MiB; NaN off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def run_header(device: torch.device, dtype: torch.dtype) -> dict:
    """What every report names about the run: device, dtype, threads, library versions."""
    import transformers

    return {"device": device_name(device), "dtype": str(dtype).replace("torch.", ""),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def speedup_verdict(speedup: float, target: float) -> dict:
    return {"speedup": round(speedup, 2), "speedup_target": target, "meets_target": speedup >= target}


def _child(target: Callable[..., dict], args: tuple, results) -> None:
    try:
        out = target(*args)
        out["peak_rss_mib"] = proc_status_mib("VmHWM")
        results.put(("ok", out))
    except BaseException as err:  # hand any failure back to the parent, with its text
        import traceback

        results.put(("error", "".join(traceback.format_exception(err))))


def run_isolated(target: Callable[..., dict], *args: Any) -> dict:
    """`target(*args)` in a fresh spawned process, so each method's peak memory is its own.

    `target` must be a module-level function returning a dict; `peak_rss_mib` is added. On a GPU,
    targets report `torch.cuda.max_memory_allocated` themselves. A child that dies without a
    word (killed for memory) is an error, not a hang.
    """
    import queue

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_child, args=(target, args, results))
    process.start()
    while True:
        try:
            status, payload = results.get(timeout=5)
            break
        except queue.Empty:
            if not process.is_alive():
                raise RuntimeError(f"{getattr(target, '__name__', target)}'s process died (exit code "
                                   f"{process.exitcode}; -9 is usually the out-of-memory killer)") from None
    process.join()
    if status != "ok":
        raise RuntimeError(f"{getattr(target, '__name__', target)} failed in its process:\n{payload}")
    return payload


def save_run(name: str, key: str, report: dict, out: Path | None = None) -> Path:
    """Merge `report` into reports/benchmarks/<name>.json under runs[key]; other runs are kept."""
    path = out or REPORTS / f"{name}.json"
    runs = read_json(path).get("runs", {}) if path.exists() else {}
    runs[key] = {**report, "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json(path, {"runs": dict(sorted(runs.items()))})
    return path
