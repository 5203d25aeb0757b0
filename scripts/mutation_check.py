"""Mutation check of the equations: every one-line mutant below must make a fast test of its stage fail.

Each mutant replaces one line's text (``old`` -> ``new``) in a production file. For each, the repository (the
files git tracks or would track) is copied to a temporary folder, the mutant applied there, and the stage's fast
tests run with ``pytest -x -q``; a failing test "kills" the mutant, a mutant whose tests all pass "survives".
The unmutated copy must pass the same tests first. The check fails loudly when an ``old`` text does not occur
exactly once (the list cannot silently rot when the code changes) or a mutant does not compile.

    python scripts/mutation_check.py                  # every mutant: a table, exit status 1 if one survives
    python scripts/mutation_check.py --list           # the mutants, one a line
    python scripts/mutation_check.py --only eq5-momentum-swapped --only td3bc-lambda-abs-of-mean

Slow (minutes per stage on a 2-core CPU): run it before a release, not in CI. A persistent XLA compilation
cache shared by the runs lets the unmutated programs compile once.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The fast tests of each stage, the cheapest first (pytest -x stops at the first failure).
TESTS = {
    "cluster": [
        "tests/test_cluster.py::test_e_step_posterior_matches_numpy",
        "tests/test_cluster.py::test_m_step_loss_matches_numpy",
        "tests/test_cluster.py::test_classifier_kl_matches_numpy",
        "tests/test_equations_cluster.py",
        "tests/test_cluster.py::test_main_runs_the_heuristics_momentum_and_final_assignment_of_algorithm_1",
    ],
    "ppo": [
        "tests/test_ppo.py::test_mc_returns_match_a_numpy_loop_with_episode_boundaries",
        "tests/test_ppo.py::test_sarsa_target_terminal_timeout_and_cluster_head",
        "tests/test_ppo.py::test_ppo_surrogate_matches_numpy",
        "tests/test_equations_ppo.py",
        "tests/test_ppo.py::test_each_clusters_policy_moves_toward_its_own_better_action",
    ],
    "highlevel": [
        "tests/test_highlevel.py::test_n_step_returns_match_a_numpy_loop_with_terminals_and_timeouts",
        "tests/test_highlevel.py::test_expectile_loss_and_value_loss_match_numpy",
        "tests/test_highlevel.py::test_in_distribution_and_high_level_action_on_hand_made_values",
        "tests/test_equations_highlevel.py",
        "tests/test_highlevel.py::test_target_network_is_copied_every_n_h_steps_and_fixed_in_between",
        "tests/test_highlevel.py::test_pi_h_learns_the_better_cluster_of_each_region",
    ],
    "baselines": [
        "tests/test_td3_bc.py::test_smoothed_target_action_clips_the_noise_then_the_action",
        "tests/test_td3_bc.py::test_critic_target_takes_the_min_of_the_twins_and_stops_at_terminals",
        "tests/test_td3_bc.py::test_actor_loss_normalises_q_by_a_constant_lambda_and_adds_the_bc_term",
        "tests/test_td3_bc.py::test_polyak_moves_the_target_by_tau",
        "tests/test_bc.py::test_bc_loss_and_its_gradient_match_numpy",
        "tests/test_equations_baselines.py",
        "tests/test_td3_bc.py::test_actor_and_targets_move_only_on_every_second_critic_step",
    ],
    "iql": [
        "tests/test_iql.py::test_expectile_loss_weighs_tau_above_and_one_minus_tau_below",
        "tests/test_iql.py::test_value_loss_regresses_v_on_the_min_of_the_twin_targets_held_fixed",
        "tests/test_iql.py::test_q_target_stops_at_terminals_and_the_critic_loss_sums_the_twins",
        "tests/test_iql.py::test_awr_weights_are_exp_beta_advantage_clipped_and_weight_the_log_prob",
        "tests/test_iql.py::test_polyak_moves_the_target_by_tau",
        "tests/test_iql.py::test_actor_has_a_clipped_state_independent_log_std_and_a_bounded_mean",
        "tests/test_iql.py::test_the_actor_lr_decays_by_a_cosine_to_zero_and_the_critics_do_not",
        "tests/test_iql.py::test_reward_scale_is_1000_over_the_range_of_trajectory_returns",
        "tests/test_equations_baselines.py::test_iql_step_matches_numpy",
    ],
    "behaviour": [
        "tests/test_sac.py::test_tanh_gaussian_log_prob_is_the_change_of_variables",
        "tests/test_sac.py::test_soft_critic_target_takes_the_min_of_the_twins_minus_alpha_log_pi_and_stops_at_terminals",
        "tests/test_sac.py::test_critic_loss_sums_the_twins_mses_and_holds_the_target",
        "tests/test_sac.py::test_actor_loss_is_alpha_log_pi_minus_the_min_q_with_alpha_held",
        "tests/test_sac.py::test_temperature_loss_moves_log_alpha_towards_the_target_entropy",
        "tests/test_sac.py::test_polyak_moves_the_target_by_tau",
        "tests/test_sac.py::test_actor_clips_log_std_and_splits_its_heads",
        "tests/test_sac.py::test_insert_wraps_around_the_capacity",
        "tests/test_sac.py::test_one_update_matches_numpy",
    ],
}
STAGE_OF_FILE = {"empo_cluster.py": "cluster", "empo_ppo.py": "ppo", "empo_highlevel.py": "highlevel",
                 "baselines/td3_bc.py": "baselines", "baselines/bc.py": "baselines", "behaviour/sac.py": "behaviour",
                 "baselines/iql.py": "iql"}


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    what: str


MUTANTS = [
    # --- stage 1: Algorithm 1 ---
    Mutant("eq3-normalise-over-trajectories", "empo_cluster.py",
           "loglik - jax.nn.logsumexp(loglik, axis=1, keepdims=True), loglik",
           "loglik - jax.nn.logsumexp(loglik, axis=0, keepdims=True), loglik",
           "E-step posterior normalised over trajectories instead of clusters"),
    Mutant("eq6-unweighted", "empo_cluster.py",
           "return -jnp.mean(jnp.sum(weights * log_probs, axis=1))  # Eq. (4), Eq. (6)",
           "return -jnp.mean(jnp.sum(log_probs, axis=1)) / weights.shape[1]  # Eq. (4), Eq. (6)",
           "M-step with uniform weights instead of Q(z|tau)"),
    Mutant("eq6-weights-by-row", "empo_cluster.py",
           "weights = q[data.episode_ids[idx]]  # [B, K]", "weights = q[idx]  # [B, K]",
           "M-step weights looked up by row instead of by the row's trajectory"),
    Mutant("eq5-momentum-swapped", "empo_cluster.py",
           "q = args.momentum * q_prev + (1.0 - args.momentum) * jnp.exp(log_post)",
           "q = (1.0 - args.momentum) * q_prev + args.momentum * jnp.exp(log_post)",
           "mu and 1 - mu swapped in Eq. (5)"),
    Mutant("eq5-m-step-on-old-q", "empo_cluster.py",
           "state, metrics = m_epoch(state, q, key, data)", "state, metrics = m_epoch(state, q_prev, key, data)",
           "the EM epoch's M-step weighted by Q^(k-1) instead of Q^(k)"),
    Mutant("classifier-reverse-kl", "empo_cluster.py",
           "return jnp.mean(entropy_term - jnp.sum(weights * log_q, axis=1))  # KL(Q || q)",
           "return jnp.mean(jnp.sum(jnp.exp(log_q) * (log_q - jnp.log(weights + 1e-6)), axis=1))  # KL(Q || q)",
           "classifier loss KL(q || Q) instead of KL(Q || q)"),
    Mutant("eq7-eq8-phases-swapped", "empo_cluster.py",
           'q = q_bias if phase == "bias" else q_uniform  # Eq. (8) / Eq. (7)',
           'q = q_uniform if phase == "bias" else q_bias  # Eq. (8) / Eq. (7)',
           "uniform Q in the N_b epochs and the random split in the N_p epochs"),
    Mutant("eq7-momentum-starts-from-split", "empo_cluster.py",
           "q = q_uniform  # Q^(0) = 1/K (Eq. 7) is where the momentum of Eq. (5) starts",
           "q = q_bias  # Q^(0) = 1/K (Eq. 7) is where the momentum of Eq. (5) starts",
           "the momentum of the EM epochs starts from Q^(-1) instead of Q^(0) = 1/K"),
    Mutant("eq9-argmin", "empo_cluster.py",
           "assignments = posterior.argmax(-1).astype(np.int32)", "assignments = posterior.argmin(-1).astype(np.int32)",
           "assignments by argmin of the posterior"),
    # --- stage 2: Algorithm 2 ---
    Mutant("eq10-no-discount", "empo_ppo.py",
           "a = gamma * (1.0 - last.astype(rewards.dtype))", "a = 1.0 - last.astype(rewards.dtype)",
           "Monte-Carlo return without gamma"),
    Mutant("eq10-across-trajectories", "empo_ppo.py",
           "a = gamma * (1.0 - last.astype(rewards.dtype))", "a = gamma * jnp.ones_like(rewards)",
           "Monte-Carlo return that runs on into the next trajectory"),
    Mutant("eq11-online-bootstrap", "empo_ppo.py",
           "q_next = q_net.apply(state.q_target,", "q_next = q_net.apply(state.q,",
           "SARSA target from the online network psi instead of psi_bar"),
    Mutant("eq11-bootstrap-after-terminal", "empo_ppo.py",
           "return rewards + gamma * bootstrap * select(q_next, z)  # Eq. (11)",
           "return rewards + gamma * select(q_next, z)  # Eq. (11)",
           "SARSA target bootstraps past a terminal"),
    Mutant("eq11-gamma-1", "empo_ppo.py",
           "target = sarsa_target(data.rewards[idx], data.bootstrap[idx], q_next, z, args.gamma)  # [B]",
           "target = sarsa_target(data.rewards[idx], data.bootstrap[idx], q_next, z, 1.0)  # [B]",
           "SARSA step without the discount"),
    Mutant("eq11-head-0", "empo_ppo.py",
           "z = run.assign[idx]  # [B]; A(s', a') = A(s, a) inside a trajectory",
           "z = jnp.zeros_like(run.assign[idx])  # [B]; A(s', a') = A(s, a) inside a trajectory",
           "SARSA trains head 0 on every row"),
    Mutant("eq12-head-0", "empo_ppo.py",
           "lambda p: v_loss(select(v_net.apply(p, data.obs[idx]), run.assign[idx]), data.returns[idx])",
           "lambda p: v_loss(select(v_net.apply(p, data.obs[idx]), 0 * run.assign[idx]), data.returns[idx])",
           "V regressed with head 0 on every row"),
    Mutant("eq13-tau-swapped", "empo_ppo.py",
           "(1 - args.q_target_rate) * t + args.q_target_rate * p",
           "args.q_target_rate * t + (1 - args.q_target_rate) * p",
           "tau_Q and 1 - tau_Q swapped in the target update"),
    Mutant("eq13-every-step", "empo_ppo.py",
           "refresh = (q_step % args.q_target_every) == 0", "refresh = q_step > 0",
           "target network updated every step instead of every n_Q"),
    Mutant("eq14-advantage-head-0", "empo_ppo.py",
           "v_net.apply(state.v, obs), z)", "v_net.apply(state.v, obs), jnp.zeros_like(z))",
           "PPO advantage from cluster head 0 for every row"),
    Mutant("eq14-policy-head-0", "empo_ppo.py",
           "return policy.apply(jax.tree.map(lambda p: p[z[0]], params), obs)",
           "return policy.apply(jax.tree.map(lambda p: p[0], params), obs)",
           "PPO ratio from policy head 0 for every chunk of rows"),
    Mutant("eq14-max-instead-of-min", "empo_ppo.py",
           "return jnp.minimum(ratio * advantage, jnp.clip(ratio, 1.0 - clip, 1.0 + clip) * advantage)",
           "return jnp.maximum(ratio * advantage, jnp.clip(ratio, 1.0 - clip, 1.0 + clip) * advantage)",
           "PPO surrogate takes the max of the clipped and unclipped terms"),
    Mutant("eq14-clip-range", "empo_ppo.py",
           "jnp.clip(ratio, 1.0 - clip, 1.0 + clip) * advantage)",
           "jnp.clip(ratio, 1.0 - clip, 1.0 + 2 * clip) * advantage)",
           "PPO clip range [1 - eps, 1 + 2 eps]"),
    Mutant("eq14-ratio-inverted", "empo_ppo.py",
           "surrogate = ppo_surrogate(log_pi, log_beta, adv, args.clip)",
           "surrogate = ppo_surrogate(log_beta, log_pi, adv, args.clip)", "PPO ratio beta / pi_L"),
    Mutant("eq14-ascent-sign", "empo_ppo.py",
           'return -stats["surrogate"] / num_rows, stats', 'return stats["surrogate"] / num_rows, stats',
           "PPO step minimises the surrogate"),
    # --- stage 3: §3.3 ---
    Mutant("nstep-gamma-n", "empo_highlevel.py",
           "discount = np.where(terminals[last], 0.0, float(gamma) ** m)",
           "discount = np.where(terminals[last], 0.0, float(gamma) ** n)",
           "n-step bootstrap discounted by gamma^n where fewer than n rows are left"),
    Mutant("nstep-reward-discount", "empo_highlevel.py",
           "gamma ** j * rewards[np.minimum(rows + j, num - 1)]",
           "gamma ** (j + 1) * rewards[np.minimum(rows + j, num - 1)]",
           "n-step rewards discounted one step too many"),
    Mutant("iql-target-uses-q", "empo_highlevel.py",
           "v_next = vh_net.apply(state.vh, data.bootstrap_obs[idx])[:, 0]",
           "v_next = select(qh_net.apply(state.qh_target, data.bootstrap_obs[idx]), z)",
           "Q_H's target bootstraps from Q_H (psi_bar_H) instead of V_H"),
    Mutant("iql-v-on-online-q", "empo_highlevel.py",
           "q_bar = select(qh_net.apply(state.qh_target, obs), z)", "q_bar = select(qh_net.apply(state.qh, obs), z)",
           "V_H's expectile of the online Q_H instead of the target network"),
    Mutant("iql-head-0", "empo_highlevel.py",
           "z = assign[idx]  # [B] A(s, a)", "z = jnp.zeros_like(assign[idx])  # [B] A(s, a)",
           "IQL on head 0 for every row"),
    Mutant("expectile-direction", "empo_highlevel.py",
           "return jnp.abs(tau - (u < 0).astype(u.dtype)) * u * u",
           "return jnp.abs(tau - (u > 0).astype(u.dtype)) * u * u",
           "expectile weights tau on the negative side"),
    Mutant("expectile-one-minus-tau", "empo_highlevel.py",
           "return vh_loss(q_bar, v_s, args.expectile), v_s", "return vh_loss(q_bar, v_s, 1 - args.expectile), v_s",
           "V_H trained with the 1 - tau expectile"),
    Mutant("id-threshold-strict", "empo_highlevel.py",
           "return q_probs >= jnp.max(q_probs, axis=-1, keepdims=True) / b",
           "return q_probs > jnp.max(q_probs, axis=-1, keepdims=True) / b",
           "ID(s) threshold exclusive"),
    Mutant("id-threshold-scale", "empo_highlevel.py",
           "return q_probs >= jnp.max(q_probs, axis=-1, keepdims=True) / b",
           "return q_probs >= jnp.max(q_probs, axis=-1, keepdims=True) / (b * b)",
           "ID(s) threshold max q / b^2"),
    Mutant("pi-h-ignores-id", "empo_highlevel.py",
           "masked = jnp.where(in_distribution(q_probs, b), q_h, -jnp.inf)", "masked = q_h",
           "pi_H takes the argmax of Q_H over every cluster"),
    Mutant("pi-runs-cluster-0", "empo_highlevel.py",
           'mean, log_std = stacked_apply(nets["policy"], run.pi, obs, z)',
           'mean, log_std = stacked_apply(nets["policy"], run.pi, obs, 0 * z)',
           "the final policy executes pi_L of cluster 0 whatever pi_H chose"),
    # --- baselines ---
    Mutant("td3bc-lambda-abs-of-mean", "baselines/td3_bc.py",
           "lam = alpha / jax.lax.stop_gradient(jnp.mean(jnp.abs(q_pi)))",
           "lam = alpha / jax.lax.stop_gradient(jnp.abs(jnp.mean(q_pi)))",
           "lambda = alpha / |mean Q| instead of alpha / mean |Q|"),
    Mutant("td3bc-lambda-times", "baselines/td3_bc.py",
           "lam = alpha / jax.lax.stop_gradient(jnp.mean(jnp.abs(q_pi)))",
           "lam = alpha * jax.lax.stop_gradient(jnp.mean(jnp.abs(q_pi)))",
           "lambda = alpha mean |Q|"),
    Mutant("td3bc-actor-sign", "baselines/td3_bc.py",
           "return -lam * jnp.mean(q_pi) + bc, (lam, bc)", "return lam * jnp.mean(q_pi) + bc, (lam, bc)",
           "the actor minimises Q"),
    Mutant("td3bc-bc-term", "baselines/td3_bc.py",
           "bc = jnp.mean((pi - actions) ** 2)", "bc = jnp.mean(jnp.abs(pi - actions))", "BC term |pi - a|"),
    Mutant("td3-target-max", "baselines/td3_bc.py",
           "return rewards + gamma * not_done * jnp.minimum(next_q1, next_q2)",
           "return rewards + gamma * not_done * jnp.maximum(next_q1, next_q2)",
           "clipped double Q takes the max of the twins"),
    Mutant("td3-target-online-actor", "baselines/td3_bc.py",
           "smoothed_target_action(actor_net.apply(state.actor_target, next_obs)",
           "smoothed_target_action(actor_net.apply(state.actor, next_obs)",
           "critic target from the online actor phi instead of phi'"),
    Mutant("td3-target-online-critic", "baselines/td3_bc.py",
           "next_q = q_values(nets, state.critic_target, next_obs, next_action, action_scale)",
           "next_q = q_values(nets, state.critic, next_obs, next_action, action_scale)",
           "critic target from the online critics theta instead of theta'"),
    Mutant("td3-polyak-swapped", "baselines/td3_bc.py",
           "lambda t, p: tau * p + (1.0 - tau) * t, target, online)",
           "lambda t, p: tau * t + (1.0 - tau) * p, target, online)",
           "tau and 1 - tau swapped in the target update"),
    Mutant("bc-loss-sign", "baselines/bc.py",
           "return -jnp.mean(gaussian_log_prob(mean, log_std, actions))",
           "return jnp.mean(gaussian_log_prob(mean, log_std, actions))", "BC minimises the likelihood"),
    # --- behaviour policies: SAC ---
    Mutant("sac-logprob-jacobian-sign", "behaviour/sac.py",
           "return log_normal - log_det  # SAC App. C", "return log_normal + log_det  # SAC App. C",
           "tanh correction added instead of subtracted"),
    Mutant("sac-logprob-no-log-2", "behaviour/sac.py",
           "2.0 * (jnp.log(2.0) - pre_tanh - jax.nn.softplus(-2.0 * pre_tanh))",
           "2.0 * (-pre_tanh - jax.nn.softplus(-2.0 * pre_tanh))", "log(1 - tanh^2) without its log 2"),
    Mutant("sac-logprob-no-log-std", "behaviour/sac.py",
           "jnp.sum(-0.5 * noise ** 2 - log_std - 0.5 * jnp.log(2.0 * jnp.pi), axis=-1)",
           "jnp.sum(-0.5 * noise ** 2 - 0.5 * jnp.log(2.0 * jnp.pi), axis=-1)", "Gaussian density without 1 / sigma"),
    Mutant("sac-target-max", "behaviour/sac.py",
           "(jnp.minimum(next_q1, next_q2) - alpha * next_log_pi)",
           "(jnp.maximum(next_q1, next_q2) - alpha * next_log_pi)",
           "soft target takes the max of the twins"),
    Mutant("sac-target-entropy-sign", "behaviour/sac.py",
           "(jnp.minimum(next_q1, next_q2) - alpha * next_log_pi)",
           "(jnp.minimum(next_q1, next_q2) + alpha * next_log_pi)",
           "soft target adds alpha log pi"),
    Mutant("sac-target-bootstraps-terminals", "behaviour/sac.py",
           "return rewards + gamma * not_done * (jnp.minimum", "return rewards + gamma * (jnp.minimum",
           "soft target bootstraps past a termination"),
    Mutant("sac-target-online-critic", "behaviour/sac.py",
           "next_q = q_values(nets, state.critic_target, next_obs, next_action)",
           "next_q = q_values(nets, state.critic, next_obs, next_action)",
           "soft target from the online critics theta instead of theta'"),
    Mutant("sac-target-at-s", "behaviour/sac.py",
           "next_action, next_log_pi = sample_action(*actor_net.apply(state.actor, next_obs),",
           "next_action, next_log_pi = sample_action(*actor_net.apply(state.actor, obs),",
           "the target's action a' drawn at s instead of s'"),
    Mutant("sac-critic-loss-mean-of-twins", "behaviour/sac.py",
           "return jnp.sum(jnp.mean((q - jax.lax.stop_gradient(target)[None]) ** 2, axis=-1))",
           "return jnp.mean(jnp.mean((q - jax.lax.stop_gradient(target)[None]) ** 2, axis=-1))",
           "J_Q halved: the twins' MSEs averaged"),
    Mutant("sac-actor-q1-only", "behaviour/sac.py",
           "jax.lax.stop_gradient(alpha) * log_pi - jnp.minimum(q1_pi, q2_pi))",
           "jax.lax.stop_gradient(alpha) * log_pi - q1_pi)", "the actor's loss on Q1 alone"),
    Mutant("sac-actor-entropy-sign", "behaviour/sac.py",
           "jax.lax.stop_gradient(alpha) * log_pi - jnp.minimum(q1_pi, q2_pi))",
           "-jax.lax.stop_gradient(alpha) * log_pi - jnp.minimum(q1_pi, q2_pi))", "the actor minimises its entropy"),
    Mutant("sac-actor-target-critic", "behaviour/sac.py",
           "q_pi = q_values(nets, state.critic, obs, action)  # [2, B]",
           "q_pi = q_values(nets, state.critic_target, obs, action)  # [2, B]",
           "the actor's loss on the target critics"),
    Mutant("sac-temperature-sign", "behaviour/sac.py",
           "return -jnp.mean(log_alpha * jax.lax.stop_gradient(log_pi + target_entropy))",
           "return jnp.mean(log_alpha * jax.lax.stop_gradient(log_pi + target_entropy))",
           "alpha moves away from the target entropy"),
    Mutant("sac-target-entropy-positive", "behaviour/sac.py",
           "target_entropy = nets[\"actor\"], -float(act_dim)", "target_entropy = nets[\"actor\"], float(act_dim)",
           "H_bar = +dim(A)"),
    Mutant("sac-alpha-not-exp", "behaviour/sac.py",
           "alpha = jnp.exp(state.log_alpha)", "alpha = state.log_alpha", "alpha read as log alpha"),
    Mutant("sac-polyak-swapped", "behaviour/sac.py",
           "lambda t, p: tau * p + (1.0 - tau) * t, target, online)  # SAC target critics",
           "lambda t, p: tau * t + (1.0 - tau) * p, target, online)  # SAC target critics",
           "tau and 1 - tau swapped in the target update"),
    Mutant("sac-rows-beyond-size", "behaviour/sac.py",
           "idx = jax.random.randint(key_batch, (args.batch_size,), 0, size)",
           "idx = jax.random.randint(key_batch, (args.batch_size,), 0, buffer.rewards.shape[0])",
           "minibatches drawn from the empty rows of the buffer too"),
    Mutant("sac-log-std-unclipped", "behaviour/sac.py",
           "return mean, jnp.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)", "return mean, log_std",
           "log sigma not clipped"),
    Mutant("sac-insert-no-wrap", "behaviour/sac.py",
           "idx = (first_row + jnp.arange(rows.rewards.shape[0])) % capacity  # [n]",
           "idx = first_row + jnp.arange(rows.rewards.shape[0])  # [n]",
           "the buffer does not wrap around"),
    # --- IQL ---
    Mutant("iql-expectile-flipped", "baselines/iql.py",
           "weight = jnp.where(diff > 0, expectile, 1.0 - expectile)",
           "weight = jnp.where(diff < 0, expectile, 1.0 - expectile)",
           "tau weighs the residuals below the expectile, 1 - tau those above"),
    Mutant("iql-expectile-symmetric", "baselines/iql.py",
           "weight = jnp.where(diff > 0, expectile, 1.0 - expectile)",
           "weight = jnp.where(diff > 0, expectile, expectile)",
           "the same weight tau on both sides (a scaled MSE, the mean instead of the expectile)"),
    Mutant("iql-expectile-abs", "baselines/iql.py",
           "return jnp.mean(weight * diff ** 2)  # L_2^tau", "return jnp.mean(weight * jnp.abs(diff))  # L_2^tau",
           "an asymmetric L1 (a quantile) instead of the squared expectile loss"),
    Mutant("iql-v-target-max", "baselines/iql.py",
           "q = jnp.minimum(target_q[0], target_q[1])  # [B] min",
           "q = jnp.maximum(target_q[0], target_q[1])  # [B] min",
           "V regresses on the max of the twin target critics"),
    Mutant("iql-v-target-q1", "baselines/iql.py",
           "q = jnp.minimum(target_q[0], target_q[1])  # [B] min", "q = target_q[0]  # [B] min",
           "V regresses on Q1 alone"),
    Mutant("iql-v-target-online-critic", "baselines/iql.py",
           "target_q = q_values(nets, state.critic_target, obs, actions)",
           "target_q = q_values(nets, state.critic, obs, actions)",
           "V's target and the advantages from the online critics theta instead of theta'"),
    Mutant("iql-q-target-past-terminal", "baselines/iql.py",
           "return rewards + gamma * not_done * next_v  # Eq. (6) target",
           "return rewards + gamma * next_v  # Eq. (6) target",
           "the Q target bootstraps past a terminal"),
    Mutant("iql-q-target-old-v", "baselines/iql.py",
           "v_value(nets, value, next_obs), args.gamma)", "v_value(nets, state.value, next_obs), args.gamma)",
           "the Q target from V before this step's update"),
    Mutant("iql-q-target-v-of-s", "baselines/iql.py",
           "v_value(nets, value, next_obs), args.gamma)", "v_value(nets, value, obs), args.gamma)",
           "the Q target bootstraps V(s) instead of V(s')"),
    Mutant("iql-awr-unclipped", "baselines/iql.py",
           "jnp.minimum(jnp.exp(temperature * (q - v)), max_weight))", "jnp.exp(temperature * (q - v)))",
           "advantage weights not clipped at 100"),
    Mutant("iql-awr-advantage-sign", "baselines/iql.py",
           "jnp.minimum(jnp.exp(temperature * (q - v)), max_weight))",
           "jnp.minimum(jnp.exp(temperature * (v - q)), max_weight))",
           "weights exp(beta (V - Q)): the worse actions weigh more"),
    Mutant("iql-awr-divide", "baselines/iql.py",
           "jnp.minimum(jnp.exp(temperature * (q - v)), max_weight))",
           "jnp.minimum(jnp.exp((q - v) / temperature), max_weight))",
           "beta read as a temperature that divides the advantage"),
    Mutant("iql-awr-old-v", "baselines/iql.py",
           "weights = awr_weights(jnp.minimum(target_q[0], target_q[1]), v_value(nets, value, obs),",
           "weights = awr_weights(jnp.minimum(target_q[0], target_q[1]), v_value(nets, state.value, obs),",
           "the advantages from V before this step's update"),
    Mutant("iql-actor-sign", "baselines/iql.py",
           "return -jnp.mean(weights * log_prob)  # Eq. (7)", "return jnp.mean(weights * log_prob)  # Eq. (7)",
           "the actor minimises the weighted log-likelihood"),
    Mutant("iql-actor-unweighted", "baselines/iql.py",
           "return -jnp.mean(weights * log_prob)  # Eq. (7)", "return -jnp.mean(log_prob)  # Eq. (7)",
           "the actor is plain behaviour cloning"),
    Mutant("iql-log-std-unclipped", "baselines/iql.py",
           "return mean, jnp.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)", "return mean, log_std",
           "the actor's log-std not clipped to [-5, 2]"),
    Mutant("iql-actor-lr-constant", "baselines/iql.py",
           '"actor": optax.adam(optax.cosine_decay_schedule(args.learning_rate, args.steps))}',
           '"actor": optax.adam(args.learning_rate)}',
           "the actor's lr does not decay"),
    Mutant("iql-polyak-swapped", "baselines/iql.py",
           "lambda t, p: tau * p + (1.0 - tau) * t, target, online)  # target update",
           "lambda t, p: tau * t + (1.0 - tau) * p, target, online)  # target update",
           "tau and 1 - tau swapped in the target update"),
    Mutant("iql-reward-scale", "baselines/iql.py",
           "return 1000.0 / spread", "return 1.0 / spread",
           "rewards scaled by 1 / (max - min return) instead of 1000 / (max - min return)"),
]


def repository_files() -> list:
    """The files git tracks or would track (ignored outputs, runs and data left out)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    return [path for path in out.split("\0") if path and (ROOT / path).is_file()]


