"""Pipeline parallelism: split the decoder layers into stages and run them with torch.distributed.pipelining.

A stage is the model itself with the layers it does not own deleted (``layers`` is a ModuleDict, so the kept
layers keep their names and checkpoints load by name); the first stage keeps ``embed_tokens``, the last keeps
``norm`` and ``lm_head``. Schedules: GPipe, 1F1B, and interleaved 1F1B with two stages per rank (rank r holds
stages r and r+pp).
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from collie.distributed.tensor_parallel import full_logits
from collie.errors import ConfigError
from collie.layout_rules import check_microbatches, check_pipeline_batch  # noqa: F401 (re-exported)
from collie.loss import IGNORE_INDEX

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}


# --- splitting ---------------------------------------------------------------------------------------------

def split_layers(num_layers: int, num_stages: int, mode: str = "uniform", boundaries=None,
                 layer_sizes=None) -> list[range]:
    """Layer index ranges of each stage: manual ``boundaries`` (first layer of stages 1..n-1), ``uniform``
    (equal counts, earlier stages take the remainder) or ``balanced`` (about equal parameter counts, counting
    the embedding on the first stage and norm + head on the last; needs ``layer_sizes`` = [embed, *layers,
    head])."""
    if boundaries is not None:
        edges = [0, *boundaries, num_layers]
    elif mode == "uniform":
        base, extra = divmod(num_layers, num_stages)
        counts = [base + (i < extra) for i in range(num_stages)]
        edges = [sum(counts[:i]) for i in range(num_stages + 1)]
    elif mode == "balanced":
        edges = _balanced_edges(layer_sizes, num_stages)
    else:
        raise ConfigError(f"parallel.pp_split={mode!r}; choose uniform or balanced")
    return [range(a, b) for a, b in zip(edges, edges[1:])]


def _balanced_edges(sizes: list[int], num_stages: int) -> list[int]:
    """Stage edges minimising the largest stage (a linear partition over [embed, layer0..n-1, head]),
    each stage getting at least one layer."""
    embed, layers, head = sizes[0], sizes[1:-1], sizes[-1]
    weights = list(layers)
    weights[0] += embed
    weights[-1] += head
    n = len(weights)
    best = {}  # (start, stages) -> (max load, edges)

    def solve(start: int, stages: int):
        if (start, stages) in best:
            return best[(start, stages)]
        if stages == 1:
            result = (sum(weights[start:]), [n])
        else:
            result, load = None, 0
            for end in range(start + 1, n - stages + 2):
                load += weights[end - 1]
                rest, edges = solve(end, stages - 1)
                candidate = (max(load, rest), [end, *edges])
                if result is None or candidate[0] < result[0]:
                    result = candidate
        best[(start, stages)] = result
        return result

    return [0, *solve(0, num_stages)[1]]


def stage_ids_for_rank(pp_rank: int, pp: int, schedule: str) -> list[int]:
    """Stages this pp rank holds: [rank], or [rank, rank + pp] for the interleaved schedule."""
    return [pp_rank, pp_rank + pp] if schedule == "interleaved_1f1b" else [pp_rank]


def build_stage_model(model, layer_ids, is_first: bool, is_last: bool):
    """A deep copy of (meta) ``model`` that keeps only ``layer_ids``, the embedding if first, norm and head if
    last. Parameter names are unchanged."""
    stage = copy.deepcopy(model)
    for index in list(stage.model.layers.keys()):
        if int(index) not in layer_ids:
            del stage.model.layers[index]
    if not is_first:
        stage.model.embed_tokens = None
    if not is_last:
        stage.model.norm = None
        stage.lm_head = None
    return stage


def layer_param_sizes(model) -> list[int]:
    """[embedding, each layer, norm + head] parameter counts, for the balanced split."""
    count = lambda module: sum(p.numel() for p in module.parameters()) if module is not None else 0
    head = count(model.model.norm) + (count(model.lm_head) if not model.args.tie_word_embeddings else 0)
    return [count(model.model.embed_tokens), *(count(layer) for layer in model.model.layers.values()), head]


def build_stage_models(model, parallel_cfg, pp_rank: int) -> tuple[list, list[int]]:
    """This rank's stage models and their stage ids."""
    pp, schedule = parallel_cfg.pp, parallel_cfg.pp_schedule
    ids = stage_ids_for_rank(pp_rank, pp, schedule)
    total = pp * len(ids)
    ranges = split_layers(len(model.model.layers), total, parallel_cfg.pp_split, parallel_cfg.pp_boundaries,
                          layer_param_sizes(model) if parallel_cfg.pp_split == "balanced" else None)
    stages = [build_stage_model(model, ranges[i], i == 0, i == total - 1) for i in ids]
    return stages, ids


# --- running -----------------------------------------------------------------------------------------------

