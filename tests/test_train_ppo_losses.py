"""medgpt.train.ppo_losses do what the papers say: generalised advantage estimates sum discounted future rewards,
the adaptive KL controller (Ziegler et al. 2019) moves towards its target, and the clipped policy and value losses
(Schulman et al. 2017) ignore padding and clip large ratios."""

from __future__ import annotations

import pytest
import torch
from _stage_runs import ppo_config

from medgpt.train import ppo, ppo_losses


def test_gae_sums_discounted_future_rewards():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.25, 0.0, 0.0]])
    # gamma = lam = 1: the advantage is the return from t minus V(s_t)
    assert ppo_losses.gae(rewards, values, 1.0, 1.0).tolist() == [[0.5, 0.75, 1.0, 0.0]]
    # lam = 0: the one-step TD error r_t + gamma V(s_t+1) - V(s_t)
    assert ppo_losses.gae(rewards, values, 0.5, 0.0).tolist() == [[-0.375, -0.25, 1.0, 0.0]]


def test_adaptive_kl_controller_moves_towards_the_target(sample_data, tmp_path):
    args = ppo_config("unused", tmp_path, sample_data, adaptive_kl=True, target_kl=2.0, horizon=100).train
    controller = ppo_losses.KLController(args, 0.1)
    controller.update(kl=4.0, n_responses=10)  # too far from the reference: penalise more (by at most 20%)
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    controller.update(kl=1.0, n_responses=10)
    assert controller.value < 0.1 * (1 + 0.2 * 10 / 100)
    fixed = ppo_losses.KLController(ppo_config("unused", tmp_path, sample_data).train, 0.1)
    fixed.update(kl=40.0, n_responses=10)
    assert fixed.value == 0.1


def test_clipped_losses_ignore_padding_and_clip_large_ratios(sample_data, tmp_path):
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    batch = ppo.Rollout(input_ids=None, attention_mask=None, responses=None, mask=mask, scores=None,
                        logprobs=torch.zeros(1, 3), values=torch.zeros(1, 3),
                        advantages=torch.tensor([[1.0, -1.0, 5.0]]), returns=torch.tensor([[1.0, 1.0, 9.0]]))
    args = ppo_config("unused", tmp_path, sample_data).train
    # ratio e^1 on both tokens: the positive advantage is clipped at 1.2, the negative one is not
    losses = ppo_losses.ppo_losses(batch, torch.tensor([[1.0, 1.0, 7.0]]), torch.tensor([[0.0, 0.0, 3.0]]), args)
    assert losses["policy_loss"].item() == pytest.approx((-1.2 + torch.e) / 2)
    assert losses["clip_frac"].item() == pytest.approx(0.5)
    assert losses["value_loss"].item() == pytest.approx(0.5)
