"""Functional loss kernels for language-model alignment: arrays in, arrays out.

Every function here is pure (no model, no config), jittable and differentiable. Maths runs in
float32 whatever the input dtype (bfloat16 logits in, float32 out; float64 stays float64 under
``jax.enable_x64``). Per-token losses are returned **unreduced**; reduce them explicitly with
:func:`aggregate_loss` (token-mean, sequence-mean or sequence-sum), which also accepts a global
denominator so that gradient accumulation over micro-batches gives the full-batch numbers.

Masks are ``1`` (or any non-zero weight) on valid entries and ``0`` elsewhere. In every function
that takes a mask, masked slots never influence a result: they are selected away with
``jnp.where`` before any arithmetic, so padding that holds garbage, ``inf`` or ``NaN`` cannot leak
into means, whitening, aggregation or GAE. The per-token kernels without a mask
(``ppo_policy_loss``, ``kl_penalty``, ...) compute every slot; their masked slots are dropped by
:func:`aggregate_loss`. (Gradients: feed them finite values in masked slots, as
:func:`shifted_logprobs` and :func:`gae` do by writing 0 there, since ``0 * NaN`` is ``NaN``.)

API (shapes: ``B`` batch, ``T`` time, ``V`` vocabulary):

Log-probabilities
  - :func:`token_logprobs` ``(logits[B,T,V], labels[B,T]) -> [B,T]``
  - :func:`shifted_logprobs` ``(logits[B,T,V], input_ids[B,T], loss_mask[B,T]) -> ([B,T-1], [B,T-1])``
  - :func:`sequence_logps` ``(logps[B,T], mask[B,T]) -> [B]``
  - :func:`entropy_from_logits` ``(logits[B,T,V]) -> [B,T]``
  - :func:`chunked_token_logprobs` ``(hidden[B,T,D], W[D,V] or [V,D], labels[B,T], *, chunk) -> [B,T]``
  - :func:`chunked_logprobs_and_entropy` ``(hidden, W, labels, *, chunk) -> ([B,T], [B,T])``
    (large vocabularies: never the ``[B,T,V]`` logits, custom VJP)

Masked reductions
  - :func:`masked_mean` ``(x, mask, axis=None)``
  - :func:`masked_whiten` ``(x, mask, shift_mean=True, eps=1e-8)``
  - :func:`aggregate_loss` ``(per_token[B,T], mask[B,T], mode, global_denominator, *, max_tokens) -> []``
  - :func:`loss_denominator` ``(mask[B,T], mode, *, max_tokens) -> []``

Preference losses
  - :func:`bradley_terry_loss` ``(chosen_rewards[B], rejected_rewards[B], margin) -> [B]``
  - :func:`dpo_loss` ``(pi_c[B], pi_r[B], ref_c[B], ref_r[B], beta, label_smoothing, loss_type) -> [B]``
  - :func:`dpo_implicit_rewards` ``(policy_logps[B], ref_logps[B], beta) -> [B]``
  - :func:`simpo_loss` ``(pi_c[B], pi_r[B], len_c[B], len_r[B], *, beta, gamma) -> [B]``
  - :func:`simpo_implicit_rewards` ``(policy_logps[B], lengths[B], beta) -> [B]``

PPO
  - :func:`gae` ``(rewards[B,T], values[B,T], mask[B,T], gamma, lam) -> (advantages, returns)``
  - :func:`kl_penalty` ``(logprobs[B,T], ref_logprobs[B,T], estimator) -> [B,T]``
  - :func:`ppo_policy_loss` ``(logprobs, old_logprobs, advantages, clip_eps) -> [B,T]``
  - :func:`ppo_value_loss` ``(values, old_values, returns, clip_eps) -> [B,T]``
  - :func:`ema_update` ``(ref_params, params, decay) -> pytree``

Critic-free policy optimisation (GRPO, Dr.GRPO, RLOO, REINFORCE++, DAPO, GSPO)
  - :func:`group_advantages` ``(rewards[N], group_size, method, eps) -> [N]``
  - :func:`group_reward_stats` ``(rewards[N], group_size) -> {mean, std, all_equal}[N/G]``
  - :func:`reinforce_pp_returns` ``(token_rewards[B,T], mask[B,T], gamma) -> [B,T]``
  - :func:`clipped_policy_loss` ``(logprobs, old_logprobs, advantages[B,T] or [B], mask, *,
    clip_eps_low, clip_eps_high, ratio_level) -> ([B,T], {ratio, clipped_low, clipped_high})``

Coordinating positive and negative learning (Wang et al. 2025)
  - :func:`gradient_scale` ``(x, scale) -> x`` (value unchanged, gradient scaled)
  - :func:`rank_thirds` ``(score, valid) -> {top, mid, bot}`` 0/1 masks by rank
  - :func:`coordinated_token_weights` ``(advantages[B,T], mask[B,T], *, coef_top, coef_mid, coef_bot,
    pos_coef, neg_coef) -> [B,T]``
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "aggregate_loss",
    "chunked_logprobs_and_entropy",
    "chunked_token_logprobs",
    "coordinated_token_weights",
    "gradient_scale",
    "rank_thirds",
    "bradley_terry_loss",
    "clipped_policy_loss",
    "dpo_implicit_rewards",
    "dpo_loss",
    "ema_update",
    "entropy_from_logits",
    "gae",
    "group_advantages",
    "group_reward_stats",
    "kl_penalty",
    "loss_denominator",
    "masked_mean",
    "masked_whiten",
    "ppo_policy_loss",
    "ppo_value_loss",
    "reinforce_pp_returns",
    "sequence_logps",
    "shifted_logprobs",
    "simpo_implicit_rewards",
    "simpo_loss",
    "token_logprobs",
]

AGGREGATION_MODES = ("token_mean", "seq_mean", "seq_sum", "seq_sum_norm")
DPO_LOSS_TYPES = ("sigmoid", "ipo")
KL_ESTIMATORS = ("k1", "k2", "k3")
GROUP_ADVANTAGE_METHODS = ("grpo", "dr_grpo", "rloo")
RATIO_LEVELS = ("token", "sequence")


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _compute_dtype(*xs: Any) -> jnp.dtype:
    """float32, or float64 when an array input is float64 (only under ``jax.enable_x64``).

    Python scalars are weakly typed and never widen the result.
    """
    dtype = jnp.dtype(jnp.float32)
    for x in xs:
        if isinstance(x, bool | int | float):
            continue
        d = jnp.result_type(x)
        if jnp.issubdtype(d, jnp.floating):
            dtype = jnp.promote_types(dtype, d)
    return dtype


def _up(x: Any, dtype: jnp.dtype | None = None) -> jax.Array:
    """``x`` as a float array of at least float32 precision."""
    x = jnp.asarray(x)
    return x.astype(dtype if dtype is not None else _compute_dtype(x))


def _valid(mask: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Boolean validity of ``mask`` broadcast to ``shape`` (non-zero = valid)."""
    mask = jnp.asarray(mask)
    try:
        return jnp.broadcast_to(mask != 0, shape)
    except ValueError as e:
        raise ValueError(f"mask of shape {mask.shape} does not broadcast to values of shape {shape}") from e


def _weights(mask: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """(valid bool, weight) broadcast to ``shape``; the weight is 0 wherever invalid."""
    valid = _valid(mask, shape)
    weight = jnp.where(valid, jnp.broadcast_to(jnp.asarray(mask).astype(dtype), shape), 0)
    return valid, weight


# ----------------------------------------------------------------------------------------------
# Log-probabilities
# ----------------------------------------------------------------------------------------------
def token_logprobs(logits: jax.Array, labels: jax.Array) -> jax.Array:
    r"""Log-probability of each label under the softmax of its logits.

    .. math::
        \log p(y_t) = z_{t, y_t} - \log \sum_{v} \exp z_{t, v}

    The label logit is gathered with ``take_along_axis`` and the normaliser is a float32
    ``logsumexp`` over max-centred logits, so no log-softmax ``[B, T, V]`` is built (XLA can fuse
    the upcast into the reduction), and the backward pass saves only ``logits`` and ``labels``
    (``jax.checkpoint``), not a float32 softmax. Exact to float32 rounding for logits of any
    magnitude (e.g. ``±1e4``). Forward- and reverse-mode differentiable.

    Args:
      logits: ``[..., V]`` unnormalised scores, any float dtype (e.g. ``[B, T, V]`` bfloat16).
      labels: ``[...]`` integer ids in ``[0, V)``. Out-of-range ids (e.g. ``-100`` or a pad id on
        masked positions) are clipped into range, so they give a finite, meaningless value that
        the caller masks.

    Returns:
      ``[...]`` float32 log-probabilities (``<= 0``).

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from jaxrlhf import losses
      >>> logits = jnp.log(jnp.array([[[0.25, 0.75], [0.5, 0.5]]]))  # [B=1, T=2, V=2]
      >>> print(np.asarray(jnp.exp(losses.token_logprobs(logits, jnp.array([[1, 0]])))).round(4))
      [[0.75 0.5 ]]

    References:
      The standard language-modelling likelihood (cf.
      ``optax.softmax_cross_entropy_with_integer_labels``).
    """
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"token_logprobs: logits {logits.shape} must be labels {labels.shape} + [V]")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"token_logprobs: labels must be integer ids, got dtype {labels.dtype}")
    labels = jnp.clip(labels, 0, logits.shape[-1] - 1)
    return _token_logprobs(logits, labels)


