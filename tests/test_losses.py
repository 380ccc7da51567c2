"""Losses against values computed by hand, and a few optimizer steps that must move the margin."""

import math

import torch

import pytest

from dualfw.core.losses import DPO, PairLogps, SimPO, chosen_nll, dpo_loss, simpo_loss


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_simpo_against_hand_computed_value():
    # beta=2, gamma=0.5; chosen: -64 over 64 tokens (-1/token), rejected: -128 over 64 (-2/token)
    # inside = 2*(-1) - 2*(-2) - 0.5 = 1.5
    loss = simpo_loss(torch.tensor([-64.0]), torch.tensor([-128.0]), torch.tensor([64.0]), torch.tensor([64.0]), 2.0, 0.5)
    assert math.isclose(loss.item(), -math.log(_sigmoid(1.5)), rel_tol=1e-6)


def test_simpo_normalises_by_each_length():
    # chosen -30 over 10 tokens (-3), rejected -40 over 20 (-2): inside = 1*(-3) - 1*(-2) - 0 = -1
    loss = simpo_loss(torch.tensor([-30.0]), torch.tensor([-40.0]), torch.tensor([10.0]), torch.tensor([20.0]), 1.0, 0.0)
    assert math.isclose(loss.item(), -math.log(_sigmoid(-1.0)), rel_tol=1e-6)


def test_dpo_against_hand_computed_value():
    # policy: -10 vs -12, reference: -11 vs -11 -> [(-10+11) - (-12+11)] = 2; beta 0.1 -> 0.2
    loss = dpo_loss(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]), 0.1)
    assert math.isclose(loss.item(), -math.log(_sigmoid(0.2)), rel_tol=1e-6)
    # identical policy and reference: ln 2, the known stall value
    same = dpo_loss(torch.tensor([-5.0]), torch.tensor([-7.0]), torch.tensor([-5.0]), torch.tensor([-7.0]), 0.1)
    assert math.isclose(same.item(), math.log(2), rel_tol=1e-6)


def test_loss_classes_wrap_the_functions_and_margins_agree_in_sign():
    pairs = PairLogps(
        chosen=torch.tensor([-10.0, -20.0]),
        rejected=torch.tensor([-12.0, -10.0]),
        chosen_len=torch.tensor([10.0, 10.0]),
        rejected_len=torch.tensor([10.0, 10.0]),
        ref_chosen=torch.tensor([-11.0, -20.0]),
        ref_rejected=torch.tensor([-11.0, -20.0]),
    )
    simpo = SimPO(beta=2.0, gamma=0.1)
    assert torch.allclose(simpo(pairs), -torch.nn.functional.logsigmoid(simpo.implicit_margin(pairs)))
    dpo = DPO(beta=0.5)
    assert dpo.needs_reference and not simpo.needs_reference
    assert torch.allclose(dpo(pairs), -torch.nn.functional.logsigmoid(dpo.implicit_margin(pairs)))
    assert (dpo.implicit_margin(pairs) > 0).tolist() == [True, False]
    # pair accuracy: SimPO's target margin is not part of the reward (-1.0/token beats -1.2/token)
    big_gamma = SimPO(beta=2.0, gamma=5.0)
    assert big_gamma.prefers_chosen(pairs).tolist() == [True, False]
    assert (big_gamma.implicit_margin(pairs) < 0).all()


def _policy(tiny_folder, loss):
    from dualfw.adapters.janus import JanusAdapter
    from dualfw.training.policy import Policy

    return Policy(JanusAdapter(path=str(tiny_folder)), loss=loss)


def _fixed_pairs(policy):
    from dualfw.core.interface import ImageSampling
    from dualfw.core.selfreward import Group

    prompts = ["a red circle", "two blue squares"]
    tokens = policy.model.sample_images(prompts, k=2, sampling=ImageSampling(), seed=3)
    pairs = torch.tensor([[0, 0, 1], [1, 0, 1]])
    return Group("t2i", torch.tensor([[1.0, 0.0], [1.0, 0.0]]), pairs, prompts=prompts, image_tokens=tokens)


def _margin(policy, group):
    from dualfw.core.selfreward import sequence_logps

    with torch.no_grad():
        n = len(group.pairs)
        logps, lengths = sequence_logps(policy.model, group, torch.cat([group.pairs[:, [0, 1]], group.pairs[:, [0, 2]]]))
        pairs = PairLogps(logps[:n], logps[n:], lengths[:n], lengths[n:])
        if policy.reference is not None:
            ref, _ = policy.reference.sequence_logps(group, torch.cat([group.pairs[:, [0, 1]], group.pairs[:, [0, 2]]]))
            pairs.ref_chosen, pairs.ref_rejected = ref[:n], ref[n:]
        return policy.loss.implicit_margin(pairs).mean().item()


