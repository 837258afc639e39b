"""Causal language-model loss, summed over label tokens so that micro-batches and ranks can be combined exactly."""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets for next-token prediction: position t predicts labels[t+1]; the last position predicts nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies (fp32) over positions whose shifted label is not IGNORE_INDEX.

    Dividing by the token count of the whole optimizer step (all micro-batches, all data-parallel ranks)
    gives the same gradient as one large batch, whatever the padding.
    """
    return token_loss_sum(logits, shift_labels(labels))


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy (fp32) of already shifted ``targets`` (IGNORE_INDEX: no loss)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def count_loss_tokens(labels: torch.Tensor) -> torch.Tensor:
    return (shift_labels(labels) != IGNORE_INDEX).sum()


def chunked_lm_loss_sum(head, hidden: torch.Tensor, labels: torch.Tensor,
                        chunk: int) -> torch.Tensor:
    """``causal_lm_loss_sum(head(hidden), labels)`` computed ``chunk`` positions at a time; each chunk's logits
    are recomputed in backward, so at most (batch, chunk, vocab) logits exist instead of the whole sequence's
    (4 GiB of fp32 logits for 4 × 2048 tokens of a 128k vocabulary)."""
    targets = shift_labels(labels)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[1], chunk):
        piece = slice(start, start + chunk)
        total = total + checkpoint(_chunk_loss_sum, head, hidden[:, piece], targets[:, piece], use_reentrant=False)
    return total


def _chunk_loss_sum(head, hidden, targets):
    return F.cross_entropy(head(hidden).flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def auxiliary_loss_sum(parts, labels: torch.Tensor) -> torch.Tensor | float:
    """The auxiliary losses the modules of ``parts`` (this rank's model parts) recorded in their last training
    forward (a module's ``auxiliary_loss`` scalar, e.g. an MoE model's router load-balancing and z-losses), taken
    from them so that each counts once, times this micro-batch's loss-token count: divided by the step's token
    count like the token losses, a step of one micro-batch gets transformers' ``mean token loss + coef ·
    aux_loss``, and micro-batches and data-parallel ranks weigh their own auxiliary losses by their share of the
    tokens. 0.0 when no module recorded one."""
    total = 0.0
    for module in (m for part in parts for m in part.modules()):
        recorded = getattr(module, "auxiliary_loss", None)
        if recorded is not None:
            total, module.auxiliary_loss = total + recorded, None
    return total * count_loss_tokens(labels) if torch.is_tensor(total) else total