@jax.checkpoint  # keep only (logits, labels) for the backward pass, not a [..., V] float32 softmax
def _token_logprobs(logits: jax.Array, labels: jax.Array) -> jax.Array:
    dtype = _compute_dtype(logits)
    # Centre on the row max (exact in any dtype) so that a large logit loses no precision in the
    # subtraction: log p = (z_y - m) - log sum exp(z - m). The gradient does not flow through m.
    m = jnp.max(logits, axis=-1, keepdims=True).astype(dtype)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0))
    label_logits = jnp.take_along_axis(logits, labels[..., None], axis=-1).astype(dtype) - m
    lse = jnp.log(jnp.sum(jnp.exp(logits.astype(dtype) - m), axis=-1))
    return label_logits[..., 0] - lse


def shifted_logprobs(
    logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    r"""Next-token log-probabilities of a sequence batch, masked by the loss mask.

    .. math::
        \ell_t = \log p(x_{t+1} \mid x_{\le t}) \cdot m_{t+1}, \quad t = 0 \dots T-2

    i.e. ``token_logprobs(logits[:, :-1], input_ids[:, 1:])`` with the mask ``loss_mask[:, 1:]``
    (the token at ``t + 1`` is predicted from position ``t``; see docs/DESIGN.md). Masked
    positions hold exactly 0, so a plain sum over time is the sequence log-likelihood.

    Args:
      logits: ``[B, T, V]`` model outputs for ``input_ids``.
      input_ids: ``[B, T]`` integer token ids.
      loss_mask: ``[B, T]`` 1 on the tokens the loss predicts, 0 on prompt and padding.

    Returns:
      ``(logps, mask)``: ``logps [B, T-1]`` float32 (0 where masked) and ``mask [B, T-1]``
      (``loss_mask[:, 1:]``, same dtype as ``loss_mask``).

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from jaxrlhf import losses
      >>> logits = jnp.zeros((1, 3, 4))  # uniform over V=4
      >>> logps, mask = losses.shifted_logprobs(logits, jnp.array([[0, 1, 2]]), jnp.array([[0, 0, 1]]))
      >>> print(np.asarray(logps).round(4), mask)
      [[ 0.     -1.3863]] [[0 1]]
    """
    logits = jnp.asarray(logits)
    input_ids = jnp.asarray(input_ids)
    loss_mask = jnp.asarray(loss_mask)
    if logits.ndim != 3 or input_ids.shape != logits.shape[:2] or loss_mask.shape != input_ids.shape:
        raise ValueError(
            "shifted_logprobs: expected logits [B,T,V], input_ids [B,T], loss_mask [B,T]; got "
            f"logits {logits.shape}, input_ids {input_ids.shape}, loss_mask {loss_mask.shape}"
        )
    mask = loss_mask[:, 1:]
    # Every position scored against the next token (the last against a dummy 0, then dropped):
    # slicing the [B, T, V] logits first would copy them (measured on CPU: 41 ms of a DPO step).
    labels = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    logps = token_logprobs(logits, labels)[:, :-1]
    return jnp.where(mask != 0, logps, 0.0), mask


def sequence_logps(logps: jax.Array, mask: jax.Array) -> jax.Array:
    r"""Sum of the masked per-token log-probabilities of each sequence.

    .. math::
        \log \pi(y \mid x) = \sum_t m_t \, \ell_t

    Args:
      logps: ``[B, T]`` per-token log-probabilities.
      mask: ``[B, T]`` 1 on response tokens, 0 elsewhere (masked slots may hold anything).

    Returns:
      ``[B]`` float32 sequence log-probabilities (as used by DPO).

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from jaxrlhf import losses
      >>> print(losses.sequence_logps(jnp.array([[-1.0, -2.0, jnp.nan]]), jnp.array([[1, 1, 0]])))
      [-3.]
    """
    logps = _up(logps)
    _, w = _weights(mask, logps.shape, logps.dtype)
    return jnp.sum(jnp.where(w != 0, logps, 0) * w, axis=-1)


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    r"""Entropy of the softmax distribution of each row of logits.

    .. math::
        H_t = \log \sum_v e^{z_{t,v}} - \sum_v p_{t,v} z_{t,v}, \qquad p_t = \mathrm{softmax}(z_t)

    Computed in float32 on max-centred logits (stable for ``±1e4``; ``-inf`` logits allowed); the
    backward pass recomputes the softmax from ``logits`` instead of saving it (``jax.checkpoint``).

    Args:
      logits: ``[..., V]`` (e.g. ``[B, T, V]``), any float dtype.

    Returns:
      ``[...]`` float32 entropies in nats, in ``[0, log V]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from jaxrlhf import losses
      >>> print(np.asarray(losses.entropy_from_logits(jnp.zeros((1, 1, 4)))).round(4))  # log 4
      [[1.3863]]
    """
    return _entropy(jnp.asarray(logits))


@jax.checkpoint  # keep only the logits for the backward pass
def _entropy(logits: jax.Array) -> jax.Array:
    z = _up(logits)
    zmax = jnp.max(jnp.where(jnp.isfinite(z), z, -jnp.inf), axis=-1, keepdims=True)
    z = z - jax.lax.stop_gradient(jnp.where(jnp.isfinite(zmax), zmax, 0))
    lse = jax.nn.logsumexp(z, axis=-1, keepdims=True)
    p = jnp.exp(z - lse)
    pz = p * jnp.where(p > 0, z, 0)  # 0 * -inf would be NaN
    return jnp.maximum(lse[..., 0] - jnp.sum(pz, axis=-1), 0.0)


# ----------------------------------------------------------------------------------------------
# Log-probabilities and entropy from the final hidden states, in vocabulary chunks
# ----------------------------------------------------------------------------------------------
def chunked_token_logprobs(
    hidden: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    *,
    chunk: int,
    temperature: float = 1.0,
    vocab_axis: int = 1,
) -> jax.Array:
    r"""``token_logprobs(hidden @ W / temperature, labels)`` without the ``[..., V]`` logits.

    .. math::
        z_{t,v} = h_t \cdot W_v / \tau, \qquad \log p(y_t) = z_{t,y_t} - \log \sum_v e^{z_{t,v}}

    The vocabulary is visited in chunks of ``chunk`` entries (a ``lax.scan``) with an online
    log-sum-exp (running max ``m`` and ``s = sum exp(z - m)``, Milakov & Gimelshein 2018), so only a
    ``[N, chunk]`` float32 block of logits exists at a time (``N`` = number of positions). The
    backward pass (``jax.custom_vjp``) recomputes each chunk's logits from the saved ``hidden``,
    ``weight`` and per-position log-sum-exp and accumulates ``dh`` and ``dW`` chunk by chunk:
    ``dz = g (onehot(y) - softmax(z)) / tau``. The matmuls run in ``hidden.dtype`` (the model's
    compute dtype, ``W`` cast chunk by chunk) with float32 accumulation, as the model's own head.
    A vocabulary that ``chunk`` does not divide ends with a chunk that overlaps the previous one;
    the overlapping columns are skipped.

    Args:
      hidden: ``[..., D]`` final hidden states (after the final norm), any float dtype.
      weight: the output layer: ``[D, V]`` (``vocab_axis=1``, an untied ``lm_head`` kernel) or
        ``[V, D]`` (``vocab_axis=0``, a tied input embedding).
      labels: ``[...]`` integer ids; out-of-range ids are clipped into ``[0, V)`` as in
        :func:`token_logprobs`.
      chunk: vocabulary entries per chunk (``>= 1``; ``min(chunk, V)`` is used).
      temperature: the logits are divided by it (PPO's sampling temperature).
      vocab_axis: which axis of ``weight`` is the vocabulary (0 or 1).

    Returns:
      ``[...]`` float32 log-probabilities.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from jaxrlhf import losses
      >>> h, w = jnp.ones((1, 2, 3)), jnp.zeros((3, 5))  # uniform over V=5
      >>> lp = losses.chunked_token_logprobs(h, w, jnp.array([[0, 4]]), chunk=2)
      >>> print(np.asarray(lp).round(4))
      [[-1.6094 -1.6094]]

    References:
      Milakov & Gimelshein, "Online normalizer calculation for softmax" (2018); Wijmans et al.,
      "Cut Your Losses in Large-Vocabulary Language Models" (2024): the same idea as a fused kernel.
    """
    return _chunked_call(hidden, weight, labels, chunk, temperature, vocab_axis, False)[0]


def chunked_logprobs_and_entropy(
    hidden: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    *,
    chunk: int,
    temperature: float = 1.0,
    vocab_axis: int = 1,
) -> tuple[jax.Array, jax.Array]:
    r""":func:`chunked_token_logprobs` and :func:`entropy_from_logits` of the same logits in one pass.

    .. math::
        H_t = \log s_t - a_t / s_t, \quad s_t = \sum_v e^{z_{t,v} - m_t}, \quad
        a_t = \sum_v e^{z_{t,v} - m_t} (z_{t,v} - m_t)

    ``a`` is kept online with ``s`` and the running max ``m``: when the max moves from ``m`` to
    ``m'``, ``a <- e^{m - m'} (a + (m - m') s)``. Backward: ``dH/dz_v = -p_v (log p_v + H)``.
    Arguments as :func:`chunked_token_logprobs`.

    Returns:
      ``(logps, entropy)``, both ``[...]`` float32 (entropy in nats, ``>= 0``).
    """
    return _chunked_call(hidden, weight, labels, chunk, temperature, vocab_axis, True)


def _chunked_call(hidden, weight, labels, chunk, temperature, vocab_axis, with_entropy):
    hidden, weight, labels = jnp.asarray(hidden), jnp.asarray(weight), jnp.asarray(labels)
    if vocab_axis not in (0, 1) or weight.ndim != 2:
        raise ValueError(f"chunked log-probs: weight must be 2-D with vocab_axis 0 or 1, got {weight.shape}")
    d, v = weight.shape[1 - vocab_axis], weight.shape[vocab_axis]
    if hidden.shape[-1] != d or hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"chunked log-probs: hidden {hidden.shape} must be labels {labels.shape} + [D={d}] "
            f"(weight {weight.shape}, vocab_axis={vocab_axis})"
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"chunked log-probs: labels must be integer ids, got dtype {labels.dtype}")
    if int(chunk) < 1:
        raise ValueError(f"chunked log-probs: chunk must be >= 1, got {chunk}")
    lead = labels.shape
    h = hidden.reshape(-1, d)
    y = jnp.clip(labels, 0, v - 1).reshape(-1).astype(jnp.int32)
    spec = (min(int(chunk), v), float(temperature), int(vocab_axis), bool(with_entropy))
    lp, ent = _chunked_lse(h, weight, y, spec)
    return lp.reshape(lead), ent.reshape(lead)