def check_mutants(mutants) -> None:
    """Every old text occurs exactly once in its file, and the mutated file still compiles."""
    names = [m.name for m in mutants]
    if len(set(names)) != len(names):
        sys.exit("error: two mutants share a name")
    for m in mutants:
        text = (ROOT / m.file).read_text()
        count = text.count(m.old)
        if count != 1:
            sys.exit(f"error: mutant {m.name}: its text occurs {count} times in {m.file}, expected once: {m.old!r}")
        if "\n" in m.old or "\n" in m.new or m.old == m.new:
            sys.exit(f"error: mutant {m.name} is not a change of one line")
        compile(text.replace(m.old, m.new), m.file, "exec")


def run_tests(copy: pathlib.Path, tests, timeout: float, env) -> tuple:
    """(status, tests run, first failed test, seconds) of ``pytest -x -q`` on the copy."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                              cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", "-", "-", time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|error|errors)", summary)}
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
    status = {0: "passed", 1: "failed"}.get(proc.returncode, f"pytest exit {proc.returncode}")
    first = failed.group(1).split("::")[-1] if failed else "-"
    return status, str(sum(counts.values())), first, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run this mutant (repeatable)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run")
    args = parser.parse_args()

    mutants = MUTANTS
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in MUTANTS})
        if unknown:
            sys.exit(f"error: no mutant named {', '.join(unknown)} (see --list)")
        mutants = [m for m in MUTANTS if m.name in args.only]
    check_mutants(MUTANTS)
    if args.list:
        for m in mutants:
            print(f"{m.name:34s} {m.file:20s} {m.what}")
        return 0

    scratch = pathlib.Path(tempfile.mkdtemp(prefix="mutation-"))
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(scratch / "xla_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               PYTHONDONTWRITEBYTECODE="1")
    files = repository_files()
    copy = scratch / "repo"
    for path in files:
        (copy / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, copy / path)
    t_start = time.perf_counter()
    try:
        # The unmutated code must pass the tests that are to kill the mutants.
        for stage in sorted({STAGE_OF_FILE[m.file] for m in mutants}):
            status, count, first, seconds = run_tests(copy, TESTS[stage], args.timeout, env)
            print(f"baseline {stage}: {status} ({count} tests, {seconds:.0f} s)", flush=True)
            if status != "passed":
                print(f"error: the unmutated code fails the {stage} tests ({first}); fix that first")
                return 2
        rows = []
        header = f"| {'mutant':34s} | {'file':20s} | tests run | {'result':9s} | {'killed by':74s} | seconds |"
        print("\n" + header + "\n|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|", flush=True)
        for m in mutants:
            target = copy / m.file
            original = target.read_text()
            target.write_text(original.replace(m.old, m.new))
            try:
                status, count, first, seconds = run_tests(copy, TESTS[STAGE_OF_FILE[m.file]], args.timeout, env)
            finally:
                target.write_text(original)
            result = {"failed": "killed", "passed": "SURVIVED", "timeout": "killed"}.get(status, "killed")
            if result == "killed" and status != "failed":
                first = f"({status})"
            rows.append((m, result))
            print(f"| {m.name:34s} | {m.file:20s} | {count:>9s} | {result:9s} | {first:74s} | {seconds:7.0f} |",
                  flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    survived = [m.name for m, result in rows if result != "killed"]
    print(f"\n{len(rows) - len(survived)} of {len(rows)} mutants killed in {time.perf_counter() - t_start:.0f} s"
          + (f"; survived: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
