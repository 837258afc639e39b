"""Which layouts, optimizers and batch sizes can run together: each rule once, over plain values.

Config load (``collie.config``), the estimator (``Setup.check``, and through it the planner's search), the
optimizers' validators and the runtime (pipeline runner, data parallelism, DeepSpeed, the mesh) call these
functions. Each raises ``ConfigError`` naming the config key and what would be valid. ``check_layout`` runs
every rule that needs no model and no environment; ``check_config`` feeds it a ``CollieConfig``.
Model-shape rules (heads, layers, vocab over tp/pp) live in ``collie.distributed.mesh.validate_model_for_layout``.
"""
from __future__ import annotations

from collie.errors import ConfigError

COLLIE_MODEL_PEFT = ("none", "lora")  # peft methods that keep collie's own model (the others run transformers)


# --- degrees and world size --------------------------------------------------------------------------------

def check_degrees(dp: int) -> None:
    if dp == 0:
        raise ConfigError("parallel.dp=0 is invalid: use a positive degree or -1 to fill the world size")


def resolve_dp(world: int, dp: int, tp: int, pp: int, cp: int = 1) -> int:
    """``dp`` with -1 filled in from the world size; ConfigError when the degrees do not multiply to it."""
    other = tp * pp * cp
    names = f"parallel.tp={tp} × parallel.pp={pp}" + (f" × parallel.cp={cp}" if cp > 1 else "")
    if dp == -1:
        if world % other:
            raise ConfigError(f"world size {world} is not divisible by {names} = {other}; launch with "
                              f"--nproc_per_node a multiple of {other} or change "
                              f"parallel.tp/parallel.pp" + ("/parallel.cp" if cp > 1 else ""))
        dp = world // other
    if dp * other != world:
        hint = f"set parallel.dp={world // other} or " if world % other == 0 else ""
        raise ConfigError(f"world size {world} ≠ parallel.dp={dp} × {names} = {dp * other}; {hint}launch with "
                          f"--nproc_per_node {dp * other}")
    return dp


def check_launch(engine: str, launched: bool) -> None:
    """``launched``: the process was started by torchrun (WORLD_SIZE is set)."""
    if engine == "deepspeed" and not launched:
        raise ConfigError("parallel.engine=deepspeed needs a torchrun launch (WORLD_SIZE is not set): run "
                          "torchrun --nproc_per_node N -m collie train CONFIG, or set parallel.engine=native")


# --- pipeline ----------------------------------------------------------------------------------------------

def pipeline_microbatches(pp: int, pp_microbatches: int | None) -> int:
    """Micro-batches per pipeline step: parallel.pp_microbatches, default 2·pp; 1 without pipelining."""
    return 1 if pp == 1 else pp_microbatches or 2 * pp


def check_pp_boundaries(pp: int, boundaries) -> None:
    if boundaries is not None and len(boundaries) != pp - 1:
        raise ConfigError(f"parallel.pp_boundaries has {len(boundaries)} entries; parallel.pp={pp} needs "
                          f"{pp - 1} (the first layer of each stage after the first)")