def _chunk_logits(h, w, i, spec):
    """Chunk ``i``'s float32 logits ``[N, C]``, its first column ``start``, and ``fresh [C]``: the
    columns not already visited (the last chunk is shifted back to end at ``V``)."""
    chunk, temperature, axis, _ = spec
    v = w.shape[axis]
    start = jnp.minimum(i * chunk, v - chunk)
    wc = jax.lax.dynamic_slice_in_dim(w, start, chunk, axis=axis).astype(h.dtype)
    contract = ((1,), (1 - axis,))
    z = jax.lax.dot_general(h, wc, (contract, ((), ())), preferred_element_type=jnp.float32)
    if temperature != 1.0:
        z = z / temperature
    cols = start + jnp.arange(chunk, dtype=jnp.int32)
    return z, start, cols, cols >= i * chunk


def _n_chunks(w, spec) -> int:
    return -(-w.shape[spec[2]] // spec[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_lse(h, w, y, spec):
    """``(logps [N], entropy [N])`` (entropy zeros unless ``spec[3]``); ``spec`` = (chunk,
    temperature, vocab_axis, with_entropy)."""
    return _chunked_lse_fwd(h, w, y, spec)[0]


def _chunked_lse_fwd(h, w, y, spec):
    f32, with_entropy = jnp.float32, spec[3]
    n = h.shape[0]

    def body(carry, i):
        m, s, a, zy = carry
        z, _, cols, fresh = _chunk_logits(h, w, i, spec)
        z = jnp.where(fresh, z, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(z, axis=-1))
        scale = jnp.exp(m - m_new)
        e = jnp.exp(z - m_new[:, None])  # 0 on skipped columns
        if with_entropy:  # a = sum e (z - m), rescaled when the max moves
            shift = jnp.where(s > 0, (m - m_new) * s, 0.0)
            a = scale * (a + shift) + jnp.sum(jnp.where(fresh, e * (z - m_new[:, None]), 0.0), axis=-1)
        s = s * scale + jnp.sum(e, axis=-1)
        zy = zy + jnp.sum(jnp.where(fresh & (cols == y[:, None]), z, 0.0), axis=-1)
        return (m_new, s, a, zy), None

    init = (jnp.full((n,), -jnp.inf, f32), jnp.zeros((n,), f32), jnp.zeros((n,), f32), jnp.zeros((n,), f32))
    (m, s, a, zy), _ = jax.lax.scan(body, init, jnp.arange(_n_chunks(w, spec)))
    log_s = jnp.log(s)
    logps = (zy - m) - log_s
    entropy = jnp.maximum(log_s - a / s, 0.0) if with_entropy else jnp.zeros_like(logps)
    return (logps, entropy), (h, w, y, m + log_s, entropy)


def _chunked_lse_bwd(spec, res, ct):
    h, w, y, lse, entropy = res
    g_lp, g_ent = (c.astype(jnp.float32) for c in ct)
    axis, with_entropy = spec[2], spec[3]

    def body(carry, i):
        dh, dw = carry
        z, start, cols, fresh = _chunk_logits(h, w, i, spec)
        p = jnp.where(fresh, jnp.exp(z - lse[:, None]), 0.0)  # softmax over the whole vocabulary
        dz = g_lp[:, None] * (jnp.where(fresh & (cols == y[:, None]), 1.0, 0.0) - p)
        if with_entropy:  # dH/dz = -p (log p + H)
            dz = dz - g_ent[:, None] * p * (z - lse[:, None] + entropy[:, None])
        if spec[1] != 1.0:
            dz = dz / spec[1]
        dz = dz.astype(h.dtype)
        wc = jax.lax.dynamic_slice_in_dim(w, start, spec[0], axis=axis).astype(h.dtype)
        dh = dh + jax.lax.dot_general(dz, wc, (((1,), (axis,)), ((), ())), preferred_element_type=jnp.float32)
        # dW chunk: [D, C] (vocab_axis 1) or [C, D] (vocab_axis 0)
        lhs, rhs = (h, dz) if axis == 1 else (dz, h)
        dwc = jax.lax.dot_general(lhs, rhs, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        old = jax.lax.dynamic_slice_in_dim(dw, start, spec[0], axis=axis)
        return (dh, jax.lax.dynamic_update_slice_in_dim(dw, old + dwc, start, axis=axis)), None

    init = (jnp.zeros(h.shape, jnp.float32), jnp.zeros(w.shape, jnp.float32))
    (dh, dw), _ = jax.lax.scan(body, init, jnp.arange(_n_chunks(w, spec)))
    return dh.astype(h.dtype), dw.astype(w.dtype), None


_chunked_lse.defvjp(_chunked_lse_fwd, _chunked_lse_bwd)


# ----------------------------------------------------------------------------------------------
# Masked reductions
# ----------------------------------------------------------------------------------------------
def masked_mean(x: jax.Array, mask: jax.Array, axis: int | tuple[int, ...] | None = None) -> jax.Array:
    r"""Mean of the valid entries of ``x``; the denominator is clamped at 1.

    .. math::
        \mathrm{mean}(x; m) = \frac{\sum x \, m}{\max(\sum m, 1)}

    Masked entries are selected away before multiplying, so ``NaN``/``inf`` there is harmless.

    Args:
      x: ``[...]`` values.
      mask: broadcastable to ``x``; 1 (or a weight) on valid entries, 0 elsewhere.
      axis: axis or axes to reduce; ``None`` reduces everything.

    Returns:
      float32 array of ``x``'s shape with ``axis`` removed (a scalar for ``axis=None``); 0 where
      nothing is valid.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from jaxrlhf import losses
      >>> x = jnp.array([[1.0, 3.0, jnp.nan], [jnp.inf, 0.0, 0.0]])
      >>> m = jnp.array([[1, 1, 0], [0, 0, 0]])
      >>> print(losses.masked_mean(x, m), losses.masked_mean(x, m, axis=1))
      2.0 [2. 0.]
    """
    x = _up(x)
    valid, w = _weights(mask, x.shape, x.dtype)
    num = jnp.sum(jnp.where(valid, x, 0) * w, axis=axis)
    den = jnp.sum(w, axis=axis)
    return num / jnp.maximum(den, 1)


def masked_whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    r"""Normalise the valid entries of ``x`` to zero mean and unit variance over the whole batch.

    .. math::
        \hat x = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \;(+\, \mu \text{ if not shift\_mean}),
        \quad \mu = \mathrm{mean}(x; m), \quad \sigma^2 = \mathrm{mean}((x - \mu)^2; m)

    ``μ`` and the *population* variance ``σ²`` are taken over every valid entry of the whole array
    (not per row), as PPO advantage normalisation does. Masked outputs are 0; an all-masked input
    gives all zeros (no ``NaN``).

    Args:
      x: ``[...]`` values (e.g. advantages ``[B, T]``).
      mask: broadcastable to ``x``; 1 on valid entries, 0 elsewhere.
      shift_mean: if False, add ``μ`` back (rescale only, keep the mean).
      eps: added to the variance under the square root.

    Returns:
      float32 array of ``x``'s shape; 0 where masked.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from jaxrlhf import losses
      >>> x = jnp.array([[1.0, 3.0, 99.0]])
      >>> print(np.asarray(losses.masked_whiten(x, jnp.array([[1, 1, 0]]))).round(4))
      [[-1.  1.  0.]]

    References:
      Engstrom et al. 2020, "Implementation Matters in Deep Policy Gradients" (advantage
      normalisation); Xu et al. 2024, "Is DPO Superior to PPO for LLM Alignment?" (ICML).
    """
    x = _up(x)
    valid = _valid(mask, x.shape)
    mean = masked_mean(x, mask)
    centred = jnp.where(valid, x - mean, 0)
    var = masked_mean(centred * centred, mask)
    out = centred * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(valid, out, 0)


def loss_denominator(
    mask: jax.Array, mode: str = "token_mean", *, max_tokens: int | None = None
) -> jax.Array:
    r"""The local denominator :func:`aggregate_loss` uses for ``mode`` (before clamping at 1).

    ``token_mean``: the number (total weight) of valid tokens; ``seq_mean`` / ``seq_sum``: the
    number of rows with at least one valid token; ``seq_sum_norm``: that number of rows times
    ``max_tokens`` (Dr.GRPO's constant). Summed over the micro-batches of a step (or ``psum``-ed
    over devices) it is the ``global_denominator`` that makes gradient accumulation exact.

    Args:
      mask: ``[B, T]`` loss mask.
      mode: one of ``"token_mean"``, ``"seq_mean"``, ``"seq_sum"``, ``"seq_sum_norm"``.
      max_tokens: ``seq_sum_norm`` only: the constant length normaliser, e.g. the maximum
        response length (default: the mask width ``T``). An error for the other modes.

    Returns:
      float32 scalar.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from jaxrlhf import losses
      >>> m = jnp.array([[1, 1, 0], [0, 0, 0], [0, 1, 1]])
      >>> print(losses.loss_denominator(m, "token_mean"), losses.loss_denominator(m, "seq_mean"))
      4.0 2.0
      >>> print(losses.loss_denominator(m, "seq_sum_norm", max_tokens=8))
      16.0
    """
    _check_mode(mode, max_tokens)
    mask = jnp.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"loss_denominator: mask must be [B, T], got shape {mask.shape}")
    w = jnp.where(mask != 0, _up(mask), 0)
    if mode == "token_mean":
        return jnp.sum(w)
    rows = jnp.sum(jnp.any(mask != 0, axis=-1)).astype(w.dtype)
    if mode == "seq_sum_norm":
        return rows * (mask.shape[-1] if max_tokens is None else max_tokens)
    return rows


def _check_mode(mode: str, max_tokens: int | None = None) -> None:
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"aggregation mode must be one of {AGGREGATION_MODES}, got {mode!r}")
    if max_tokens is None:
        return
    if mode != "seq_sum_norm":
        raise ValueError(f"max_tokens={max_tokens} is read only by mode 'seq_sum_norm', not {mode!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")


