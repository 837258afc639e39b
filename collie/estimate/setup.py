"""What an estimate is about: one parallel layout and training recipe, field names as in ``CollieConfig``.

``Setup.from_config(cfg)`` reads a job config, so ``collie estimate`` describes exactly the job ``collie train``
would run; ``Setup(dp=8, tp=2, ...)`` or ``replace(setup, zero_stage=3)`` describes one by hand.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from collie.errors import ConfigError
from collie.layout_rules import (check_expert_parallel, check_expert_parallel_model, check_layout,
                                 pipeline_microbatches)

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PRECISION_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OPTIMIZERS = ("adamw", "lion", "adan", "sophia", "lomo", "adalomo")
FUSED_OPTIMIZERS = ("lomo", "adalomo")


@dataclass(frozen=True)
class Setup:
    """One training job's layout and recipe (per data-parallel rank: ``micro_batch_size`` sequences of
    ``seq_len`` tokens per forward)."""
    dp: int = 1  # every data-parallel rank: dp_replicate × dp_shard
    dp_replicate: int = 1  # HSDP replicas (parallel.dp_replicate): ZeRO-2/3 shard over dp / dp_replicate ranks
    tp: int = 1
    pp: int = 1
    cp: int = 1  # context parallel (parallel.cp): each sequence split over cp ranks; ZeRO shards over dp × cp
    ep: int = 1  # expert parallel (parallel.ep): the routed experts split over ep ranks carved from dp
    zero_stage: int = 0
    cpu_offload: bool = False
    sequence_parallel: bool = False
    pp_schedule: str = "1f1b"  # gpipe, 1f1b, interleaved_1f1b
    pp_microbatches: Optional[int] = None  # None = 2·pp (collie's default)
    pp_split: str = "uniform"  # uniform or balanced (parallel.pp_split)
    pp_boundaries: Optional[tuple[int, ...]] = None  # first layer of stages 1..pp-1 (parallel.pp_boundaries)
    engine: str = "native"  # parallel.engine: native or deepspeed (its layout rules; memory: master_weights)
    optimizer: str = "adamw"
    clip_grad_norm: float = 0.0  # LOMO/AdaLomo run a second backward to get the norm when > 0
    master_weights: bool = False  # fp32 master copy + fp32 states for 16-bit params (DeepSpeed engine)
    peft: str = "none"  # none or lora
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")  # peft.target_modules: last name components
    lora_experts: bool = False  # peft.lora_experts: the routed experts' targets adapted too (MoE)
    param_dtype: str = "float32"  # model.dtype
    precision: str = "fp32"  # train.precision: fp32, or bf16/fp16 autocast
    activation_checkpointing: str = "none"  # none, full, selective (every checkpoint_every-th layer), attention
    checkpoint_every: int = 2
    micro_batch_size: int = 1
    seq_len: int = 2048
    grad_accum_steps: int = 1
    # k/v repeated to every query head before SDPA: collie does so only on CUDA with an explicit mask (a sliding
    # window shorter than the sequence, left padding); causal and per-document attention read them unexpanded
    # (None: collie's choice on CUDA, i.e. only under cp, whose attention takes an explicit mask)
    expand_kv_heads: Optional[bool] = None
    hold_logits: Optional[bool] = None  # logits alive through backward; None = collie's loop: only under pp

    def __post_init__(self):
        self.check()

    # --- derived ---------------------------------------------------------------------------------------------
    @property
    def holds_logits(self) -> bool:
        """Whether the logits outlive the loss's forward: collie's Trainer passes them straight to the loss
        (freed once the loss has its fp32 copy); torch.distributed.pipelining keeps each stage's output."""
        return self.pp > 1 if self.hold_logits is None else self.hold_logits

    @property
    def dp_shard(self) -> int:
        """Data-parallel ranks of one HSDP replica (all of dp without HSDP)."""
        return self.dp // self.dp_replicate

    @property
    def zero_shards(self) -> int:
        """Ranks that share (shard) one copy of the non-expert parameters, gradients and optimizer state under
        ZeRO: a replica's dp ranks × cp (collie folds cp into the data-parallel mesh, as torchtitan does)."""
        return self.dp_shard * self.cp

    @property
    def gradient_ranks(self) -> int:
        """Ranks whose gradients are summed: dp × cp."""
        return self.dp * self.cp

    @property
    def expert_shards(self) -> int:
        """Ranks holding the same routed experts (the "ep_replicate" column of the (dp/ep, ep) grid): ZeRO shards
        the experts over them, and their gradients are summed over them only."""
        return self.dp // self.ep

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    @property
    def sequence_multiple(self) -> int:
        """What a rank's share of the sequence is padded to a multiple of: tp under sequence parallelism, which
        splits it again over the tp ranks (``ParallelEngine.sequence_multiple``)."""
        return self.tp if self.sequence_parallel else 1

    @property
    def local_seq_len(self) -> int:
        """Tokens of a sequence on one rank: s/cp, the sequence padded to a multiple of 2·cp·sequence_multiple
        first (``collie.distributed.context_parallel.ContextParallel.shard``)."""
        if self.cp == 1:
            return self.seq_len
        chunks = 2 * self.cp * self.sequence_multiple
        return -(-self.seq_len // chunks) * chunks // self.cp

    @property
    def padded_seq_len(self) -> int:
        """The whole (padded) sequence whose keys and values every cp rank gathers."""
        return self.local_seq_len * self.cp

    @property
    def kv_repeated(self) -> bool:
        """Whether k/v reach SDPA repeated to every query head: on CUDA only with an explicit mask, which
        context parallelism passes (``collie.models.attention_kernels``)."""
        return self.cp > 1 if self.expand_kv_heads is None else self.expand_kv_heads

    @property
    def n_microbatches(self) -> int:
        """Pipeline micro-batches per forward of ``micro_batch_size`` sequences (1 without pp)."""
        return pipeline_microbatches(self.pp, self.pp_microbatches)

    @property
    def stages_per_rank(self) -> int:
        return 2 if self.pp_schedule == "interleaved_1f1b" and self.pp > 1 else 1

    @property
    def fused(self) -> bool:
        return self.optimizer in FUSED_OPTIMIZERS

    @property
    def param_bytes(self) -> int:
        return DTYPE_BYTES[self.param_dtype]

    @property
    def compute_dtype(self) -> str:
        """Dtype of matmul outputs: autocast's dtype for 16-bit precision on fp32 params, else the params'."""
        if self.precision != "fp32" and self.param_dtype == "float32":
            return PRECISION_DTYPE[self.precision]
        return self.param_dtype

    @property
    def autocast(self) -> bool:
        """Autocast changes anything only when it casts fp32 weights to 16 bits."""
        return self.compute_dtype != self.param_dtype

    def replace(self, **changes) -> "Setup":
        return dataclasses.replace(self, **changes)

    # --- checks ----------------------------------------------------------------------------------------------
    def check(self) -> None:
        for name in ("dp", "dp_replicate", "tp", "pp", "cp", "ep", "micro_batch_size", "seq_len", "grad_accum_steps",
                     "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"estimate: {name}={getattr(self, name)} must be >= 1")
        _choice("zero_stage", self.zero_stage, (0, 1, 2, 3))
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("peft", self.peft, ("none", "lora"))
        _choice("param_dtype", self.param_dtype, tuple(DTYPE_BYTES))
        _choice("precision", self.precision, tuple(PRECISION_DTYPE))
        _choice("activation_checkpointing", self.activation_checkpointing, ("none", "full", "selective", "attention"))
        _choice("pp_schedule", self.pp_schedule, ("gpipe", "1f1b", "interleaved_1f1b"))
        _choice("pp_split", self.pp_split, ("uniform", "balanced"))
        _choice("engine", self.engine, ("native", "deepspeed"))
        unknown = [t for t in self.lora_targets if t not in LINEAR_NAMES]
        if unknown:
            raise ConfigError(f"estimate: lora target(s) {unknown} unknown; choose from {', '.join(LINEAR_NAMES)}")
        if self.lora_experts and self.peft != "lora":
            raise ConfigError(f"peft.lora_experts=true gives routed experts LoRA factors: set peft.method=lora (it "
                              f"is {self.peft}) or peft.lora_experts=false")
        check_layout(dp=self.dp, tp=self.tp, pp=self.pp, cp=self.cp, zero_stage=self.zero_stage, engine=self.engine,
                     dp_replicate=self.dp_replicate,
                     optimizer=self.optimizer, fused=self.fused, micro_batch_size=self.micro_batch_size,
                     pp_microbatches=self.pp_microbatches, pp_schedule=self.pp_schedule,
                     pp_boundaries=self.pp_boundaries, seq_len=self.seq_len, sequence_parallel=self.sequence_parallel,
                     cpu_offload=self.cpu_offload, peft=self.peft)
        check_expert_parallel(self.ep, dp=self.dp, cp=self.cp, dp_replicate=self.dp_replicate, engine=self.engine,
                              peft=self.peft, cpu_offload=self.cpu_offload)

    def check_model(self, args) -> None:
        """The rules that need the model: ep needs routed experts, num_experts/ep on every rank; LoRA on the
        routed experts needs them and a target among their linears (collie's own checks)."""
        check_expert_parallel_model(self.ep, args.architecture, args.num_experts)
        mlp = ("gate_proj", "up_proj", "down_proj")
        if self.lora_experts:
            from collie.peft.lora import check_expert_targets
            check_expert_targets(set(mlp) if args.num_experts else set(), self.lora_targets)
        unmatched = [t for t in self.lora_targets if t in mlp and args.num_experts and
                     not args.shared_expert_intermediate_size and not self.lora_experts]
        if self.peft == "lora" and unmatched:  # as collie.peft.apply_lora: only routed experts have them
            raise ConfigError(f"peft.target_modules={list(self.lora_targets)}: {unmatched} matches no linear of this "
                              f"model (the routed experts' linears get adapters only with peft.lora_experts=true)")

    # --- from a job config -----------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg, world_size: int | None = None) -> "Setup":
        """The setup of a ``CollieConfig``; ``world_size`` resolves ``parallel.dp=-1`` (default: dp=1)."""
        p = cfg.parallel
        if cfg.peft.method not in ("none", "lora"):
            raise ConfigError(f"collie estimate models peft.method none and lora, not {cfg.peft.method!r} "
                              f"(its few trainable parameters make it close to LoRA with a small r)")
        dp, other = p.dp, p.tp * p.pp * p.cp
        if dp == -1:
            dp = max(1, (world_size or other) // other)
        from collie.builders import precision, storage_dtype
        # collie's fp32 master weights for 16-bit models: fp32 parameters, 16-bit autocast
        param_dtype = str(storage_dtype(cfg)).removeprefix("torch.")
        return cls(
            dp=dp, dp_replicate=p.dp_replicate, tp=p.tp, pp=p.pp, cp=p.cp, ep=p.ep, zero_stage=p.zero_stage,
            cpu_offload=p.cpu_offload,
            sequence_parallel=p.sequence_parallel, pp_schedule=p.pp_schedule, pp_microbatches=p.pp_microbatches,
            pp_split=p.pp_split, pp_boundaries=tuple(p.pp_boundaries) if p.pp_boundaries else None,
            engine=p.engine, optimizer=cfg.optim.name, clip_grad_norm=cfg.optim.clip_grad_norm,
            master_weights=p.engine == "deepspeed", peft=cfg.peft.method,
            lora_r=cfg.peft.r, lora_targets=tuple(cfg.peft.target_modules), lora_experts=cfg.peft.lora_experts,
            param_dtype=param_dtype,
            precision=precision(cfg), activation_checkpointing=cfg.model.activation_checkpointing,
            checkpoint_every=cfg.model.checkpoint_every, micro_batch_size=cfg.train.micro_batch_size,
            seq_len=cfg.data.seq_len, grad_accum_steps=cfg.train.grad_accum_steps)


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"estimate: {name}={value!r}; choose from {', '.join(map(str, choices))}")
