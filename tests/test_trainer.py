"""The one-process Trainer end to end on the shipped quickstart data and the tiny model."""
import json
import math
import os

import pytest
import torch

from collie.config import CollieConfig
from collie.trainer import Callback, Trainer
from tolerance import assert_logits_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")
SMALL = ["model.arch={num_hidden_layers: 2, hidden_size: 64, intermediate_size: 128}", "train.log_every=1",
         "train.progress_bar=false", "checkpoint.save_final=false", "eval.max_batches=1", "eval.batch_size=8",
         "optim.warmup_steps=0", "monitor.sinks=[jsonl]"]


def config(tmp_path, *overrides):
    cfg = CollieConfig.load(QUICKSTART, SMALL + [f"train.output_dir={tmp_path}", *overrides])
    for attr in ("train_files", "eval_files"):
        setattr(cfg.data, attr, [os.path.join(ROOT, f) for f in getattr(cfg.data, attr)])
    cfg.data.tokenizer = os.path.join(ROOT, cfg.data.tokenizer)
    return cfg


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_training_writes_run_directory_and_loss_falls(tmp_path):
    cfg = config(tmp_path, "train.max_steps=30", "checkpoint.save_final=true", "optim.lr=3e-3")
    results = Trainer(cfg).fit()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 31))
    for key in ("loss", "lr", "grad_norm", "step_time_s", "tokens_per_s_per_gpu", "peak_mem_gib"):
        assert all(key in r for r in train_rows), key
    assert sum(r["loss"] for r in train_rows[-5:]) < sum(r["loss"] for r in train_rows[:5])
    assert {"perplexity", "exact_match"} <= set(results)
    assert any("eval/perplexity" in r for r in rows)
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "train.log").exists()
    assert CollieConfig.load(str(tmp_path / "config.yaml")).train.max_steps == 30
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "final") is not None


