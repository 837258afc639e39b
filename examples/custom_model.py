"""A research extension without touching collie: QK-norm attention (RMSNorm on each head's queries and keys
before the rotary embedding, as in OLMo 2 and Qwen3), registered as a new architecture and trained by the
unchanged Trainer.

    python examples/custom_model.py configs/sft_tiny.yaml [section.key=value ...]

``@collie.register_model("llama-qknorm")`` makes the class buildable by name: a config selects it with
``model.arch.architecture=llama-qknorm`` (or ``architecture: llama-qknorm`` in a model card), and the saved
Hugging Face directory names it in config.json, so ``collie.from_pretrained`` builds this class again.
Parallel plans, checkpoints, PEFT and the optimizers apply to it as to any Llama.
"""
import sys

import torch

import collie
from collie.models import LlamaForCausalLM
from collie.models.components import Attention, RMSNorm


class QKNormAttention(Attention):
    """Attention whose per-head queries and keys are RMS-normalized (learned scale) before rotary positions."""

    def __init__(self, args: collie.ModelArgs):
        super().__init__(args)
        self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)

    def project(self, x):
        q, k, v = super().project(x)
        return self.q_norm(q), self.k_norm(k), v


@collie.register_model("llama-qknorm")
class QKNormLlama(LlamaForCausalLM):
    """A Llama decoder whose layers use QKNormAttention; weights, init and I/O are inherited."""
    hf_architecture, hf_model_type = "LlamaQKNormForCausalLM", "llama_qknorm"

    def __init__(self, args: collie.ModelArgs):
        super().__init__(args)
        for layer in self.model.layers.values():
            layer.self_attn = QKNormAttention(args)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    cfg = collie.CollieConfig.load(argv[0], ["model.arch.architecture=llama-qknorm", *argv[1:]])
    trainer = collie.Trainer(cfg)
    trainer.fit()
    if trainer.is_main_process and cfg.checkpoint.save_final:
        reloaded = collie.from_pretrained(f"{cfg.train.output_dir}/final")
        norms = sum(isinstance(m, QKNormAttention) for m in reloaded.modules())
        print(f"reloaded {type(reloaded).__name__} with {norms} QK-norm attention layers")
        with torch.no_grad():
            print("q_norm scale of layer 0 after training:", reloaded.model.layers["0"].self_attn.q_norm.weight[:4])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
