"""Ray workers that generate multi-turn rollouts from the policy, with tool calls in the sandbox."""
