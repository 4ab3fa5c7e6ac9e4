"""Flax NNX decoder for the Llama 3, Qwen2/2.5 and Qwen3 families.

The decoder is imported on first use, not with the package: `medjax.config` reads
`medjax.models.config`, and the CLI must be able to set JAX_PLATFORMS before anything imports jax.
"""

from medjax.models.config import ModelConfig, RopeScaling

__all__ = ["Decoder", "ModelConfig", "RopeScaling", "count_params"]


def __getattr__(name: str):
    if name in ("Decoder", "count_params"):
        from medjax.models import decoder

        return getattr(decoder, name)
    raise AttributeError(f"module 'medjax.models' has no attribute {name!r}")
