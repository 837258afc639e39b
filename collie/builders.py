"""Build the pieces a job needs from its config: device, tokenizer, model, datasets."""
from __future__ import annotations

import dataclasses
import logging
import math
import os

import torch

from collie.distributed.activation_checkpointing import apply_activation_checkpointing
from collie.errors import ConfigError

logger = logging.getLogger("collie")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def master_weights(cfg) -> bool:
    """Whether a bf16/fp16 model keeps fp32 master weights: yes for classic optimizers, whose small updates
    would round away in 16 bits; LOMO/AdaLomo update the 16-bit weights in place (as their papers do)."""
    from collie.optim import is_fused_optimizer
    return cfg.model.dtype != "float32" and not is_fused_optimizer(cfg.optim.name)


def storage_dtype(cfg) -> torch.dtype:
    """The parameters' dtype: ``model.dtype``, or float32 when they are master weights."""
    return torch.float32 if master_weights(cfg) else DTYPES[cfg.model.dtype]


def precision(cfg) -> str:
    """The compute precision: ``train.precision``; with master weights at least the model's 16-bit dtype."""
    if cfg.train.precision == "fp32" and master_weights(cfg):
        return {"bfloat16": "bf16", "float16": "fp16"}[cfg.model.dtype]
    return cfg.train.precision


def compute_dtype(cfg) -> torch.dtype | None:
    """The autocast dtype of ``precision(cfg)`` (None: no autocast)."""
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision(cfg)]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available; use train.device=cpu or auto")
    if name == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def build_model_args(model_cfg):
    """The architecture: from the pretrained directory's config.json, else the card; then ``model.arch``. With
    ``model.backend: hf``, the ``transformers`` model's description (``HFModelArgs``)."""
    from collie.models import load_card, load_hf_config
    if model_cfg.backend == "hf":
        from collie.models.hf_backend import hf_model_args
        return hf_model_args(model_cfg.pretrained)
    args = load_hf_config(model_cfg.pretrained) if model_cfg.pretrained else load_card(model_cfg.card)
    if model_cfg.arch:
        from collie.schema import from_dict
        merged = {**dataclasses.asdict(args), **model_cfg.arch}
        args = from_dict(type(args), merged, "model.arch")
    return args


def build_model(cfg, args, ctx):
    """The model on this rank: weights from ``model.pretrained`` or random init (the same values in every
    layout), created on the meta device and materialized once, in its final placement."""
    from collie.distributed import default_init_fn, load_full_state_dict, parallelize
    from collie.distributed.hf_loading import load_hf_checkpoint
    from collie.models import build_model as build_arch, from_pretrained
    from collie.peft import apply_peft, lora_initial_state
    dtype, m, seed = storage_dtype(cfg), cfg.model, cfg.train.seed
    if master_weights(cfg):
        logger.info("model.dtype=%s with optim.name=%s: fp32 master weights, computed in %s", m.dtype,
                    cfg.optim.name, compute_dtype(cfg))
    if m.backend == "hf":
        return build_hf_backend_model(cfg, ctx)
    ctx.validate_model(args)
    if ctx.world_size == 1 or cfg.parallel.engine == "deepspeed":  # DeepSpeed partitions the full model itself
        if m.pretrained:
            model = from_pretrained(m.pretrained, device=ctx.device, dtype=dtype, args_overrides=m.arch or None)
        else:
            model = build_arch(args, device="meta")
            model.to_empty(device=ctx.device)
            model.init_weights(seed=seed)
            model = model.to(dtype)
        model = apply_peft(model, cfg.peft, seed)
        apply_activation_checkpointing(model, m.activation_checkpointing, m.checkpoint_every)
        return compile_layers(model, cfg)
    meta = apply_peft(build_arch(args, device="meta").to(dtype), cfg.peft, seed, ctx.world_size)
    adapters = lora_initial_state(meta, seed) if cfg.peft.method == "lora" else {}
    options = dict(activation_checkpointing=m.activation_checkpointing, checkpoint_every=m.checkpoint_every,
                   compute_dtype=compute_dtype(cfg) if master_weights(cfg) else None)
    if not m.pretrained:
        base = default_init_fn(type(meta), args, seed, dtype)
        model = parallelize(meta, args, cfg.parallel, ctx, ctx.device, init_fn=lambda: {**base(), **adapters},
                            **options)
    else:
        model = parallelize(meta, args, cfg.parallel, ctx, ctx.device, **options)
        read = load_hf_checkpoint(model, m.pretrained)  # each rank reads only its own shards
        logger.info("rank %d read %.1f MiB of %s", ctx.rank, read / 2**20, m.pretrained)
        if adapters:
            load_full_state_dict(model, adapters)
    for part in model.parts:
        compile_layers(part, cfg)
    return model


def build_hf_backend_model(cfg, ctx):
    """``model.backend: hf``: the ``transformers`` model of ``model.pretrained``, loaded whole on every rank (the
    same weights everywhere, so nothing is broadcast), adapted (PEFT) and wrapped for data parallelism / ZeRO."""
    from collie.distributed import parallelize_loaded
    from collie.models.hf_backend import HFCausalLM
    from collie.peft import apply_peft
    m = cfg.model
    model = HFCausalLM.from_pretrained(m.pretrained, dtype=storage_dtype(cfg), device=ctx.device)
    model = apply_peft(model, cfg.peft, cfg.train.seed, ctx.world_size)
    if ctx.world_size == 1:
        apply_activation_checkpointing(model, m.activation_checkpointing, m.checkpoint_every)
        return compile_layers(model, cfg)
    model = parallelize_loaded(model, cfg.parallel, ctx, activation_checkpointing=m.activation_checkpointing,
                               checkpoint_every=m.checkpoint_every,
                               compute_dtype=compute_dtype(cfg) if master_weights(cfg) else None)
    for part in model.parts:
        compile_layers(part, cfg)
    return model


