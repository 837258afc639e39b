"""Classic optimizers (Lion, Adan, SophiaG) against their references, and optimizer config validation."""

import pytest
import torch
import torch.nn.functional as F

from collie.config import CollieConfig
from collie.errors import ConfigError
from collie.optim import Adan, Lion, SophiaG, build_optimizer, refresh_hessian, sophia_refresh_due

BASE = {"data": {"train_files": ["data/quickstart/train.jsonl"]}}


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Tanh(), torch.nn.Linear(8, 5))


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 6, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(n)]


def train(model, optimizer, data):
    for x, y in data:
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def assert_same_weights(a, b, atol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lion_matches_lion_pytorch(weight_decay):
    from lion_pytorch import Lion as Reference
    ours, ref, data = tiny_model(), tiny_model(), batches(5)
    train(ours, Lion(ours.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=weight_decay), data)
    train(ref, Reference(ref.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=weight_decay), data)
    assert_same_weights(ours, ref, atol=1e-6)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adan_matches_adan_pytorch(weight_decay):
    from adan_pytorch import Adan as Reference
    ours, ref, data = tiny_model(), tiny_model(), batches(6)
    train(ours, Adan(ours.parameters(), lr=1e-2, weight_decay=weight_decay), data)
    train(ref, Reference(ref.parameters(), lr=1e-2, weight_decay=weight_decay), data)
    assert_same_weights(ours, ref, atol=1e-6)


def test_lion_keeps_state_of_bf16_params_in_their_dtype_and_skips_params_without_grad():
    model = tiny_model().to(torch.bfloat16)
    opt = Lion(model.parameters(), lr=1e-2)
    x, y = batches(1)[0]
    F.cross_entropy(model[0](x.bfloat16()).sum(-1, keepdim=True).expand(-1, 5), y).backward()  # model[3] unused
    before = model[3].weight.clone()
    opt.step()
    assert opt.state[model[0].weight]["exp_avg"].dtype == torch.bfloat16
    assert model[3].weight not in opt.state and torch.equal(model[3].weight, before)


def test_sophia_update_matches_hand_computation():
    model = tiny_model()
    opt = SophiaG(model.parameters(), lr=0.1, betas=(0.9, 0.95), rho=0.5, weight_decay=0.1, eps=1e-3)
    p = model[0].weight
    hessian = torch.rand_like(p) * 0.01
    hessian[0] = 0.0  # ρ·h below eps: the denominator is eps
    opt.state[p].update(exp_avg=torch.randn_like(p), hessian=hessian)
    m0, p0 = opt.state[p]["exp_avg"].clone(), p.detach().clone()
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    g = p.grad.clone()
    opt.step()
    m = 0.9 * m0 + 0.1 * g
    expected = p0 * (1 - 0.1 * 0.1) - 0.1 * (m / torch.clamp(0.5 * hessian, min=1e-3)).clamp(-1, 1)
    torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(opt.state[p]["exp_avg"], m, atol=1e-6, rtol=0)


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=7, dim=5):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = torch.nn.Embedding(vocab, dim), torch.nn.Linear(dim, vocab)

    def forward(self, input_ids):
        return self.head(torch.tanh(self.embed(input_ids)))


def test_sophia_hessian_refresh_equals_direct_gnb_computation():
    model = TinyLM()
    opt = SophiaG(model.parameters(), lr=0.1, betas=(0.9, 0.8), update_every=3)
    labels = torch.tensor([[1, 2, 3, -100], [4, 5, -100, -100]])
    batch = {"input_ids": torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]]), "labels": labels}
    assert [sophia_refresh_due(opt, s) for s in range(1, 7)] == [False, False, True, False, False, True]
    forward = lambda b: model(b["input_ids"])  # noqa: E731
    refresh_hessian(opt, model, batch, forward, generator=torch.Generator().manual_seed(3))
    assert all(p.grad is None for p in model.parameters())

    # direct: positions whose next label is kept (shifted labels), samples from the same generator stream
    logits = model(batch["input_ids"])[:, :-1][labels[:, 1:] != -100].float()
    sampled = torch.multinomial(logits.softmax(-1).detach(), 1, generator=torch.Generator().manual_seed(3))[:, 0]
    grads = torch.autograd.grad(F.cross_entropy(logits, sampled), list(model.parameters()))
    num_tokens = 3
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(opt.state[p]["hessian"], 0.2 * num_tokens * g * g, atol=1e-7, rtol=1e-5)
    assert any(opt.state[p]["hessian"].abs().sum() > 0 for p in model.parameters())


