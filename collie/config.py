"""The job configuration: one dataclass per section, loaded from YAML with dotted command-line overrides.

    cfg = CollieConfig.load("configs/quickstart.yaml", ["train.max_steps=10", "optim.lr=3e-4"])

Every field documents itself in ``metadata["help"]``; ``docs/configuration.md`` is generated from these
dataclasses (``python -m collie.config_reference``). Keys, types and ranges are checked by
``collie.schema``; combinations of sections are checked by ``CollieConfig.validate``.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from collie.errors import ConfigError
from collie.schema import from_dict, suggest

logger = logging.getLogger("collie")


def _f(default, help: str, **bounds):
    """A dataclass field with its documentation and bounds."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help, **bounds})
    return field(default=default, metadata={"help": help, **bounds})


@dataclass
class ModelConfig:
    """Which architecture to build and where its weights come from."""
    card: str = _f("tiny", "architecture card: a name from models/ (tiny, llama3-8b, …) or a path to a YAML card")
    arch: dict = _f({}, "overrides of card fields, e.g. {num_hidden_layers: 2}; keys are ModelArgs fields")
    pretrained: Optional[str] = _f(None, "local Hugging Face model directory to load architecture and weights "
                                         "from (overrides card); null = random init")
    backend: Literal["collie", "hf"] = _f("collie", "collie: collie's implementation of the architecture (a card or "
                                                    "model.pretrained of a registered family; every layout); hf: "
                                                    "the transformers AutoModelForCausalLM in model.pretrained (any "
                                                    "family transformers defines, no remote code; data parallel "
                                                    "and ZeRO 0-3; see docs/hf_backend.md)")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "dtype of the parameters")
    activation_checkpointing: Literal["none", "full", "selective", "attention"] = _f(
        "none", "recompute activations in backward: none, full (every layer), selective (every "
                "`checkpoint_every`-th layer) or attention (the attention block of every layer)")
    checkpoint_every: int = _f(2, "with activation_checkpointing=selective, checkpoint every n-th layer", min=1)


