"""LOMO and AdaLomo fused into backward: parity with lomo-optim, accumulation, clipping, non-finite steps,
loss scaling, checkpoints, gradient memory, and data/tensor-parallel reductions on two gloo ranks."""
import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from collie.optim import AdaLomo, DynamicLossScaler, Lomo

OPTIMIZERS = {"lomo": Lomo, "adalomo": AdaLomo}


@pytest.fixture
def lomo_optim(monkeypatch):
    """The reference; its AdaLomo puts state on .cuda(), made a no-op on this CPU-only machine."""
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    import lomo_optim
    return lomo_optim


def tiny_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Tanh(), torch.nn.Linear(8, 5))
    return model.to(dtype)


def batches(n, size=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=g), torch.randint(0, 5, (size,), generator=g)) for _ in range(n)]


def loss_fn(model, x, y):
    return F.cross_entropy(model(x.to(next(model.parameters()).dtype)).float(), y)


def fused_train(model, opt, data):
    results = []
    for x, y in data:
        opt.backward(loss_fn(model, x, y))
        results.append(opt.step())
    return results


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_close_models(a, b, atol=1e-5):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("name", ["lomo", "adalomo"])
@pytest.mark.parametrize("clip", [{}, {"clip_grad_norm": 0.3}, {"clip_grad_value": 0.02}])
def test_matches_lomo_optim(lomo_optim, name, clip):
    ours, ref, data = tiny_model(), tiny_model(), batches(4)
    opt = OPTIMIZERS[name](ours.parameters(), lr=0.05, weight_decay=0.01, **clip)
    reference = {"lomo": lomo_optim.Lomo, "adalomo": lomo_optim.AdaLomo}[name](
        ref, lr=0.05, weight_decay=0.01, clip_grad_norm=clip.get("clip_grad_norm"),
        clip_grad_value=clip.get("clip_grad_value"))
    fused_train(ours, opt, data)
    for x, y in data:
        if clip.get("clip_grad_norm"):
            reference.grad_norm(loss_fn(ref, x, y))
        reference.fused_backward(loss_fn(ref, x, y), 0.05)
    assert_close_models(ours, ref)


def test_adalomo_matches_lomo_optim_on_a_tiny_llama(lomo_optim):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    ours = LlamaForCausalLM(config)
    ref = copy.deepcopy(ours)
    opt = AdaLomo(ours.parameters(), lr=0.01, clip_grad_norm=1.0)
    reference = lomo_optim.AdaLomo(ref, lr=0.01, clip_grad_norm=1.0)
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        opt.backward(ours(ids, labels=ids).loss)
        opt.step()
        reference.grad_norm(ref(ids, labels=ids).loss)
        reference.fused_backward(ref(ids, labels=ids).loss, 0.01)
    assert_close_models(ours, ref)


@pytest.mark.parametrize("name", ["lomo", "adalomo"])
@pytest.mark.parametrize("clip_grad_norm", [0.0, 0.3])
def test_accumulation_equals_one_large_batch(name, clip_grad_norm):
    big, accumulated = tiny_model(), tiny_model()
    big_opt = OPTIMIZERS[name](big.parameters(), lr=0.05, clip_grad_norm=clip_grad_norm)
    acc_opt = OPTIMIZERS[name](accumulated.parameters(), lr=0.05, clip_grad_norm=clip_grad_norm)
    for x, y in batches(3, size=6):
        big_opt.backward(loss_fn(big, x, y))
        big_opt.step()
        acc_opt.begin_step(num_micro_batches=3)
        for xs, ys in zip(x.split(2), y.split(2)):  # loss normalised by the step's token count
            acc_opt.backward(F.cross_entropy(accumulated(xs), ys, reduction="sum") / len(y))
        assert all(p.grad is not None for p in accumulated.parameters())  # held until step()
        acc_opt.step()
    assert_close_models(big, accumulated)


@pytest.mark.parametrize("options", [{}, {"clip_grad_norm": 1.0}])
def test_no_gradient_outlives_its_hook(options):
    model = tiny_model()
    live = []
    for p in model.parameters():  # registered before the optimizer's hook, so it runs first
        p.register_post_accumulate_grad_hook(
            lambda _: live.append(sum(q.grad is not None for q in model.parameters())))
    opt = AdaLomo(model.parameters(), lr=0.01, **options)
    x, y = batches(1)[0]
    opt.backward(loss_fn(model, x, y))
    passes = 2 if options else 1
    assert len(live) == passes * len(list(model.parameters())) and max(live) == 1
    assert all(p.grad is None for p in model.parameters())
    assert opt.step().finite


