"""Stage-1 losses: LPIPS, GAN losses, the adaptive GAN weight."""
from .gan import (adaptive_gan_weight, adaptive_weight_from_grads, d_loss_fn, g_loss_fn, hinge_d_loss,
                  vanilla_d_loss, vanilla_g_loss)
from .perceptual import build_lpips

__all__ = ["hinge_d_loss", "vanilla_d_loss", "vanilla_g_loss", "adaptive_gan_weight",
           "adaptive_weight_from_grads", "d_loss_fn", "g_loss_fn", "build_lpips"]
