"""Verifiable reinforcement learning: rollouts, rewards, group advantages, the policy-gradient loss."""