@pytest.mark.parametrize("name, options, passes", [
    ("lomo", {}, 1), ("adalomo", {}, 1), ("lomo", {"clip_grad_value": 0.01}, 1), ("adalomo", {"clip_grad_value": 0.01}, 1),
    ("lomo", {"clip_grad_norm": 1.0}, 2), ("adalomo", {"clip_grad_norm": 1.0}, 2), ("lomo", {"guard_nonfinite": True}, 2)])
def test_one_backward_per_step_unless_the_global_norm_is_needed_first(name, options, passes):
    """The default costs one backward: the norm pass runs only for norm clipping, fp16 scaling (below) or the
    explicit all-or-nothing option. Each backward completes every parameter's gradient once."""
    model = tiny_model()
    calls = []
    opt = OPTIMIZERS[name](model.parameters(), lr=0.01, **options)
    for p in model.parameters():  # after the optimizer's hook: counts every pass, norm-only ones included
        p.register_post_accumulate_grad_hook(lambda param: calls.append(param))
    assert opt.needs_grad_norm_pass == (passes == 2)
    for x, y in batches(3):
        calls.clear()
        opt.backward(loss_fn(model, x, y))
        assert opt.step().finite
        assert len(calls) == passes * len(list(model.parameters()))


@pytest.mark.parametrize("name", ["lomo", "adalomo"])
def test_by_default_a_nonfinite_gradient_never_reaches_the_weights(name):
    """The per-parameter guard of the one-backward default: the parameter with the inf gradient is untouched,
    the others are updated, every weight stays finite and the next step trains normally."""
    model = tiny_model()
    opt = OPTIMIZERS[name](model.parameters(), lr=0.01)
    before = weights(model)
    (x, y), (x2, y2) = batches(2)
    opt.backward(nonfinite_grad_loss(model, x, y))
    result = opt.step()
    assert not result.finite and result.partial
    assert torch.equal(model[3].weight, before[4]) and not torch.equal(model[0].weight, before[0])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(v).all() for state in opt.state.values() for v in state.values())
    opt.backward(loss_fn(model, x2, y2))
    assert opt.step().finite and not torch.equal(model[3].weight, before[4])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_lr_comes_from_param_groups_so_schedulers_work():
    model = tiny_model()
    opt = Lomo(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step >= 1 else 1.0)
    before = weights(model)
    fused_train(model, opt, batches(1))
    scheduler.step()
    after_first = weights(model)
    assert any(not torch.equal(a, b) for a, b in zip(before, after_first))
    fused_train(model, opt, batches(1, seed=2))  # lr is now 0
    assert all(torch.equal(a, b) for a, b in zip(after_first, weights(model)))


def nonfinite_grad_loss(model, x, y):
    """A finite loss whose gradient for the last layer's weight[0, 0] is inf (d sqrt(u)/du at u = 0)."""
    w = model[3].weight[0, 0]
    return loss_fn(model, x, y) + torch.sqrt(w - w.detach())


def test_nonfinite_loss_skips_the_step():
    model = tiny_model()
    opt = AdaLomo(model.parameters(), lr=0.01)
    before, x = weights(model), batches(1)[0][0]
    opt.backward(model(x).sum() * float("nan"))
    result = opt.step()
    assert not result.finite and not result.partial
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model)))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("options, micro_batches", [({"guard_nonfinite": True}, 1), ({"clip_grad_norm": 1.0}, 1),
                                                   ({}, 2)])
def test_nonfinite_gradients_seen_before_any_update_skip_the_whole_step(options, micro_batches):
    model = tiny_model()
    opt = AdaLomo(model.parameters(), lr=0.01, **options)
    before, state = weights(model), copy.deepcopy(opt.state_dict())
    x, y = batches(1)[0]
    opt.begin_step(micro_batches)
    opt.backward(loss_fn(model, x, y) if micro_batches > 1 else nonfinite_grad_loss(model, x, y))
    if micro_batches > 1:
        opt.backward(nonfinite_grad_loss(model, x, y))
    result = opt.step()
    assert all(p.grad is None for p in model.parameters())
    assert not result.finite and not result.partial
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model)))
    torch.testing.assert_close(opt.state_dict()["state"], state["state"])