class PipelineRunner:
    """Runs training and evaluation steps through the pipeline; every rank calls the same methods.

    The loss of micro-batch m on the last stage is ``loss_sum_fn(logits, targets) / denominator`` (``targets``:
    next-token targets, already shifted) with one
    step-level denominator (the global token count of the optimizer step), so gradients equal those of one
    process on the whole batch. Stages are built per input shape (pipelining fixes tensor shapes at first
    use): pad batches to a few lengths (``data.pad_to_multiple_of``) to keep that cache small.
    """

    def __init__(self, parts, stage_ids, ctx, loss_sum_fn, n_microbatches: int | None = None):
        self.parts, self.stage_ids, self.ctx, self.loss_sum_fn = parts, stage_ids, ctx, loss_sum_fn
        self.schedule_name = ctx.cfg.pp_schedule
        self.num_stages = ctx.pp * len(stage_ids)
        self.n_microbatches = n_microbatches or ctx.cfg.pp_microbatches or 2 * ctx.pp
        check_microbatches(self.n_microbatches, ctx.pp, self.schedule_name)
        self._schedules: dict = {}
        self._denominator = torch.ones((), device=ctx.device)

    def _loss_fn(self, output, targets):
        return self.loss_sum_fn(output, targets) / self._denominator

    def _schedule(self, shape, training: bool):
        key = (tuple(shape), training)
        if key not in self._schedules:
            stages = [PipelineStage(part, sid, self.num_stages, self.ctx.device, group=self.ctx.pp_group)
                      for part, sid in zip(self.parts, self.stage_ids)]
            cls = SCHEDULES[self.schedule_name]
            stage_arg = stages if self.schedule_name == "interleaved_1f1b" else stages[0]
            self._schedules[key] = cls(stage_arg, n_microbatches=self.n_microbatches, loss_fn=self._loss_fn,
                                       scale_grads=False)
        return self._schedules[key]

    def _run(self, training: bool, input_ids, targets, inputs: dict | None):
        batch, seq = input_ids.shape
        check_pipeline_batch(batch, self.n_microbatches, "train.micro_batch_size" if training else "eval.batch_size")
        kwargs = {key: value for key, value in (inputs or {}).items() if value is not None}  # split per micro-batch
        positions = kwargs.get("position_ids", torch.arange(seq, device=input_ids.device))
        kwargs["position_ids"] = positions.expand(batch, seq)
        args = (input_ids,) if self.ctx.is_first_stage else ()
        target = targets if self.ctx.is_last_stage else None
        schedule = self._schedule(input_ids.shape, training)
        losses: list = []
        if training:
            schedule.step(*args, target=target, losses=losses, return_outputs=False, **kwargs)
        else:
            schedule.eval(*args, target=target, losses=losses, **kwargs)
        total = torch.stack([l.detach().float() for l in losses]).sum() if losses \
            else torch.zeros((), device=self.ctx.device)
        dist.broadcast(total, group=self.ctx.pp_group, group_src=self.ctx.pp - 1)
        return total

    def step(self, input_ids, targets, inputs: dict | None = None, loss_denominator=None):
        """Forward and backward of one batch (this dp replica's share) through all micro-batches.

        ``inputs``: the model's keyword inputs (position_ids, attention_mask, document_ids), each (batch, …).

        ``loss_denominator``: the global token count of the optimizer step (sum over grad-accumulation batches
        and dp ranks); default: this batch's count summed over dp. Returns the normalised loss, the same on
        every rank of the pipeline (sum it over dp for the global value)."""
        if loss_denominator is None:
            loss_denominator = self.ctx.dp_sum((targets != IGNORE_INDEX).sum().to(self.ctx.device)).clamp(min=1)
        self._denominator = torch.as_tensor(loss_denominator, dtype=torch.float32, device=self.ctx.device)
        return self._run(True, input_ids, targets, inputs)

    @torch.no_grad()
    def eval_forward(self, input_ids, targets, inputs: dict | None = None) -> torch.Tensor:
        """Summed token loss of the batch (no backward), the same on every rank of the pipeline."""
        self._denominator = torch.ones((), device=self.ctx.device)
        return self._run(False, input_ids, targets, inputs)

    @torch.no_grad()
    def last_logits(self, input_ids, position_ids=None, attention_mask=None) -> torch.Tensor:
        """Logits of the last position, (batch, 1, vocab) fp32 on every rank of the pipeline: the whole batch
        goes through the stages in order (no micro-batches), each handing its hidden states to the next with
        send/recv; the last stage broadcasts only the last position. For generation, which calls it once per
        new token (with a KV cache-free recomputation), so every pipeline rank must call it with the same input."""
        batch, seq = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(seq, device=input_ids.device)[None]
        kwargs = {"position_ids": position_ids.expand(batch, seq), "attention_mask": attention_mask}
        sequence_share = self.ctx.tp if self.ctx.cfg.sequence_parallel else 1
        dtype = next(self.parts[0].parameters()).dtype
        hidden_shape = (batch, seq // sequence_share, self.parts[0].args.hidden_size)
        logits = torch.empty(batch, 1, self.parts[-1].args.vocab_size, device=self.ctx.device)
        owner = lambda stage: stage % self.ctx.pp  # noqa: E731 — rank r holds stages r (and r + pp)
        for stage in range(self.num_stages):
            if owner(stage) != self.ctx.pp_rank:
                continue
            part = self.parts[self.stage_ids.index(stage)]
            if stage == 0:
                inputs = input_ids
            else:
                inputs = torch.empty(hidden_shape, dtype=dtype, device=self.ctx.device)
                dist.recv(inputs, group=self.ctx.pp_group, group_src=owner(stage - 1))
            out = part(inputs, **kwargs)
            if stage < self.num_stages - 1:
                dist.send(out.to(dtype).contiguous(), group=self.ctx.pp_group, group_dst=owner(stage + 1))
            else:
                logits = full_logits(out)[:, -1:].float().contiguous()  # collectives need contiguous memory
        dist.broadcast(logits, group=self.ctx.pp_group, group_src=owner(self.num_stages - 1))
        return logits