@dataclass
class ParallelConfig:
    """How the job is spread over processes: data × context × tensor × pipeline parallel, and ZeRO."""
    dp: int = _f(-1, "data-parallel degree; -1 = world size / (tp·pp·cp)", min=-1)
    dp_replicate: int = _f(1, "HSDP: split the dp ranks into this many replicas of dp/dp_replicate ranks each; "
                              "ZeRO-2/3 shard within a replica (e.g. a node) and gradients are all-reduced across "
                              "replicas; 1 = shard over all of dp", min=1)
    tp: int = _f(1, "tensor-parallel degree", min=1)
    pp: int = _f(1, "pipeline-parallel degree (number of stages)", min=1)
    cp: int = _f(1, "context-parallel degree: each sequence is split over cp ranks (load-balanced: 2·cp chunks, rank r "
                    "holds chunk r and chunk 2·cp-1-r) and attention all-gathers keys/values over them; gradients are "
                    "summed over dp × cp; composes with dp, ZeRO 0-3, tp (+SP), pp, LOMO/AdaLomo and LoRA (not with "
                    "DeepSpeed)", min=1)
    zero_stage: int = _f(0, "ZeRO stage over the data-parallel group: 0 replicate, 1 shard optimizer state, "
                            "2 + gradients, 3 + parameters", min=0, max=3)
    cpu_offload: bool = _f(False, "offload optimizer state (and parameters at stage 3) to CPU memory")
    ep: int = _f(1, "expert-parallel degree (mixture-of-experts models): the routed experts are split over ep ranks "
                    "carved from the data-parallel ones (ep divides dp and num_experts; each rank holds "
                    "num_experts/ep experts) and tokens reach their experts by all-to-all; composes with dp, "
                    "ZeRO 0-3, LOMO/AdaLomo, tp (experts replicated over tp) and pp (not yet with cp, HSDP or "
                    "DeepSpeed)", min=1)
    sequence_parallel: bool = _f(False, "shard norms/dropout activations along the sequence over the tp group")
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = _f("1f1b", "pipeline schedule")
    pp_microbatches: Optional[int] = _f(None, "micro-batches per pipeline step; null = 2·pp", min=1)
    pp_split: Literal["uniform", "balanced"] = _f("uniform", "how layers are split into stages (ignored when "
                                                              "pp_boundaries is set)")
    pp_boundaries: Optional[list[int]] = _f(None, "manual stage boundaries: first layer index of stages 1..pp-1")
    engine: Literal["native", "deepspeed"] = _f("native", "ZeRO engine: torch-native (DDP/ZeRO optimizer/FSDP2) "
                                                          "or DeepSpeed")
    timeout_s: int = _f(600, "collective timeout in seconds before a hung job fails", min=1)


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""
    name: str = _f("adamw", "optimizer name from the registry (adamw, lion, adan, sophia, lomo, adalomo, …)")
    lr: float = _f(1e-3, "peak learning rate (finite, > 0)", greater_than=0.0)
    weight_decay: float = _f(0.0, "decoupled weight decay", min=0.0)
    no_decay: list[str] = _f(["norm", "bias"], "kinds of parameters exempt from weight_decay, told by parameter "
                                               "name: norm (normalisation gains), bias, embedding (the token and "
                                               "tied embeddings); [] = decay every parameter")
    args: dict = _f({}, "further optimizer hyper-parameters, e.g. {betas: [0.9, 0.95], eps: 1e-8}")
    scheduler: Literal["constant", "linear", "cosine"] = _f("cosine", "learning-rate decay after warm-up")
    warmup_steps: int = _f(0, "linear warm-up steps", min=0)
    min_lr_ratio: float = _f(0.0, "final learning rate as a fraction of lr (linear/cosine)", min=0.0, max=1.0)
    clip_grad_norm: float = _f(0.0, "clip gradients to this global L2 norm; 0 = off", min=0.0)
    clip_grad_value: float = _f(0.0, "clip each gradient element to ±value; 0 = off", min=0.0)


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning."""
    method: Literal["none", "lora", "prefix", "prompt", "ia3"] = _f("none", "adapter method; none = full fine-tuning")
    r: int = _f(8, "LoRA rank", min=1)
    alpha: float = _f(16.0, "LoRA scaling numerator (scale = alpha / r)", min=0.0)
    dropout: float = _f(0.0, "LoRA dropout", min=0.0, max=1.0)
    target_modules: list[str] = _f(["q_proj", "v_proj"], "names of the linears that get adapters")
    lora_experts: bool = _f(False, "LoRA on a mixture-of-experts model: the routed experts' target linears get "
                                   "factors of their own per expert too (saved merged: peft cannot represent them); "
                                   "false: attention, dense MLP and shared-expert targets only")
    num_virtual_tokens: int = _f(20, "prefix/prompt tuning: number of virtual tokens", min=1)


@dataclass
class DataConfig:
    """Training and evaluation data."""
    format: Literal["instruction", "pretrain"] = _f("instruction", "instruction: conversations with loss on "
                                                                   "responses; pretrain: plain text")
    train_files: list[str] = _f([], "training files (.jsonl/.json; .txt/.parquet for pretrain)")
    eval_files: list[str] = _f([], "evaluation files")
    tokenizer: Optional[str] = _f(None, "tokenizer: HF tokenizer directory or sentencepiece .model; "
                                        "null = model.pretrained")
    template: str = _f("alpaca", "chat template for instruction data: alpaca, chatml, a model family's (llama2, "
                                 "llama3, mistral, qwen2, internlm2), 'tokenizer' for the tokenizer's own, or a Jinja "
                                 "chat template (a .jinja file or its text); saved with the model for generation")
    seq_len: int = _f(512, "maximum tokens per sequence", min=2)
    pack: bool = _f(False, "instruction data: pack several conversations per sequence (positions restart per "
                           "conversation); pretrain data is always packed into seq_len blocks")
    document_masking: bool = _f(False, "packed sequences: tokens attend only within their own document or "
                                       "conversation, and no loss crosses a boundary")
    text_field: str = _f("text", "pretrain: the field/column holding the text in .jsonl, .parquet and saved "
                                 "Hugging Face datasets")
    txt_documents: Literal["paragraph", "file"] = _f("paragraph", "pretrain .txt files: documents separated by "
                                                                   "blank lines, or one document per file")
    cache_dir: Optional[str] = _f(None, "pretrain: where tokenized corpora are cached and memory-mapped; null = "
                                        "<train.output_dir>/data_cache (point runs at one directory to share it)")
    skip_malformed: bool = _f(False, "pretrain: skip malformed records (bad JSON, missing text field) and count "
                                     "them (reported) instead of failing; refused with data.format=instruction, "
                                     "which always fails on one")
    pad_to_multiple_of: Optional[int] = _f(None, "round padded batch length up to a multiple of this", min=1)
    shuffle: bool = _f(True, "shuffle the training data each epoch")
    eval_split: Optional[float] = _f(None, "hold out part of the training data as evaluation data: a fraction in "
                                           "(0, 1) or a whole count >= 1 of samples (records; packed sequences for "
                                           "pretrain data or data.pack), drawn with train.seed; exclusive with "
                                           "eval_files", min=0.0)

    def __post_init__(self):
        check_eval_split(self.eval_split, self.eval_files)


@dataclass
class TrainConfig:
    """The training loop."""
    output_dir: str = _f("outputs/run", "where the resolved config, log, metrics.jsonl and checkpoints go")
    max_steps: Optional[int] = _f(None, "optimizer steps to run; null = 100, or counted from train.epochs (set one "
                                        "of the two)", min=1)
    epochs: Optional[float] = _f(None, "passes over the training data, instead of max_steps: max_steps = ceil(epochs "
                                       "· training samples / global batch), logged at the start; null = max_steps",
                                 min=0.0)
    micro_batch_size: int = _f(8, "sequences per forward pass on each data-parallel rank", min=1)
    grad_accum_steps: int = _f(1, "micro-batches accumulated into one optimizer step", min=1)
    precision: Literal["fp32", "bf16", "fp16"] = _f("fp32", "compute precision (autocast for bf16/fp16)")
    seed: int = _f(42, "random seed (model init, data order, dropout)", min=0, max=2**63 - 1)
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto = cuda when available, else cpu")
    log_every: int = _f(10, "write a log line and metrics every n steps", min=1)
    on_nonfinite: Literal["skip", "stop"] = _f("skip", "a non-finite loss: skip the step or stop the run")
    progress_bar: bool = _f(True, "show a progress bar on rank 0 when its console is a terminal (in a file or "
                                  "a pipe, log lines only)")
    compile: bool = _f(False, "torch.compile each decoder layer (after activation checkpointing and sharding); pad batches to fixed "
                                "lengths (data.pad_to_multiple_of) to avoid recompiling for every new length")
    compile_backend: str = _f("inductor", "torch.compile backend (inductor; aot_eager to check without codegen)")
    loss_chunk_size: int = _f(0, "compute the LM head and loss over this many positions at a time, recomputing "
                                 "them in backward, so full-vocabulary logits never exist; 0 = off (one process)",
                              min=0)
    overwrite: bool = _f(False, "a fresh run (checkpoint.resume unset) into an output_dir holding an earlier run's "
                                "checkpoints deletes them (and its metrics) instead of refusing to start")

    def __post_init__(self):
        self.max_steps = check_steps_or_epochs(self.max_steps, self.epochs)


@dataclass
class EvalConfig:
    """Evaluation during and after training."""
    every_steps: int = _f(0, "evaluate every n steps; 0 = only at the end", min=0)
    before_training: bool = _f(False, "also evaluate before the first step (a baseline to compare with)")
    batch_size: int = _f(16, "sequences per evaluation batch", min=1)
    max_batches: Optional[int] = _f(None, "cap on evaluation batches; null = whole eval set", min=1)
    metrics: list[str] = _f(["perplexity"], "evaluators to run: perplexity; exact_match, bleu, rouge (greedy "
                            "responses vs references, data.format=instruction); multiple_choice, classification "
                            "(option log-likelihoods on eval.choice_file); see docs/evaluation.md")
    max_new_tokens: int = _f(16, "generation length for generation-based metrics", min=1)
    stop: list[str] = _f([], "stop strings for generation-based metrics: a response ends before the first one")
    choice_file: Optional[str] = _f(None, "JSONL (or JSON list) of {prompt, choices, answer} records for "
                                          "multiple_choice / classification")


@dataclass
class MonitorConfig:
    """Where metrics go."""
    sinks: list[str] = _f(["console", "jsonl"], "metric sinks: console, jsonl, csv, tensorboard, wandb")
    wandb_project: str = _f("collie", "wandb project (runs offline unless WANDB_MODE says otherwise)")
    peak_tflops: Optional[float] = _f(None, "device peak TFLOP/s for MFU; null = look up the device", min=0.0)


@dataclass
class CheckpointConfig:
    """Saving and resuming."""
    every_steps: int = _f(0, "save every n steps; 0 = only at the end", min=0)
    keep_last: int = _f(2, "checkpoints to keep", min=1)
    resume: Optional[str] = _f(None, "checkpoint directory to resume from, or 'auto' for the latest in output_dir")
    save_final: bool = _f(True, "save a checkpoint when training ends")


SECTIONS = {
    "model": ModelConfig, "parallel": ParallelConfig, "optim": OptimConfig, "peft": PeftConfig,
    "data": DataConfig, "train": TrainConfig, "eval": EvalConfig, "monitor": MonitorConfig,
    "checkpoint": CheckpointConfig,
}


@dataclass
class CollieConfig:
    """A whole job. Build with ``CollieConfig.load(path, overrides)`` or ``CollieConfig.from_dict(data)``."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @classmethod
    def from_dict(cls, data: dict | None, overrides: list[str] | None = None) -> "CollieConfig":
        data = apply_overrides(copy.deepcopy(data or {}), overrides or [])
        cfg = from_dict(cls, data)
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: str, overrides: list[str] | None = None) -> "CollieConfig":
        return cls.from_dict(read_yaml(path), overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    def validate(self) -> None:
        """Checks across sections: what each field alone cannot tell."""
        for check in VALIDATORS:
            check(self)


def read_yaml(path: str, what: str = "config file", expected: str = f"sections ({', '.join(SECTIONS)})") -> dict:
    """The mapping in YAML file ``path`` ({} when empty); ConfigError naming the ``what`` and the file."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what} '{path}' does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} '{path}' is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                          f"{e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} '{path}' is not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ConfigError(f"{what} '{path}' is nested too deeply to be a configuration") from None
    except OSError as e:
        raise ConfigError(f"{what} '{path}' cannot be read: {e.strerror}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{what} '{path}' must hold a mapping of {expected}")
    return data or {}


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides; the value is parsed as YAML (``3``, ``1e-4``, ``[a, b]``, ``null``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' must look like section.key=value, e.g. train.max_steps=10")
        parts = key.strip().split(".")
        if parts[0] not in SECTIONS:
            raise ConfigError(f"override '{item}': unknown section '{parts[0]}'{suggest(parts[0], SECTIONS)}; "
                              f"sections: {', '.join(SECTIONS)}")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            node[parts[-1]] = raw
    return data


# --- checks across sections -------------------------------------------------------------------------------

def _check_model_arch(cfg: CollieConfig) -> None:
    from collie.models.args import ModelArgs
    if cfg.model.backend == "hf":
        _check_hf_backend(cfg)
        return
    fields = {f.name for f in dataclasses.fields(ModelArgs)}
    for key in cfg.model.arch:
        if key not in fields:
            raise ConfigError(f"unknown key 'model.arch.{key}'{suggest(key, fields)}; "
                              f"valid keys are the ModelArgs fields: {', '.join(sorted(fields))}")
    if cfg.model.pretrained is None:  # a card is cheap to read: check it and the arch overrides at load
        _check_card_and_arch(cfg.model)


def _check_hf_backend(cfg: CollieConfig) -> None:
    """``model.backend: hf`` trains a transformers model as its directory defines it, data parallel only."""
    from collie.layout_rules import check_hf_backend
    m = cfg.model
    if not m.pretrained:
        raise ConfigError("model.backend=hf trains the transformers model of a Hugging Face directory: set "
                          "model.pretrained to a local model directory (config.json + weights)")
    if m.arch:
        raise ConfigError(f"model.arch={m.arch} changes collie's architectures; with model.backend=hf the model is "
                          f"what {m.pretrained}/config.json says: edit that file instead and set model.arch={{}}")
    check_hf_backend(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.engine)
    unsupported = {"data.document_masking=true": cfg.data.document_masking,
                   "model.activation_checkpointing=attention": m.activation_checkpointing == "attention",
                   "train.loss_chunk_size": bool(cfg.train.loss_chunk_size)}
    for what, refused in unsupported.items():
        if refused:
            raise ConfigError(f"{what} needs collie's own model code and is not supported with model.backend=hf "
                              f"(a transformers model); turn it off or use model.backend=collie with a "
                              f"registered family")


def _check_card_and_arch(model) -> None:
    """The card exists and ``model.arch`` makes a valid architecture with it (what the Trainer will build)."""
    from collie.builders import build_model_args
    from collie.models.hf_io import check_model_sizes
    try:
        args = build_model_args(model)
    except ConfigError as e:
        if "model.arch" in str(e):
            raise
        raise ConfigError(f"model.card={model.card!r} (model.arch={model.arch}): {e}") from None
    check_model_sizes(args, "model.arch" if model.arch else f"model.card={model.card!r}:")


def _check_parallel(cfg: CollieConfig) -> None:
    from collie.layout_rules import check_config
    check_config(cfg)  # every layout / optimizer / batch rule, each in one place (collie/layout_rules.py)
    if cfg.parallel.ep > 1:
        from collie.layout_rules import check_expert_parallel
        p = cfg.parallel
        check_expert_parallel(p.ep, dp=p.dp, cp=p.cp, dp_replicate=p.dp_replicate, engine=p.engine,
                              peft=cfg.peft.method, backend=cfg.model.backend, cpu_offload=p.cpu_offload)


def _check_optim(cfg: CollieConfig) -> None:
    from collie.optim import validate_optimizer_config
    validate_optimizer_config(cfg)
    _check_optim_numbers(cfg.optim.args)
    if cfg.train.max_steps is not None and cfg.optim.warmup_steps > cfg.train.max_steps:  # a warning, not an error: short smoke runs of any config
        logger.warning("optim.warmup_steps=%d exceeds train.max_steps=%d: the learning rate rises for the whole run "
                       "and never reaches optim.lr=%g (fine for a smoke test; otherwise lower optim.warmup_steps)",
                       cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.lr)


def _check_optim_numbers(args: dict) -> None:
    """Numbers in ``optim.args`` are finite; ``betas`` lie in [0, 1) and ``eps`` is > 0 (every registered
    optimizer reads them so)."""
    def numbers(value, path):
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                yield from numbers(item, f"{path}[{i}]")
        elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                yield path, float(value)
            except (ValueError, OverflowError):
                pass  # not a number: the optimizer's own check names it
    for key, value in args.items():
        for path, number in numbers(value, f"optim.args.{key}"):
            if not math.isfinite(number):
                raise ConfigError(f"{path}={value!r} is not a finite number; give a finite value")
            if key == "betas" and not 0.0 <= number < 1.0:
                raise ConfigError(f"{path}={number} is out of range: betas must lie in [0, 1), e.g. [0.9, 0.95]")
            if key == "eps" and not number > 0.0:
                raise ConfigError(f"{path}={number} is out of range: must be > 0, e.g. 1e-8")


def _check_peft(cfg: CollieConfig) -> None:
    from collie.peft import validate_peft_config
    validate_peft_config(cfg)


def _check_data(cfg: CollieConfig) -> None:
    if not cfg.data.train_files:
        raise ConfigError("data.train_files is empty: name at least one training file")
    if cfg.data.skip_malformed and cfg.data.format == "instruction":
        raise ConfigError("data.skip_malformed=true skips malformed pretraining records only; instruction data "
                          "fail on the first malformed record (named with its file and line): fix or remove it "
                          "and set data.skip_malformed=false")
    if cfg.data.document_masking and cfg.data.format == "instruction" and not cfg.data.pack:
        raise ConfigError("data.document_masking=true separates packed documents; with data.format=instruction "
                          "set data.pack=true as well")
    from collie.evaluation.choice import CHOICE_METRICS
    from collie.evaluation.metrics import TEXT_METRICS  # generation metrics, extensible by register_text_metric
    known = {"perplexity", *TEXT_METRICS, *CHOICE_METRICS}
    for i, m in enumerate(cfg.eval.metrics):
        if m not in known:
            raise ConfigError(f"eval.metrics[{i}]='{m}' is unknown{suggest(m, known)}; choose from {sorted(known)}")
    chosen = [m for m in cfg.eval.metrics if m in CHOICE_METRICS]
    from collie.layout_rules import check_choice_metrics
    check_choice_metrics(chosen, cfg.parallel.pp)
    generated = [m for m in cfg.eval.metrics if m in TEXT_METRICS]
    if generated and cfg.data.format != "instruction":
        raise ConfigError(f"eval.metrics: {generated[0]} needs data.format=instruction (it compares responses)")
    if chosen and not cfg.eval.choice_file:
        raise ConfigError(f"eval.metrics: {chosen[0]} scores the records of eval.choice_file; set it to a JSONL "
                          f"file of {{prompt, choices, answer}} records")
    if len(chosen) > 1:
        raise ConfigError("eval.metrics: classification reports what multiple_choice does plus choice_f1_macro; "
                          "list only one of them")


def _check_monitor(cfg: CollieConfig) -> None:
    known = ["console", "jsonl", "csv", "tensorboard", "wandb"]
    for i, s in enumerate(cfg.monitor.sinks):
        if s not in known:
            raise ConfigError(f"monitor.sinks[{i}]='{s}' is unknown{suggest(s, known)}; choose from {known}")


def check_steps_or_epochs(max_steps: int | None, epochs: float | None) -> int | None:
    """``train.max_steps`` or ``train.epochs``, not both; neither: 100 steps. With epochs, max_steps stays null
    until the Trainer counts the training samples (``collie.builders.resolve_max_steps``)."""
    if epochs is not None and epochs <= 0:
        raise ConfigError(f"train.epochs={epochs:g} must be > 0")
    if max_steps is not None and epochs is not None:
        raise ConfigError(f"train.max_steps={max_steps} and train.epochs={epochs:g} are alternatives: set one of them "
                          f"(e.g. train.max_steps=null to train for epochs)")
    return 100 if max_steps is None and epochs is None else max_steps


def check_eval_split(eval_split: float | None, eval_files: list) -> None:
    if eval_split is None:
        return
    if eval_split <= 0 or (eval_split >= 1 and not float(eval_split).is_integer()):
        raise ConfigError(f"data.eval_split={eval_split:g}: give a fraction in (0, 1) or a whole number of samples >= 1")
    if eval_files:
        raise ConfigError("data.eval_split and data.eval_files both name evaluation data: keep one of them "
                          "(data.eval_files=[] to hold out part of the training data)")


def check_output_dir(cfg: CollieConfig) -> None:
    """What can be known about ``train.output_dir`` without writing to it: it (and its ``checkpoints/``) is a
    directory if it exists, and the nearest existing directory on its path can be written to."""
    output_dir = cfg.train.output_dir
    for path, key in ((output_dir, "train.output_dir"), (os.path.join(output_dir, "checkpoints"),
                                                           "train.output_dir/checkpoints")):
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"{key}={path} exists and is not a directory; choose another train.output_dir or "
                              f"move the file away")
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"train.output_dir={output_dir}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"train.output_dir={output_dir}: {existing} is not writable; choose a directory you "
                          f"can write to")


VALIDATORS: list[Any] = [_check_model_arch, _check_parallel, _check_optim, _check_peft, _check_data, _check_monitor]
