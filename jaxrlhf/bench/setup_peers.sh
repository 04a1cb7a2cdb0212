#!/usr/bin/env bash
# Creates the peers' virtual environments for `python -m jaxrlhf.bench.compare` (run from the repo root):
#   .venv-bench        TRL (PyTorch, CPU wheel)       -> jaxrlhf/bench/peer_trl.py
#   .venv-bench-tunix  Tunix (JAX)                    -> jaxrlhf/bench/peer_tunix.py
# Two venvs because google-tunix 0.1.7 pins safetensors<0.8, which forces transformers back to 5.12,
# while TRL 1.16 runs on transformers 5.23; neither venv is jaxrlhf's own .venv.
# Versions are pinned to those measured in docs/benchmarks.md; override with TRL_SPEC / TUNIX_SPEC.
set -euo pipefail
PY=${PY:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TRL_SPEC=${TRL_SPEC:-"trl==1.16.0 transformers==5.23.0 datasets==5.2.0 accelerate==1.15.0 safetensors==0.8.0 tokenizers==0.23.3"}
TUNIX_SPEC=${TUNIX_SPEC:-"google-tunix==0.1.7 jax==0.10.2 flax==0.12.8"}

if [ ! -x .venv-bench/bin/python ]; then "$PY" -m venv .venv-bench; fi
.venv-bench/bin/pip install -q --upgrade pip
# CPU-only torch: here pip's find-links hold the 2.13.0+cpu wheel; elsewhere set TORCH_SPEC to a
# CPU-only build (a wheel path or an --index-url argument) so that no CUDA build is pulled.
.venv-bench/bin/pip install -q "$TORCH_SPEC"
# shellcheck disable=SC2086
.venv-bench/bin/pip install -q $TRL_SPEC

if [ ! -x .venv-bench-tunix/bin/python ]; then "$PY" -m venv .venv-bench-tunix; fi
.venv-bench-tunix/bin/pip install -q --upgrade pip
# shellcheck disable=SC2086
.venv-bench-tunix/bin/pip install -q $TUNIX_SPEC

.venv-bench/bin/python -c "import torch, trl, transformers; print('TRL venv:', trl.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
.venv-bench-tunix/bin/python -c "import importlib.metadata as m, jax; print('Tunix venv:', m.version('google-tunix'), 'jax', jax.__version__)"
