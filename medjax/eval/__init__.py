"""Benchmark evaluation: prompts, model backends (medjax/HF weights in JAX, or an OpenAI-compatible
server such as vLLM), log-likelihood and generative scoring, reports. Items and answer extraction
come from medjax.tasks, the same code the RL rewards use."""