def compile_layers(model, cfg):
    """``torch.compile`` each decoder layer in place (``train.compile``): layer by layer keeps compile time and
    graph breaks local, and composes with activation checkpointing, FSDP2 and pipeline stages.

    A fused optimizer's norm pass (clipping, fp16) backpropagates twice through one graph (``retain_graph``),
    which compiled backwards with donated buffers refuse: those are turned off (process-wide) for them."""
    from collie.optim import is_fused_optimizer
    if not cfg.train.compile:
        return model
    if is_fused_optimizer(cfg.optim.name):
        torch._functorch.config.donated_buffer = False
    from collie.models.hf_backend import decoder_layers
    for layer in decoder_layers(model).values():
        layer.compile(backend=cfg.train.compile_backend)
    return model


def count_parameters(parts, ctx) -> tuple[int, int]:
    """(trainable, total) parameters of the whole model, not of this rank's shard or pipeline stage."""
    from collie.peft import count_parameters as count
    counts = torch.tensor([sum(c) for c in zip(*(count(part) for part in parts))])
    if ctx.pp > 1:
        torch.distributed.all_reduce(counts, group=ctx.pp_group)
    return int(counts[0]), int(counts[1])


def build_tokenizer(cfg):
    from collie.data.tokenizer import load_tokenizer
    path = cfg.data.tokenizer or cfg.model.pretrained
    if path is None:
        raise ConfigError("data.tokenizer is not set and model.pretrained is null: name a tokenizer directory "
                          "or sentencepiece .model file")
    return load_tokenizer(path)


def check_vocab(tokenizer, args) -> None:
    if tokenizer.vocab_size > args.vocab_size:
        raise ConfigError(f"data.tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                          f"{args.vocab_size}; use a matching tokenizer or set model.arch.vocab_size")


def build_dataset(cfg, tokenizer, files: list[str], args, is_main_process: bool = True, barrier=None):
    """A tokenized dataset of the configured format, with its statistics (truncated / skipped records)."""
    if cfg.data.seq_len > args.max_position_embeddings:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the model's max_position_embeddings="
                          f"{args.max_position_embeddings}")
    if cfg.data.format == "pretrain":
        from collie.data.pretrain import load_pretrain_dataset
        d = cfg.data
        cache_dir = d.cache_dir or os.path.join(cfg.train.output_dir, "data_cache")  # nothing outside the run
        return load_pretrain_dataset(files, tokenizer, d.seq_len, cache_dir=cache_dir, text_field=d.text_field,
                                     txt_documents=d.txt_documents, document_masking=d.document_masking,
                                     skip_malformed=d.skip_malformed, is_main_process=is_main_process,
                                     barrier=barrier)
    from collie.data.instruction import load_instruction_dataset
    return load_instruction_dataset(files, tokenizer, cfg.data.seq_len, template=cfg.data.template,
                                    pack=cfg.data.pack)


def split_eval_data(cfg, train, eval_dataset):
    """``(train, eval)``: with ``data.eval_split``, that fraction (or count) of the training samples, drawn with
    ``train.seed`` (the same on every rank and every run), is evaluation data and no longer trained on. An
    evaluation dataset handed to the Trainer takes precedence."""
    split = cfg.data.eval_split
    if split is None or eval_dataset is not None:
        return train, eval_dataset
    count = round(split * len(train)) if split < 1 else int(split)
    if not 1 <= count < len(train):
        raise ConfigError(f"data.eval_split={split:g} holds out {count} of the {len(train)} training samples; "
                          f"leave at least one sample on each side")
    generator = torch.Generator().manual_seed(cfg.train.seed)
    order = torch.randperm(len(train), generator=generator).tolist()
    logger.info("data.eval_split=%g: %d of %d training samples held out for evaluation (train.seed=%d)", split,
                count, len(train), cfg.train.seed)
    subset = torch.utils.data.Subset
    return subset(train, sorted(order[count:])), subset(train, sorted(order[:count]))


def resolve_max_steps(cfg, num_samples: int, dp: int) -> int:
    """``train.max_steps``; with ``train.epochs``, ceil(epochs · samples / global batch) written into the config
    (which then holds ``max_steps`` alone, as a config saved from it reloads) and logged."""
    train = cfg.train
    if train.epochs is None:
        return train.max_steps
    global_batch = train.micro_batch_size * train.grad_accum_steps * dp
    steps = max(1, math.ceil(train.epochs * num_samples / global_batch))
    logger.info("train.epochs=%g: max_steps=%d (%d training samples, global batch %d = micro_batch_size %d × "
                "grad_accum_steps %d × dp %d)", train.epochs, steps, num_samples, global_batch,
                train.micro_batch_size, train.grad_accum_steps, dp)
    train.max_steps, train.epochs = steps, None
    return steps
