"""What a training step costs: throughput, model FLOPs utilisation and memory."""
from __future__ import annotations

import resource
import sys

import torch

# Dense bf16 tensor-core peaks in TFLOP/s, matched against torch.cuda.get_device_name().
PEAK_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "GH200": 989.0,
    "B200": 2250.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10G": 125.0,
    "A10": 125.0, "RTX 4090": 165.2, "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0,
}


def device_peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """Peak dense bf16 TFLOP/s of ``device``: the override, the table entry, or None (CPU, unknown GPU)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_TFLOPS.items():  # the table lists specific names before their families
        if key in name:
            return peak
    return None


def flops_per_token(num_params: int, num_layers: int, hidden_size: int, seq_len: int,
                    trainable_params: int | None = None) -> float:
    """Model FLOPs of training on one token (recomputation not counted, as MFU requires).

    Dense matmuls: 2·N forward, 2·N for the input gradients and 2·N_trainable for the weight gradients (frozen
    weights, as under LoRA, need none), i.e. 6·N when everything trains. Attention scores and values add
    12·L·h·s (forward and both backward products; their inputs are activations, so always computed).
    """
    trainable = num_params if trainable_params is None else trainable_params
    return 4.0 * num_params + 2.0 * trainable + 12.0 * num_layers * hidden_size * seq_len


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read measures it (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_stats(device: torch.device) -> dict:
    """Peak memory of the step (reset each step) and what is allocated/reserved now, in GiB.

    On CPU the peak is the process's maximum resident set size (it cannot be reset).
    """
    gib = 2 ** 30
    if device.type == "cuda":
        return {"peak_mem_gib": torch.cuda.max_memory_allocated(device) / gib,
                "allocated_gib": torch.cuda.memory_allocated(device) / gib,
                "reserved_gib": torch.cuda.memory_reserved(device) / gib}
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_mem_gib": maxrss * (1 if sys.platform == "darwin" else 1024) / gib}


class StepMeter:
    """Turns a step's token count and duration into tokens/s per device and MFU."""

    def __init__(self, flops_per_token: float, peak_tflops: float | None, world_size: int):
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops
        self.world_size = world_size

    def throughput(self, tokens: int, step_time_s: float) -> dict:
        per_gpu = tokens / max(step_time_s, 1e-9) / self.world_size
        mfu = per_gpu * self.flops_per_token / (self.peak_tflops * 1e12) if self.peak_tflops else None
        return {"tokens_per_s_per_gpu": per_gpu, "mfu": mfu}


def max_over_ranks(value: float, device: torch.device) -> float:
    """The largest ``value`` over all ranks; every rank must call this at the same point."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return value
    tensor = torch.tensor(value, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return float(tensor)
