"""Load and save foreign formats: upstream RAE checkpoints/statistics and diffusers AutoencoderRAE."""
from rae_scale.interop.diffusers_rae import load_diffusers_autoencoder, save_diffusers_autoencoder
from rae_scale.interop.upstream import (
    CheckpointMismatchError,
    check_state_dict,
    load_checked,
    load_stage2_checkpoint,
    load_upstream_decoder,
    save_upstream_stats,
)

__all__ = [
    "CheckpointMismatchError", "check_state_dict", "load_checked", "load_diffusers_autoencoder",
    "load_stage2_checkpoint", "load_upstream_decoder", "save_diffusers_autoencoder", "save_upstream_stats",
]
