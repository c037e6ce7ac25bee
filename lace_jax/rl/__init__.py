"""Reinforcement learning: Lattice GRPO (spec section 6, stage 3)."""
