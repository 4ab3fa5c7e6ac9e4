"""Data: tokenizers, record sources, Grain pipelines (packing, sharding), bundled synthetic data."""


class DataError(ValueError):
    """Bad input data; the message names the file and line (or path) at fault."""
