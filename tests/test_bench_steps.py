"""``python -m jaxrlhf.bench`` in a smoke size: every row measured, finite, and the FLOPs formula used."""

import json

import numpy as np

from jaxrlhf import models
from jaxrlhf.bench import steps


def test_step_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    report = steps.main(
        ["--preset=tiny", "--batch=2", "--seq=32", "--steps=2", "--warmup=1", "--new_tokens=4",
         "--sampler_batch=2", "--only=sft,dpo,ppo_update,sampler", "--fsdp=1", f"--out={out}"]
    )  # fmt: skip
    names = [r["step"] for r in report["results"]]
    assert names == ["sft", "dpo", "ppo_update", "sampler_b1", "sampler_b2"]
    sft, dpo, ppo_update = report["results"][:3]
    for r in (sft, dpo, ppo_update):
        assert r["step_time_s"]["min"] <= r["step_time_s"]["median"] <= r["step_time_s"]["max"]
        assert 0 < r["real_tokens_per_s"] <= r["padded_tokens_per_s"]
        assert 0 < r["mfu"] < 1.5 and np.isfinite(r["tflops_per_s"])
    # DPO counts the reference forward: 4/3 of the trained FLOPs per token, two sequences per pair.
    cfg = models.init("llama", **steps.PRESETS["tiny"]).config
    fpt = models.flops_per_token(cfg, 32)
    med = dpo["step_time_s"]["median"]
    np.testing.assert_allclose(dpo["tflops_per_s"] * 1e12 * med, fpt * 4 / 3 * 2 * 2 * 32, rtol=1e-6)
    # PPO update: actor (LM head) and critic (scalar head) forward + backward on every token.
    critic = models.init("llama", head="scalar", **steps.PRESETS["tiny"]).config
    ppo_fpt = fpt + models.flops_per_token(critic, 32)
    med = ppo_update["step_time_s"]["median"]
    np.testing.assert_allclose(ppo_update["tflops_per_s"] * 1e12 * med, ppo_fpt * 2 * 32, rtol=1e-6)
    assert ppo_fpt > fpt and "ppo_update" in out.with_suffix(".md").read_text()
    assert all(r["decode_tokens_per_s"] > 0 for r in report["results"][3:])
    assert json.loads(out.read_text())["peak_name"] == "CPU-measured"
    assert "| sft |" in (tmp_path / "bench.md").read_text()
