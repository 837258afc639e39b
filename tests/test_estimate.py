"""collie.estimate: exact arithmetic on known cases, the orderings every layout must respect, agreement with
what torch actually saves/allocates on CPU and sends over gloo, the H100 baselines, the planner and the CLI."""
import json
import os

import pytest
import torch

from collie.errors import ConfigError
from collie.estimate import Setup, estimate_communication, estimate_memory, plan, wire_bytes
from collie.estimate import activations as act
from collie.estimate.cli import estimate_main
from collie.estimate.memory import GIB
from collie.estimate.shapes import model_tensors, pipeline_stages, setup_inventory, stage_tensors
from collie.models import ModelArgs, build_model, load_card
from collie.loss import causal_lm_loss_sum

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# divisible by 2 and 4 everywhere, so that tp/ZeRO shards are exact
SMALL = ModelArgs(vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=512)


def gib(value_bytes: float) -> float:
    return value_bytes / GIB


# --- exact arithmetic --------------------------------------------------------------------------------------

@pytest.mark.parametrize("card", ["tiny", "llama-1b", "llama2-70b", "qwen2-7b", "internlm2-7b", "qwen3-0.6b",
                                  "phi3-mini"])
def test_inventory_is_num_params(card):
    args = load_card(card)
    assert sum(t.numel for t in model_tensors(args)) == args.num_params()
    tied = ModelArgs(**{**vars(SMALL), "tie_word_embeddings": True})
    assert sum(t.numel for t in model_tensors(tied)) == tied.num_params()


@pytest.mark.parametrize("dtype,size", [("float32", 4), ("bfloat16", 2)])
def test_weights_are_num_params_times_dtype(dtype, size):
    mem = estimate_memory(SMALL, Setup(param_dtype=dtype, micro_batch_size=1, seq_len=8))
    assert mem.breakdown["weights"] == pytest.approx(gib(SMALL.num_params() * size), rel=1e-12)


def test_weights_shard_over_tp_and_zero3():
    """tp splits every matrix and the embeddings (norms stay whole); ZeRO-3 then splits dim 0 over dp."""
    h, L = SMALL.hidden_size, SMALL.num_hidden_layers
    norms = (2 * L + 1) * h
    for tp in (2, 4):
        mem = estimate_memory(SMALL, Setup(tp=tp, micro_batch_size=1, seq_len=8))
        assert mem.breakdown["weights"] == pytest.approx(gib(4 * ((SMALL.num_params() - norms) / tp + norms)))
    zero3 = estimate_memory(SMALL, Setup(dp=4, zero_stage=3, micro_batch_size=1, seq_len=8))
    assert zero3.breakdown["weights"] == pytest.approx(gib(4 * SMALL.num_params() / 4))


@pytest.mark.parametrize("optimizer,per_param", [("adamw", 2), ("lion", 1), ("adan", 4), ("sophia", 2), ("lomo", 0)])
def test_optimizer_state_is_states_times_params(optimizer, per_param):
    """collie's optimizers keep their moments in the parameter dtype (zeros_like)."""
    mem = estimate_memory(SMALL, Setup(param_dtype="bfloat16", optimizer=optimizer, micro_batch_size=1, seq_len=8))
    assert mem.breakdown.get("optimizer_state", 0.0) == pytest.approx(gib(2 * per_param * SMALL.num_params()),
                                                                      abs=1e-12)


def test_adalomo_state_is_factored_and_master_weights_add_fp32():
    ada = estimate_memory(SMALL, Setup(optimizer="adalomo", micro_batch_size=1, seq_len=8))
    expected = sum(4 * (sum(t.shape) if len(t.shape) == 2 else t.numel) for t in model_tensors(SMALL))
    assert ada.breakdown["optimizer_state"] == pytest.approx(gib(expected))
    deepspeed = estimate_memory(SMALL, Setup(param_dtype="bfloat16", master_weights=True, micro_batch_size=1,
                                             seq_len=8))
    assert deepspeed.breakdown["optimizer_state"] == pytest.approx(gib(8 * SMALL.num_params()))
    assert deepspeed.breakdown["master_weights"] == pytest.approx(gib(4 * SMALL.num_params()))


def test_lora_keeps_state_and_gradients_for_adapters_only():
    setup = Setup(peft="lora", lora_r=4, lora_targets=("q_proj", "v_proj"), micro_batch_size=1, seq_len=8)
    h, q, kv = SMALL.hidden_size, SMALL.num_attention_heads * SMALL.head_dim_, SMALL.n_kv_heads * SMALL.head_dim_
    adapters = SMALL.num_hidden_layers * 4 * ((h + q) + (h + kv))
    mem = estimate_memory(SMALL, setup)
    assert mem.breakdown["optimizer_state"] == pytest.approx(gib(2 * 4 * adapters))
    assert mem.breakdown["weights"] == pytest.approx(gib(4 * (SMALL.num_params() + adapters)))
    full = estimate_memory(SMALL, setup.replace(peft="none"))
    assert mem.peak_gib < full.peak_gib


def test_pipeline_stages_split_layers_and_hold_in_flight_microbatches():
    stages = pipeline_stages(SMALL, 2)
    assert [s.layer_ids for s in stages] == [(0, 1), (2, 3)]
    assert [(s.has_embedding, s.has_head) for s in stages] == [(True, False), (False, True)]
    assert [s.layer_ids for s in pipeline_stages(SMALL, 2, stages_per_rank=2)] == [(0, 2), (1, 3)]
    base = Setup(pp=2, pp_microbatches=4, micro_batch_size=4, seq_len=256)
    one_f_one_b, gpipe = (estimate_memory(SMALL, base.replace(pp_schedule=s)) for s in ("1f1b", "gpipe"))
    assert len(gpipe.per_rank_gib) == 2
    # rank 0 holds min(n, pp) = 2 micro-batches under 1F1B, all 4 under GPipe
    assert gpipe.per_rank_gib[0] > one_f_one_b.per_rank_gib[0]


