"""transformers models as references of the parity tests."""
import torch


@torch.no_grad()
def perturb_constants(model: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """transformers initialises biases to zero and norm weights to one; moving them by ``scale``·N(0, 1) (torch's
    global RNG) makes a wrong mapping of them show in the logits."""
    for name, p in model.named_parameters():
        if name.endswith("bias") or "norm" in name:
            p.add_(scale * torch.randn_like(p))
    return model
