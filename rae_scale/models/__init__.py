"""Pure nn.Modules: frozen encoders, ViT decoder, RAE, DiT models, discriminator.

Nothing here imports torch.distributed or training code; transformers is imported lazily
by the encoder builders only.
"""
from rae_scale.models.decoder import DECODER_PRESETS, ViTDecoder, build_decoder
from rae_scale.models.discriminator import DiffAug, DinoDiscriminator
from rae_scale.models.dit import DDT_HEAD, DIT_PRESETS, DiTwDDTHead, LightningDiT, build_dit
from rae_scale.models.encoders import FrozenEncoder, build_encoder
from rae_scale.models.rae import RAE, DecoderOutput, EncoderOutput

__all__ = [
    "DDT_HEAD", "DECODER_PRESETS", "DIT_PRESETS", "DecoderOutput", "DiTwDDTHead", "DiffAug",
    "DinoDiscriminator", "EncoderOutput", "FrozenEncoder", "LightningDiT", "RAE", "ViTDecoder",
    "build_decoder", "build_dit", "build_encoder",
]
