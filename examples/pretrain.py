"""Pretraining: documents are tokenized once into a memory-mapped cache and packed into ``data.seq_len`` blocks
(with ``data.document_masking`` each document attends only to itself); the trained model then continues a text.

    python examples/pretrain.py configs/pretrain_tiny.yaml [section.key=value ...]
    torchrun --nproc_per_node 4 examples/pretrain.py configs/pretrain_3d.yaml

``data.train_files`` takes .txt, .jsonl and .parquet files, globs, and directories written by
``datasets.Dataset.save_to_disk``. Resume an interrupted run with ``checkpoint.resume=auto``: the data position is
part of the checkpoint, so no block is seen twice or skipped.
"""
import sys

import collie
from collie.cli import main as collie_cli


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    cfg = collie.CollieConfig.load(argv[0], argv[1:])
    trainer = collie.Trainer(cfg)
    results = trainer.fit()
    if trainer.is_main_process and cfg.checkpoint.save_final:
        if results:
            print("final evaluation:", ", ".join(f"{k}={v:.4g}" for k, v in results.items()))
        collie_cli(["generate", f"{cfg.train.output_dir}/final", "--prompt", "In winter the valley",
                    "--max-new-tokens", "16"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