def aggregate_loss(
    per_token: jax.Array,
    mask: jax.Array,
    mode: str = "token_mean",
    global_denominator: jax.Array | float | None = None,
    *,
    max_tokens: int | None = None,
) -> jax.Array:
    r"""Reduce a per-token loss ``[B, T]`` to a scalar: token-mean, sequence-mean or sequence-sum.

    .. math::
        \text{token\_mean} = \frac{\sum_{b,t} m_{bt} \ell_{bt}}{D_{tok}}, \quad
        \text{seq\_mean} = \frac{1}{D_{seq}} \sum_{b} \frac{\sum_t m_{bt} \ell_{bt}}{\sum_t m_{bt}},
        \quad \text{seq\_sum} = \frac{1}{D_{seq}} \sum_{b} \sum_t m_{bt} \ell_{bt},
        \quad \text{seq\_sum\_norm} = \frac{1}{D_{seq} L} \sum_{b} \sum_t m_{bt} \ell_{bt}

    ``D_tok`` is the number of valid tokens and ``D_seq`` the number of rows with at least one
    valid token (rows with none contribute nothing), both clamped at 1 — or, when given,
    ``global_denominator``. ``seq_sum_norm`` is Dr.GRPO's aggregation: every token weighs the
    same whatever its sequence's length, and the normaliser ``D_seq · L`` (``L = max_tokens``,
    the maximum response length; the mask width ``T`` by default) does not depend on the
    lengths sampled, so there is neither the length bias of ``seq_mean`` nor the batch-dependent
    scale of ``token_mean``. For gradient accumulation pass the *global* denominator of the whole
    step (the sum of :func:`loss_denominator` over its micro-batches) to every micro-batch and
    **sum** the micro-batch losses: the result equals the full-batch value exactly, whatever the
    split. Masked slots of ``per_token`` may hold ``NaN``/``inf``: the value ignores them (for a
    finite *gradient* they must be finite where the loss was computed from differentiated inputs).

    Args:
      per_token: ``[B, T]`` unreduced loss (e.g. from :func:`ppo_policy_loss`).
      mask: ``[B, T]`` 1 on valid tokens, 0 elsewhere.
      mode: ``"token_mean"`` (every token weighs the same), ``"seq_mean"`` (every sequence weighs
        the same; each is its token-mean), ``"seq_sum"`` (mean over sequences of the per-sequence
        sum, e.g. DPO-style sequence losses) or ``"seq_sum_norm"`` (``seq_sum / max_tokens``).
      global_denominator: optional scalar replacing the local denominator (tokens for
        ``token_mean``, sequences for ``seq_mean``/``seq_sum``, sequences × ``max_tokens`` for
        ``seq_sum_norm``: the sum of :func:`loss_denominator` over the step); clamped at 1.
      max_tokens: ``seq_sum_norm`` only, without ``global_denominator`` (which already holds it):
        the constant ``L``; an error otherwise.

    Returns:
      float32 scalar.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from jaxrlhf import losses
      >>> loss = jnp.array([[1.0, 3.0, 0.0], [5.0, 0.0, 0.0]])
      >>> m = jnp.array([[1, 1, 0], [1, 0, 0]])
      >>> for mode in ("token_mean", "seq_mean", "seq_sum"):
      ...     print(mode, losses.aggregate_loss(loss, m, mode))
      token_mean 3.0
      seq_mean 3.5
      seq_sum 4.5
      >>> print(losses.aggregate_loss(loss, m, "seq_sum_norm", max_tokens=3))  # (4 + 5) / (2 * 3)
      1.5
      >>> half = [losses.aggregate_loss(loss[i : i + 1], m[i : i + 1], global_denominator=3) for i in (0, 1)]
      >>> print(sum(half))
      3.0

    References:
      Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective" (the length
      bias of sequence-mean aggregation; Dr.GRPO's constant normaliser, ``seq_sum_norm``); Yu et
      al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" (token-mean).
    """
    _check_mode(mode, max_tokens)
    if global_denominator is not None and max_tokens is not None:
        raise ValueError("aggregate_loss: pass max_tokens to loss_denominator, not with a global_denominator")
    x = _up(per_token)
    if x.ndim != 2:
        raise ValueError(f"aggregate_loss: per_token must be [B, T], got shape {x.shape}")
    valid, w = _weights(mask, x.shape, x.dtype)
    row_sum = jnp.sum(jnp.where(valid, x, 0) * w, axis=-1)  # [B]
    if global_denominator is not None:
        den = jnp.maximum(jnp.asarray(global_denominator, x.dtype), 1)
    else:
        den = jnp.maximum(loss_denominator(mask, mode, max_tokens=max_tokens).astype(x.dtype), 1)
    if mode == "token_mean":
        return jnp.sum(row_sum) / den
    if mode == "seq_mean":
        row_sum = row_sum / jnp.maximum(jnp.sum(w, axis=-1), 1)
    return jnp.sum(row_sum) / den


