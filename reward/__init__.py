"""Scoring of rollouts for RL updates (GRPO) and reward-evaluation helpers."""