def check_microbatches(n: int, pp: int, schedule: str) -> None:
    """The schedule can run ``n`` micro-batches over ``pp`` stages."""
    if schedule == "1f1b" and n < pp:
        raise ConfigError(f"parallel.pp_microbatches={n} is fewer than parallel.pp={pp} stages; 1f1b needs at "
                          f"least {pp}")
    if schedule == "interleaved_1f1b" and n % max(1, n // pp):
        raise ConfigError(f"parallel.pp_microbatches={n} does not suit interleaved_1f1b with pp={pp}; use a "
                          f"multiple of {pp}")


def check_pipeline_batch(batch: int, n: int, key: str = "train.micro_batch_size") -> None:
    """A pipeline step splits ``batch`` sequences (the value of ``key``) into ``n`` equal micro-batches."""
    if batch % n:
        raise ConfigError(f"{key}={batch} must be a multiple of the {n} pipeline micro-batches "
                          f"(parallel.pp_microbatches, default 2·pp); choose {key}={(batch // n + 1) * n} or "
                          f"a parallel.pp_microbatches that divides {batch}")


def check_choice_metrics(chosen: list[str], pp: int) -> None:
    """Choice metrics (multiple_choice, classification) read every position's logits on one rank."""
    if chosen and pp > 1:
        raise ConfigError(f"eval.metrics: {chosen[0]} needs every position's logits on one rank, which is "
                          f"not available under parallel.pp > 1 (generation metrics and perplexity are); use "
                          f"parallel.pp=1 for it")


# --- tensor / sequence parallel, loss ----------------------------------------------------------------------

def check_sequence_parallel(sequence_parallel: bool, tp: int, pp: int, seq_len: int) -> None:
    if sequence_parallel and tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1")
    if sequence_parallel and pp > 1 and seq_len % tp:
        raise ConfigError(f"data.seq_len={seq_len} must be a multiple of parallel.tp={tp} with "
                          f"sequence parallelism under pipeline parallelism (every batch is padded to seq_len)")


def check_loss_chunk(loss_chunk_size: int, dp: int, tp: int, pp: int, peft: str) -> None:
    if loss_chunk_size and max(dp, tp, pp) > 1:
        raise ConfigError("train.loss_chunk_size runs in one process (parallel.dp=tp=pp=1): under tensor "
                          "parallelism the vocab-parallel loss already avoids full logits, and sharded or "
                          "replicated heads need their gradient hooks; set train.loss_chunk_size=0")
    if loss_chunk_size and peft not in COLLIE_MODEL_PEFT:
        raise ConfigError(f"train.loss_chunk_size needs collie's own LM head; peft.method={peft} runs a "
                          f"transformers model: set train.loss_chunk_size=0")


# --- data parallel -----------------------------------------------------------------------------------------

def check_cpu_offload(cpu_offload: bool, zero_stage: int, engine: str = "native", dp: int = -1,
                      world_size: int | None = None) -> None:
    """Native offload is FSDP2's offload policy: sharded parameters over a data-parallel group of more than
    one rank (``dp``/``world_size`` when known; a one-process job ignores parallel settings). DeepSpeed
    checks its own offload."""
    if not cpu_offload or engine != "native":
        return
    if zero_stage < 2:
        raise ConfigError(f"parallel.cpu_offload=true needs parallel.zero_stage 2 or 3 (got {zero_stage}): "
                          f"offloading goes with FSDP's sharded parameters")
    if dp == 1 and world_size is not None and world_size > 1:
        raise ConfigError(f"parallel.cpu_offload=true shards over the data-parallel group and needs "
                          f"parallel.dp > 1 (this layout has parallel.dp=1 of world size {world_size})")


def check_dp_replicate(dp_replicate: int, dp: int, zero_stage: int, engine: str = "native") -> None:
    """HSDP: ``dp`` data-parallel ranks as ``dp_replicate`` replicas × ``dp / dp_replicate`` shards. Parameters,
    gradients and optimizer state are sharded within a replica (ZeRO-2/3 over the shard group) and gradients
    all-reduced across replicas. ``dp=-1``: the division is checked at launch, once dp is known."""
    if dp_replicate == 1:
        return
    what = f"parallel.dp_replicate={dp_replicate}"
    if engine != "native":
        raise ConfigError(f"{what} (HSDP) needs parallel.engine=native: DeepSpeed's ZeRO shards over every "
                          f"data-parallel rank; set parallel.dp_replicate=1 or parallel.engine=native")
    if zero_stage < 2:
        raise ConfigError(f"{what} shards within replicas (HSDP) and needs parallel.zero_stage 2 or 3 (got "
                          f"{zero_stage}): stage 0 already replicates everything over parallel.dp and stage 1 "
                          f"shards optimizer state over all of it; set parallel.dp_replicate=1 or zero_stage 2/3")
    if dp < 1:
        return
    choices = [d for d in range(1, dp) if dp % d == 0]
    choose = ", ".join(map(str, choices[:-1])) + " or " + str(choices[-1]) if len(choices) > 1 else "1"
    if dp % dp_replicate or dp_replicate >= dp:
        why = "does not divide" if dp % dp_replicate else "leaves one rank per shard group of"
        raise ConfigError(f"{what} {why} parallel.dp={dp}: the data-parallel ranks are dp_replicate replicas × "
                          f"dp/dp_replicate shards, at least 2; choose parallel.dp_replicate {choose}")


# --- context parallel --------------------------------------------------------------------------------------

def check_context_parallel(cp: int, tp: int = 1, pp: int = 1, engine: str = "native", peft: str = "none",
                           backend: str = "collie", loss_chunk_size: int = 0, document_masking: bool = False) -> None:
    """Context parallelism splits each sequence over ``cp`` ranks and all-gathers keys/values in every attention
    layer of collie's own models. It runs with data parallelism, ZeRO 0-3, tensor parallelism and pipeline stages
    (native engine)."""
    if cp == 1:
        return
    what = f"parallel.cp={cp}"
    if pp > 1 and document_masking:
        raise ConfigError(f"{what} with parallel.pp={pp} cannot mask packed documents: each row's attention is cut at "
                          f"its own document starts, which do not follow the pipeline's micro-batches; set "
                          f"data.document_masking=false, or parallel.pp=1 or parallel.cp=1")
    if engine != "native":
        raise ConfigError(f"{what} needs parallel.engine=native: DeepSpeed reduces gradients over its own "
                          f"data-parallel group, which does not include the cp ranks")
    if backend != "collie" or peft not in COLLIE_MODEL_PEFT:
        why = f"model.backend={backend}" if backend != "collie" else f"peft.method={peft}"
        raise ConfigError(f"{what} replaces the attention of collie's own models; {why} runs a transformers "
                          f"model: use model.backend=collie with peft.method none or lora, or parallel.cp=1")
    if loss_chunk_size:
        raise ConfigError(f"train.loss_chunk_size runs in one process; under {what} each rank's logits are "
                          f"already 1/cp of the sequence's: set train.loss_chunk_size=0")


# --- model backends ----------------------------------------------------------------------------------------

def check_hf_backend(tp: int, pp: int, engine: str) -> None:
    """``model.backend: hf`` runs any transformers causal LM, which has no tensor or pipeline plan: data
    parallelism and ZeRO 0–3 only (the registered families have both, with model.backend=collie)."""
    from collie.models import list_models
    for key, value in (("tp", tp), ("pp", pp)):
        if value > 1:
            raise ConfigError(f"parallel.{key}={value} is not supported with model.backend=hf: a transformers model "
                              f"runs data parallel and ZeRO 0-3 only (parallel.tp=1, parallel.pp=1). Tensor and "
                              f"pipeline parallelism need collie's implementation of the family: "
                              f"{', '.join(list_models())} (model.backend=collie)")
    if engine == "deepspeed":
        raise ConfigError("parallel.engine=deepspeed is not supported with model.backend=hf; use "
                          "parallel.engine=native (ZeRO 0-3 with torch's DDP/FSDP2)")


# --- optimizers and engines --------------------------------------------------------------------------------

def check_fused_optimizer(name: str, pp: int, zero_stage: int, engine: str) -> None:
    """An optimizer that updates inside backward (LOMO, AdaLomo)."""
    if pp > 1:
        raise ConfigError(f"optim.name={name} updates inside backward and cannot run under pipeline schedules "
                          f"(parallel.pp={pp}); use parallel.pp=1 or a classic optimizer (adamw, lion, …)")
    if zero_stage == 1:
        raise ConfigError(f"parallel.zero_stage=1 splits optimizer.step() over ranks, but optim.name={name} "
                          f"updates inside backward and keeps no gradients; use parallel.zero_stage 0, 2 or 3")
    if engine == "deepspeed":
        raise ConfigError(f"optim.name={name} needs collie's own backward; parallel.engine=deepspeed runs its own. "
                          f"Use parallel.engine=native")


def check_sophia(name: str, pp: int, cp: int = 1) -> None:
    if name == "sophia" and pp > 1:
        raise ConfigError(f"optim.name=sophia refreshes its Hessian estimate from the logits of a forward pass, "
                          f"which no single stage has under parallel.pp={pp}; use parallel.pp=1")
    if name == "sophia" and cp > 1:
        raise ConfigError(f"optim.name=sophia refreshes its Hessian estimate from a whole-sequence forward, which "
                          f"every one of the parallel.cp={cp} ranks would add to the gradients they sum; use "
                          f"parallel.cp=1 or another optimizer (adamw, lion, adan, …)")


def check_deepspeed(engine: str, tp: int, pp: int, optimizer: str, clip_grad_value: float, peft: str) -> None:
    """What the DeepSpeed engine supports."""
    if engine != "deepspeed":
        return
    if tp > 1 or pp > 1:
        raise ConfigError(f"parallel.engine=deepspeed runs data parallelism only (ZeRO stages 0-3); parallel.tp="
                          f"{tp}, parallel.pp={pp} need parallel.engine=native")
    if optimizer == "sophia":
        raise ConfigError("optim.name=sophia refreshes its Hessian estimate from gradients that DeepSpeed "
                          "partitions; with parallel.engine=deepspeed use adamw, lion or adan")
    if clip_grad_value:
        raise ConfigError("optim.clip_grad_value is not applied by DeepSpeed (it clips by norm only); set it to 0 "
                          "or use parallel.engine=native")
    if peft not in COLLIE_MODEL_PEFT:
        raise ConfigError(f"peft.method={peft} runs in one process; with parallel.engine=deepspeed "
                          f"use peft.method=none or lora")


# --- entry points ------------------------------------------------------------------------------------------

def check_layout(*, dp: int = -1, tp: int = 1, pp: int = 1, cp: int = 1, zero_stage: int = 0, engine: str = "native",
                 dp_replicate: int = 1,
                 optimizer: str = "adamw", fused: bool = False, micro_batch_size: int = 1,
                 eval_batch_size: int | None = None, pp_microbatches: int | None = None,
                 pp_schedule: str = "1f1b", pp_boundaries=None, seq_len: int = 2048, sequence_parallel: bool = False,
                 cpu_offload: bool = False, peft: str = "none", loss_chunk_size: int = 0,
                 clip_grad_value: float = 0.0, backend: str = "collie", document_masking: bool = False) -> None:
    """Every rule above that needs neither the model nor the environment. ``dp=-1``: resolved at launch
    (the rules that need it run then); ``fused``: the optimizer updates inside backward; ``eval_batch_size``:
    None when nothing is evaluated."""
    check_degrees(dp)
    check_dp_replicate(dp_replicate, dp, zero_stage, engine)
    check_pp_boundaries(pp, pp_boundaries)
    if pp > 1:
        n = pipeline_microbatches(pp, pp_microbatches)
        check_pipeline_batch(micro_batch_size, n, "train.micro_batch_size")
        if eval_batch_size is not None:
            check_pipeline_batch(eval_batch_size, n, "eval.batch_size")
        check_microbatches(n, pp, pp_schedule)
    check_deepspeed(engine, tp, pp, optimizer, clip_grad_value, peft)
    check_context_parallel(cp, tp, pp, engine, peft, backend, loss_chunk_size, document_masking)
    check_loss_chunk(loss_chunk_size, dp, tp, pp, peft)
    check_sequence_parallel(sequence_parallel, tp, pp, seq_len)
    check_cpu_offload(cpu_offload, zero_stage, engine, dp * cp, dp * tp * pp * cp if dp > 0 else None)
    if fused:
        check_fused_optimizer(optimizer, pp, zero_stage, engine)
    check_sophia(optimizer, pp, cp)


def check_config(cfg) -> None:
    """``check_layout`` over a ``CollieConfig`` (at load)."""
    from collie.optim import is_fused_optimizer, list_optimizers
    p, name = cfg.parallel, cfg.optim.name
    check_layout(dp=p.dp, tp=p.tp, pp=p.pp, cp=p.cp, zero_stage=p.zero_stage, engine=p.engine, dp_replicate=p.dp_replicate,
                 optimizer=name,
                 fused=name in list_optimizers() and is_fused_optimizer(name),  # unknown names: _check_optim
                 micro_batch_size=cfg.train.micro_batch_size,
                 eval_batch_size=cfg.eval.batch_size if cfg.data.eval_files else None,
                 pp_microbatches=p.pp_microbatches, pp_schedule=p.pp_schedule, pp_boundaries=p.pp_boundaries,
                 seq_len=cfg.data.seq_len, sequence_parallel=p.sequence_parallel, cpu_offload=p.cpu_offload,
                 peft=cfg.peft.method, loss_chunk_size=cfg.train.loss_chunk_size,
                 clip_grad_value=cfg.optim.clip_grad_value, backend=cfg.model.backend,
                 document_masking=cfg.data.document_masking)


# --- expert parallel ---------------------------------------------------------------------------------------

def check_expert_parallel(ep: int, *, dp: int = -1, cp: int = 1, dp_replicate: int = 1, engine: str = "native",
                          peft: str = "none", backend: str = "collie", cpu_offload: bool = False) -> None:
    """Expert parallelism shards the routed experts of collie's MoE families over ep ranks carved from the
    data-parallel group of each pipeline stage and tp rank. It runs with data parallelism and ZeRO 0-3 (native
    engine, classic or fused optimizers), tensor parallelism (experts replicated over tp) and pipeline stages."""
    if ep == 1:
        return
    what = f"parallel.ep={ep}"
    for key, value in (("parallel.cp", cp), ("parallel.dp_replicate", dp_replicate)):
        if value > 1:
            raise ConfigError(f"{what} does not yet compose with {key}={value}: expert parallelism runs with data "
                              f"parallelism and ZeRO 0-3, tensor and pipeline parallelism (parallel.dp, "
                              f"parallel.zero_stage, parallel.tp, parallel.pp); set {key}=1 or parallel.ep=1")
    if engine != "native":
        raise ConfigError(f"{what} needs parallel.engine=native: DeepSpeed reduces every gradient over all of dp, "
                          f"but an expert's gradient is summed only over the ranks holding the same expert")
    if backend != "collie" or peft not in ("none", "lora"):  # LoRA factors of an expert stay with it
        why = f"model.backend={backend}" if backend != "collie" else f"peft.method={peft}"
        raise ConfigError(f"{what} shards the experts of collie's own MoE models; {why} is not supported with it "
                          f"yet: use model.backend=collie and peft.method=none or lora, or parallel.ep=1")
    if cpu_offload:
        raise ConfigError(f"{what} does not yet compose with parallel.cpu_offload=true; set one of them off")
    if dp > 0:
        check_expert_parallel_degree(ep, dp)


def check_expert_parallel_degree(ep: int, dp: int, world: int | None = None) -> None:
    """The ep ranks are carved from the data-parallel ranks: ep must divide dp."""
    if dp % ep:
        choose = ", ".join(str(d) for d in range(1, dp + 1) if dp % d == 0)
        raise ConfigError(f"parallel.ep={ep} does not divide parallel.dp={dp}"
                          f"{f' (world size {world})' if world else ''}: the expert-parallel groups are carved from "
                          f"the data-parallel ranks; choose parallel.ep from {choose}")


def check_expert_parallel_model(ep: int, architecture: str, num_experts: int | None) -> None:
    """ep needs routed experts, an equal number on every ep rank."""
    if ep == 1:
        return
    if not num_experts:
        raise ConfigError(f"parallel.ep={ep} shards routed experts, but architecture {architecture} has none; use a "
                          f"mixture-of-experts architecture (mixtral, qwen2_moe, qwen3_moe) or parallel.ep=1")
    if num_experts % ep:
        choose = ", ".join(str(d) for d in range(1, num_experts + 1) if num_experts % d == 0)
        raise ConfigError(f"parallel.ep={ep} does not divide num_experts={num_experts}: each ep rank holds "
                          f"num_experts/ep experts; choose parallel.ep from {choose}")