# ----------------------------------------------------------------------------------------------
# Preference losses
# ----------------------------------------------------------------------------------------------
def bradley_terry_loss(
    chosen_rewards: jax.Array, rejected_rewards: jax.Array, margin: jax.Array | float = 0.0
) -> jax.Array:
    r"""Bradley-Terry negative log-likelihood that the chosen response beats the rejected one.

    .. math::
        \ell = -\log \sigma(r_c - r_r - m)

    Uses ``jax.nn.log_sigmoid``, finite for reward gaps of any size (``±1e4``).

    Args:
      chosen_rewards: ``[B]`` scalar rewards of the chosen responses.
      rejected_rewards: ``[B]`` scalar rewards of the rejected responses.
      margin: scalar or ``[B]`` required margin (Llama 2); 0 gives the plain model.

    Returns:
      ``[B]`` float32 per-pair losses.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from jaxrlhf import losses
      >>> print(np.asarray(losses.bradley_terry_loss(jnp.array([0.0, 2.0]), jnp.array([0.0, 1.0]))).round(4))
      [0.6931 0.3133]

    References:
      Bradley & Terry 1952, "Rank Analysis of Incomplete Block Designs"; Ouyang et al. 2022,
      "Training language models to follow instructions with human feedback"; Touvron et al. 2023
      (Llama 2) for the margin.
    """
    dtype = _compute_dtype(chosen_rewards, rejected_rewards, margin)
    gap = _up(chosen_rewards, dtype) - _up(rejected_rewards, dtype) - _up(margin, dtype)
    return -jax.nn.log_sigmoid(gap)


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> jax.Array:
    r"""Direct Preference Optimization loss per pair (sigmoid/conservative DPO or IPO).

    With :math:`h = (\pi_c - \pi^{ref}_c) - (\pi_r - \pi^{ref}_r)` (sequence log-probabilities):

    .. math::
        \text{sigmoid:}\quad \ell = -(1 - \varepsilon) \log \sigma(\beta h)
        - \varepsilon \log \sigma(-\beta h)

        \text{ipo:}\quad \ell = \left(h - \frac{1}{2\beta}\right)^2

    ``ε = label_smoothing`` is the conservative-DPO assumption that a fraction ``ε`` of labels is
    flipped; ``ε = 0`` is plain DPO. IPO ignores nothing silently: a non-zero ``label_smoothing``
    with ``loss_type="ipo"`` is an error. (IPO as published uses length-averaged log-probs; pass
    those if you want that variant.) Finite for log-probs of any magnitude.

    Args:
      policy_chosen_logps: ``[B]`` policy log-probabilities of the chosen responses.
      policy_rejected_logps: ``[B]`` policy log-probabilities of the rejected responses.
      ref_chosen_logps: ``[B]`` reference log-probabilities of the chosen responses.
      ref_rejected_logps: ``[B]`` reference log-probabilities of the rejected responses.
      beta: inverse temperature (KL strength), ``> 0``.
      label_smoothing: ``ε`` in ``[0, 0.5)``, sigmoid loss only.
      loss_type: ``"sigmoid"`` or ``"ipo"``.

    Returns:
      ``[B]`` float32 per-pair losses.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from jaxrlhf import losses
      >>> pc, pr, rc, rr = jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([-2.0]), jnp.array([-2.0])
      >>> print(np.asarray(losses.dpo_loss(pc, pr, rc, rr, beta=0.5)).round(4))  # -log sigmoid(0.5 * 2)
      [0.3133]
      >>> print(losses.dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo"))  # (2 - 1)^2
      [1.]

    References:
      Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
      Reward Model"; Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO"
      (conservative DPO); Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning
      from Human Preferences" (IPO).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo_loss: loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "ipo" and isinstance(label_smoothing, int | float) and label_smoothing != 0:
        raise ValueError(f"dpo_loss: label_smoothing={label_smoothing} has no meaning for loss_type='ipo'")
    dtype = _compute_dtype(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    pc, pr = _up(policy_chosen_logps, dtype), _up(policy_rejected_logps, dtype)
    rc, rr = _up(ref_chosen_logps, dtype), _up(ref_rejected_logps, dtype)
    h = (pc - rc) - (pr - rr)
    if loss_type == "ipo":
        return jnp.square(h - 1.0 / (2.0 * beta))
    eps = jnp.asarray(label_smoothing, dtype)
    return -(1.0 - eps) * jax.nn.log_sigmoid(beta * h) - eps * jax.nn.log_sigmoid(-beta * h)


def dpo_implicit_rewards(policy_logps: jax.Array, ref_logps: jax.Array, beta: float) -> jax.Array:
    r"""DPO's implicit reward of each response.

    .. math::
        \hat r = \beta (\log \pi(y \mid x) - \log \pi_{ref}(y \mid x))

    Differentiable; wrap in ``jax.lax.stop_gradient`` when used only as a metric (reward margin,
    accuracy = mean of ``r_c > r_r``).

    Args:
      policy_logps: ``[B]`` policy sequence log-probabilities.
      ref_logps: ``[B]`` reference sequence log-probabilities.
      beta: the DPO ``β``.

    Returns:
      ``[B]`` float32 implicit rewards.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from jaxrlhf import losses
      >>> print(np.asarray(losses.dpo_implicit_rewards(jnp.array([-1.0]), jnp.array([-3.0]), 0.1)).round(4))
      [0.2]

    References:
      Rafailov et al. 2023, "Direct Preference Optimization", section 5.
    """
    dtype = _compute_dtype(policy_logps, ref_logps)
    return beta * (_up(policy_logps, dtype) - _up(ref_logps, dtype))


def simpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    chosen_lengths: jax.Array,
    rejected_lengths: jax.Array,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> jax.Array:
    r"""SimPO loss per pair: reference-free, length-normalised preference loss with a margin.

    .. math::
        \ell = -\log \sigma\left(\frac{\beta}{|y_w|} \log \pi(y_w \mid x)
        - \frac{\beta}{|y_l|} \log \pi(y_l \mid x) - \gamma\right)

    i.e. :func:`bradley_terry_loss` on the implicit rewards of :func:`simpo_implicit_rewards` with
    the margin ``γ``. ``γ`` is the paper's target reward margin, in reward units (eq. 6), the same
    quantity as TRL's ``CPOConfig.simpo_gamma`` (TRL computes ``β (Δ - simpo_gamma / β)``); the
    authors' code (``princeton-nlp/SimPO``) is configured by ``gamma_beta_ratio = γ / β`` instead.
    Finite for log-probabilities of any magnitude; lengths below 1 are clamped at 1.

    Args:
      policy_chosen_logps: ``[B]`` summed log-probabilities of the chosen responses
        (:func:`sequence_logps`).
      policy_rejected_logps: ``[B]`` summed log-probabilities of the rejected responses.
      chosen_lengths: ``[B]`` number of response tokens of each chosen response (int or float).
      rejected_lengths: ``[B]`` number of response tokens of each rejected response.
      beta: reward scale ``β > 0`` (the paper uses 2 to 10).
      gamma: target reward margin ``γ`` (not ``γ/β``).

    Returns:
      ``[B]`` float32 per-pair losses.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from jaxrlhf import losses
      >>> # rewards 2 * (-4 / 4) = -2 and 2 * (-9 / 3) = -6: -log sigmoid(-2 + 6 - 0.5)
      >>> out = losses.simpo_loss(jnp.array([-4.0]), jnp.array([-9.0]), jnp.array([4]), jnp.array([3]))
      >>> print(np.asarray(out).round(4))
      [0.0298]

    References:
      Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"
      (NeurIPS), eq. 6.
    """
    dtype = _compute_dtype(policy_chosen_logps, policy_rejected_logps)
    r_w = simpo_implicit_rewards(_up(policy_chosen_logps, dtype), chosen_lengths, beta)
    r_l = simpo_implicit_rewards(_up(policy_rejected_logps, dtype), rejected_lengths, beta)
    return -jax.nn.log_sigmoid(r_w - r_l - jnp.asarray(gamma, dtype))


def simpo_implicit_rewards(policy_logps: jax.Array, lengths: jax.Array, beta: float = 2.0) -> jax.Array:
    r"""SimPO's implicit reward: the length-normalised, scaled sequence log-probability.

    .. math::
        \hat r = \frac{\beta}{|y|} \log \pi(y \mid x)

    Differentiable; wrap in ``jax.lax.stop_gradient`` when used as a metric (reward margin,
    accuracy = mean of ``r_w > r_l``).

    Args:
      policy_logps: ``[B]`` summed policy log-probabilities of the responses.
      lengths: ``[B]`` response lengths in tokens, clamped at 1.
      beta: the SimPO ``β``.

    Returns:
      ``[B]`` float32 implicit rewards.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from jaxrlhf import losses
      >>> print(losses.simpo_implicit_rewards(jnp.array([-6.0, -1.0]), jnp.array([3, 0]), beta=2.0))
      [-4. -2.]

    References:
      Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
      eq. 4.
    """
    dtype = _compute_dtype(policy_logps)
    lengths = jnp.maximum(_up(lengths, dtype), 1)
    return beta * _up(policy_logps, dtype) / lengths


# ----------------------------------------------------------------------------------------------
# PPO
# ----------------------------------------------------------------------------------------------
def gae(
    rewards: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[jax.Array, jax.Array]:
    r"""Generalized Advantage Estimation over the valid tokens of each row.

    .. math::
        \delta_t = r_t + \gamma V_{next(t)} - V_t, \qquad A_t = \delta_t + \gamma\lambda A_{next(t)},
        \qquad R_t = A_t + V_t

    ``next(t)`` is the next *valid* token of the row (masked slots in between are skipped, so a
    row may start after a prompt, end before padding, or even contain holes); after a row's last
    valid token ``V = 0`` and ``A = 0`` (the episode terminates). Computed by one reverse
    ``lax.scan`` over time. Advantages and returns are 0 where the mask is 0, and masked slots
    may hold anything (``NaN`` included). Usually called under ``jax.lax.stop_gradient``.

    Args:
      rewards: ``[B, T]`` per-token rewards (e.g. the score on the last token minus a KL penalty).
      values: ``[B, T]`` value estimates ``V_t``.
      mask: ``[B, T]`` 1 on the valid response tokens, 0 on prompt and padding.
      gamma: discount ``γ``.
      lam: GAE ``λ``.

    Returns:
      ``(advantages, returns)``, each ``[B, T]`` float32.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from jaxrlhf import losses
      >>> r = jnp.array([[0.0, 0.0, 1.0, 0.0]])
      >>> v = jnp.array([[9.0, 0.5, 0.5, 9.0]])
      >>> m = jnp.array([[0, 1, 1, 0]])  # one prompt token, one padding token
      >>> adv, ret = losses.gae(r, v, m, gamma=1.0, lam=1.0)
      >>> print(adv, ret)
      [[0.  0.5 0.5 0. ]] [[0. 1. 1. 0.]]

    References:
      Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
      Estimation".
    """
    dtype = _compute_dtype(rewards, values)
    r, v = _up(rewards, dtype), _up(values, dtype)
    if r.shape != v.shape or jnp.shape(mask) != r.shape:
        raise ValueError(
            f"gae: rewards {r.shape}, values {v.shape} and mask {jnp.shape(mask)} must share one shape"
        )
    valid = jnp.asarray(mask) != 0
    r = jnp.where(valid, r, 0)
    v = jnp.where(valid, v, 0)
    gamma = jnp.asarray(gamma, dtype)
    lam = jnp.asarray(lam, dtype)

    def step(carry, xs):
        next_value, next_adv = carry  # [...] of the next valid token (0 past the last one)
        r_t, v_t, valid_t = xs
        delta = r_t + gamma * next_value - v_t
        adv = delta + gamma * lam * next_adv
        adv = jnp.where(valid_t, adv, 0)
        carry = (jnp.where(valid_t, v_t, next_value), jnp.where(valid_t, adv, next_adv))
        return carry, adv

    zeros = jnp.zeros(r.shape[:-1], dtype)
    time_major = lambda x: jnp.moveaxis(x, -1, 0)
    _, adv = jax.lax.scan(
        step, (zeros, zeros), (time_major(r), time_major(v), time_major(valid)), reverse=True
    )
    adv = jnp.moveaxis(adv, 0, -1)
    returns = jnp.where(valid, adv + v, 0)
    return adv, returns


def kl_penalty(logprobs: jax.Array, ref_logprobs: jax.Array, estimator: str = "k1") -> jax.Array:
    r"""Per-token estimate of KL(π ‖ π_ref) from log-probabilities of tokens sampled from π.

    With :math:`d = \log \pi_{ref}(y_t) - \log \pi(y_t)`:

    .. math::
        k_1 = -d, \qquad k_2 = \tfrac{1}{2} d^2, \qquad k_3 = e^{d} - 1 - d

    ``k1`` is unbiased but can be negative, ``k2`` is biased with low variance, ``k3`` is
    unbiased and always ``>= 0`` (computed as ``expm1(d) - d``).

    Args:
      logprobs: ``[B, T]`` log-probabilities under the policy.
      ref_logprobs: ``[B, T]`` log-probabilities under the reference.
      estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
      ``[B, T]`` float32 per-token estimates (unmasked; reduce with :func:`aggregate_loss`).

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from jaxrlhf import losses
      >>> lp, ref = jnp.array([[-1.0]]), jnp.array([[-2.0]])
      >>> print([round(float(losses.kl_penalty(lp, ref, k)[0, 0]), 4) for k in ("k1", "k2", "k3")])
      [1.0, 0.5, 0.3679]

    References:
      Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_penalty: estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    dtype = _compute_dtype(logprobs, ref_logprobs)
    d = _up(ref_logprobs, dtype) - _up(logprobs, dtype)
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * jnp.square(d)
    return jnp.maximum(jnp.expm1(d) - d, 0)


