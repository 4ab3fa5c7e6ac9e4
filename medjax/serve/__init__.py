"""Generation from checkpoints and vLLM serving of exported models."""
