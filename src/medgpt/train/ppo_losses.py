"""PPO's formulas: masked means and whitening over response tokens, generalised advantage estimates, the KL
controller (fixed or adaptive, Ziegler et al. 2019) and the clipped policy and value losses (Schulman et al.
2017). The loop that uses them is `medgpt.train.ppo`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from medgpt.train.ppo import PPOConfig, Rollout


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimates; padding has zero value and reward, so it adds nothing."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages


class KLController:
    """Fixed kl_coef, or the adaptive controller of Ziegler et al. that steers the KL towards target_kl."""

    def __init__(self, args: PPOConfig, value: float) -> None:
        self.value, self.args = value, args

    def update(self, kl: float, n_responses: int) -> None:
        if self.args.adaptive_kl:
            error = max(-0.2, min(0.2, kl / self.args.target_kl - 1))
            self.value *= 1 + error * n_responses / self.args.horizon


def ppo_losses(batch: Rollout, logprobs: torch.Tensor, values: torch.Tensor, args: PPOConfig) -> dict[str, Any]:
    """Clipped surrogate policy loss and clipped value loss (Schulman et al. 2017), over response tokens."""
    mask = batch.mask
    clipped_values = batch.values + (values - batch.values).clamp(-args.cliprange_value, args.cliprange_value)
    unclipped_error, clipped_error = (values - batch.returns) ** 2, (clipped_values - batch.returns) ** 2
    ratio = torch.exp(logprobs - batch.logprobs)
    pg_losses = -batch.advantages * ratio
    pg_clipped = -batch.advantages * ratio.clamp(1 - args.cliprange, 1 + args.cliprange)
    with torch.no_grad():
        stats = {"clip_frac": masked_mean((pg_clipped > pg_losses).float(), mask),
                 "approx_kl": 0.5 * masked_mean((logprobs - batch.logprobs) ** 2, mask),
                 "value_clip_frac": masked_mean((clipped_error > unclipped_error).float(), mask)}
    return {"policy_loss": masked_mean(torch.max(pg_losses, pg_clipped), mask),
            "value_loss": 0.5 * masked_mean(torch.max(unclipped_error, clipped_error), mask), **stats}
