"""Config sections: the builders each ``configs/*.py`` and each algorithm's record use.

No algorithm logic here and no import of an algorithm: ``jaxrlhf.config_defaults`` re-exports these
builders beside ``base(algorithm)``, which asks the algorithm registry which sections to add.
Every key is read by the code for the algorithms that include it (``tests/test_train_run.py``
checks that no key of a shipped config goes unread).
"""

from __future__ import annotations

import ml_collections

from jaxrlhf.data import default_data_config
from jaxrlhf.lora import DEFAULT_FULL, DEFAULT_TARGETS


def common(algorithm: str) -> ml_collections.ConfigDict:
    """The keys every run has, whatever its algorithm."""
    c = ml_collections.ConfigDict()
    c.algorithm = algorithm
    c.seed = 0
    c.mesh = dict(data=-1, fsdp=1, tensor=1)  # -1 fills the remaining devices
    c.partition_rules = ()  # () = the model's default rules; else ((regex, spec-tuple), ...)
    c.tokenizer = ""
    c.model = model()
    c.data = data()
    c.micro_batches = 1  # gradient accumulation: micro-batches per step (a lax.scan)
    c.optim = optim()
    c.lora = lora()
    c.checkpoint = dict(every=500, keep=3, async_save=True)  # every: in the driver's unit (see README)
    c.log_every = 10
    c.progress_bar = True
    c.max_consecutive_skips = 10  # skipped updates in a row before the run stops with an error
    # divergence guard: after `warmup` applied updates, skip a step whose gradient norm exceeds
    # `factor` x the running mean (EMA `decay`) of the applied ones; factor 0 = off. `loss_factor`:
    # also skip a step whose |loss - running mean| exceeds loss_factor x the running mean absolute
    # deviation of the applied steps' losses (scale-free: losses may be negative); 0 = off
    c.guard = dict(factor=0.0, warmup=10, decay=0.9, loss_factor=0.0)
    # multi-process runs (jax.distributed): a process silent for this long is declared dead and the
    # others stop with a clear error (exit 75); a rerun resumes from the last checkpoint
    c.distributed = dict(heartbeat_timeout_s=100)
    c.export_hf = True  # write <workdir>/hf (config.json + safetensors) at the end
    c.compilation_cache_dir = (
        ""  # JAX's persistent compilation cache (reruns/resumes skip compiles); "" = off
    )
    return c


def language_model_keys(c: ml_collections.ConfigDict) -> None:
    """Keys of algorithms whose trained model has an LM head (all but the reward model)."""
    # the policy's log-probs / entropy / SFT loss in vocabulary chunks of this many entries
    # (losses.chunked_*, algorithms.common.token_logps): never the [B, T, V] logits; 0 = the plain
    # logits path; a vocabulary of at most this size takes the plain path anyway (docs/benchmarks.md,
    # "Large vocabularies"). A run key, not a model key: scalar-head models have no vocabulary.
    c.vocab_chunk = 8192


def offline_run_keys(c: ml_collections.ConfigDict) -> None:
    """Run-length keys of the offline driver (SFT, reward model, DPO family)."""
    c.batch_size = 64  # global, in sequences (pairs for reward/DPO) per optimizer step
    c.total_steps = 1000
    # Padded batch lengths rounded up to this: at most max_length / 128 shapes (compiles). Measured on
    # UltraFeedback (Qwen2.5 tokens, length-bucketed batches of 8-64 pairs): 64 -> 128 halves the
    # shapes (max_length 512: 6-7 -> 3-4; 1024: 11-15 -> 7-8) for +3.2 to +4.3 points of padding.
    c.pad_to_multiple_of = 128
    # batches prepared (collation, device transfer) in a background thread while the current step
    # runs; 0: none (prepared in the loop). See jaxrlhf.data.prefetch.
    c.prefetch = 2
    c.eval_every = 0  # steps between evaluations on data.eval_split / data.eval_fraction; 0: none
    c.eval_batches = 8  # batches per evaluation


def batch_size_key(c: ml_collections.ConfigDict) -> None:
    """DPO-Iter's update batch (pairs per DPO step)."""
    c.batch_size = 64


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
    # attention kernel of the full forward: "portable" (every platform), "xla" or "cudnn"
    # (jax.nn.dot_product_attention; cudnn = the fused GPU kernel, bf16/fp16), "splash" (Pallas
    # splash attention: the TPU kernel; interpreted, slowly, on other platforms)
    m.attention = "portable"
    return m


def lora(**overrides) -> ml_collections.ConfigDict:
    """LoRA adapters (``jaxrlhf.lora``, docs/lora.md): ``rank`` 0 = off (full fine-tuning).

    ``targets``: regex over parameter paths of the kernels that get adapters (default: attention
    and MLP projections); ``full``: regex of leaves trained in full (default: the scalar head);
    ``alpha``: the adapters' scale is ``alpha / rank``; ``init``: ``A``'s init, "kaiming" or
    "gaussian" (``B`` = 0, so step 0 is the base model exactly); ``dropout``: PEFT's
    ``lora_dropout``, the rate of dropout on the adapter path's input in training forwards only.
    """
    c = ml_collections.ConfigDict(
        dict(rank=0, alpha=16.0, targets=DEFAULT_TARGETS, full=DEFAULT_FULL, init="kaiming", dropout=0.0)
    )
    c.update(overrides)
    return c


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
    """The reward *source* of the rollout algorithms (PPO, GRPO, DPO-Iter, evaluation): a
    programmatic reward ``fn`` ("package.module:function") or a reward model at ``model_path``.

    (Training a reward model is ``algorithm="reward"``, configured by ``bradley_terry()``.)

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


def dpo_ref() -> ml_collections.ConfigDict:
    """The DPO family's default reference: frozen, evaluated in the step (``precompute`` off)."""
    return ref(ema_decay=1.0, precompute=False)


