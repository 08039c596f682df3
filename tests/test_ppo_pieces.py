"""The PPO pieces that each script holds its own copy of (CleanRL style), checked against plain references in both:
GAE against a NumPy loop with terminations and time-outs, the observation normalizer against NumPy's statistics."""

import numpy as np
import pytest
import torch

import ppo_isaac_locomotion
import ppo_isaac_reach

SCRIPTS = [ppo_isaac_locomotion, ppo_isaac_reach]


# ---------------------------------------------------------------------------------------------------------------
# GAE and the normalizer against plain references
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_gae_matches_a_plain_numpy_loop(script):
    rng = np.random.default_rng(0)
    T, N, gamma, lam = 16, 5, 0.99, 0.95
    rewards, values = rng.normal(size=(T, N)), rng.normal(size=(T, N))
    final_values, next_value = rng.normal(size=(T, N)), rng.normal(size=N)
    terminated = rng.random((T, N)) < 0.1
    truncated = (rng.random((T, N)) < 0.1) & ~terminated
    # Reference: the textbook definition, one environment and one step at a time, with the two kinds of ending
    # told apart: a fall (termination) has no future; a time-out's future is worth V(final observation).
    ref = np.zeros((T, N))
    for n in range(N):
        acc = 0.0
        for t in reversed(range(T)):
            if terminated[t, n]:
                delta, acc = rewards[t, n] - values[t, n], 0.0
            elif truncated[t, n]:
                delta, acc = rewards[t, n] + gamma * final_values[t, n] - values[t, n], 0.0
            else:
                nv = next_value[n] if t == T - 1 else values[t + 1, n]
                delta = rewards[t, n] + gamma * nv - values[t, n]
            acc = delta + gamma * lam * acc
            ref[t, n] = acc
    # The script's way: bootstrap time-outs in the reward, then GAE cut at every done.
    r = torch.tensor(rewards) + gamma * torch.tensor(final_values) * torch.tensor(truncated)
    adv, ret = script.compute_gae(
        r, torch.tensor(values), torch.tensor(terminated | truncated), torch.tensor(next_value), gamma, lam
    )
    np.testing.assert_allclose(adv.numpy(), ref, atol=1e-12)
    np.testing.assert_allclose(ret.numpy(), ref + values, atol=1e-12)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_normalizer_matches_numpy_over_concatenated_batches(script):
    rng = np.random.default_rng(1)
    batches = [rng.normal(loc=3.0, scale=s, size=(n, 7)) for n, s in [(5, 1.0), (128, 4.0), (1, 2.0), (33, 0.5)]]
    norm = script.ObservationNormalizer(7, clip=1e9)
    for b in batches:
        norm.update(torch.tensor(b, dtype=torch.float32))
    all_obs = np.concatenate(batches)
    np.testing.assert_allclose(norm.mean.numpy(), all_obs.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(norm.var.numpy(), all_obs.var(0), rtol=1e-4)
    assert norm.count.item() == len(all_obs)
    x = torch.tensor(all_obs[:3], dtype=torch.float32)
    np.testing.assert_allclose(
        norm(x).numpy(), (all_obs[:3] - all_obs.mean(0)) / np.sqrt(all_obs.var(0)), rtol=1e-3, atol=1e-4
    )
    assert script.ObservationNormalizer(7, clip=5.0).forward(torch.full((1, 7), 100.0)).max() == 5.0


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_bf16_hidden_layers_stay_close_to_float32(script):
    """--bf16 runs the hidden layers in bfloat16 (autocast) and the output layers in float32: means, values and
    log-probabilities come out as float32, within bfloat16's rounding of the float32 network, and gradients reach
    every parameter in float32."""
    torch.manual_seed(0)
    agent = script.ActorCritic(48, 12, init_noise_std=0.5)
    x, action = torch.randn(256, 48), torch.randn(256, 12)
    outputs = {}
    for bf16 in (False, True):
        agent.bf16 = bf16
        agent.zero_grad()
        _, logprob, _, value = agent.get_action_and_value(x, action)
        mean = agent.act_deterministic(x)
        (logprob.mean() + value.square().mean()).backward()
        outputs[bf16] = (mean, value, logprob, [p.grad.clone() for p in agent.parameters()])
    (mean32, value32, logprob32, grads32), (mean16, value16, logprob16, grads16) = outputs[False], outputs[True]
    for t in (mean16, value16, logprob16, *grads16):
        assert t.dtype == torch.float32
    assert not torch.equal(value16, value32), "bf16 changed nothing: the hidden layers did not run in bfloat16"
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%) per hidden activation.
    torch.testing.assert_close(mean16, mean32, rtol=0.02, atol=0.002)
    torch.testing.assert_close(value16, value32, rtol=0.02, atol=0.02)
    torch.testing.assert_close(logprob16, logprob32, rtol=0.01, atol=0.05)
    for g16, g32 in zip(grads16, grads32):
        assert torch.isfinite(g16).all()
        assert torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.99