def ppo_policy_loss(
    logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array, clip_eps: float = 0.2
) -> jax.Array:
    r"""PPO clipped surrogate policy loss per token (unreduced).

    .. math::
        \ell_t = \max\left(-A_t \rho_t,\; -A_t\, \mathrm{clip}(\rho_t, 1 - \epsilon, 1 + \epsilon)\right),
        \qquad \rho_t = \exp(\log\pi(y_t) - \log\pi_{old}(y_t))

    Args:
      logprobs: ``[B, T]`` log-probabilities under the current policy (differentiated).
      old_logprobs: ``[B, T]`` log-probabilities under the policy that sampled the tokens.
      advantages: ``[B, T]`` advantages (typically whitened, treated as constants).
      clip_eps: ``ε``.

    Returns:
      ``[B, T]`` float32 per-token losses; reduce with :func:`aggregate_loss`. The clip fraction
      is ``aggregate_loss((|ρ - 1| > ε).astype(float), mask)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from jaxrlhf import losses
      >>> lp, old = jnp.log(jnp.array([[1.5, 0.5]])), jnp.zeros((1, 2))
      >>> print(np.asarray(losses.ppo_policy_loss(lp, old, jnp.array([[1.0, 1.0]]))).round(4))
      [[-1.2 -0.5]]

    References:
      Schulman et al. 2017, "Proximal Policy Optimization Algorithms".
    """
    dtype = _compute_dtype(logprobs, old_logprobs, advantages)
    adv = _up(advantages, dtype)
    ratio = jnp.exp(_up(logprobs, dtype) - _up(old_logprobs, dtype))
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return jnp.maximum(-adv * ratio, -adv * clipped)


def ppo_value_loss(
    values: jax.Array, old_values: jax.Array, returns: jax.Array, clip_eps: float = 0.2
) -> jax.Array:
    r"""PPO clipped value loss per token (unreduced).

    .. math::
        \ell_t = \tfrac{1}{2} \max\left((v_t - R_t)^2,\;
        (v^{old}_t + \mathrm{clip}(v_t - v^{old}_t, -\epsilon, \epsilon) - R_t)^2\right)

    Args:
      values: ``[B, T]`` current value predictions (differentiated).
      old_values: ``[B, T]`` value predictions at rollout time.
      returns: ``[B, T]`` GAE returns (targets).
      clip_eps: ``ε`` (in value units).

    Returns:
      ``[B, T]`` float32 per-token losses; reduce with :func:`aggregate_loss`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from jaxrlhf import losses
      >>> v, old, ret = jnp.array([[1.0, 0.1]]), jnp.array([[0.0, 0.0]]), jnp.array([[1.0, 0.0]])
      >>> print(np.asarray(losses.ppo_value_loss(v, old, ret)).round(4))  # max(0, 0.8^2)/2; max(.01, .01)/2
      [[0.32  0.005]]

    References:
      Schulman et al. 2017, "Proximal Policy Optimization Algorithms"; Ziegler et al. 2019,
      "Fine-Tuning Language Models from Human Preferences" (the clipped value loss for LMs).
    """
    dtype = _compute_dtype(values, old_values, returns)
    v, old, ret = _up(values, dtype), _up(old_values, dtype), _up(returns, dtype)
    v_clipped = old + jnp.clip(v - old, -clip_eps, clip_eps)
    return 0.5 * jnp.maximum(jnp.square(v - ret), jnp.square(v_clipped - ret))


def ema_update(ref_params: Any, params: Any, decay: jax.Array | float) -> Any:
    r"""Exponential moving average of a pytree: move the reference towards the parameters.

    .. math::
        \pi_{ref,k} = \alpha\, \pi_{ref,k-1} + (1 - \alpha)\, \pi_{actor,k}, \qquad \alpha = \text{decay}

    ``decay = 1`` keeps the reference frozen, ``decay = 0`` copies the parameters. Computed in
    float32 and cast back to each reference leaf's dtype; non-float leaves (e.g. integer
    counters) are returned from ``ref_params`` unchanged. Same as ``optax.incremental_update``
    with ``step_size = 1 - decay``.

    Args:
      ref_params: pytree of reference parameters.
      params: pytree of current parameters with the same structure and shapes.
      decay: scalar ``α`` in ``[0, 1]`` (may be traced).

    Returns:
      A pytree like ``ref_params`` (same structure and dtypes).

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from jaxrlhf import losses
      >>> print(np.asarray(losses.ema_update({"w": jnp.zeros(2)}, {"w": jnp.ones(2)}, 0.9)["w"]).round(4))
      [0.1 0.1]

    References:
      Xu et al. 2024, "Is DPO Superior to PPO for LLM Alignment? A Comprehensive Study" (ICML),
      the exponential-moving-average reference model.
    """

    def update(ref: jax.Array, new: jax.Array) -> jax.Array:
        ref, new = jnp.asarray(ref), jnp.asarray(new)
        if ref.shape != new.shape:
            raise ValueError(f"ema_update: reference leaf {ref.shape} and parameter leaf {new.shape} differ")
        if not jnp.issubdtype(ref.dtype, jnp.inexact):
            return ref
        dtype = _compute_dtype(ref, new)
        a = jnp.asarray(decay, dtype)
        return (a * ref.astype(dtype) + (1 - a) * new.astype(dtype)).astype(ref.dtype)

    return jax.tree.map(update, ref_params, params)


# ----------------------------------------------------------------------------------------------
# Critic-free policy optimisation: GRPO, Dr.GRPO, RLOO, REINFORCE++, DAPO, GSPO
# ----------------------------------------------------------------------------------------------
def _grouped(rewards: jax.Array, group_size: int, name: str) -> jax.Array:
    """``rewards [N]`` as float ``[N / group_size, group_size]`` after checking the shapes."""
    r = _up(rewards)
    if r.ndim != 1:
        raise ValueError(f"{name}: rewards must be [N], got shape {r.shape}")
    try:
        g = operator.index(group_size)
    except TypeError as e:
        raise ValueError(f"{name}: group_size must be a static Python int, got {group_size!r}") from e
    if g < 2:
        raise ValueError(f"{name}: group_size must be >= 2 (a group needs a baseline), got {g}")
    if r.shape[0] % g:
        raise ValueError(f"{name}: N={r.shape[0]} rewards do not split into groups of group_size={g}")
    return r.reshape(-1, g)