# --- orderings ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["adamw", "lion", "adan"])
@pytest.mark.parametrize("seq_len", [128, 4096])
def test_zero_stages_shrink_memory(optimizer, seq_len):
    """ZeRO-3 ≤ ZeRO-2 ≤ ZeRO-1 ≤ ZeRO-0, for the model state at the optimizer step and for the peak (FSDP2's
    replicate keeps an unsharded copy of the parameters at ZeRO-0/1 as ZeRO-2 does: the order holds)."""
    args = load_card("llama2-7b")
    base = Setup(dp=8, param_dtype="bfloat16", optimizer=optimizer, micro_batch_size=1, seq_len=seq_len)
    runs = [estimate_memory(args, base.replace(zero_stage=z)) for z in range(4)]
    states = [r.phases["optimizer_step"] for r in runs]
    assert states[3] <= states[2] <= states[1] <= states[0]
    peaks = [r.peak_gib for r in runs]
    assert peaks[3] <= peaks[2] <= peaks[1] <= peaks[0]


def test_checkpointing_and_fused_optimizers_save_memory():
    args = load_card("llama2-7b")
    base = Setup(param_dtype="bfloat16", micro_batch_size=4, seq_len=2048)
    none, selective, full, attention = (estimate_memory(args, base.replace(activation_checkpointing=c))
                                        for c in ("none", "selective", "full", "attention"))
    assert attention.phases["forward_end"] < none.phases["forward_end"]
    assert full.phases["forward_end"] < selective.phases["forward_end"] < none.phases["forward_end"]
    assert full.peak_gib < selective.peak_gib < none.peak_gib
    adamw, lomo, adalomo = (estimate_memory(args, base.replace(optimizer=o)) for o in ("adamw", "lomo", "adalomo"))
    assert lomo.peak_gib <= adalomo.peak_gib < adamw.peak_gib
    assert "gradients" not in lomo.breakdown  # no gradient set: only the parameter being updated


def test_tp_and_sequence_parallel_shrink_activations():
    args = load_card("llama2-7b")
    base = Setup(param_dtype="bfloat16", micro_batch_size=1, seq_len=4096)
    tp1, tp4 = (estimate_memory(args, base.replace(tp=t)).phases["forward_end"] for t in (1, 4))
    sp = estimate_memory(args, base.replace(tp=4, sequence_parallel=True)).phases["forward_end"]
    assert sp < tp4 < tp1


# --- mixture of experts and expert parallelism ---------------------------------------------------------------

TINY_MOE = dict(vocab_size=512, hidden_size=128, intermediate_size=192, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=4, max_position_embeddings=512, architecture="mixtral", num_experts=4,
                num_experts_per_tok=2)


def routed_expert_numel(args: ModelArgs) -> int:
    return args.num_hidden_layers * args.num_experts * 3 * args.hidden_size * args.moe_intermediate_size_


QWEN2_MOE = dict(TINY_MOE, architecture="qwen2_moe", shared_expert_intermediate_size=256, moe_intermediate_size=96,
                 norm_topk_prob=False)
MOE_LORA_CASES = [(("q_proj", "v_proj"), False), (("q_proj", "gate_proj", "down_proj"), False),
                  (("q_proj", "gate_proj", "down_proj"), True), (("up_proj",), True)]


@pytest.mark.parametrize("targets,experts", MOE_LORA_CASES)
def test_moe_lora_adapters_are_collies(targets, experts):
    """LoRA on a MoE model as collie.peft.apply_lora adds it: targets match the last name component, so the
    shared expert's MLP is adapted by default and the routed experts only with peft.lora_experts."""
    from collie.peft import apply_lora, count_parameters
    args = ModelArgs(**QWEN2_MOE)
    model = build_model(args, device="meta")
    apply_lora(model, r=4, target_modules=targets, experts=experts)
    setup = Setup(peft="lora", lora_r=4, lora_targets=targets, lora_experts=experts)
    tensors = stage_tensors(args, pipeline_stages(args, 1)[0], *setup_inventory(setup))
    assert sum(t.numel for t in tensors if t.trainable) == count_parameters(model)[0]
    assert sum(t.numel for t in tensors) == count_parameters(model)[1]
    states = 8 * count_parameters(model)[0]  # AdamW, fp32
    assert estimate_memory(args, setup.replace(micro_batch_size=1, seq_len=8)).breakdown["optimizer_state"] == \
        pytest.approx(gib(states))


def test_moe_lora_rules_are_collies():
    with pytest.raises(ConfigError, match="set peft.method=lora"):
        Setup(lora_experts=True)
    with pytest.raises(ConfigError, match="names none of the routed experts' linears"):
        estimate_memory(ModelArgs(**TINY_MOE), Setup(peft="lora", lora_experts=True))
    with pytest.raises(ConfigError, match="has none"):
        estimate_memory(SMALL, Setup(peft="lora", lora_targets=("gate_proj",), lora_experts=True))
    # a Mixtral's only MLPs are routed experts
    with pytest.raises(ConfigError, match=r"\['gate_proj'\] matches no linear of this model \(the routed"):
        estimate_memory(ModelArgs(**TINY_MOE), Setup(peft="lora", lora_targets=("q_proj", "gate_proj")))


@pytest.mark.parametrize("card", ["mixtral-8x7b", "qwen3-30b-a3b", "qwen1.5-moe-a2.7b", "tiny-moe"])
def test_moe_inventory_counts_every_expert_and_the_active_ones(card):
    from collie.estimate.shapes import active_params
    args = load_card(card)
    assert sum(t.numel for t in model_tensors(args)) == args.num_params()
    idle = routed_expert_numel(args) * (args.num_experts - args.num_experts_per_tok) // args.num_experts
    assert active_params(args) == args.num_params() - idle < args.num_params()


