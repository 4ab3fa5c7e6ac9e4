"""Hugging Face <-> medjax conversion, tensor by tensor (config, weights, tokenizer files)."""


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the tensor or file and both shapes."""
