"""Shared config sections; each ``configs/*.py`` experiment builds on these and sets its own keys.

Every key here is read by the code for the algorithms that include it (tests/test_configs.py
checks that no key of a shipped config goes unread).
"""

from __future__ import annotations

import ml_collections

from jaxrlhf.data import default_data_config


def base(algorithm: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.algorithm = algorithm
    c.seed = 0
    c.mesh = dict(data=-1, fsdp=1, tensor=1)  # -1 fills the remaining devices
    c.partition_rules = ()  # () = the model family's default rules; else ((regex, spec-tuple), ...)
    c.tokenizer = ""
    c.model = model()
    c.data = data()
    if algorithm in ("sft", "reward", "dpo", "dpo_iter"):
        c.batch_size = 64  # global, in sequences (pairs for reward/DPO) per optimizer step
    c.micro_batches = 1  # gradient accumulation: micro-batches per step (a lax.scan)
    if algorithm in ("sft", "reward", "dpo"):
        c.total_steps = 1000
        c.pad_to_multiple_of = 64  # batch lengths rounded up to this: few shapes, few compiles
        c.eval_every = 0  # steps between evaluations on data.eval_split / data.eval_fraction; 0: none
        c.eval_batches = 8  # batches per evaluation
    c.optim = optim()
    c.checkpoint = dict(every=500, keep=3, async_save=True)  # every: steps (PPO iterations, DPO-Iter rounds)
    c.log_every = 10
    c.progress_bar = True
    c.max_consecutive_skips = 10  # non-finite steps in a row before the run stops with an error
    c.export_hf = True  # write <workdir>/hf (config.json + safetensors) at the end
    return c


def model(path: str = "", family: str = "llama", **init) -> ml_collections.ConfigDict:
    """``path``: HF-format dir or hub id; empty means random init of ``family`` with ``init`` overrides."""
    m = ml_collections.ConfigDict()
    m.path = path
    if not path:
        m.family = family
        m.init = init
    m.dtype = "bfloat16"  # activation / compute dtype
    m.param_dtype = "float32"  # master weights
    m.remat = False  # gradient checkpointing per block
    return m


def data(**overrides) -> ml_collections.ConfigDict:
    """``config.data``: the data pipeline's keys (``jaxrlhf.data.DATA_CONFIG_KEYS``, see docs/data.md)."""
    return default_data_config(**overrides)


def optim(**overrides) -> ml_collections.ConfigDict:
    o = ml_collections.ConfigDict(
        dict(
            name="adamw",
            lr=1e-5,
            schedule="cosine",
            warmup_steps=10,
            min_lr_ratio=0.1,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.0,
            no_decay=("bias", "norm", "embed"),
            clip_norm=1.0,
        )
    )
    o.update(overrides)
    return o


def ref(
    ema_decay: float = 1.0, reset_every: int = 0, precompute: bool | None = None
) -> ml_collections.ConfigDict:
    """The reference policy: ``ema_decay`` 1.0 = frozen; < 1 = EMA of the actor (Xu et al. 2024).

    ``precompute`` (offline DPO only; pass a bool to add the key): with a frozen reference,
    compute the reference log-probs once over the dataset before training and drop the reference
    from the train state (no reference forward per step, no reference parameters in memory).
    """
    r = ml_collections.ConfigDict(dict(ema_decay=ema_decay, reset_every=reset_every))
    if precompute is not None:
        r.precompute = precompute
    return r


TINY_LLAMA = dict(
    vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
)


def generation(**overrides) -> ml_collections.ConfigDict:
    """Sampler settings (``jaxrlhf.generation``); ``reshard`` = decode in the generation layout."""
    g = ml_collections.ConfigDict(
        dict(max_new_tokens=128, temperature=1.0, top_k=0, top_p=1.0, reshard=False)
    )
    g.update(overrides)
    return g


def reward(
    fn: str = "", model_path: str = "", shaping: bool = True, **overrides
) -> ml_collections.ConfigDict:
    """A programmatic reward ``fn`` ("package.module:function") or a reward model at ``model_path``.

    ``shaping`` adds PPO's score normalisation and clipping keys (DPO-Iter only ranks scores).
    """
    r = ml_collections.ConfigDict()
    r.fn = fn
    if not fn:
        r.model = model(model_path, **overrides.pop("init", {})) if model_path else overrides.pop("model")
    r.missing_eos_penalty = 1.0  # subtracted from the score of a response cut at max_new_tokens
    if shaping:
        r.normalize = True  # running mean/std normalisation of the score
        r.clip = 5.0  # clip the (normalised) score to +-clip; 0 disables
    r.update(overrides)
    return r


def ppo(**overrides) -> ml_collections.ConfigDict:
    """The study's PPO recipe by default: rollout batch 512, advantage whitening, EMA reference."""
    p = ml_collections.ConfigDict(
        dict(
            iterations=100,
            rollout_batch_size=512,
            minibatch_size=128,
            epochs=1,
            shuffle_minibatches=True,
            clip_eps=0.2,
            value_clip_eps=0.2,
            vf_coef=0.5,
            entropy_coef=0.0,
            gamma=1.0,
            lam=0.95,
            whiten_advantages=True,
            kl_mode="reward",  # "reward": per-token penalty in the reward; "loss": a KL loss term
            kl_estimator="k1",
            kl_coef=0.05,
            adaptive_kl=False,
            kl_target=6.0,
            kl_horizon=10000,
        )
    )
    p.update(overrides)
    return p


TINY_LLAMA_WORDS = dict(TINY_LLAMA, vocab_size=512)  # covers the shipped review/answer tokenizer