@pytest.mark.parametrize("zero", [0, 1, 3])
def test_ep_splits_the_routed_experts_and_zero_shards_them_over_their_replicas(zero):
    """ep=2 of dp=4: a rank holds half the experts (weights, gradients, optimizer state); ZeRO shards the rest of
    the model over all 4 dp ranks but an expert only over the dp/ep=2 ranks holding it."""
    args = ModelArgs(**TINY_MOE)
    routed, rest = routed_expert_numel(args), args.num_params() - routed_expert_numel(args)
    base = Setup(dp=4, zero_stage=zero, micro_batch_size=1, seq_len=8)
    one, two = (estimate_memory(args, base.replace(ep=ep)).breakdown for ep in (1, 2))
    weight_shards, state_shards = (4 if zero >= 3 else 1), (4 if zero >= 1 else 1)
    assert one["weights"] == pytest.approx(gib(4 * args.num_params() / weight_shards))
    assert two["weights"] == pytest.approx(gib(4 * (rest / weight_shards + routed / 2 / (weight_shards // 2 or 1))))
    states = 8 * (rest / state_shards + routed / 2 / (state_shards // 2 or 1))
    assert two["optimizer_state"] == pytest.approx(gib(states))
    assert two["weights"] < one["weights"] if zero < 3 else two["weights"] == pytest.approx(one["weights"])


def test_ep_moves_routed_tokens_by_all_to_all_and_expert_gradients_over_their_replicas():
    args = ModelArgs(**TINY_MOE)
    setup = Setup(dp=4, ep=2, micro_batch_size=2, seq_len=64)
    comm = estimate_communication(args, setup)
    rows = 2 * 64 * args.num_experts_per_tok * args.hidden_size * 4  # k rows per token, fp32
    assert comm.payload[("ep", "all_to_all")] == 4 * rows * args.num_hidden_layers  # dispatch, combine, and back
    experts = 4 * routed_expert_numel(args) / 2
    assert comm.payload[("ep_replicate", "all_reduce")] == experts
    assert comm.payload[("dp", "all_reduce")] == 4 * args.num_params() - 2 * experts
    assert ("ep", "all_to_all") not in estimate_communication(args, setup.replace(ep=1)).payload


def test_ep_rules_are_collies():
    args = ModelArgs(**TINY_MOE)
    with pytest.raises(ConfigError, match="parallel.ep=3 does not divide parallel.dp=4"):
        Setup(dp=4, ep=3)
    with pytest.raises(ConfigError, match="num_experts"):
        estimate_memory(args, Setup(dp=8, ep=8))
    with pytest.raises(ConfigError, match="has none"):
        estimate_memory(SMALL, Setup(dp=2, ep=2))


# --- context parallelism -------------------------------------------------------------------------------------

def test_cp_splits_activations_and_keeps_gathered_kv_and_the_mask():
    """Per-rank activations at seq 8192 of the 5M model of benchmarks/context_parallel_memory.py fall with cp but
    stay above 1/cp: each layer keeps the whole sequence's k/v, and the forward the (s/cp × s) mask."""
    args = ModelArgs(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=8192)
    base = Setup(seq_len=8192, micro_batch_size=1)
    one, two, four = (estimate_memory(args, base.replace(cp=cp)).phases["forward_end"] for cp in (1, 2, 4))
    assert one / 2 < two < one and one / 4 < four < two
    saved = {cp: act.layer_bytes(args, base.replace(cp=cp, expand_kv_heads=False)) for cp in (1, 2)}
    assert saved[2]["attn_k"] == 2 * saved[1]["attn_k"] and saved[2]["attn_q"] == saved[1]["attn_q"]
    # on CUDA the masked SDPA gets k/v repeated to every query head (8 of 4 here)
    assert act.layer_bytes(args, base.replace(cp=2))["attn_k"] == 2 * saved[2]["attn_k"]
    assert act.cp_mask_bytes(args, base.replace(cp=2)) == 4096 * 8192 * 4
    assert estimate_memory(args, base.replace(cp=2, dp=2, zero_stage=3)).breakdown["weights"] == \
        pytest.approx(gib(4 * args.num_params() / 4), rel=0.01)  # ZeRO shards over dp × cp


def test_cp_all_gathers_kv_forward_and_reduce_scatters_backward():
    setup = Setup(cp=4, micro_batch_size=2, seq_len=1024)
    comm = estimate_communication(SMALL, setup)
    kv = 2 * 1024 * SMALL.n_kv_heads * SMALL.head_dim_ * 4 * SMALL.num_hidden_layers  # b·s·kv width, fp32, per layer
    assert comm.payload[("cp", "all_gather")] == comm.payload[("cp", "reduce_scatter")] == 2 * kv
    assert comm.payload[("dp", "all_reduce")] == 4 * SMALL.num_params()  # gradients summed over dp × cp


@pytest.mark.parametrize("cp,tp,sequence_parallel", [(2, 1, False), (2, 4, True), (4, 2, True), (4, 2, False)])
def test_cp_pads_the_sequence_as_context_parallel_shards_it(cp, tp, sequence_parallel):
    """A rank's tokens are those ``ContextParallel.shard`` gives it: the sequence padded to a multiple of 2·cp,
    times tp under sequence parallelism (which splits the rank's share again over tp)."""
    from types import SimpleNamespace

    from collie.distributed.context_parallel import ContextParallel
    mesh = SimpleNamespace(size=lambda: cp, get_local_rank=lambda: 0)
    plan = ContextParallel(mesh, tp if sequence_parallel else 1)
    ids = torch.ones(1, 100, dtype=torch.long)
    shard = plan.shard({"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)})
    setup = Setup(cp=cp, tp=tp, sequence_parallel=sequence_parallel, seq_len=100)
    assert setup.local_seq_len == shard.input_ids.shape[1]
    assert setup.padded_seq_len == shard.input_ids.shape[1] * cp

# --- agreement with torch on CPU -----------------------------------------------------------------------------

def saved_tensor_bytes(model, ids, autocast: bool) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in a forward (autocast copies included)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(ids)
    return sum(seen.values())


ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("dtype,precision,lora", [("bfloat16", "fp32", None), ("float32", "fp32", None),
                                                  ("float32", "bf16", None), ("bfloat16", "fp32", ("q_proj", "v_proj")),
                                                  ("float32", "bf16", ("q_proj", "v_proj")),
                                                  ("bfloat16", "fp32", ALL_LINEARS)])
def test_saved_activations_match_autograd_exactly(dtype, precision, lora):
    """Every tensor collie's decoder saves for backward, counted by autograd's own hooks, to the byte: full
    fine-tuning and LoRA (frozen linears keep no input; nothing before the first adapter needs a gradient)."""
    from collie.peft import apply_lora
    batch, seq = 2, 24
    model = build_model(SMALL, device="cpu", seed=0).to(getattr(torch, dtype))
    fields = dict(param_dtype=dtype, precision=precision, micro_batch_size=batch, seq_len=seq)
    if lora:
        apply_lora(model, r=4, target_modules=lora)
        fields.update(peft="lora", lora_r=4, lora_targets=lora)
    ids = torch.randint(0, SMALL.vocab_size, (batch, seq))
    setup = Setup(**fields)
    mem = estimate_memory(SMALL, setup)
    expected = mem.phases["forward_end"] - mem.breakdown["weights"] - mem.breakdown["optimizer_state"]
    expected -= gib(act.logits_bytes(SMALL, setup) * batch * seq)  # the output, not saved by anything
    assert gib(saved_tensor_bytes(model, ids, precision == "bf16")) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("arch,lora", [("mixtral", None), ("qwen2_moe", None), ("qwen2_moe", MOE_LORA_CASES[1]),
                                       ("mixtral", MOE_LORA_CASES[2]), ("qwen2_moe", MOE_LORA_CASES[2])])
@pytest.mark.parametrize("dtype,precision", [("bfloat16", "fp32"), ("float32", "bf16")])
def test_saved_moe_activations_match_autograd_exactly(arch, dtype, precision, lora):
    """The routed experts (k rows per token whatever the routing), the router and Qwen2-MoE's shared expert;
    with LoRA, adapters on the shared expert and (peft.lora_experts) on every routed one."""
    from collie.peft import apply_lora
    args = ModelArgs(**(QWEN2_MOE if arch == "qwen2_moe" else TINY_MOE))
    batch, seq = 2, 24
    model = build_model(args, device="cpu", seed=0).to(getattr(torch, dtype))
    setup = Setup(param_dtype=dtype, precision=precision, micro_batch_size=batch, seq_len=seq)
    if lora:
        apply_lora(model, r=4, target_modules=lora[0], experts=lora[1])
        setup = setup.replace(peft="lora", lora_r=4, lora_targets=lora[0], lora_experts=lora[1])
    mem = estimate_memory(args, setup)
    expected = mem.phases["forward_end"] - mem.breakdown["weights"] - mem.breakdown["optimizer_state"]
    expected -= gib(act.logits_bytes(args, setup) * batch * seq)
    ids = torch.randint(0, args.vocab_size, (batch, seq))
    assert gib(saved_tensor_bytes(model, ids, precision == "bf16")) == pytest.approx(expected, rel=1e-9)


def cpu_peak_bytes(args: ModelArgs, setup: Setup) -> int:
    """Peak bytes allocated during a training step (after a warm-up step) plus the resident weights and
    optimizer state, from the profiler's allocation events: the CPU stand-in for max_memory_allocated."""
    from torch.profiler import ProfilerActivity, profile

    from collie.distributed.activation_checkpointing import apply_activation_checkpointing
    from collie.optim.registry import get_optimizer_factory
    model = build_model(args, device="cpu", seed=0).to(getattr(torch, setup.param_dtype))
    apply_activation_checkpointing(model, setup.activation_checkpointing, setup.checkpoint_every)
    if setup.optimizer == "adamw":  # the CUDA default is the fused kernel: no temporaries
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    else:
        clip = {"clip_grad_norm": setup.clip_grad_norm} if setup.fused else {}
        optimizer = get_optimizer_factory(setup.optimizer)(list(model.parameters()), lr=1e-3, **clip)
    ids = torch.randint(0, args.vocab_size, (setup.micro_batch_size, setup.seq_len))

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setup.precision == "bf16"):
            return model(ids)

    def step():  # as collie's Trainer: the logits go straight into the loss
        loss = causal_lm_loss_sum(forward(), ids)
        optimizer.backward(loss) if getattr(optimizer, "fused_backward", False) else loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    resident = [p for p in model.parameters()] + [t for s in optimizer.state.values() for t in s.values()
                                                  if torch.is_tensor(t) and t.dim() > 0]
    return peak + sum(t.numel() * t.element_size() for t in resident)


# (setup fields, tolerance): loss-phase peaks are exact up to a few scalars; later phases within 5%.
CPU_PEAK_CASES = {
    "bf16_adamw_loss": (dict(param_dtype="bfloat16", micro_batch_size=2, seq_len=128), 0.002),
    "autocast_adamw_loss": (dict(precision="bf16", micro_batch_size=2, seq_len=128), 0.002),
    "bf16_adan_loss": (dict(param_dtype="bfloat16", optimizer="adan", micro_batch_size=2, seq_len=128), 0.002),
    "bf16_adamw_full_ckpt": (dict(param_dtype="bfloat16", activation_checkpointing="full", micro_batch_size=2,
                                  seq_len=128), 0.002),
    "fp32_lion_step": (dict(optimizer="lion", micro_batch_size=1, seq_len=8), 0.05),
    "fp32_lomo_backward": (dict(optimizer="lomo", micro_batch_size=1, seq_len=8), 0.05),
    "autocast_selective_backward": (dict(precision="bf16", activation_checkpointing="selective",
                                         micro_batch_size=2, seq_len=128), 0.05),
    "autocast_attention_ckpt_backward": (dict(precision="bf16", activation_checkpointing="attention",
                                              micro_batch_size=2, seq_len=128), 0.05),
    # LOMO's norm pass (retain_graph) keeps every activation through a first backward: conservative, +2.5%
    "fp32_lomo_norm_pass": (dict(optimizer="lomo", clip_grad_norm=1.0, micro_batch_size=2, seq_len=64), 0.05),
}


@pytest.mark.parametrize("name", list(CPU_PEAK_CASES))
def test_peak_matches_cpu_allocation_trace(name):
    fields, tolerance = CPU_PEAK_CASES[name]
    wide_vocab = fields["seq_len"] > 8 and "clip_grad_norm" not in fields  # the peak is then at the loss
    args = ModelArgs(vocab_size=1024 if wide_vocab else 64, hidden_size=128 if wide_vocab else 256,
                     intermediate_size=352 if wide_vocab else 704, num_hidden_layers=2, num_attention_heads=8,
                     num_key_value_heads=2, max_position_embeddings=512)
    setup = Setup(**fields)
    torch.manual_seed(0)
    measured = cpu_peak_bytes(args, setup)
    assert estimate_memory(args, setup).peak_gib * GIB == pytest.approx(measured, rel=tolerance)


# --- measured H100 baselines (shared/bench/README.md: HF LlamaForCausalLM, batch 4, seq 2048) --------------

HF_BASELINES = [  # (card, setup fields, measured peak GiB)
    ("llama-1b", dict(param_dtype="float32", precision="bf16", optimizer="adamw"), 35.4),
    ("llama-1b", dict(param_dtype="bfloat16", optimizer="adamw"), 23.9),
    ("llama-1b", dict(param_dtype="bfloat16", optimizer="lomo"), 19.8),
    ("llama2-7b", dict(param_dtype="bfloat16", optimizer="lomo", activation_checkpointing="full"), 17.8),
]


@pytest.mark.parametrize("card,fields,measured", HF_BASELINES)
def test_hf_baselines_within_two_percent(card, fields, measured):
    """HF's model runs k/v unexpanded (SDPA enable_gqa) and drops the logits before backward."""
    setup = Setup(micro_batch_size=4, seq_len=2048, expand_kv_heads=False, hold_logits=False, **fields)
    assert estimate_memory(load_card(card), setup).peak_gib == pytest.approx(measured, rel=0.02)


# --- communication -----------------------------------------------------------------------------------------

def test_ring_wire_bytes():
    assert wire_bytes("all_reduce", 800, 8) == 2 * 7 / 8 * 800
    assert wire_bytes("all_gather", 800, 8) == wire_bytes("reduce_scatter", 800, 8) == 700
    assert wire_bytes("send", 100, 2) == 100 and wire_bytes("recv", 100, 2) == 0
    assert wire_bytes("all_reduce", 800, 1) == 0


def test_zero3_sends_more_than_ddp_and_tp_scales_with_tokens():
    args = load_card("llama2-7b")
    base = Setup(dp=8, param_dtype="bfloat16", micro_batch_size=1, seq_len=2048)
    ddp, zero3 = (sum(estimate_communication(args, base.replace(zero_stage=z)).wire.values()) for z in (0, 3))
    assert zero3 == pytest.approx(1.5 * ddp, rel=0.01)  # 2 all-gathers + 1 reduce-scatter vs 1 all-reduce
    tp = [estimate_communication(args, base.replace(dp=1, tp=2, seq_len=s)).wire["tp"] for s in (1024, 2048)]
    assert tp[1] == pytest.approx(2 * tp[0])


@pytest.mark.parametrize("zero", [2, 3])
def test_hsdp_shards_over_one_replica_and_all_reduces_the_shard_across_replicas(zero):
    """dp=8 as 2 replicas × 4 shards: each rank holds what a dp=4 rank of ZeRO-2/3 holds (weights, gradients and
    optimizer state over the 4 ranks of its replica); it all-gathers and reduce-scatters within the replica as a
    dp=4 job does, and all-reduces its gradient shard (1/4 of the gradients) with the other replica."""
    base = Setup(dp=8, zero_stage=zero, micro_batch_size=1, seq_len=8)
    hsdp, per_replica = base.replace(dp_replicate=2), base.replace(dp=4)
    mem, ref = estimate_memory(SMALL, hsdp), estimate_memory(SMALL, per_replica)
    assert mem.breakdown == pytest.approx(ref.breakdown) and mem.peak_gib == pytest.approx(ref.peak_gib)
    assert mem.breakdown["optimizer_state"] == pytest.approx(gib(2 * 4 * SMALL.num_params() / 4))
    assert estimate_memory(SMALL, base).breakdown["optimizer_state"] < mem.breakdown["optimizer_state"]
    comm, ref_comm = estimate_communication(SMALL, hsdp), estimate_communication(SMALL, per_replica)
    assert {k: v for k, v in comm.payload.items() if k[0] == "dp"} == ref_comm.payload
    assert comm.payload[("dp_replicate", "all_reduce")] == pytest.approx(4 * SMALL.num_params() / 4)
    assert comm.wire["dp_replicate"] == wire_bytes("all_reduce", 4 * SMALL.num_params() / 4, 2)
    with pytest.raises(Exception, match="parallel.zero_stage 2 or 3"):
        base.replace(dp_replicate=2, zero_stage=1)
    with pytest.raises(Exception, match="parallel.dp_replicate=3 does not divide parallel.dp=8"):
        base.replace(dp_replicate=3)


WORKER = os.path.join(ROOT, "tests", "estimate_worker.py")
COMM_BATCH, COMM_SEQ = 4, 16
COMM_ARGS = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
# scenario -> Setup fields of the matching estimate
COMM_SCENARIOS = {
    "manual_allreduce": dict(dp=2),
    "torch_ddp": dict(dp=2),
    "lomo_dp2_clip": dict(dp=2, optimizer="lomo", clip_grad_norm=1.0),
    "collie_dp2": dict(dp=2),
    "collie_dp2_ga2": dict(dp=2, grad_accum_steps=2, micro_batch_size=2),
    "collie_zero1": dict(dp=2, zero_stage=1),
    "collie_zero2": dict(dp=2, zero_stage=2),
    "collie_zero2_ga2": dict(dp=2, zero_stage=2, grad_accum_steps=2, micro_batch_size=2),
    "collie_zero3": dict(dp=2, zero_stage=3),
    "collie_tp2": dict(tp=2),
    "collie_tp2_sp": dict(tp=2, sequence_parallel=True),
    "collie_tp2_sp_autocast": dict(tp=2, sequence_parallel=True, precision="bf16"),
    "collie_pp2_1f1b": dict(pp=2, pp_microbatches=2),
    "collie_pp2_gpipe": dict(pp=2, pp_schedule="gpipe", pp_microbatches=4),
    "collie_pp2_interleaved": dict(pp=2, pp_schedule="interleaved_1f1b", pp_microbatches=4),
    "collie_cp2": dict(cp=2),
    "collie_cp2_zero2": dict(cp=2, zero_stage=2),
    "collie_ep2": dict(dp=2, ep=2),
    "collie_ep2_zero3": dict(dp=2, ep=2, zero_stage=3),
    "collie_tp2_moe": dict(tp=2),
    "collie_tp2_sp_moe_autocast": dict(tp=2, sequence_parallel=True, precision="bf16"),
}

# 4 ranks: HSDP (2 replicas × 2 shards), dp2 × cp2, dp4 with two replicas of each expert; checked like the above
HSDP_COMM_SCENARIOS = {
    "collie_hsdp_zero2": dict(dp=4, dp_replicate=2, zero_stage=2),
    "collie_hsdp_zero3": dict(dp=4, dp_replicate=2, zero_stage=3),
    "collie_dp2_cp2_zero3": dict(dp=2, cp=2, zero_stage=3),
    "collie_dp4_ep2_zero1": dict(dp=4, ep=2, zero_stage=1),
}
COMM_MOE_ARGS = dict(COMM_ARGS, architecture="mixtral", num_experts=4, num_experts_per_tok=2)


MEMORY_ARGS = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, max_position_embeddings=512)
# scenario -> Setup fields; peaks measured per rank with the profiler (tests/estimate_worker.py)
MEMORY_SCENARIOS = {
    "memory_dp2": dict(dp=2), "memory_zero2": dict(dp=2, zero_stage=2), "memory_zero3": dict(dp=2, zero_stage=3),
    "memory_tp2": dict(tp=2), "memory_tp2_sp": dict(tp=2, sequence_parallel=True),
    "memory_pp2_1f1b": dict(pp=2, pp_microbatches=2),
    "memory_pp2_gpipe": dict(pp=2, pp_schedule="gpipe", pp_microbatches=4),
}
HSDP_MEMORY_SCENARIOS = {"memory_hsdp_zero3": dict(dp=4, dp_replicate=2, zero_stage=3)}


@pytest.fixture(scope="module")
def counted_ranks(tmp_path_factory):
    from collie.distributed.launch import run_distributed
    names = ["dtensor_mlp", *COMM_SCENARIOS, *MEMORY_SCENARIOS]
    return run_distributed(WORKER, 2, names, timeout_s=240, result_dir=str(tmp_path_factory.mktemp("comm")))


@pytest.fixture(scope="module")
def hsdp_ranks(tmp_path_factory):
    from collie.distributed.launch import run_distributed
    names = [*HSDP_COMM_SCENARIOS, *HSDP_MEMORY_SCENARIOS]
    return run_distributed(WORKER, 4, names, timeout_s=240, result_dir=str(tmp_path_factory.mktemp("hsdp")))


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(COMM_SCENARIOS) + list(HSDP_COMM_SCENARIOS))
def test_predicted_bytes_equal_counted_bytes(name, request):
    """Payload of every collective (tensors over 16 elements; the rest is control traffic: loss and norm
    scalars, DDP's 8-float buffer broadcast), by mesh dimension and kind, on every rank, exactly. Under HSDP
    "dp" is the shard group (all-gathers, reduce-scatters) and "dp_replicate" the gradient shards' all-reduce."""
    scenarios = {**COMM_SCENARIOS, **HSDP_COMM_SCENARIOS}
    ranks = request.getfixturevalue("hsdp_ranks" if name in HSDP_COMM_SCENARIOS else "counted_ranks")
    fields = {"micro_batch_size": COMM_BATCH, "seq_len": COMM_SEQ, **scenarios[name]}
    setup = Setup(**fields)
    args = ModelArgs(**(COMM_MOE_ARGS if setup.ep > 1 or "moe" in name else COMM_ARGS))
    routed, predicted_routed = 0, 0
    for rank, results in enumerate(ranks):
        result = results[name]
        assert "error" not in result, f"rank {rank}: {result['error']}"
        estimate = estimate_communication(args, setup, pp_rank=result.get("pp_rank", 0))
        predicted = {}
        for (dim, kind), v in estimate.payload.items():
            # cp without dp: the gradient group (dp × cp) is the cp group, and the counter names it "dp"; so is
            # the ep group when it spans dp
            dim = "dp" if (dim == "cp" and setup.dp == 1) or (dim == "ep" and setup.ep == setup.dp) else dim
            predicted[f"{dim}/{kind}"] = predicted.get(f"{dim}/{kind}", 0) + int(v)
        # a rank's all-to-all rows depend on its routing; over the ep group they are k rows per token, exactly
        routed += sum(result["payload"].pop(key) for key in list(result["payload"]) if key.endswith("all_to_all"))
        predicted_routed += sum(predicted.pop(key) for key in list(predicted) if key.endswith("all_to_all"))
        assert result["payload"] == predicted, f"rank {rank}"
    assert routed == predicted_routed and (routed > 0) == (setup.ep > 1)


@pytest.mark.distributed
def test_dtensor_mlp_sends_one_forward_and_two_backward_all_reduces(counted_ranks):
    """The per-layer tp rule in miniature: row-parallel down_proj all-reduces its output, and each
    column-parallel linear (gate, up) all-reduces its input gradient."""
    activation = COMM_BATCH * COMM_SEQ * COMM_ARGS["hidden_size"] * 4
    for results in counted_ranks:
        assert results["dtensor_mlp"]["payload"] == {"tp/all_reduce": 3 * activation}


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(MEMORY_SCENARIOS) + list(HSDP_MEMORY_SCENARIOS))
def test_distributed_peak_matches_cpu_allocation_trace(name, request):
    """Per-rank peak of collie's layouts (FSDP2 replicate/ZeRO, HSDP, DTensor tp/sp, pipeline schedules) within
    6% (allocation order varies a little between runs with gloo's threads)."""
    hsdp = name in HSDP_MEMORY_SCENARIOS
    ranks = request.getfixturevalue("hsdp_ranks" if hsdp else "counted_ranks")
    setup = Setup(micro_batch_size=4, seq_len=64, **{**MEMORY_SCENARIOS, **HSDP_MEMORY_SCENARIOS}[name])
    for rank, results in enumerate(ranks):
        result = results[name]
        assert "error" not in result, f"rank {rank}: {result['error']}"
        estimate = estimate_memory(ModelArgs(**MEMORY_ARGS), setup, pp_rank=result["pp_rank"])
        assert estimate.peak_gib * GIB == pytest.approx(result["peak_bytes"], rel=0.06), f"rank {rank}"


# --- planner and command line ------------------------------------------------------------------------------

def test_plan_returns_only_fitting_layouts_of_all_gpus():
    args = load_card("llama2-7b")
    base = Setup(param_dtype="bfloat16", micro_batch_size=1, seq_len=2048)
    rows = plan(args, 16, 40.0, base=base, global_batch=64, checkpointing=("none", "full"))
    assert rows
    speeds = [r.tokens_per_s_per_gpu for r in rows]
    assert speeds == sorted(speeds, reverse=True)
    for row in rows:
        s = row.setup
        assert s.dp * s.tp * s.pp == 16
        assert row.memory.reserved_gib <= 40.0
        assert s.dp * s.micro_batch_size * s.grad_accum_steps == 64
        assert args.n_kv_heads % s.tp == 0
    assert len({(r.setup.dp, r.setup.dp_replicate, r.setup.tp, r.setup.pp) for r in rows}) == len(rows)


def test_plan_tries_hsdp_with_shard_groups_inside_a_node():
    """On two nodes of 8, ZeRO-2/3 are also tried as replicas whose shard group (tp·dp_shard GPUs) fits in a node;
    the replicas' all-reduce is the only data-parallel traffic that crosses nodes. On one node, no HSDP."""
    from collie.estimate.plan import Hardware
    args = load_card("llama2-7b")
    base = Setup(param_dtype="bfloat16", micro_batch_size=1, seq_len=2048)
    rows = plan(args, 16, 80.0, base=base, global_batch=64, checkpointing=("none",), keep="all")
    hsdp = [r for r in rows if r.setup.dp_replicate > 1]
    assert hsdp and all(r.setup.zero_stage >= 2 and r.setup.tp * r.setup.dp_shard <= 8 for r in hsdp)
    assert all("dp_replicate" in r.comm_gb for r in hsdp)
    full = next(r for r in rows if (r.setup.dp, r.setup.dp_replicate, r.setup.zero_stage) == (16, 1, 3))
    two = next(r for r in rows if (r.setup.dp, r.setup.dp_replicate, r.setup.zero_stage) == (16, 2, 3))
    assert two.memory.peak_gib > full.memory.peak_gib  # a replica holds twice the shard
    assert two.comm_gb["dp_replicate"] < full.comm_gb["dp"]  # the network carries far less
    one_node = plan(args, 8, 80.0, base=base, global_batch=32, checkpointing=("none",), keep="all")
    assert {r.setup.dp_replicate for r in one_node} == {1}
    wide = plan(args, 16, 80.0, base=base, global_batch=64, checkpointing=("none",), keep="all",
                hardware=Hardware(gpus_per_node=16))
    assert {r.setup.dp_replicate for r in wide} == {1}


def test_plan_finds_nothing_when_nothing_fits():
    assert plan(load_card("llama2-70b"), 2, 80.0, base=Setup(param_dtype="bfloat16", seq_len=4096)) == []


def test_plan_proposes_cp_only_where_the_sequence_does_not_fit_otherwise(capsys):
    """At seq 65536 on 4 GPUs of 24 GiB, no dp-only layout of llama-1b fits; splitting the sequence over 4 ranks
    does. Layouts with tp or pp that fit without cp get no cp."""
    args, gpus, mem = load_card("llama-1b"), 4, 24.0
    base = Setup(param_dtype="bfloat16", micro_batch_size=1, seq_len=65536)
    rows = plan(args, gpus, mem, base=base, global_batch=4, zero_stages=(0, 3), checkpointing=("full",), keep="all")
    split = [r for r in rows if r.setup.cp > 1]
    assert split and all(r.memory.fits(mem) and r.comm_gb["cp"] > 0 for r in split)
    for row in split:  # the same recipe with the cp ranks given to dp does not fit
        s = row.setup
        assert not estimate_memory(args, s.replace(cp=1, dp=s.dp * s.cp, grad_accum_steps=1)).fits(mem)
    fitting_without = {(r.setup.tp, r.setup.pp) for r in rows if r.setup.cp == 1}
    assert fitting_without and not fitting_without & {(r.setup.tp, r.setup.pp) for r in split}
    assert estimate_main(["--card", "llama-1b", "--plan", "--gpus", "4", "--gpu-mem", "24", "--dtype", "bfloat16",
                          "--seq", "65536", "--global-batch", "4", "--mbs", "1"]) == 0
    table = capsys.readouterr().out
    assert "| dp | tp | pp | cp |" in table and "| 1 | 1 | 1 | 4 |" in table and "cp > 1:" in table


def test_plan_tries_ep_for_experts_only():
    moe = plan(ModelArgs(**TINY_MOE), 4, 1.0, base=Setup(micro_batch_size=1, seq_len=64), global_batch=8,
               zero_stages=(0, 3), checkpointing=("none",), keep="all")
    assert {r.setup.ep for r in moe} == {1, 2, 4}
    assert all(r.setup.dp % r.setup.ep == 0 for r in moe)
    assert all(("ep" in r.comm_gb) == (r.setup.ep > 1) for r in moe)
    dense = plan(SMALL, 4, 1.0, base=Setup(micro_batch_size=1, seq_len=64), global_batch=8, zero_stages=(0,),
                 checkpointing=("none",), keep="all")
    assert dense and {r.setup.ep for r in dense} == {1}


def test_cli_ep_and_cp_flags(capsys):
    assert estimate_main(["--card", "mixtral-8x7b", "--dp", "8", "--ep", "8", "--zero", "3", "--dtype", "bfloat16",
                          "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["setup"]["ep"] == 8 and out["active_params"] < out["params"]
    assert out["communication"]["payload_bytes"]["ep/all_to_all"] > 0
    assert estimate_main(["--card", "mixtral-8x7b", "--dp", "8", "--ep", "8", "--zero", "3", "--dtype",
                          "bfloat16"]) == 0
    assert "dp=8 tp=1 pp=1 ep=8" in capsys.readouterr().out
    assert estimate_main(["--card", "llama-1b", "--dp", "2", "--cp", "2", "--gpus", "4", "--seq", "8192"]) == 0
    assert "dp=2 tp=1 pp=1 cp=2" in capsys.readouterr().out
    assert estimate_main(["--card", "llama-1b", "--dp", "4", "--cp", "2", "--gpus", "4"]) == 2
    assert "× cp 2" in capsys.readouterr().err
    assert estimate_main(["--card", "llama-1b", "--dp", "2", "--ep", "2"]) == 2
    assert "parallel.ep=2" in capsys.readouterr().err


def test_cli_lora_flags(capsys):
    """--lora-targets and --lora-experts: the routed experts' adapters cost E× the shared expert's state."""
    lora = ["--card", "qwen1.5-moe-a2.7b", "--peft", "lora", "--lora-targets", "q_proj,gate_proj", "--json"]
    states = []
    for experts in ([], ["--lora-experts"]):
        assert estimate_main(lora + experts) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["setup"]["lora_targets"] == ["q_proj", "gate_proj"] and out["setup"]["lora_experts"] == bool(experts)
        states.append(out["memory"]["breakdown_gib"]["optimizer_state"])
    assert states[1] > 10 * states[0]
    assert estimate_main(lora[:-3] + ["--lora-experts"]) == 2
    assert "names none of the routed experts' linears" in capsys.readouterr().err


def test_cli_job_config_reads_cp_and_ep(capsys):
    for config, flag in (("sft_long_cp.yaml", "cp=2"), ("pretrain_moe_ep.yaml", "ep=2")):
        assert estimate_main([os.path.join(ROOT, "configs", config), "--gpus", "2"]) == 0
        assert flag in capsys.readouterr().out


def test_cli_card_json(capsys):
    code = estimate_main(["--card", "llama2-7b", "--dp", "8", "--zero", "1", "--dtype", "bfloat16",
                          "--mbs", "4", "--seq", "2048", "--ckpt", "full", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["setup"]["zero_stage"] == 1 and out["fits"]
    assert set(out["communication"]["payload_bytes"]) == {"dp/all_reduce", "dp/broadcast"}


def test_cli_job_config_with_overrides_and_table(capsys):
    config = os.path.join(ROOT, "configs", "quickstart.yaml")
    code = estimate_main([config, "model.dtype=bfloat16", "parallel.zero_stage=3", "--gpus", "4"])
    out = capsys.readouterr().out
    assert code == 0
    assert "dp=4 tp=1 pp=1, ZeRO-3" in out and "peak allocated" in out and "all_gather" in out


def test_cli_plan_and_errors(capsys):
    assert estimate_main(["--card", "llama-1b", "--plan", "--gpus", "4", "--gpu-mem", "24", "--dtype", "bfloat16",
                          "--seq", "1024", "--mbs", "1"]) == 0
    table = capsys.readouterr().out
    assert table.count("\n| ") >= 2 and "est. tok/s/GPU" in table
    assert estimate_main(["--card", "llama-1b", "--dp", "3", "--gpus", "4"]) == 2
    assert "--gpus 4" in capsys.readouterr().err
    assert estimate_main([]) == 2


def test_cli_hsdp_flags(capsys):
    assert estimate_main(["--card", "llama2-7b", "--dp", "16", "--dp-replicate", "2", "--zero", "3", "--dtype",
                          "bfloat16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["setup"]["dp_replicate"] == 2 and "dp_replicate/all_reduce" in out["communication"]["payload_bytes"]
    assert estimate_main(["--card", "llama2-7b", "--dp", "16", "--dp-replicate", "2", "--zero", "2", "--dtype",
                          "bfloat16"]) == 0
    assert "dp=16 (2 replicas × 8 shards)" in capsys.readouterr().out
    assert estimate_main(["--card", "llama2-7b", "--dp", "16", "--dp-replicate", "2", "--zero", "1"]) == 2
    assert "parallel.dp_replicate=2" in capsys.readouterr().err
    assert estimate_main(["--card", "llama-1b", "--plan", "--gpus", "8", "--gpus-per-node", "4", "--gpu-mem", "24",
                          "--dtype", "bfloat16", "--seq", "1024", "--mbs", "1"]) == 0
    table = capsys.readouterr().out
    assert "| 2×4 |" in table or "| 2×2 |" in table, table