def ppo_ref() -> ml_collections.ConfigDict:
    """PPO's default reference: the study's EMA reference (Xu et al. 2024), decay 0.99 per
    optimizer step: pi_ref <- 0.99 pi_ref + 0.01 pi_actor."""
    return ref(ema_decay=0.99)


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
            # coordinated PPO (Wang et al. 2025): token weights by |A| third (their cPPO: lambda on
            # TOP or MID) and a periodic swing between positive and negative learning (their hPPO)
            coef_top=1.0,
            coef_mid=1.0,
            coef_bot=1.0,
            pos_coef=1.0,  # weight of positive-advantage tokens (0: no positive learning)
            neg_coef=1.0,  # weight of negative-advantage tokens (0: no negative learning)
            period=0,  # iterations; 0 = off
            amplitude=0.0,
        )
    )
    p.update(overrides)
    return p


TINY_LLAMA_WORDS = dict(TINY_LLAMA, vocab_size=512)  # covers the shipped review/answer tokenizer


def analysis(**overrides) -> ml_collections.ConfigDict:
    """Training-dynamics probes (``jaxrlhf.analysis.gradients``): every ``every`` steps (PPO/GRPO:
    iterations) the gradient is split into positive/negative learning and TOP/MID/BOT thirds and
    the update direction's stability is logged under ``analysis/``; 0 = off (no cost)."""
    a = ml_collections.ConfigDict(dict(every=0))
    a.update(overrides)
    return a


def bradley_terry(**overrides) -> ml_collections.ConfigDict:
    """Reward-model training (``algorithm="reward"``): ``use_margin`` subtracts the pair's margin
    column inside the sigmoid (Llama-2's margin loss)."""
    b = ml_collections.ConfigDict(dict(use_margin=False))
    b.update(overrides)
    return b


def dpo(**overrides) -> ml_collections.ConfigDict:
    """DPO (``loss_type`` sigmoid | ipo), conservative DPO (``label_smoothing`` > 0) and the extra-SFT
    remedy (``nll_coef``: NLL of the chosen answers per chosen token, added to the loss)."""
    p = ml_collections.ConfigDict(
        dict(
            beta=0.1,
            label_smoothing=0.0,
            loss_type="sigmoid",
            nll_coef=0.0,
            # coordinated DPO (Wang et al. 2025; not conservative DPO): negative learning x
            # early_neg_coef before step early_until, positive learning x late_pos_coef from late_from
            early_neg_coef=1.0,
            early_until=0,
            late_pos_coef=1.0,
            late_from=0,
        )
    )
    p.update(overrides)
    return p


def simpo(**overrides) -> ml_collections.ConfigDict:
    """SimPO (Meng et al. 2024): reference-free, length-normalised log-probs, target margin ``gamma``."""
    p = ml_collections.ConfigDict(dict(beta=2.0, gamma=0.5, nll_coef=0.0))
    p.update(overrides)
    return p


def dpo_iter(**overrides) -> ml_collections.ConfigDict:
    """Iterative DPO rounds: sample ``samples_per_prompt`` responses for ``prompts_per_round`` prompts,
    pair best vs worst, take ``steps_per_round`` DPO steps; ``reset_reference``: on-policy reference."""
    p = ml_collections.ConfigDict(
        dict(rounds=10, prompts_per_round=64, samples_per_prompt=4, steps_per_round=8, reset_reference=True)
    )
    p.update(overrides)
    return p


def grpo(**overrides) -> ml_collections.ConfigDict:
    """The critic-free family (``algorithm="grpo"``, ``jaxrlhf.algorithms.grpo``, docs/grpo.md).

    Each iteration samples ``samples_per_prompt`` responses for ``prompts_per_iteration`` prompts;
    ``estimator``: ``grpo`` (group-normalised), ``dr_grpo`` (group-centred), ``rloo``
    (leave-one-out) or ``reinforce_pp`` (REINFORCE++: KL in the per-token reward, returns whitened
    over the batch; ``gamma`` its discount). ``clip_eps_high`` (DAPO's clip-higher) defaults to
    ``clip_eps`` (symmetric); ``ratio_level="sequence"`` is GSPO's length-normalised sequence ratio;
    ``loss_agg`` ``token_mean | seq_mean | seq_sum_norm`` (Dr.GRPO's constant normaliser,
    ``generation.max_new_tokens``); ``filter_equal_groups`` masks groups with all-equal rewards
    out of the loss; ``kl_coef`` weighs the ``kl_estimator`` KL to ``config.ref`` (a loss term, or a
    reward term for ``reinforce_pp``; 0 allowed).
    """
    p = ml_collections.ConfigDict(
        dict(
            iterations=100,
            prompts_per_iteration=64,
            samples_per_prompt=8,
            minibatch_size=128,  # sequences per optimizer step
            epochs=1,
            shuffle_minibatches=True,
            estimator="grpo",
            clip_eps=0.2,
            clip_eps_high=overrides.get("clip_eps", 0.2),
            ratio_level="token",
            loss_agg="token_mean",
            filter_equal_groups=False,
            kl_coef=0.0,
            kl_estimator="k3",
            entropy_coef=0.0,
            gamma=1.0,
        )
    )
    p.update(overrides)
    return p
