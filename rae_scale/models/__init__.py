"""Pure nn.Modules: frozen encoders, ViT decoder, RAE, DiT models, discriminator.

Nothing here imports torch.distributed or training code; transformers is imported lazily
by the encoder builders only.
"""
from rae_scale.models.decoder import build_decoder
from rae_scale.models.discriminator import DiffAug, DinoDiscriminator
from rae_scale.models.dit import DIT_PRESETS, DiTwDDTHead, LightningDiT, build_dit
from rae_scale.models.encoders import build_encoder
from rae_scale.models.rae import RAE

__all__ = [
    "DIT_PRESETS", "DiTwDDTHead", "DiffAug", "DinoDiscriminator", "LightningDiT", "RAE", "build_decoder",
    "build_dit", "build_encoder",
]
