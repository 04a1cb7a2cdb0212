"""The GPU suite script (jaxrlhf/bench/gpu.sh) is runnable as written: every command it runs names a
preset that exists and arguments the benchmark accepts, and the presets have the published sizes of
the models they stand for (independent: the parameter counts of the HF checkpoints)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxrlhf import models
from jaxrlhf.bench import steps

SCRIPT = Path(__file__).resolve().parents[1] / "jaxrlhf" / "bench" / "gpu.sh"

# Parameter counts of the HF checkpoints (tied embeddings): Qwen/Qwen2.5-0.5B 494,032,768;
# Qwen/Qwen2.5-1.5B 1,543,714,304; meta-llama/Llama-3.2-1B 1,235,814,400.
PUBLISHED = {"qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304, "gpu-1b": 1_235_814_400}


def _commands() -> list[list[str]]:
    text = SCRIPT.read_text().replace("\\\n", " ")
    defaults = dict(re.findall(r"^(\w+)=\$\{\w+:-([^}]*)\}", text, re.M))
    cmds = []
    for line in text.splitlines():
        if "-m jaxrlhf.bench" in line:
            line = re.sub(r'"\$(\w+)"|\$(\w+)', lambda m: defaults.get(m[1] or m[2], "OUT"), line)
            argv = shlex.split(line)
            cmds.append(argv[argv.index("jaxrlhf.bench") + 1 :])
    return cmds


def test_every_command_parses_with_an_existing_preset(monkeypatch):
    cmds = _commands()
    assert len(cmds) == 3, cmds
    seen = []

    def fake_parse(self, argv=None, namespace=None):  # stop main() right after parsing
        a = real_parse(self, argv, namespace)
        seen.append(a)
        raise SystemExit(0)

    import argparse

    real_parse = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", fake_parse)
    for argv in cmds:
        with pytest.raises(SystemExit):
            steps.main(argv)
    assert [a.preset for a in seen] == ["qwen2.5-0.5b", "qwen2.5-1.5b", "tiny"]
    assert seen[0].dtype == seen[1].dtype == "bfloat16"
    assert set(seen[0].only.split(",")) == {"dpo", "sampler"} and seen[0].sampler_batch == 256
    assert seen[2].only == "ppo_iteration"


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_presets_have_the_published_parameter_counts(preset):
    p = dict(steps.PRESETS[preset])
    family = p.pop("family", "llama")
    shapes = jax.eval_shape(lambda: nnx.split(models.init(family, **p))[1])
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == PUBLISHED[preset]
