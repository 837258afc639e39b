"""Reference steps outside collie, which ``collie bench`` divides collie's figures by.

A baseline trains the model of one collie configuration of the grid — the same architecture, dtype, compute
precision, micro-batch, sequence length, learning rate, weight decay and clipping — without any collie code in
the step: a ``transformers`` model built from the ``config.json`` collie would export, and

* ``hf_adamw``: torch AdamW (fused on CUDA, foreach on CPU), norms and biases exempt from weight decay as the
  transformers Trainer does, gradients accumulated over ``train.grad_accum_steps`` micro-batches;
* ``lomo_optim_lomo`` / ``lomo_optim_adalomo``: the LOMO authors' package ``lomo-optim`` (``Lomo`` /
  ``AdaLomo`` with ``fused_backward``), which has no gradient accumulation.

Batches are random token ids of the configuration's shape (throughput does not depend on their values). Each
baseline runs in its own process, started by the bench runner:

    python -m collie.bench.baseline hf_adamw configs/pretrain_tiny.yaml --warmup 2 --steps 8 [overrides …]

and reports, like a collie run's ``metrics.jsonl``, the median step time and tokens/s and the peak memory
(CUDA: the allocator's peak; CPU: the process's maximum RSS, as collie's monitor measures it).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

KINDS = {
    "hf_adamw": "transformers + torch AdamW",
    "lomo_optim_lomo": "transformers + lomo-optim Lomo",
    "lomo_optim_adalomo": "transformers + lomo-optim AdaLomo",
}


def hf_model(cfg, device: torch.device):
    """The configuration's architecture as a transformers model (random weights, sdpa attention)."""
    import transformers
    from collie.builders import build_model_args, storage_dtype
    from collie.models import get_model_class
    args = build_model_args(cfg.model)
    config = get_model_class(args.architecture).hf_config(args)
    model_type = config.pop("model_type")
    hf_config = transformers.AutoConfig.for_model(model_type, **config)
    torch.manual_seed(cfg.train.seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa",
                                                          dtype=storage_dtype(cfg))
    return model.to(device).train()


def decay_groups(model, weight_decay: float) -> list[dict]:
    """Two parameter groups: norms and biases without weight decay (the transformers Trainer's rule)."""
    exempt = [p for name, p in model.named_parameters() if "norm" in name or name.endswith(".bias")]
    exempt_ids = {id(p) for p in exempt}
    decay = [p for p in model.parameters() if id(p) not in exempt_ids]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]


def make_step(kind: str, cfg, model, device: torch.device):
    """A function of the step's micro-batches that trains on them and returns the mean loss."""
    o = cfg.optim
    autocast = torch.autocast(device.type, dtype=_autocast_dtype(cfg), enabled=_autocast_dtype(cfg) is not None)

    def loss_of(ids):
        with autocast:
            return model(input_ids=ids, labels=ids).loss

    if kind == "hf_adamw":
        extra = {key: tuple(value) if key == "betas" else value for key, value in o.args.items()
                 if key in ("betas", "eps")}  # the configuration's AdamW hyper-parameters
        optimizer = torch.optim.AdamW(decay_groups(model, o.weight_decay), lr=o.lr, fused=device.type == "cuda",
                                      **extra)

        def step(batches):
            losses = []
            for ids in batches:
                loss = loss_of(ids) / len(batches)
                loss.backward()
                losses.append(loss.detach())
            if o.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return torch.stack(losses).sum()
        return step
    import lomo_optim
    cls = lomo_optim.Lomo if kind == "lomo_optim_lomo" else lomo_optim.AdaLomo
    optimizer = cls(model, lr=o.lr, clip_grad_norm=o.clip_grad_norm or None, weight_decay=o.weight_decay)

    def fused_step(batches):
        loss = loss_of(batches[0])
        optimizer.fused_backward(loss, o.lr)
        return loss.detach()
    return fused_step


def _autocast_dtype(cfg):
    from collie.builders import compute_dtype
    return compute_dtype(cfg)


def measure(kind: str, cfg, warmup_steps: int, steps: int) -> dict:
    """Train ``warmup_steps + steps`` steps; medians over the timed ones and the peak memory (status ok), or
    status 'skipped: <why>' where the baseline cannot run on this device."""
    from collie.builders import resolve_device
    from collie.monitor.meters import memory_stats, synchronize
    device = resolve_device(cfg.train.device)
    if kind == "lomo_optim_adalomo" and device.type != "cuda":
        return {"status": "skipped: lomo-optim's AdaLomo needs CUDA (it creates its state with .cuda())"}
    model = hf_model(cfg, device)
    step = make_step(kind, cfg, model, device)
    shape = (cfg.train.micro_batch_size, cfg.data.seq_len)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    times, loss = [], None
    for index in range(warmup_steps + steps):
        batches = [torch.randint(0, model.config.vocab_size, shape, generator=generator).to(device)
                   for _ in range(cfg.train.grad_accum_steps)]
        synchronize(device)
        start = time.perf_counter()
        loss = step(batches)
        synchronize(device)
        if index >= warmup_steps:
            times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    tokens = shape[0] * shape[1] * cfg.train.grad_accum_steps
    return {"status": "ok", "step_time_s": step_time, "tokens_per_s_per_gpu": tokens / step_time, "timed_steps": len(times),
            "peak_mem_gib": memory_stats(device)["peak_mem_gib"], "final_loss": float(loss),
            "params": sum(p.numel() for p in model.parameters()),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def check_supported(kind: str, cfg) -> None:
    """What a baseline cannot mirror is an error naming the setting, before any process starts."""
    from collie.errors import ConfigError
    p = cfg.parallel
    if p.tp * p.pp * max(p.dp, 1) != 1 or cfg.peft.method != "none":
        raise ConfigError(f"baseline {kind} runs one process without PEFT; compare it with a single-process, "
                          f"full fine-tuning configuration")
    if kind != "hf_adamw" and cfg.train.grad_accum_steps != 1:
        raise ConfigError(f"baseline {kind}: lomo-optim has no gradient accumulation; use "
                          f"train.grad_accum_steps=1")


def main(argv=None) -> None:
    from collie.config import CollieConfig
    from collie.distributed.launch import write_rank_result
    parser = argparse.ArgumentParser(prog="python -m collie.bench.baseline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    options = parser.parse_intermixed_args(argv)
    cfg = CollieConfig.load(options.config, options.overrides)
    check_supported(options.kind, cfg)
    result = measure(options.kind, cfg, options.warmup, options.steps)
    write_rank_result(result)
    print(result)


if __name__ == "__main__":
    main()
