"""Memory and communication estimates for a parallel layout, and a planner that picks layouts that fit.

    from collie.estimate import Setup, estimate_memory, estimate_communication, plan
    args = load_card("llama2-7b")
    mem = estimate_memory(args, Setup(dp=8, zero_stage=1, param_dtype="bfloat16", micro_batch_size=4))
    print(mem.peak_gib, mem.breakdown)
"""
from collie.estimate.communication import CommEstimate, estimate_communication
from collie.estimate.counting import CollectiveCounter, count_collective_bytes, wire_bytes
from collie.estimate.memory import MemoryEstimate, estimate_memory
from collie.estimate.plan import Hardware, PlanRow, plan
from collie.estimate.setup import Setup

__all__ = ["CollectiveCounter", "CommEstimate", "Hardware", "MemoryEstimate", "PlanRow", "Setup",
           "count_collective_bytes", "estimate_communication", "estimate_memory", "plan", "wire_bytes"]
