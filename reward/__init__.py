"""Rewards and their analysis: reward functions (a registry, composites), group advantages,
metrics (pass@k and friends) and loading run directories. No Ray, and no torch at import.
"""

from reward.advantages import group_advantages, trajectory_advantages
from reward.analysis import latest_run, load_run, render_trajectory
from reward.composite import CompositeReward, make_reward
from reward.metrics import pass_at_k, pass_at_k_curve, summarize
from reward.registry import RewardFunction, get_reward, list_rewards, register_reward

__all__ = [
    "CompositeReward",
    "RewardFunction",
    "get_reward",
    "group_advantages",
    "latest_run",
    "list_rewards",
    "load_run",
    "make_reward",
    "pass_at_k",
    "pass_at_k_curve",
    "register_reward",
    "render_trajectory",
    "summarize",
    "trajectory_advantages",
]
