"""Issue 16: the route classes of a rollout, the two evaluation protocols and TD3+BC's action units."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import empo_io  # noqa: E402
import empo_ppo  # noqa: E402
import nav_env  # noqa: E402
from baselines import td3_bc  # noqa: E402


def path(*corners, step=0.2):
    """A path from corner to corner in steps of at most ``step`` per axis (the task's a_max), as [T+1, 2]."""
    points = [np.asarray(corners[0], np.float64)]
    for target in corners[1:]:
        target = np.asarray(target, np.float64)
        while np.abs(target - points[-1]).max() > 1e-9:
            gap = target - points[-1]  # the last step lands on the corner exactly
            points.append(target.copy() if np.abs(gap).max() <= step + 1e-9 else points[-1] + np.clip(gap, -step, step))
    return np.stack(points)


def classify(*corners, goal=None):
    pos = path(*corners)
    padded = np.concatenate([pos, np.repeat(pos[-1:], 1200 - len(pos), 0)])  # frozen after the end, as rollout's
    return int(nav_env.route_classes(padded[None], np.array([len(pos) - 1]),
                                     None if goal is None else np.array([goal]))[0]), len(pos) - 1


def test_the_fast_route_is_fast_and_about_300_steps_without_noise():
    route, steps = classify((0, 0), (10, 0), (10, 15), (20, 15), (20, 30), (30, 30))
    assert nav_env.ROUTES[route] == "fast"
    assert steps == 300  # 50 + 75 + 50 + 75 + 50; the data's noise makes it ~365


def test_up_the_left_wall_first_is_a_detour():  # the paper's Figure 5d
    route, _ = classify((0, 0), (0, 30), (10, 30), (20, 30), (30, 30))
    assert nav_env.ROUTES[route] == "detour"
    # up x = 0 to the top, back down and through the middle: still a detour (it rose above 22.5 left of S_p)
    assert nav_env.ROUTES[classify((0, 0), (0, 28), (10, 15), (20, 15), (20, 30), (30, 30))[0]] == "detour"


def test_the_fast_corridor_taken_slowly_is_a_detour_in_time():
    pos = path((0, 0), (10, 0), (10, 15), (20, 15), (20, 30), (30, 30))
    slow = np.concatenate([pos[:100], np.repeat(pos[100:101], 200, 0), pos[101:]])  # stalls 200 steps on x = 10
    padded = np.concatenate([slow, np.repeat(slow[-1:], 1001 - len(slow), 0)])
    assert nav_env.route_classes(padded[None], np.array([len(slow) - 1]), np.array([True]))[0] == nav_env.ROUTE_DETOUR


def test_a_route_through_the_penalty_area_and_one_touching_its_edge():
    assert nav_env.ROUTES[classify((0, 0), (30, 0), (30, 30))[0]] == "through S_p"  # behaviour 1's end
    assert nav_env.ROUTES[classify((0, 0), (15, 10), (15, 20), (30, 30))[0]] == "through S_p"  # S_p is closed
    assert nav_env.ROUTES[classify((0, 0), (14.8, 10), (15, 20), (30, 30))[0]] == "fast"


def test_no_goal_wins_over_every_other_class():
    assert nav_env.ROUTES[classify((0, 0), (10, 0), (10, 15), (20, 15), (20, 29))[0]] == "no goal"
    assert nav_env.ROUTES[classify((0, 0), (30, 0), (30, 29))[0]] == "no goal"
    # the rollout's own goal flag, when given, is used instead of the path's last state
    assert nav_env.ROUTES[classify((0, 0), (0, 30), (30, 30), goal=False)[0]] == "no goal"


def test_states_after_the_end_of_a_rollout_are_ignored():
    pos = path((0, 0), (10, 0), (10, 15), (20, 15), (20, 30), (30, 30))
    tail = path((30, 30), (30, 0))  # after the end: never part of the rollout
    padded = np.concatenate([pos, tail[1:]])
    assert nav_env.route_classes(padded[None], np.array([len(pos) - 1]), np.array([True]))[0] == nav_env.ROUTE_FAST


def test_route_classes_agree_with_rollout_flags():
    out = nav_env.rollout(jax.random.key(0), lambda key, pos: jax.random.uniform(key, pos.shape, minval=-.2,
                                                                                  maxval=.2) + 0.15, 8)
    assert np.asarray(out["goal"]).any()
    routes = nav_env.route_classes(np.asarray(out["positions"]), np.asarray(out["length"]), np.asarray(out["goal"]))
    assert np.array_equal(routes == nav_env.ROUTE_NO_GOAL, ~np.asarray(out["goal"]))
    assert np.array_equal(routes == nav_env.ROUTE_PENALTY, np.asarray(out["goal"] & (out["penalty_steps"] > 0)))
    assert np.array_equal((routes == nav_env.ROUTE_FAST) | (routes == nav_env.ROUTE_DETOUR),
                          np.asarray(out["optimal_route"]))
    assert sum(nav_env.route_counts(routes).values()) == 8


@pytest.fixture(scope="module")
def gaussian():
    policy = empo_ppo.GaussianPolicy(2, (0.2, 0.2), 16, 2)
    params = jax.vmap(jax.vmap(lambda k: policy.init(k, jnp.zeros((1, 2)))))(
        jax.random.split(jax.random.key(3), 2).reshape(1, 2))  # [S=1, K=2]
    return policy, params


def test_sampled_evaluation_differs_from_the_mean_action_and_repeats_with_its_seed(gaussian):
    policy, params = gaussian
    keys = jax.random.split(jax.random.key(1), 1)
    run = {s: nav_env.make_policy_rollouts(policy, jnp.zeros(2), jnp.full(2, 10.0), 3, s) for s in (False, True)}
    mean, sampled = (jax.device_get(run[s](params, keys)) for s in (False, True))
    again = jax.device_get(run[True](params, keys))
    assert np.array_equal(mean["positions"][..., 0, :], sampled["positions"][..., 0, :])  # the same s_0
    assert not np.allclose(mean["positions"], sampled["positions"])
    assert np.array_equal(sampled["positions"], again["positions"])
    other = jax.device_get(run[True](params, jax.random.split(jax.random.key(2), 1)))
    assert not np.allclose(other["positions"], sampled["positions"])


def test_td3_bc_sampled_evaluation_adds_clipped_exploration_noise():
    actor = td3_bc.Actor(2, (0.2, 0.2), 16, 2)
    params = jax.vmap(lambda k: actor.init(k, jnp.zeros((1, 2))))(jax.random.split(jax.random.key(0), 1))
    keys = jax.random.split(jax.random.key(1), 1)
    run = {s: td3_bc.make_evaluate(actor, jnp.zeros(2), jnp.full(2, 10.0), 2, s, (0.2, 0.2)) for s in (False, True)}
    mean, sampled = (jax.device_get(run[s](params, keys)) for s in (False, True))
    assert not np.allclose(mean["positions"], sampled["positions"])
    assert np.array_equal(sampled["positions"], jax.device_get(run[True](params, keys))["positions"])
    steps = np.diff(sampled["positions"], axis=-2)
    assert np.abs(steps).max() <= 0.2 + 1e-6


def test_td3_bc_action_units_scale_the_bc_term_by_one_over_a_max_squared():
    rng = np.random.default_rng(0)
    scale = np.array([0.2, 0.5], np.float32)
    pi = rng.uniform(-1, 1, (7, 2)).astype(np.float32) * scale
    actions = rng.uniform(-1, 1, (7, 2)).astype(np.float32) * scale
    q_pi = rng.normal(size=7).astype(np.float32)
    for units, want_bc in (("raw", np.mean((pi - actions) ** 2)),
                           ("normalised", np.mean(((pi - actions) / scale) ** 2))):
        loss, (lam, bc) = td3_bc.actor_loss(jnp.asarray(q_pi), *td3_bc.bc_units(
            jnp.asarray(pi), jnp.asarray(actions), tuple(scale.tolist()), units), 2.5)
        np.testing.assert_allclose(bc, want_bc, rtol=1e-5)
        np.testing.assert_allclose(loss, -2.5 / np.abs(q_pi).mean() * q_pi.mean() + want_bc, rtol=1e-5)
    # on this task (a_max = 0.2 on both axes) the normalised BC term is 25 times the raw one
    raw = td3_bc.bc_units(jnp.asarray(pi), jnp.asarray(actions), (0.2, 0.2), "raw")
    norm = td3_bc.bc_units(jnp.asarray(pi), jnp.asarray(actions), (0.2, 0.2), "normalised")
    np.testing.assert_allclose(np.mean((norm[0] - norm[1]) ** 2), 25 * np.mean((raw[0] - raw[1]) ** 2), rtol=1e-5)


@pytest.mark.parametrize("eval_at, pi_epochs, episodes, message", [
    ("1,x", 10, 10, "comma-separated whole numbers"), ("1,11", 10, 10, "must lie in 0..10"),
    ("-1", 10, 10, "must lie in 0..10"), (",", 10, 10, "must lie in 0..10"), ("1,2", 10, 0, "needs --eval-episodes")])
def test_eval_at_out_of_range_is_one_sentence(eval_at, pi_epochs, episodes, message):
    args = empo_ppo.Args(eval_at=eval_at, pi_epochs=pi_epochs, eval_episodes=episodes)
    with pytest.raises(empo_io.InputError, match=message):
        empo_ppo.validate_args(args)
    assert empo_ppo.sweep_epochs(empo_ppo.Args(eval_at="100, 1,5,1", pi_epochs=100)) == [1, 5, 100]
    assert "eval_at" not in empo_ppo.NEUTRAL_FLAGS  # a checkpoint holds the sweep so far: --eval-at is its own


def start_off_grid(*corners):
    """A hand-made path whose start is (0.05, 0.05) (inside the start box), so that no state lies on a corridor's
    edge y = 2 or y = 13 up to rounding: y = 0.05 + 0.2 k."""
    return path(*[(x + 0.05, y + 0.05) for x, y in corners])


def corridors(*corners, stall_at=None, stall=0):
    """nav_env.corridor_stats of one hand-made path (optionally standing still ``stall`` steps at step ``stall_at``)."""
    pos = start_off_grid(*corners)
    if stall:
        pos = np.concatenate([pos[:stall_at], np.repeat(pos[stall_at:stall_at + 1], stall, 0), pos[stall_at:]])
    padded = np.concatenate([pos, np.repeat(pos[-1:], 1500 - len(pos), 0)])
    return nav_env.corridor_stats(padded[None], np.array([len(pos) - 1]))


def test_the_fast_route_climbs_the_x10_corridor_at_full_speed_and_passes_above_the_x20_one():
    stats = corridors((0, 0), (10, 0), (10, 15), (20, 15), (20, 30), (30, 30))
    assert stats["x = 10"]["entered"] == 1 and stats["x = 10"]["steps"] == 55  # y = 2.05, 2.25, ..., 12.85
    np.testing.assert_allclose(stats["x = 10"]["speed"], 0.2)
    assert stats["x = 20"] == {"entered": 0, "steps": 0, "speed": stats["x = 20"]["speed"]}
    assert np.isnan(stats["x = 20"]["speed"])
    np.testing.assert_allclose(stats["elsewhere"], 0.2)


def test_along_the_bottom_through_s_p_enters_no_corridor_and_behaviour_0_enters_both():
    bottom = corridors((0, 0), (30, 0), (30, 30))
    assert bottom["x = 10"]["entered"] == bottom["x = 20"]["entered"] == 0  # the junction at y = 0 is not counted
    b0 = corridors((0, 0), (0, 30), (10, 30), (10, 0), (20, 0), (20, 30), (30, 30))
    assert b0["x = 10"]["entered"] == b0["x = 20"]["entered"] == 1
    assert b0["x = 10"]["steps"] == b0["x = 20"]["steps"] == 55


def test_standing_still_in_a_corridor_lowers_its_speed_and_not_the_speed_elsewhere():
    corners = ((0, 0), (10, 0), (10, 15), (20, 15), (20, 30), (30, 30))
    creep = corridors(*corners, stall_at=75, stall=224)  # step 75 starts at (10.05, 5.05): 224 more steps in place
    assert creep["x = 10"]["steps"] == 55 + 224
    np.testing.assert_allclose(creep["x = 10"]["speed"], 0.2 * 55 / (55 + 224))
    np.testing.assert_allclose(creep["elsewhere"], 0.2)
    # two rollouts at once: counts add up, and steps after a rollout's end are not counted (the second ends at
    # (10.05, 5.85), inside the corridor, and its frozen padding there is not a step: 19 steps from y = 2.05 on)
    fast, short = start_off_grid(*corners), start_off_grid(*corners)[:80]
    pos = np.stack([np.concatenate([p, np.repeat(p[-1:], 400 - len(p), 0)]) for p in (fast, short)])
    both = nav_env.corridor_stats(pos, np.array([len(fast) - 1, len(short) - 1]))
    assert both["x = 10"]["entered"] == 2 and both["x = 10"]["steps"] == 55 + 19
    np.testing.assert_allclose(both["x = 10"]["speed"], 0.2)