def test_nonfinite_gradient_without_norm_pass_leaves_that_parameter_and_its_state_unchanged():
    model = tiny_model()
    opt = AdaLomo(model.parameters(), lr=0.01)
    before = weights(model)
    x, y = batches(1)[0]
    opt.backward(nonfinite_grad_loss(model, x, y))
    result = opt.step()
    assert not result.finite and result.partial
    bad = model[3].weight
    assert torch.equal(bad, before[4]) and opt.state[bad]["step"] == 0
    assert not torch.equal(model[0].weight, before[0]) and opt.state[model[0].weight]["step"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_loss_scaler_is_exact_skips_overflow_and_grows_back():
    plain, scaled = tiny_model(), tiny_model()
    plain_opt, opt = Lomo(plain.parameters(), lr=0.05), Lomo(scaled.parameters(), lr=0.05)
    scaler = DynamicLossScaler(init_scale=2.0 ** 8, growth_interval=2)
    opt.setup_training(loss_scaler=scaler)
    assert opt.needs_grad_norm_pass  # overflow must be known before any update
    scales = []
    for step, (x, y) in enumerate(batches(6)):
        overflow = step in (1, 2)
        before = weights(scaled)
        opt.backward((nonfinite_grad_loss if overflow else loss_fn)(scaled, x, y))
        result = opt.step()
        scales.append(scaler.loss_scale)
        assert result.finite != overflow
        if overflow:
            assert all(torch.equal(a, b) for a, b in zip(before, weights(scaled)))
        else:
            plain_opt.backward(loss_fn(plain, x, y))
            plain_opt.step()
            assert_close_models(plain, scaled, atol=1e-7)  # power-of-two scaling is exact
    assert scales == [2.0 ** 8, 2.0 ** 7, 2.0 ** 6, 2.0 ** 6, 2.0 ** 7, 2.0 ** 7]
    restored = DynamicLossScaler()
    restored.load_state_dict(scaler.state_dict())
    assert restored.loss_scale == scaler.loss_scale and restored.finite_steps == scaler.finite_steps


def test_state_dict_resume_matches_uninterrupted_training():
    data = batches(5)
    straight = tiny_model()
    fused_train(straight, AdaLomo(straight.parameters(), lr=0.05, weight_decay=0.1), data)

    first = tiny_model()
    opt = AdaLomo(first.parameters(), lr=0.05, weight_decay=0.1)
    fused_train(first, opt, data[:3])
    saved_weights, saved_state = copy.deepcopy(first.state_dict()), copy.deepcopy(opt.state_dict())
    assert saved_state["state"][0]["step"] == 3 and set(saved_state["state"][0]) == {
        "step", "exp_avg_sq_row", "exp_avg_sq_col"}
    resumed = tiny_model(seed=5)
    resumed.load_state_dict(saved_weights)
    opt = AdaLomo(resumed.parameters(), lr=1.0, weight_decay=0.0)
    opt.load_state_dict(saved_state)  # restores the hyper-parameters too
    fused_train(resumed, opt, data[3:])
    assert_close_models(straight, resumed, atol=0)


def test_moments_of_bf16_parameters_stay_fp32_through_a_checkpoint():
    model = tiny_model(dtype=torch.bfloat16)
    opt = AdaLomo(model.parameters(), lr=0.01)
    fused_train(model, opt, batches(1))
    saved = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(saved)
    state = opt.state[model[0].weight]
    assert state["exp_avg_sq_row"].dtype == torch.float32
    torch.testing.assert_close(state["exp_avg_sq_row"], saved["state"][0]["exp_avg_sq_row"], atol=0, rtol=0)


# --- two gloo ranks: data-parallel reduction and DTensor-sharded parameters --------------------------------

def _distributed_worker(rank, world_size, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        _check_data_parallel(rank, world_size)
        _check_sharded_parameters(rank, world_size)
        _check_fsdp2(rank, world_size)
        _check_classic_optimizers_on_shards(world_size)  # here to share the process start-up
        dist.barrier()  # no rank tears gloo down while its peer still has a collective in flight
    finally:
        dist.destroy_process_group()


def _check_data_parallel(rank, world_size):
    """Each rank backpropagates half the batch; the hooks all-reduce over the dp group (loss / global count)."""
    single, replica = tiny_model(), tiny_model()
    single_opt = AdaLomo(single.parameters(), lr=0.05, clip_grad_norm=0.5)
    opt = AdaLomo(replica.parameters(), lr=0.05, clip_grad_norm=0.5)
    opt.setup_training(dp_group=dist.group.WORLD, grad_reduce="sum")
    for x, y in batches(2, size=4):
        single_opt.backward(loss_fn(single, x, y))
        single_opt.step()
        xs, ys = x.chunk(world_size)[rank], y.chunk(world_size)[rank]
        opt.backward(F.cross_entropy(replica(xs), ys, reduction="sum") / len(y))
        assert opt.step().finite
    assert_close_models(single, replica)
    x, y = batches(1)[0]  # a non-finite loss on one rank only: both ranks skip, nobody hangs
    loss = loss_fn(replica, x, y) * (float("nan") if rank == 0 else 1.0)
    opt.backward(loss)
    assert not opt.step().finite


def _check_sharded_parameters(rank, world_size):
    """DTensor parameters (uneven Shard(0), Shard(1), sharded 1-D, Replicate) give the unsharded update."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world_size,))
    torch.manual_seed(0)
    shapes = {(5, 6): Shard(0), (4, 6): Shard(1), (7,): Shard(0), (3, 4): Replicate()}
    values = [torch.randn(shape) for shape in shapes]
    targets = [torch.randn(shape) for shape in shapes]
    for name in ("adalomo", "lomo"):
        full = [torch.nn.Parameter(v.clone()) for v in values]
        sharded = [torch.nn.Parameter(distribute_tensor(v.clone(), mesh, [pl]))
                   for v, pl in zip(values, shapes.values())]
        sharded_targets = [distribute_tensor(t, mesh, [pl]) for t, pl in zip(targets, shapes.values())]
        full_opt = OPTIMIZERS[name](full, lr=0.05, weight_decay=0.1, clip_grad_norm=2.0)
        opt = OPTIMIZERS[name](sharded, lr=0.05, weight_decay=0.1, clip_grad_norm=2.0)
        for _ in range(2):
            full_opt.backward(sum(((p - t) ** 3).sum() for p, t in zip(full, targets)))
            full_res = full_opt.step()
            opt.backward(sum(((p - t) ** 3).sum() for p, t in zip(sharded, sharded_targets)).full_tensor())
            res = opt.step()
            assert abs(res.grad_norm - full_res.grad_norm) < 1e-4 * full_res.grad_norm
        for p, q in zip(full, sharded):
            torch.testing.assert_close(q.full_tensor(), p.detach(), atol=1e-5, rtol=0)


def _check_fsdp2(rank, world_size):
    """Under FSDP2 ``replicate`` (ZeRO-0) and ``fully_shard`` (ZeRO-2/3), summing over dp as collie configures
    them, the hooks see reduced gradients (grad_reduce="none"): same result as one process, norm pass included."""
    from torch.distributed._composable.replicate_with_fsdp import replicate
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    mesh = init_device_mesh("cpu", (world_size,))
    for wrap in (replicate, fully_shard):
        single, model = tiny_model(), tiny_model()
        for module in (model[0], model[3], model):
            wrap(module, mesh=mesh)
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
        assert all(isinstance(m, FSDPModule) for m in (model[0], model[3], model))
        single_opt = AdaLomo(single.parameters(), lr=0.05, clip_grad_norm=0.5)
        opt = AdaLomo(model.parameters(), lr=0.05, clip_grad_norm=0.5)
        opt.setup_training(dp_group=dist.group.WORLD, grad_reduce="none")
        for x, y in batches(2, size=4):
            single_opt.backward(loss_fn(single, x, y))
            single_opt.step()
            xs, ys = x.chunk(world_size)[rank], y.chunk(world_size)[rank]
            opt.backward(F.cross_entropy(model(xs), ys, reduction="sum") / len(y))
            assert opt.step().finite and all(p.grad is None for p in model.parameters())
        for p, q in zip(single.parameters(), model.parameters()):
            torch.testing.assert_close(q.full_tensor(), p.detach(), atol=1e-5, rtol=0)


def _check_classic_optimizers_on_shards(world_size):
    """Lion, Adan and SophiaG update DTensor shards locally: same result as on the full tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from collie.optim import Adan, Lion, SophiaG
    mesh = init_device_mesh("cpu", (world_size,))
    torch.manual_seed(0)
    value, target = torch.randn(5, 3), torch.randn(5, 3)
    for cls in (Lion, Adan, SophiaG):
        full = torch.nn.Parameter(value.clone())
        sharded = torch.nn.Parameter(distribute_tensor(value.clone(), mesh, [Shard(1)]))
        sharded_target = distribute_tensor(target, mesh, [Shard(1)])
        opts = cls([full], lr=0.01, weight_decay=0.1), cls([sharded], lr=0.01, weight_decay=0.1)
        for _ in range(3):
            ((full - target) ** 3).sum().backward()
            ((sharded - sharded_target) ** 3).sum().full_tensor().backward()
            for opt in opts:
                opt.step()
                opt.zero_grad()
        torch.testing.assert_close(sharded.full_tensor(), full.detach(), atol=1e-6, rtol=0)


def test_data_parallel_and_sharded_reductions_on_two_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_distributed_worker, args=(2, os.path.join(tmp, "store")), nprocs=2, join=True)


def test_hooks_are_registered_once_whatever_the_number_of_steps_and_setups():
    """One post-accumulate-grad hook per parameter, from construction: setup_training and steps add none (the hook
    finds its group and shard layout by dictionary lookup, O(1) per gradient)."""
    model = tiny_model()
    opt = AdaLomo(model.parameters(), lr=0.01)
    params = list(model.parameters())
    for _ in range(2):
        opt.setup_training(grad_reduce="none")
        for x, y in batches(3):
            opt.backward(loss_fn(model, x, y))
            assert opt.step().finite
    assert len(opt._hooks) == len(params)
    assert all(len(p._post_accumulate_grad_hooks) == 1 for p in params)
