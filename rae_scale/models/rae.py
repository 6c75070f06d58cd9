"""Representation Autoencoder: frozen encoder, latent normalisation, trainable decoder.

Order of operations (rae_method.md 1.1-1.4): encoder tokens -> (training only) noise
sigma = noise_tau * U(0, 1) per sample -> [B, C, h, w] -> (z - mean) / sqrt(var + eps).
Decoding inverts the normalisation, runs the ViT decoder and de-standardises pixels with
the encoder's mean/std. Outputs are not clamped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rae_scale.models.decoder import ViTDecoder
from rae_scale.models.encoders import FrozenEncoder, tokens_to_grid


LATENT_EPS = 1e-5  # upstream's eps in sqrt(var + eps)


def normalize_latent(z: torch.Tensor, mean: torch.Tensor | None, var: torch.Tensor | None,
                     eps: float = LATENT_EPS) -> torch.Tensor:
    """(z - mean) / sqrt(var + eps); a missing statistic is the identity (upstream's DINOv2-B has no mean)."""
    if mean is not None:
        z = z - mean.to(z.dtype)
    if var is not None:
        z = z / torch.sqrt(var + eps).to(z.dtype)
    return z


def denormalize_latent(z: torch.Tensor, mean: torch.Tensor | None, var: torch.Tensor | None,
                       eps: float = LATENT_EPS) -> torch.Tensor:
    """The inverse of :func:`normalize_latent`."""
    if var is not None:
        z = z * torch.sqrt(var + eps).to(z.dtype)
    if mean is not None:
        z = z + mean.to(z.dtype)
    return z


@dataclass
class EncoderOutput:
    latent: torch.Tensor


@dataclass
class DecoderOutput:
    sample: torch.Tensor


class RAE(nn.Module):
    """encode(x).latent / decode(z).sample, as diffusers' AutoencoderRAE."""

    def __init__(
        self,
        encoder: FrozenEncoder | None,
        decoder: ViTDecoder,
        *,
        noise_tau: float = 0.0,
        latent_mean: torch.Tensor | None = None,
        latent_var: torch.Tensor | None = None,
        eps: float = LATENT_EPS,
        image_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    ):
        """``encoder=None`` builds an RAE that only decodes (stage 2 on a latent cache, sampling): no
        encoder weights are read, and ``image_stats`` (the encoder's pixel mean and std) must be given."""
        super().__init__()
        if encoder is not None and decoder.latent_dim != encoder.hidden_size:
            raise ValueError(
                f"decoder latent_dim {decoder.latent_dim} != encoder hidden size {encoder.hidden_size}"
            )
        if encoder is None and image_stats is None:
            raise ValueError("an RAE without its encoder needs image_stats (the encoder's pixel mean and std)")
        if noise_tau < 0:
            raise ValueError(f"noise_tau must be >= 0, got {noise_tau}")
        self.encoder = encoder
        self.decoder = decoder
        self.noise_tau = float(noise_tau)
        self.eps = eps
        mean, std = ((encoder.image_mean, encoder.image_std) if encoder is not None
                     else (torch.tensor(s, dtype=torch.float32).view(1, 3, 1, 1) for s in image_stats))
        # the pixel statistics decoding de-standardises with; non-persistent, as the encoder's own
        self.register_buffer("image_mean", mean.detach().clone(), persistent=False)
        self.register_buffer("image_std", std.detach().clone(), persistent=False)
        self.register_buffer("latent_mean", None)
        self.register_buffer("latent_var", None)
        self.set_latent_stats(latent_mean, latent_var)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint with statistics must load into an RAE built without them.
        for name in ("latent_mean", "latent_var"):
            key = prefix + name
            if key in state_dict and self._buffers[name] is None:
                self._buffers[name] = torch.empty_like(state_dict[key], dtype=torch.float32)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        if self.encoder is not None:
            return self.encoder.latent_shape
        grid = int(round(self.decoder.num_patches ** 0.5))
        return (self.decoder.latent_dim, grid, grid)

    def set_latent_stats(self, mean: torch.Tensor | None, var: torch.Tensor | None) -> None:
        """Install statistics broadcastable to [C, H, W]; None means identity (mean 0 / var 1)."""
        for name, value in (("mean", mean), ("var", var)):
            if value is not None and value.dim() > 3:
                raise ValueError(f"latent {name} must broadcast to [C, H, W], got shape {tuple(value.shape)}")
        ref = self.decoder.decoder_embed.weight
        self.latent_mean = None if mean is None else mean.detach().to(ref.device, torch.float32).clone()
        self.latent_var = None if var is None else var.detach().to(ref.device, torch.float32).clone()

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return normalize_latent(z, self.latent_mean, self.latent_var, self.eps)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return denormalize_latent(z, self.latent_mean, self.latent_var, self.eps)

    _tokens_to_map = staticmethod(tokens_to_grid)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> EncoderOutput:
        """Images in [0, 1] -> normalised latent; latent noise only in training mode."""
        if self.encoder is None:
            raise RuntimeError("this RAE was built without its encoder (for decoding only); build it with the "
                               "encoder to encode images")
        tokens = self.encoder(x)
        if self.training and self.noise_tau > 0:
            b = tokens.shape[0]
            sigma = self.noise_tau * torch.rand(
                (b, 1, 1), generator=generator, device=tokens.device, dtype=tokens.dtype
            )
            noise = torch.randn(tokens.shape, generator=generator, device=tokens.device, dtype=tokens.dtype)
            tokens = tokens + sigma * noise
        return EncoderOutput(latent=self.normalize(self._tokens_to_map(tokens)))

    def decode(self, z: torch.Tensor) -> DecoderOutput:
        """Normalised latent [B, C, h, w] -> image [B, 3, H, W] in about [0, 1]."""
        z = self.denormalize(z)
        tokens = z.flatten(2).transpose(1, 2)
        pixels = self.decoder.unpatchify(self.decoder(tokens))
        mean, std = self.image_mean.to(pixels.dtype), self.image_std.to(pixels.dtype)
        return DecoderOutput(sample=pixels * std + mean)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruction decode(encode(x)); noise-augmented when training."""
        return self.decode(self.encode(x, generator=generator).latent).sample
