"""Flow-matching transport, samplers and guidance; the network is a plain callable model(x, t, y)."""
from .guidance import autoguidance, classifier_free_guidance, guided_velocity
from .sampling import per_sample_noise, sample_ode, sample_sde, time_grid
from .transport import Transport, shift_from_dim, time_shift

__all__ = [
    "Transport", "shift_from_dim", "time_shift",
    "sample_ode", "sample_sde", "time_grid", "per_sample_noise",
    "classifier_free_guidance", "autoguidance", "guided_velocity",
]
