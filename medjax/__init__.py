"""medjax: a JAX training stack for medical foundation models (QuarkMed recipe)."""

__version__ = "0.1.0"