def group_reward_stats(rewards: jax.Array, group_size: int) -> dict[str, jax.Array]:
    r"""Per-group mean, unbiased standard deviation and all-equal flag of grouped rewards.

    .. math::
        \mu_g = \frac{1}{G} \sum_{j \in g} r_j, \qquad
        \sigma_g = \sqrt{\frac{1}{G - 1} \sum_{j \in g} (r_j - \mu_g)^2}

    ``rewards`` holds ``N / G`` groups of ``G = group_size`` contiguous samples (the samples of one
    prompt). A group whose rewards are all equal gets exactly ``μ_g = r`` and ``σ_g = 0``. The
    deviations are rescaled by their maximum before squaring, so ``σ_g`` does not overflow for
    rewards up to the float32 range. ``group_size`` is static (a Python int).

    Args:
      rewards: ``[N]`` scalar rewards, ``N = prompts × group_size``.
      group_size: samples per prompt ``G >= 2``.

    Returns:
      ``{"mean": [N/G], "std": [N/G], "all_equal": [N/G] bool}`` (float32 statistics); the
      fraction of all-equal groups is ``all_equal.mean()``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from jaxrlhf import losses
      >>> s = losses.group_reward_stats(jnp.array([0.0, 1.0, 1.0, 1.0]), group_size=2)
      >>> print(s["mean"], np.asarray(s["std"]).round(4), s["all_equal"])
      [0.5 1. ] [0.7071 0.    ] [False  True]

    References:
      Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
      Language Models" (group statistics of GRPO).
    """
    r = _grouped(rewards, group_size, "group_reward_stats")  # [P, G]
    all_equal = jnp.max(r, axis=-1) == jnp.min(r, axis=-1)  # [P]
    mean = jnp.where(all_equal, r[:, 0], jnp.mean(r, axis=-1))  # exact for a tied group
    dev = r - mean[:, None]
    scale = jnp.max(jnp.abs(dev), axis=-1)  # [P]
    safe = jnp.where(scale > 0, scale, 1)
    ss = jnp.sum(jnp.square(dev / safe[:, None]), axis=-1)  # in [1, G] unless tied
    std = scale * jnp.sqrt(jnp.where(all_equal, 1, ss) / (group_size - 1))
    return {"mean": mean, "std": jnp.where(all_equal, 0, std), "all_equal": all_equal}


def group_advantages(
    rewards: jax.Array, group_size: int, method: str = "grpo", eps: float = 1e-6
) -> jax.Array:
    r"""Critic-free advantages: each sample's reward against the other samples of its prompt.

    With ``G = group_size`` samples per prompt, group mean ``μ_g`` and unbiased (``ddof=1``)
    standard deviation ``σ_g`` (:func:`group_reward_stats`):

    .. math::
        \text{grpo:}\; A_i = \frac{r_i - \mu_g}{\sigma_g + \epsilon}, \qquad
        \text{dr\_grpo:}\; A_i = r_i - \mu_g, \qquad
        \text{rloo:}\; A_i = r_i - \frac{1}{G - 1} \sum_{j \in g, j \ne i} r_j
        = \frac{G}{G - 1} (r_i - \mu_g)

    A group whose rewards are all equal gets advantage exactly 0 (it carries no signal; the
    fraction of such groups is worth logging, and they may be filtered). ``σ_g`` with ``ddof=1``
    is what TRL and verl use. The advantage is per sequence; broadcast it over the sequence's
    tokens (:func:`clipped_policy_loss` accepts ``[B]``). Jittable with ``group_size`` and
    ``method`` static: ``jax.jit(group_advantages, static_argnames=("group_size", "method"))``.
    Under ``jit`` on a sharded ``rewards`` the statistics are those of the global array.

    Args:
      rewards: ``[N]`` scalar rewards, ``N = prompts × group_size``, each prompt's samples
        contiguous (``rewards.reshape(prompts, group_size)``).
      group_size: samples per prompt ``G >= 2`` (a static Python int).
      method: ``"grpo"``, ``"dr_grpo"`` or ``"rloo"``.
      eps: added to ``σ_g`` (``grpo`` only).

    Returns:
      ``[N]`` float32 advantages.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from jaxrlhf import losses
      >>> r = jnp.array([1.0, 0.0, 0.0, 2.0, 2.0, 2.0])  # the second group is tied
      >>> for method in ("grpo", "dr_grpo", "rloo"):
      ...     print(method, np.asarray(losses.group_advantages(r, 3, method)).round(4))
      grpo [ 1.1547 -0.5773 -0.5773  0.      0.      0.    ]
      dr_grpo [ 0.6667 -0.3333 -0.3333  0.      0.      0.    ]
      rloo [ 1.  -0.5 -0.5  0.   0.   0. ]

    References:
      Shao et al. 2024, "DeepSeekMath" (GRPO); Liu et al. 2025, "Understanding R1-Zero-Like
      Training: A Critical Perspective" (Dr.GRPO); Ahmadian et al. 2024, "Back to Basics:
      Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs" (RLOO).
    """
    if method not in GROUP_ADVANTAGE_METHODS:
        raise ValueError(f"group_advantages: method must be one of {GROUP_ADVANTAGE_METHODS}, got {method!r}")
    stats = group_reward_stats(rewards, group_size)
    r = _grouped(rewards, group_size, "group_advantages")  # [P, G]
    dev = r - stats["mean"][:, None]  # exactly 0 in a tied group
    if method == "grpo":  # a tied group divides its zeros by 1, not by eps (which may be 0)
        adv = dev / jnp.where(stats["all_equal"], 1, stats["std"] + eps)[:, None]
    elif method == "dr_grpo":
        adv = dev
    else:  # rloo, through the mean: no cancellation in sum_g - r_i
        adv = dev * (group_size / (group_size - 1))
    return adv.reshape(-1)


def reinforce_pp_returns(token_rewards: jax.Array, mask: jax.Array, gamma: float = 1.0) -> jax.Array:
    r"""REINFORCE++ reward-to-go over the valid tokens of each row.

    .. math::
        G_t = r_t + \gamma\, G_{next(t)}, \qquad A = \mathrm{whiten}(G)

    ``next(t)`` is the next *valid* token of the row (masked slots in between are skipped, as in
    :func:`gae`); ``G = 0`` after the row's last valid token. One reverse ``lax.scan`` over time.
    REINFORCE++'s per-token reward is the sequence score on the last response token minus the
    per-token KL penalty ``β · kl_penalty(old_logprobs, ref_logprobs)``, and its advantages are the
    returns whitened over the **global** rollout batch: ``masked_whiten(returns, mask)`` on the
    whole (sharded) batch, before it is split into minibatches or micro-batches. (This equals
    :func:`gae` with values 0 and ``λ = 1``.) Returns are 0 where the mask is 0, and masked slots of
    ``token_rewards`` may hold anything.

    Args:
      token_rewards: ``[B, T]`` per-token rewards.
      mask: ``[B, T]`` 1 on the valid response tokens, 0 on prompt and padding.
      gamma: discount ``γ`` (1 in the paper).

    Returns:
      ``[B, T]`` float32 returns.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from jaxrlhf import losses
      >>> r = jnp.array([[9.0, -0.1, -0.1, 1.0, 9.0]])
      >>> m = jnp.array([[0, 1, 1, 1, 0]])  # one prompt token, one padding token
      >>> print(np.asarray(losses.reinforce_pp_returns(r, m)).round(4))
      [[0.  0.8 0.9 1.  0. ]]

    References:
      Hu et al. 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language
      Models".
    """
    dtype = _compute_dtype(token_rewards)
    r = _up(token_rewards, dtype)
    if jnp.shape(mask) != r.shape:
        raise ValueError(f"reinforce_pp_returns: token_rewards {r.shape} and mask {jnp.shape(mask)} differ")
    valid = jnp.asarray(mask) != 0
    r = jnp.where(valid, r, 0)
    gamma = jnp.asarray(gamma, dtype)

    def step(next_return, xs):
        r_t, valid_t = xs
        ret = r_t + gamma * next_return
        return jnp.where(valid_t, ret, next_return), jnp.where(valid_t, ret, 0)

    time_major = lambda x: jnp.moveaxis(x, -1, 0)
    zeros = jnp.zeros(r.shape[:-1], dtype)
    _, ret = jax.lax.scan(step, zeros, (time_major(r), time_major(valid)), reverse=True)
    return jnp.moveaxis(ret, 0, -1)


def _clip_range(ratio_level: str, clip_eps_low: float, clip_eps_high: float | None) -> tuple[float, float]:
    """``(low, high)`` of :func:`clipped_policy_loss`, checked."""
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(
            f"clipped_policy_loss: ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}"
        )
    low = clip_eps_low
    high = clip_eps_low if clip_eps_high is None else clip_eps_high
    if not (0 <= low < 1 and high >= 0):
        raise ValueError(
            f"clipped_policy_loss: need 0 <= clip_eps_low < 1 and clip_eps_high >= 0, got {low}, {high}"
        )
    return low, high


def _policy_inputs(logprobs, old_logprobs, advantages, mask):
    """``(logprobs, old_logprobs, advantages)`` in the compute dtype, advantages broadcast to ``[B, T]``."""
    dtype = _compute_dtype(logprobs, old_logprobs, advantages)
    lp, old, adv = _up(logprobs, dtype), _up(old_logprobs, dtype), _up(advantages, dtype)
    if lp.ndim != 2 or old.shape != lp.shape or jnp.shape(mask) != lp.shape:
        raise ValueError(
            "clipped_policy_loss: logprobs, old_logprobs and mask must share one [B, T] shape; got "
            f"{lp.shape}, {old.shape}, {jnp.shape(mask)}"
        )
    if adv.shape == lp.shape[:1]:
        adv = jnp.broadcast_to(adv[:, None], lp.shape)
    elif adv.shape != lp.shape:
        raise ValueError(
            f"clipped_policy_loss: advantages must be [B] or [B, T] = {lp.shape}, got {adv.shape}"
        )
    return lp, old, adv