def test_a_few_optimizer_steps_raise_the_chosen_vs_rejected_margin(tiny_folder):
    for loss in (SimPO(beta=2.0, gamma=0.5), DPO(beta=0.1)):
        policy = _policy(tiny_folder, loss)
        batch = _fixed_pairs(policy)
        optimizer = torch.optim.AdamW(policy.model.parameters(), lr=1e-3)
        before = _margin(policy, batch)
        losses = []
        for _ in range(5):
            value, _ = policy.direction_loss(batch)
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            losses.append(value.item())
        after = _margin(policy, batch)
        assert after > before + 0.1, (type(loss).__name__, before, after)
        assert losses[-1] < losses[0]


def test_chosen_nll_term_adds_its_weight_times_the_chosen_per_token_nll(tiny_folder):
    from dualfw.core.errors import ConfigError
    from dualfw.adapters.janus import JanusAdapter
    from dualfw.training.policy import Policy
    from dualfw.core.selfreward import sequence_logps

    plain = Policy(JanusAdapter(path=str(tiny_folder)), loss=SimPO())
    anchored = Policy(JanusAdapter(path=str(tiny_folder)), loss=SimPO(), chosen_nll_weight=0.5)
    group = _fixed_pairs(plain)
    with torch.no_grad():
        base_loss, _ = plain.direction_loss(group)
        total, stats = anchored.direction_loss(group)
        logps, lengths = sequence_logps(plain.model, group, group.pairs[:, [0, 1]])
    expected_nll = (-logps / lengths).mean()
    assert torch.allclose(stats["chosen_nll"], expected_nll, atol=1e-5)
    assert torch.allclose(total, base_loss + 0.5 * expected_nll, atol=1e-5)
    assert torch.allclose(stats["loss"], base_loss, atol=1e-6)  # the stall check sees the pair loss only
    assert torch.equal(chosen_nll(torch.tensor([-6.0]), torch.tensor([3.0])), torch.tensor([2.0]))
    with pytest.raises(ConfigError, match="chosen_nll_weight"):
        Policy(JanusAdapter(path=str(tiny_folder)), chosen_nll_weight=-1.0)


def test_chosen_nll_loss_learns_the_chosen_sample_only():
    from dualfw.core.losses import ChosenNLL

    chosen = torch.tensor([-6.0, -2.0], requires_grad=True)
    rejected = torch.tensor([-1.0, -9.0], requires_grad=True)
    pairs = PairLogps(chosen, rejected, torch.tensor([3.0, 2.0]), torch.tensor([1.0, 3.0]))
    loss = ChosenNLL()(pairs)
    assert torch.allclose(loss, torch.tensor([2.0, 1.0]))
    loss.sum().backward()
    assert torch.allclose(chosen.grad, torch.tensor([-1 / 3, -1 / 2])) and rejected.grad is None
    assert ChosenNLL().prefers_chosen(pairs).tolist() == [False, True]  # -2 < -1 per token; -1 > -3


def test_guided_logps_train_the_cfg_distribution_for_policy_and_reference(tiny_folder):
    """guided_logps: the pair loss reads log-probs under the group's sampling CFG scale, for the policy
    and the Reference alike; without it, the conditional model's."""
    from dualfw.adapters.janus import JanusAdapter
    from dualfw.training.policy import Policy

    policy = Policy(JanusAdapter(path=str(tiny_folder)), loss=DPO(beta=0.1), guided_logps=True)
    plain = Policy(JanusAdapter(path=str(tiny_folder)), loss=DPO(beta=0.1))
    group = _fixed_pairs(policy)
    group.guidance_scale = 3.0
    chosen = group.image_tokens[group.pairs[:, 0], group.pairs[:, 1]]
    prompts = [group.prompts[r] for r in group.pairs[:, 0].tolist()]
    with torch.no_grad():
        guided = policy.model.image_logprobs(prompts, chosen, 3.0).sum(-1)
        cond = policy.model.image_logprobs(prompts, chosen).sum(-1)
        _, stats = policy.direction_loss(group)
        _, plain_stats = plain.direction_loss(group)
    n = policy.model.num_image_tokens
    assert torch.allclose(stats["logp_chosen"], (guided / n).mean(), atol=1e-4)
    assert torch.allclose(plain_stats["logp_chosen"], (cond / n).mean(), atol=1e-4)
    assert not torch.allclose(guided, cond, atol=1e-2)
    # the Reference is the initial model: at the start the DPO margin is 0 in both modes
    assert abs(float(stats["loss"]) - math.log(2)) < 1e-5
    value, _ = policy.direction_loss(group)
    value.backward()  # gradients reach the weights through the guided log-probs
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.model.parameters())
