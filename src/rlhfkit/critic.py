"""Critics of the RL stages that have one (PPO; TRPO with a value baseline).

A value model is a sequence-classification copy of the policy with its own LoRA (built by the RL
stage); the cheap critic for CPUs is a linear head on the reference pass's hidden states. Either
is trained beside the policy inside one module, so the engine prepares, steps and checkpoints both.
"""

from __future__ import annotations

import torch


class ValueHead(torch.nn.Module):
    """A linear value head V = w·h + b on frozen hidden states (of the reference policy).

    The cheap critic for CPUs: its features come from the reference pass the KL needs anyway, so
    the critic costs no forward or backward pass of its own. Starts at V = 0.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features.to(self.linear.weight.dtype)).squeeze(-1).float()

    def save_pretrained(self, directory, state_dict: dict[str, torch.Tensor] | None = None, **_) -> None:
        """state_dict: the whole tensors when the head's own are sharded (FSDP)."""
        from safetensors.torch import save_file

        state = state_dict if state_dict is not None else self.state_dict()
        save_file(
            {name: value.detach().cpu().contiguous() for name, value in state.items()},
            str(directory / "value_head.safetensors"),
        )


class PolicyAndCritic(torch.nn.Module):
    """The trainable models of an RL stage; the critic is None for critic-free algorithms."""

    def __init__(self, policy: torch.nn.Module, critic: torch.nn.Module | None) -> None:
        super().__init__()
        self.policy = policy
        self.critic = critic