def clipped_policy_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float | None = None,
    ratio_level: str = "token",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""Clipped surrogate policy loss per token with asymmetric clipping and token or sequence ratios.

    .. math::
        \ell_t = \max\left(-A_t \rho_t,\; -A_t\, \mathrm{clip}(\rho_t, 1 - \epsilon_{low},
        1 + \epsilon_{high})\right)

    ``ratio_level="token"`` (PPO, GRPO, DAPO): ``ρ_t = π(y_t) / π_old(y_t)``.
    ``ratio_level="sequence"`` (GSPO): every token of sequence ``i`` uses the length-normalised
    sequence ratio

    .. math::
        s_i = \exp\Big(\frac{1}{|y_i|} \sum_{t \in y_i} \log\pi(y_t) - \log\pi_{old}(y_t)\Big),
        \qquad \rho_{i,t} = \mathrm{sg}[s_i] \cdot \frac{\pi(y_t)}{\mathrm{sg}[\pi(y_t)]}

    whose value is ``s_i`` (so clipping acts on ``s_i``) and whose gradient is ``s_i ∇ log π(y_t)``
    (GSPO-token, eq. 13-14 of the paper). With a per-sequence advantage (``[B]``), the sum over a
    sequence's tokens of this loss has exactly the value and gradient of ``|y_i|`` times GSPO's
    sequence term ``max(-A_i s_i, -A_i clip(s_i))`` (whose gradient flows through every token's
    log-probability via ``s_i``), so ``seq_mean`` aggregation is GSPO's objective, for any
    aggregation mode the gradient is the one of the matching sequence-level objective, and
    per-token advantages are also allowed. ``clip_eps_high > clip_eps_low`` is DAPO's
    clip-higher; GSPO uses small ranges (e.g. ``3e-4`` / ``4e-4``).

    Masked slots are selected away first (loss 0, ratio 1, never clipped, no gradient), so they
    may hold garbage. No ratio is clamped: log-ratios above ~88 overflow float32, as in
    :func:`ppo_policy_loss`, to which the token level with ``clip_eps_high=None`` is equal on
    valid tokens.

    Args:
      logprobs: ``[B, T]`` log-probabilities under the current policy (differentiated).
      old_logprobs: ``[B, T]`` log-probabilities under the policy that sampled the tokens.
      advantages: ``[B, T]`` per-token advantages (e.g. whitened REINFORCE++ returns) or ``[B]``
        per-sequence advantages (e.g. :func:`group_advantages`) broadcast over the tokens;
        treated as constants.
      mask: ``[B, T]`` 1 on the response tokens, 0 elsewhere (also the weights of the sequence
        mean of the log-ratio).
      clip_eps_low: ``ε_low``: the ratio is clipped below at ``1 - ε_low``.
      clip_eps_high: ``ε_high``: the ratio is clipped above at ``1 + ε_high``; ``None`` is
        ``ε_low`` (symmetric PPO clipping).
      ratio_level: ``"token"`` or ``"sequence"``.

    Returns:
      ``(per_token_loss, diagnostics)``: ``per_token_loss [B, T]`` float32 (0 where masked;
      reduce with :func:`aggregate_loss`) and a dict of ``[B, T]`` arrays without gradient:
      ``"ratio"`` (``ρ``, i.e. ``s_i`` on every token of a sequence at the sequence level),
      ``"clipped_low"`` (``ρ < 1 - ε_low`` and ``A < 0``) and ``"clipped_high"`` (``ρ > 1 + ε_high``
      and ``A > 0``), the booleans marking where the clip is active (the token gets no gradient),
      as TRL logs them; their clip fractions are ``aggregate_loss(d["clipped_low"], mask)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from jaxrlhf import losses
      >>> lp, old = jnp.log(jnp.array([[1.5, 0.5, 0.5]])), jnp.zeros((1, 3))
      >>> m = jnp.ones((1, 3))
      >>> loss, d = losses.clipped_policy_loss(lp, old, jnp.array([[1.0, 1.0, -1.0]]), m, clip_eps_high=0.28)
      >>> print(np.asarray(loss).round(4), d["clipped_high"], d["clipped_low"])
      [[-1.28 -0.5   0.8 ]] [[ True False False]] [[False False  True]]
      >>> # GSPO: s = exp(mean(log [1.5, 0.5, 0.5])) = 0.7211, clipped to 0.8 for A = -1
      >>> loss, d = losses.clipped_policy_loss(lp, old, jnp.array([-1.0]), m, ratio_level="sequence")
      >>> print(np.asarray(d["ratio"]).round(4), np.asarray(loss).round(4))
      [[0.7211 0.7211 0.7211]] [[0.8 0.8 0.8]]

    References:
      Schulman et al. 2017, "Proximal Policy Optimization Algorithms"; Yu et al. 2025, "DAPO: An
      Open-Source LLM Reinforcement Learning System at Scale" (clip-higher); Zheng et al. 2025,
      "Group Sequence Policy Optimization" (the sequence ratio).
    """
    low, high = _clip_range(ratio_level, clip_eps_low, clip_eps_high)
    lp, old, adv = _policy_inputs(logprobs, old_logprobs, advantages, mask)
    valid = jnp.asarray(mask) != 0
    lp, old, adv = (jnp.where(valid, x, 0) for x in (lp, old, adv))
    log_ratio = lp - old  # [B, T], 0 where masked
    if ratio_level == "sequence":
        seq_log_ratio = masked_mean(log_ratio, mask, axis=-1)  # [B]
        log_ratio = jax.lax.stop_gradient(seq_log_ratio)[:, None] + (lp - jax.lax.stop_gradient(lp))
        log_ratio = jnp.where(valid, log_ratio, 0)
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - low, 1.0 + high)
    loss = jnp.where(valid, jnp.maximum(-adv * ratio, -adv * clipped), 0)
    ratio = jax.lax.stop_gradient(ratio)
    diagnostics = {
        "ratio": ratio,
        "clipped_low": valid & (ratio < 1.0 - low) & (adv < 0),
        "clipped_high": valid & (ratio > 1.0 + high) & (adv > 0),
    }
    return loss, diagnostics


# ----------------------------------------------------------------------------------------------
# Coordinating positive and negative learning (Wang et al. 2025).
# ----------------------------------------------------------------------------------------------
def gradient_scale(x: jax.Array, scale: jax.Array | float) -> jax.Array:
    r"""``x`` in value, ``scale * x`` in gradient: ``scale x + stop_gradient((1 - scale) x)``.

    Lets a loss weigh the gradient of one of its terms (DPO's chosen or rejected log-probs: positive
    vs negative learning) without changing the loss value or any metric computed from it.

    Examples:
      >>> import jax
      >>> from jaxrlhf import losses
      >>> print(jax.grad(lambda x: losses.gradient_scale(x, 0.25) ** 2)(3.0))  # 0.25 * 2 * 3
      1.5
    """
    return scale * x + jax.lax.stop_gradient((1.0 - scale) * x)


def rank_thirds(score: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
    r"""0/1 float32 masks of the top, middle and bottom thirds of the ``valid`` units by ``score``.

    Ranks are by descending score among valid units (ties by position); with ``n`` valid units the
    top third holds ranks ``[0, ceil(n/3))``, the middle ``[ceil(n/3), ceil(2n/3))``, the bottom
    the rest. Shapes: any, ``score`` and ``valid`` alike; each mask has that shape.

    References:
      Wang et al. 2025, "What Is Preference Optimization Doing, How and Why?" (TOP/MID/BOT data).
    """
    flat, ok = score.reshape(-1).astype(jnp.float32), valid.reshape(-1) > 0
    key = jnp.where(ok, flat, -jnp.inf)
    order = jnp.argsort(-key, stable=True)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
    n = jnp.sum(ok)
    cut1, cut2 = (n + 2) // 3, (2 * n + 2) // 3
    masks = {
        "top": ok & (rank < cut1),
        "mid": ok & (rank >= cut1) & (rank < cut2),
        "bot": ok & (rank >= cut2),
    }
    return {k: m.reshape(score.shape).astype(jnp.float32) for k, m in masks.items()}


def coordinated_token_weights(
    advantages: jax.Array,
    mask: jax.Array,
    *,
    coef_top: float = 1.0,
    coef_mid: float = 1.0,
    coef_bot: float = 1.0,
    pos_coef: jax.Array | float = 1.0,
    neg_coef: jax.Array | float = 1.0,
) -> jax.Array:
    r"""Per-token loss weights of the coordinated PPO variants (Wang et al. 2025).

    .. math::
        w_t = c_{third(t)} \cdot (c_+ [A_t > 0] + c_- [A_t < 0] + [A_t = 0])

    where ``third(t)`` ranks the valid tokens of the batch by ``|A_t|`` (:func:`rank_thirds`):
    ``coef_top/mid/bot`` down-weight the TOP or MID data (their cPPO, ``λ``), ``pos_coef`` /
    ``neg_coef`` weigh positive- and negative-advantage tokens (their periodic hPPO sets these per
    iteration). All coefficients 1: weights 1 on every valid token. 0 on masked tokens.

    Args:
      advantages: ``[B, T]`` advantages (whitened or raw; only signs and ranks of ``|A|`` matter).
      mask: ``[B, T]`` valid tokens.

    Returns:
      ``[B, T]`` float32 weights.
    """
    valid = mask > 0
    third = rank_thirds(jnp.abs(advantages), valid)
    c = coef_top * third["top"] + coef_mid * third["mid"] + coef_bot * third["bot"]
    sign = jnp.where(advantages > 0, pos_coef, jnp.where(advantages < 0, neg_coef, 1.0))
    return jnp.where(valid, c * sign, 0.0).astype(jnp.float32)
