"""Causal language-model loss, summed over label tokens so that micro-batches and ranks can be combined exactly."""
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets for next-token prediction: position t predicts labels[t+1]; the last position predicts nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies (fp32) over positions whose shifted label is not IGNORE_INDEX.

    Dividing by the token count of the whole optimizer step (all micro-batches, all data-parallel ranks)
    gives the same gradient as one large batch, whatever the padding.
    """
    targets = shift_labels(labels)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def count_loss_tokens(labels: torch.Tensor) -> torch.Tensor:
    return (shift_labels(labels) != IGNORE_INDEX).sum()