def test_sophia_without_refresh_takes_sign_steps():
    model = tiny_model()
    p0 = [p.detach().clone() for p in model.parameters()]
    train(model, SophiaG(model.parameters(), lr=0.01, betas=(0.0, 0.99)), batches(1))
    for before, p in zip(p0, model.parameters()):
        assert torch.allclose((before - p.detach()).abs(), torch.full_like(p, 0.01), atol=1e-6)


def load(overrides):
    return CollieConfig.from_dict(BASE, overrides)


@pytest.mark.parametrize("name", ["lion", "adan", "sophia", "lomo", "adalomo"])
def test_every_optimizer_builds_from_config(name):
    cfg = load([f"optim.name={name}", "optim.clip_grad_norm=1.0"])
    opt = build_optimizer(cfg, tiny_model().parameters())
    assert opt.param_groups[0]["lr"] == cfg.optim.lr
    if getattr(opt, "fused_backward", False):
        assert opt.clip_grad_norm == 1.0
        opt.remove_hooks()


def test_fused_optimizer_combinations_that_work_load():
    load(["optim.name=adalomo", "optim.clip_grad_norm=1", "model.activation_checkpointing=full",
          "train.grad_accum_steps=2"])
    load(["optim.name=adalomo", "optim.clip_grad_norm=1", "model.activation_checkpointing=full"])
    load(["optim.name=lomo", "train.precision=fp16", "parallel.zero_stage=3", "peft.method=lora"])
    load(["optim.name=adalomo", "parallel.zero_stage=2"])


def test_config_hyper_parameters_reach_the_optimizer():
    # YAML 1.1 reads 1e-30 as a string: the registry converts it to the default's type at load time
    cfg = load(["optim.name=adalomo", "optim.args={eps: [1e-30, 1e-2], decay_rate: -0.5}", "optim.clip_grad_value=2"])
    assert cfg.optim.args["eps"] == [1e-30, 1e-2]
    opt = build_optimizer(cfg, tiny_model().parameters())
    assert opt.param_groups[0]["eps"] == (1e-30, 1e-2) and opt.param_groups[0]["decay_rate"] == -0.5
    assert opt.clip_grad_value == 2
    opt.remove_hooks()


@pytest.mark.parametrize("overrides, message", [
    (["optim.name=lion", "optim.args={beta: [0.9, 0.99]}"], "optim.args.beta is not a hyper-parameter of 'lion' "
                                                              "(did you mean 'betas'?)"),
    (["optim.name=adalomo", "optim.args={momentum: 0.9}"], "optim.args.momentum is not a hyper-parameter of 'adalomo'"),
    (["optim.name=sophia", "optim.args={k: 5}"], "it takes: betas, eps, rho, update_every"),
    (["optim.name=lomo", "optim.args={clip_grad_norm: 1.0}"], "set it as optim.clip_grad_norm"),
    (["optim.name=sophia", "optim.args={update_every: 2.5}"], "optim.args.update_every=2.5: expected a value like 10"),
    (["optim.name=lion", "optim.args={betas: [0.9]}"], "optim.args.betas=[0.9]: expected a value like (0.9, 0.99)"),
    (["optim.name=sophia", "parallel.pp=2"], "parallel.pp=2"),
    (["optim.name=lomo", "parallel.pp=2"], "parallel.pp=2"),
    (["optim.name=adalomo", "parallel.zero_stage=1"], "parallel.zero_stage=1"),
    (["optim.name=adalomo", "parallel.engine=deepspeed"], "parallel.engine=deepspeed"),
])
def test_bad_optimizer_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load(overrides)
    assert message in str(err.value)
