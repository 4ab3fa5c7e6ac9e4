"""Flax NNX decoder for the Llama 3, Qwen2/2.5 and Qwen3 families."""

from medjax.models.config import ModelConfig, RopeScaling
from medjax.models.decoder import Decoder, count_params

__all__ = ["Decoder", "ModelConfig", "RopeScaling", "count_params"]
