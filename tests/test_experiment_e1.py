"""E1 (Xu et al. 2024 §4.1, OOD counter-example): the analytic claims and a smoke-size run."""

import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def e1():
    return importlib.import_module("jaxrlhf.experiments.e1_ood")


@pytest.fixture(scope="module")
def smoke(e1, tmp_path_factory):
    out = tmp_path_factory.mktemp("e1")
    res = e1.main(["--smoke", f"--out={out}"])
    return res, out


def test_dpo_loss_ignores_pi_y3_and_vanishes_on_an_ood_policy():
    # Same log π(y1) - log π(y2), π(y3) from 0.001 to 0.999: identical DPO loss.
    ref = jnp.log(jnp.full((3,), 1 / 3))
    p3 = jnp.array([0.001, 0.5, 0.999])
    lp1, lp2 = jnp.log((1 - p3) * 0.9), jnp.log((1 - p3) * 0.1)
    loss = losses.dpo_loss(lp1, lp2, jnp.full((3,), ref[0]), jnp.full((3,), ref[1]), beta=0.1)
    np.testing.assert_allclose(loss, loss[0], rtol=1e-5)
    # π(y3) = 0.999 with π(y1)/π(y2) = e^200: loss ~ log(1 + e^-20) ≈ 2e-9.
    ood = losses.dpo_loss(jnp.log(jnp.array([1e-3])), jnp.log(jnp.array([1e-3])) - 200.0, ref[:1], ref[1:2])
    assert float(ood[0]) < 1e-8


def test_analytic_part(smoke):
    a = smoke[0]["analytic"]
    ood = a["ood_policy"]
    assert ood["probs"][2] > 0.99 and ood["dpo_loss"] < 1e-6
    assert a["near_opt_max_pi_y3"] > 0.99 and a["near_opt_min_pi_y3"] < 0.01
    assert a["dpo_loss_max_spread_over_pi_y3"] < 1e-4
    r1, r2, r3 = a["tabular_rewards"]
    assert r1 > 1.0 and abs(r1 + r2) < 1e-4 and abs(r3) < 1e-6  # y3 never gets a gradient
    for key in ("rlhf_optimum_r3_mean", "rlhf_optimum_r3_eq_r2", "rlhf_optimum_r3_mean_beta_x10"):
        assert a[key]["probs"][2] <= a["ref_probs"][2]  # the RLHF optimum does not raise π(y3)
        # and the OOD DPO optimum is a poor RLHF policy
        assert a[key]["rlhf_objective"] > ood["rlhf_objective"] + 1.0


def test_smoke_run_dpo_raises_pi_y3_ppo_stops_at_the_kl_optimum(smoke):
    res, out = smoke
    assert {"table.md", "results.json", "pi_y3.png"} <= set(os.listdir(out))
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["config"]["seeds"] == 2
    runs = {(r["scenario"], r["policy"], r["name"], r["beta"], r["y3_logit_offset"]): r for r in res["runs"]}
    dpo = runs[("extrapolate", "linear", "DPO", 0.1, 0.0)]
    ppo = runs[("extrapolate", "linear", "PPO (tabular RM)", 0.1, 0.0)]
    ref3 = dpo["ref_probs_mean"][2]
    assert dpo["final_probs_mean"][2] > ref3 + 0.5
    # PPO's fixed point is the exact KL-regularised optimum in the policy family, well below DPO's.
    assert abs(ppo["final_probs_mean"][2] - ppo["family_rlhf_optimum_probs_mean"][2]) < 0.03
    assert ppo["final_probs_mean"][2] < dpo["final_probs_mean"][2] - 0.2
    rare_dpo = runs[("extrapolate", "linear", "DPO", 0.1, -3.0)]
    rare_ppo = runs[("extrapolate", "linear", "PPO (tabular RM)", 0.1, -3.0)]
    assert rare_dpo["final_probs_mean"][2] > 0.9
    assert rare_ppo["final_probs_mean"][2] < 0.35
    # Without parameter sharing between y3 and the pair, DPO does not raise π(y3).
    # A shared-parameter MLP policy: DPO raises π(y3), PPO (tabular RM) does not.
    mlp_dpo = runs[("extrapolate", "mlp", "DPO", 0.1, 0.0)]
    mlp_ppo = runs[("extrapolate", "mlp", "PPO (tabular RM)", 0.1, 0.0)]
    assert mlp_dpo["final_probs_mean"][2] > mlp_dpo["ref_probs_mean"][2] + 0.15
    assert mlp_ppo["final_probs_mean"][2] < mlp_ppo["ref_probs_mean"][2]
    orth = runs[("orthogonal", "linear", "DPO", 0.1, 0.0)]
    assert orth["final_probs_mean"][2] < orth["ref_probs_mean"][2]
    assert np.isfinite(res["wall_time_s"])


def test_bad_settings_raise(e1):
    with pytest.raises(ValueError, match="scenario"):
        e1.features("sideways", 1.0)
    with pytest.raises(ValueError, match="arg"):
        e1.get_config("huge")
    cfg = e1.get_config("smoke")
    cfg.ref_probs = (0.5, 0.5, 0.0)
    with pytest.raises(ValueError, match="ref_probs"):
        e1.analytic(cfg, np.zeros(3))