# ---------------------------------------------------------------------------------------------------------------
# The loss and the learning-rate schedule as rsl_rl has them; wall time from the script's first line
# ---------------------------------------------------------------------------------------------------------------
def tiny_rollout(script, T=4, N=8, seed=0):
    torch.manual_seed(seed)
    agent = script.ActorCritic(5, 3, hidden=(16, 16))
    storage = script.RolloutStorage.allocate(T, N, 5, 3, "cpu")
    storage.obs.normal_()
    with torch.no_grad():
        actions, logprobs = agent.get_action(storage.obs.view(T * N, 5))
        storage.actions.copy_(actions.view(T, N, 3))
        storage.logprobs.copy_((logprobs + 0.05 * torch.randn(T * N)).view(T, N))  # a policy that moved a little
        storage.values.copy_(agent.get_value(storage.obs.view(T * N, 5)).view(T, N))
    storage.returns.normal_()
    storage.advantages.normal_()
    return agent, storage


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_value_loss_is_rsl_rls(script):
    """rsl_rl's PPO: value loss = mean(max((V - R)^2, (V_clipped - R)^2)), with no factor 0.5 (CleanRL's has one)."""
    agent, storage = tiny_rollout(script)
    args = script.Args(clip_coef=0.2)
    mb = torch.arange(storage.rewards.numel())
    _, stats = script.ppo_loss(agent, storage, mb, args)
    with torch.no_grad():
        v = agent.get_value(storage.obs.view(-1, 5))
        old, ret = storage.values.flatten(), storage.returns.flatten()
        clipped = old + (v - old).clamp(-0.2, 0.2)
        expected = torch.max((v - ret).square(), (clipped - ret).square()).mean()
    torch.testing.assert_close(stats[0], expected)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_learning_rate_adapts_before_the_minibatchs_own_step(script):
    """rsl_rl sets the learning rate from a minibatch's KL before that minibatch's optimizer step: with a KL far
    above twice the target, the step is taken at lr / 1.5 (Adam's first step moves each weight by about its rate)."""
    steps = {}
    for adapt in (True, False):
        agent, storage = tiny_rollout(script)
        lr = 1e-3 if adapt else 1e-3 / 1.5
        args = script.Args(desired_kl=1e-9 if adapt else 0.0, max_grad_norm=1e9)
        # foreach=False: a tensor learning rate, as the scripts keep it, needs the single-tensor path on the CPU
        optimizer = torch.optim.Adam(agent.parameters(), lr=torch.tensor(lr), eps=1e-5, foreach=False)
        before = [p.detach().clone() for p in agent.parameters()]
        mb = torch.arange(storage.rewards.numel())
        script.ppo_minibatch_update(agent, optimizer, storage, mb, torch.zeros(6), args)
        steps[adapt] = [p.detach() - b for p, b in zip(agent.parameters(), before)]
        if adapt:
            assert optimizer.param_groups[0]["lr"].item() == pytest.approx(1e-3 / 1.5)
    for a, b in zip(steps[True], steps[False]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)  # lr * (1 / 1.5) against lr / 1.5: rounding


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_wall_time_counts_from_the_scripts_first_line(script):
    """PROCESS_START is taken before any import but `time` (and `from __future__`): figures include the imports."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(script.__file__).read_text())
    first = []
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):  # the docstring
            continue
        first.append(node)
        if isinstance(node, ast.Assign):
            break
    names = [ast.unparse(n) for n in first]
    assert names == ["from __future__ import annotations", "import time", "PROCESS_START = time.time()"], names