def test_gradient_accumulation_equals_larger_batch(tmp_path):
    # eps 1e-5: with the default 1e-8, Adam turns float rounding in near-zero gradients into visible updates.
    common = ["train.max_steps=3", "data.shuffle=false", "optim.args={eps: 1e-5}"]
    big = Trainer(config(tmp_path / "a", *common, "train.micro_batch_size=8"))
    big.fit()
    accum = Trainer(config(tmp_path / "b", *common, "train.micro_batch_size=4", "train.grad_accum_steps=2"))
    accum.fit()
    for (name, a), b in zip(big.model.state_dict().items(), accum.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", ["full", "attention"])
def test_activation_checkpointing_gives_the_same_training(tmp_path, mode):
    plain = Trainer(config(tmp_path / "a", "train.max_steps=2"))
    plain.fit()
    ckpt = Trainer(config(tmp_path / "b", "train.max_steps=2", f"model.activation_checkpointing={mode}"))
    ckpt.fit()
    for (name, a), b in zip(plain.model.state_dict().items(), ckpt.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


class PoisonStep(Callback):
    """Makes the logits of one step infinite, as an overflow would."""

    def __init__(self, step):
        self.step, self.handle = step, None

    def on_step_begin(self, trainer):
        if trainer.state.step + 1 == self.step:
            self.handle = trainer.model.lm_head.register_forward_hook(lambda m, i, out: out * float("inf"))
        elif self.handle:
            self.handle.remove()
            self.handle = None


def test_nonfinite_step_is_skipped_without_touching_weights_or_optimizer(tmp_path):
    snapshots = {}

    class Snapshot(Callback):
        def on_step_end(self, trainer, metrics):
            snapshots[trainer.state.step] = (weights(trainer.model),
                                             {k: v.clone() for k, v in trainer.optimizer.state_dict()["state"][0].items()})

    trainer = Trainer(config(tmp_path, "train.max_steps=3"), callbacks=[PoisonStep(2), Snapshot()])
    trainer.fit()
    assert trainer.state.skipped_steps == 1
    for key, value in snapshots[1][0].items():
        assert torch.equal(value, snapshots[2][0][key]), key
    for key, value in snapshots[1][1].items():
        assert torch.equal(value, snapshots[2][1][key]), key
    assert any(not torch.equal(v, snapshots[3][0][k]) for k, v in snapshots[2][0].items())


def test_nonfinite_can_stop_the_run(tmp_path):
    from collie.trainer import NonFiniteLossError
    with pytest.raises(NonFiniteLossError, match="step 1"):
        Trainer(config(tmp_path, "train.max_steps=2", "train.on_nonfinite=stop"), callbacks=[PoisonStep(1)]).fit()


def test_bf16_autocast_and_callbacks_and_eval_fn_override(tmp_path):
    events = []

    class Recorder(Callback):
        def on_train_begin(self, trainer): events.append("begin")
        def on_step_end(self, trainer, metrics): events.append("step")
        def on_evaluate(self, trainer, results): events.append(("eval", results["custom"]))
        def on_train_end(self, trainer): events.append("end")

    class MyTrainer(Trainer):
        def eval_fn(self):
            return {"custom": 1.5}

    MyTrainer(config(tmp_path, "train.max_steps=2", "train.precision=bf16", "eval.every_steps=1"),
              callbacks=[Recorder()]).fit()
    # quickstart.yaml sets eval.before_training: the baseline evaluation comes before the first step
    assert events == ["begin", ("eval", 1.5), "step", ("eval", 1.5), "step", ("eval", 1.5), "end"]


@pytest.mark.parametrize("name", ["adamw", "lion", "adan", "sophia", "lomo", "adalomo"])
def test_every_registered_optimizer_trains_through_the_trainer(tmp_path, name):
    lr = {"adamw": 3e-3, "lion": 3e-4, "adan": 3e-3, "sophia": 3e-4, "lomo": 3e-2, "adalomo": 3e-2}[name]
    losses = []

    class Record(Callback):
        def on_step_end(self, trainer, metrics):
            losses.append(metrics["loss"])
            assert all(p.grad is None for p in trainer.model.parameters()), "gradients outlived the step"

    overrides = [f"optim.name={name}", f"optim.lr={lr}", "train.max_steps=12", "eval.before_training=false",
                 "eval.metrics=[perplexity]", "train.micro_batch_size=16"]
    if name == "sophia":
        overrides.append("optim.args={update_every: 2}")
    Trainer(config(tmp_path, *overrides), callbacks=[Record()]).fit()
    assert sum(losses[-3:]) < sum(losses[:3]), losses


def test_lora_training_trains_only_adapters_and_saves_a_loadable_adapter(tmp_path):
    from collie.cli import main
    from collie.peft import load_model_or_adapter
    cfg = config(tmp_path, "train.max_steps=3", "checkpoint.save_final=true", "peft.method=lora", "peft.r=4",
                 "optim.lr=1e-2", "eval.metrics=[perplexity]")
    trainer = Trainer(cfg)
    before = weights(trainer.model)
    trainer.fit()
    after = weights(trainer.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_B." in k or ".lora_A." in k for k in changed)
    assert 0 < trainer.num_trainable < trainer.num_params
    final = tmp_path / "final"
    assert (final / "adapter_config.json").exists() and (final / "base_model" / "config.json").exists()
    ids = torch.randint(0, 100, (2, 9))
    trainer.model.eval()
    assert_logits_close(load_model_or_adapter(final)(ids), trainer.model(ids), trainer.model_args)
    assert main(["convert", str(final / "base_model"), str(tmp_path / "merged"), "--merge", str(final)]) == 0
    from collie.models import from_pretrained
    assert_logits_close(from_pretrained(tmp_path / "merged")(ids), trainer.model(ids), trainer.model_args)


def test_clip_grad_norm_scales_gradients_to_the_max_norm():
    from collie.config import ParallelConfig
    from collie.distributed import clip_grad_norm_, init_parallel
    ctx = init_parallel(ParallelConfig(), "cpu")
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(2, 2))
    a.grad, b.grad = torch.full((4,), 3.0), torch.full((2, 2), 3.0)
    total = clip_grad_norm_([a, b], 1.0, ctx)
    assert float(total) == pytest.approx(math.sqrt(8 * 9.0))
    assert float(torch.linalg.vector_norm(torch.cat([a.grad, b.grad.flatten()]))) == pytest.approx(1.0, rel=1e-5)


def test_bf16_model_keeps_fp32_master_weights_for_classic_optimizers(tmp_path):
    """model.dtype=bfloat16 with AdamW trains fp32 weights computed in bf16 — the same run as float32 weights
    with train.precision=bf16; AdaLomo keeps the bf16 weights (no master copy, as in its paper)."""
    master = Trainer(config(tmp_path / "a", "train.max_steps=2", "model.dtype=bfloat16"))
    master.fit()
    amp = Trainer(config(tmp_path / "b", "train.max_steps=2", "train.precision=bf16"))
    amp.fit()
    assert all(p.dtype == torch.float32 for p in master.model.parameters())
    for (name, a), b in zip(master.model.state_dict().items(), amp.model.state_dict().values()):
        assert torch.equal(a, b), name
    fused = Trainer(config(tmp_path / "c", "train.max_steps=1", "model.dtype=bfloat16", "optim.name=adalomo",
                           "optim.args={}"))
    assert all(p.dtype == torch.bfloat16 for p in fused.model.parameters())


@pytest.mark.parametrize("optimizer", ["lomo", "adalomo"])
def test_lora_with_fused_optimizers_updates_only_adapters(tmp_path, optimizer):
    trainer = Trainer(config(tmp_path, "train.max_steps=2", "peft.method=lora", f"optim.name={optimizer}",
                             "optim.args={}", "optim.lr=1e-2", "eval.metrics=[perplexity]"))
    before = weights(trainer.model)
    trainer.fit()
    changed = {k for k, v in weights(trainer.model).items() if not torch.equal(v, before[k])}
    assert changed and all(".lora_" in k for k in changed)
    assert all(p.grad is None for p in trainer.model.parameters())


def test_chunked_loss_and_compiled_layers_train_like_the_plain_model(tmp_path):
    """train.loss_chunk_size (LM head and loss recomputed chunk by chunk) and train.compile change how, not what."""
    plain = Trainer(config(tmp_path / "a", "train.max_steps=2", "optim.args={eps: 1e-5}"))
    plain.fit()
    lean = Trainer(config(tmp_path / "b", "train.max_steps=2", "optim.args={eps: 1e-5}", "train.loss_chunk_size=7",
                          "train.compile=true", "train.compile_backend=aot_eager", "data.pad_to_multiple_of=64"))
    lean.fit()
    for (name, a), b in zip(plain.model.state_dict().items(), lean.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_chunked_loss_applies_the_final_logit_softcap(tmp_path):
    """Gemma 2 caps its logits after the LM head; the chunked loss, which runs the head itself, caps them too."""
    gemma = ("train.max_steps=2", "optim.args={eps: 1e-5}", "model.arch={architecture: gemma2, sandwich_norms: true, "
             "scale_embeddings: true, hidden_act: gelu_pytorch_tanh, final_logit_softcapping: 0.5}")
    plain = Trainer(config(tmp_path / "a", *gemma))
    plain.fit()
    chunked = Trainer(config(tmp_path / "b", *gemma, "train.loss_chunk_size=7"))
    chunked.fit()
    for (name, a), b in zip(plain.model.state_dict().items(), chunked.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_layers_take_a_fused_optimizers_two_pass_backward(tmp_path):
    """LOMO with norm clipping backpropagates twice through one graph (retain_graph), which compiled backwards
    with donated buffers refuse; collie turns those off for fused optimizers under train.compile."""
    fused = ("train.max_steps=2", "optim.name=lomo", "optim.args={}", "optim.lr=1e-2", "optim.clip_grad_norm=1.0",
             "data.pad_to_multiple_of=64")
    plain = Trainer(config(tmp_path / "a", *fused))
    plain.fit()
    compiled = Trainer(config(tmp_path / "b", *fused, "train.compile=true", "train.compile_backend=aot_eager"))
    compiled.fit()
    for (name, a), b in zip(plain.model.state_dict().items(), compiled.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_chunked_loss_sum_equals_the_full_loss_and_its_gradient():
    from collie.loss import causal_lm_loss_sum, chunked_lm_loss_sum
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50)
    hidden = torch.randn(2, 11, 8, requires_grad=True)
    labels = torch.randint(0, 50, (2, 11))
    labels[0, :3] = -100
    full = causal_lm_loss_sum(head(hidden), labels)
    full_grads = torch.autograd.grad(full, [hidden, head.weight])
    chunked = chunked_lm_loss_sum(head, hidden, labels, chunk=4)
    chunked_grads = torch.autograd.grad(chunked, [hidden, head.weight])
    torch.testing.assert_close(chunked, full)
    for a, b in zip(chunked_grads, full_grads):
        torch.testing.assert_close(a, b)


def test_final_directory_holds_the_hugging_face_tokenizer(tmp_path):
    """A run on a Hugging Face tokenizer exports it with the model: final/ loads in AutoTokenizer and in
    ``collie generate`` without naming the tokenizer."""
    from transformers import AutoTokenizer

    from collie.cli import main
    from test_tokenizer import save_hf_tokenizer
    source = save_hf_tokenizer(tmp_path / "tokenizer")
    Trainer(config(tmp_path / "run", "train.max_steps=1", "checkpoint.save_final=true", "eval.before_training=false",
                   f"data.tokenizer={source}")).fit()
    final = tmp_path / "run" / "final"
    text = "Question 3: what comes after 111?"
    assert AutoTokenizer.from_pretrained(final).encode(text) == AutoTokenizer.from_pretrained(source).encode(text)
    assert main(["generate", str(final), "--prompt", text, "--max-new-tokens", "2"]) == 0
