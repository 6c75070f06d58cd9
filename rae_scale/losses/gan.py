"""Stage-1 GAN losses and the VQGAN adaptive weight (rae_method.md section 2.3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss 1/2 [mean relu(1 - D(real)) + mean relu(1 + D(fake))]."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating discriminator loss 1/2 [mean softplus(-D(real)) + mean softplus(D(fake))]."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def vanilla_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator loss -mean D(G(z)) over all logit entries (upstream's "vanilla", not softplus)."""
    return -logits_fake.mean()


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge-GAN generator loss; the same -mean D(G(z)) as vanilla_g_loss."""
    return -logits_fake.mean()


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
G_LOSSES = {"vanilla": vanilla_g_loss, "hinge": hinge_g_loss}


def d_loss_fn(name: str):
    """The discriminator loss called `name` ("hinge" or "vanilla")."""
    if name not in D_LOSSES:
        raise ValueError(f"unknown discriminator loss {name!r}; allowed: {sorted(D_LOSSES)}")
    return D_LOSSES[name]


def g_loss_fn(name: str):
    """The generator loss called `name` ("vanilla" or "hinge")."""
    if name not in G_LOSSES:
        raise ValueError(f"unknown generator loss {name!r}; allowed: {sorted(G_LOSSES)}")
    return G_LOSSES[name]


def adaptive_weight_from_grads(rec_grad: torch.Tensor, gan_grad: torch.Tensor, max_weight: float = 1e4,
                               eps: float = 1e-6) -> torch.Tensor:
    """||rec_grad|| / (||gan_grad|| + eps) clamped to [0, max_weight], detached (gradients or their norms)."""
    weight = rec_grad.detach().float().norm() / (gan_grad.detach().float().norm() + eps)
    return weight.clamp(0.0, max_weight)


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer_weight: torch.Tensor,
                        max_weight: float = 1e4, eps: float = 1e-6) -> torch.Tensor:
    """lambda = ||grad_W rec_loss|| / (||grad_W gan_loss|| + eps), clamped to [0, max_weight], detached.

    W is the decoder's last layer weight. Call it outside autocast: the gradient norms are taken in the
    graph's own precision and the graph is kept for the real backward pass.
    """
    if not last_layer_weight.requires_grad:
        raise ValueError("adaptive_gan_weight needs last_layer_weight with requires_grad=True")
    rec_grad, = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)
    gan_grad, = torch.autograd.grad(gan_loss, last_layer_weight, retain_graph=True)
    return adaptive_weight_from_grads(rec_grad, gan_grad, max_weight=max_weight, eps=eps)
