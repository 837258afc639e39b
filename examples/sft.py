"""Instruction tuning: the loss falls on the assistant responses only; then the trained model answers.

    python examples/sft.py configs/sft_tiny.yaml [section.key=value ...]
    torchrun --nproc_per_node 4 examples/sft.py configs/sft_3d.yaml

The same script runs in every layout: ``parallel.*`` in the config and the torchrun environment decide how the
model is split; the Trainer gathers the final model into ``train.output_dir/final`` (a Hugging Face directory).
"""
import sys

import collie
from collie.cli import main as collie_cli
from collie.data.collate import IGNORE_INDEX


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    cfg = collie.CollieConfig.load(argv[0], argv[1:])
    trainer = collie.Trainer(cfg)
    results = trainer.fit()
    if trainer.is_main_process and cfg.checkpoint.save_final and trainer.eval_dataset is not None:
        print("final evaluation:", ", ".join(f"{k}={v:.4g}" for k, v in results.items()))
        sample = trainer.eval_dataset[0]
        prompt_len = int((sample["labels"] != IGNORE_INDEX).nonzero()[0])  # tokens before the first response
        prompt = trainer.tokenizer.decode(sample["input_ids"][:prompt_len])
        collie_cli(["generate", f"{cfg.train.output_dir}/final", "--prompt", prompt, "--max-new-tokens", "8"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
