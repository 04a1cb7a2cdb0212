"""Jitted sampler over the KV cache: left-padded prompts in, responses, masks and log-probs out.

Decoding is one pure function of ``(graphdef, params, prompt_ids, prompt_mask, rng)``: a prefill
(``model.decode`` of the left-padded prompt at cache slot 0), then a ``lax.while_loop`` that feeds
one token per step and stops as soon as every row has emitted a stop id (or after
``max_new_tokens``). Rows stop independently; a finished row emits ``pad_id`` with mask 0.

Cache layout (``docs/DESIGN.md``, "Models"): a prompt of width ``P`` occupies slots ``[0, P)``
(left padding masked out by ``cache_mask``); response token ``i`` is written at slot ``P + i``
with position ``prompt_len + i``, so incremental logits equal a full forward over the
concatenated ``[B, P + N]`` sequence built by :meth:`GenerationOutput.to_batch`.

Log-probs (what PPO compares against):

- ``logprobs[b, i] = log_softmax(logits / temperature)[token]`` on float32 logits, **before**
  top-k/top-p truncation. This equals a full forward of ``to_batch()`` with logits divided by
  the same temperature (the PPO "ratio is exactly 1" check). With ``top_k == 0`` and
  ``top_p == 1`` it is exactly the log-prob under the distribution the token was drawn from.
- ``model_logprobs[b, i] = log_softmax(logits)[token]``: the untempered policy (temperature 1).
- With top-k/top-p, the truncated distribution's log-prob is ``logprobs`` minus the log of the
  kept mass; it is not returned (trainers recompute without truncation).

The generation layout: :func:`make_sampler` can reshard the actor params inside the jitted call
from the training layout (e.g. FSDP) to a generation layout (e.g. replicated over ``fsdp``,
tensor-parallel kept; see :func:`generation_shardings`), so the decode loop does no per-token
parameter all-gather. The outputs are the same either way.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrlhf import sharding as shd

# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------


class GenerationOutput(NamedTuple):
    """Result of :func:`generate` (a pytree; every field is a ``jax.Array``).

    Attributes:
      prompt_ids: ``[B, P]`` int32, the left-padded prompts as given.
      prompt_mask: ``[B, P]`` int32, 1 on real prompt tokens.
      response_ids: ``[B, N]`` int32, sampled tokens; ``pad_id`` after the stop token.
      response_mask: ``[B, N]`` int32, 1 on generated tokens up to and including the stop token.
      logprobs: ``[B, N]`` float32, ``log_softmax(logits / temperature)`` at the sampled token
        (before top-k/top-p); 0 where ``response_mask`` is 0.
      model_logprobs: ``[B, N]`` float32, ``log_softmax(logits)`` (temperature 1) at the sampled
        token; 0 where ``response_mask`` is 0.
      truncated: ``[B]`` bool, the row produced ``N`` tokens without a stop id.
    """

    prompt_ids: jax.Array
    prompt_mask: jax.Array
    response_ids: jax.Array
    response_mask: jax.Array
    logprobs: jax.Array
    model_logprobs: jax.Array
    truncated: jax.Array

    @property
    def response_lengths(self) -> jax.Array:
        """``[B]`` int32: generated tokens per row, the stop token included."""
        return self.response_mask.sum(-1).astype(jnp.int32)

    @property
    def stopped(self) -> jax.Array:
        """``[B]`` bool: the row ended with a stop id (EOS)."""
        return ~self.truncated

    def sequences(self) -> jax.Array:
        """``[B, P + N]`` int32: prompt (left-padded) followed by response (right-padded)."""
        return jnp.concatenate([self.prompt_ids, self.response_ids], axis=1).astype(jnp.int32)

    def sequence_mask(self) -> jax.Array:
        """``[B, P + N]`` int32 attention mask: 1 on real prompt and generated tokens."""
        return jnp.concatenate([self.prompt_mask, self.response_mask], axis=1).astype(jnp.int32)

    def positions(self) -> jax.Array:
        """``[B, P + N]`` int32 positions, ``cumsum(mask) - 1`` on real tokens, 0 on padding."""
        return mask_positions(self.sequence_mask())

    def loss_mask(self) -> jax.Array:
        """``[B, P + N]`` int32: 1 on the response tokens (the stop token included), else 0."""
        return jnp.concatenate([jnp.zeros_like(self.prompt_mask), self.response_mask], axis=1).astype(
            jnp.int32
        )

    def to_batch(self) -> dict[str, jax.Array]:
        """The ``[B, P + N]`` sequence batch of ``docs/DESIGN.md``: ``input_ids``,
        ``attention_mask``, ``positions``, ``loss_mask``."""
        return {
            "input_ids": self.sequences(),
            "attention_mask": self.sequence_mask(),
            "positions": self.positions(),
            "loss_mask": self.loss_mask(),
        }

    def shifted(self, x: jax.Array) -> jax.Array:
        """Places a per-response-token ``[B, N]`` array into the ``[B, P + N - 1]`` frame of
        ``losses.shifted_logprobs`` (entry ``t`` predicts token ``t + 1``); 0 on the prompt."""
        p = self.prompt_ids.shape[1]
        return jnp.pad(x, ((0, 0), (p - 1, 0)))


def mask_positions(mask: jax.Array) -> jax.Array:
    """``[B, T]`` positions from a ``[B, T]`` 0/1 mask: ``cumsum - 1`` on real tokens, 0 elsewhere."""
    mask = mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0) * mask


# ----------------------------------------------------------------------------------------------
# Logit processing and sampling (float32)
# ----------------------------------------------------------------------------------------------


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """``[..., V]`` bool: tokens whose logit is ``>=`` the k-th largest (ties at the cut kept).

    ``k <= 0`` or ``k >= V`` keeps everything. ``k`` is static.
    """
    vocab = logits.shape[-1]
    if k <= 0 or k >= vocab:
        return jnp.ones(logits.shape, bool)
    kth = jax.lax.top_k(logits, k)[0][..., -1:]  # [..., 1]
    return logits >= kth


def top_p_mask(logits: jax.Array, p: float, *, sorted_desc: jax.Array | None = None) -> jax.Array:
    """``[..., V]`` bool: the nucleus, the smallest set of most likely tokens whose probability
    mass is ``>= p`` (at least one token; every token tied with the last one kept).

    Probabilities are ``softmax(logits)`` (``-inf`` logits have probability 0). A token at sorted
    rank ``r`` is in the nucleus when the mass of the tokens ranked before it is ``< p``.

    Args:
      logits: ``[..., V]`` float logits (already tempered / top-k filtered).
      p: static nucleus mass in ``(0, 1]``; ``p >= 1`` keeps every token.
      sorted_desc: optional ``[..., K]`` logits sorted in descending order holding every finite
        logit (e.g. the top-k values); defaults to a full sort.
    """
    if p >= 1.0:
        return jnp.ones(logits.shape, bool)
    if sorted_desc is None:
        sorted_desc = -jnp.sort(-logits, axis=-1)
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    probs_sorted = jnp.exp(sorted_desc - lse)  # [..., K]
    mass_before = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted
    keep_sorted = mass_before < p
    keep_sorted = keep_sorted.at[..., 0].set(True)
    # Smallest kept logit: tokens tied with it are kept too, so the set depends on values only.
    threshold = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return logits >= threshold


def process_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Tempered logits and the sampling logits (``-inf`` outside top-k / top-p).

    Args:
      logits: ``[B, V]`` model logits (any float dtype; computed in float32).

    Returns:
      ``(tempered [B, V], filtered [B, V])`` float32: ``logits / temperature`` and the same with
      ``-inf`` on tokens removed by top-k then top-p (applied in that order, like HF).
    """
    tempered = logits.astype(jnp.float32) / jnp.float32(temperature)
    filtered = tempered
    sorted_desc = None
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        sorted_desc = jax.lax.top_k(tempered, top_k)[0]
        filtered = jnp.where(tempered >= sorted_desc[..., -1:], tempered, -jnp.inf)
    if top_p < 1.0:
        filtered = jnp.where(top_p_mask(filtered, top_p, sorted_desc=sorted_desc), filtered, -jnp.inf)
    return tempered, filtered


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static decoding options (hashable; part of the compiled program).

    Attributes:
      max_new_tokens: ``N``, response width (tokens generated per row at most).
      pad_id: id emitted after a row stops.
      eos_ids: stop ids; a row stops after emitting any of them (the stop token is kept, mask 1).
      temperature: logits are divided by it before top-k/top-p and sampling (``> 0``).
      top_k: keep the ``k`` most likely tokens (ties kept); 0 = off.
      top_p: nucleus mass in ``(0, 1]``; 1 = off.
      greedy: take the argmax of the logits (first index on ties) instead of sampling.
      cache_dtype: KV cache dtype; ``None`` = the model's default.
    """

    max_new_tokens: int
    pad_id: int
    eos_ids: tuple[int, ...] = ()
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    cache_dtype: Any = None

    def __post_init__(self):
        if isinstance(self.pad_id, bool) or not isinstance(self.pad_id, int | np.integer):
            raise ValueError(
                f"pad_id must be an int token id, got {self.pad_id!r} (tokenizer.pad_token_id is None? "
                "pass the EOS id)"
            )
        object.__setattr__(self, "pad_id", int(self.pad_id))
        object.__setattr__(self, "eos_ids", tuple(int(e) for e in self.eos_ids))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_step(logits: jax.Array, keys: jax.Array, cfg: SamplingConfig):
    """One sampling step, one PRNG key per row (a row's draw never depends on the other rows).

    Args:
      logits: ``[B, V]`` next-token logits.
      keys: ``[B]`` PRNG keys (typed keys, or ``[B, 2]`` raw ``uint32`` keys).

    Returns:
      ``(tokens [B] int32, logprobs [B], model_logprobs [B])``; ``logprobs`` is
      ``log_softmax(logits / temperature)`` and ``model_logprobs`` ``log_softmax(logits)``, both at
      ``tokens`` and before top-k/top-p.
    """
    if cfg.greedy:
        tempered = logits.astype(jnp.float32) / jnp.float32(cfg.temperature)
        tokens = jnp.argmax(tempered, axis=-1)
    else:
        tempered, filtered = process_logits(
            logits, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p
        )
        tokens = jax.vmap(jax.random.categorical)(keys, filtered)
    tokens = tokens.astype(jnp.int32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(tempered, -1), tokens[:, None], axis=-1)[:, 0]
    if cfg.temperature == 1.0:
        model_logp = logp
    else:
        raw = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        model_logp = jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0]
    return tokens, logp, model_logp


# ----------------------------------------------------------------------------------------------
# Prefill and decode loop
# ----------------------------------------------------------------------------------------------


class PrefillState(NamedTuple):
    """Carry between :func:`prefill` and :func:`decode`.

    Attributes:
      cache: the model's KV cache pytree with ``S = P + N - 1`` slots, prompt written.
      cache_mask: ``[B, S]`` int32, prompt mask then zeros.
      logits: ``[B, V]`` float32 next-token logits at the last prompt slot.
      prompt_ids / prompt_mask: ``[B, P]`` int32 as given.
    """

    cache: Any
    cache_mask: jax.Array
    logits: jax.Array
    prompt_ids: jax.Array
    prompt_mask: jax.Array


def prefill(model, prompt_ids: jax.Array, prompt_mask: jax.Array, cfg: SamplingConfig) -> PrefillState:
    """Writes the left-padded ``[B, P]`` prompt into a fresh cache at slots ``[0, P)``.

    The logits of only the last prompt slot are computed (``[B, V]``, never ``[B, P, V]``).

    Left padding puts each row's last real token at slot ``P - 1``. A row with no real token gets
    an empty response from :func:`decode` (mask 0, not truncated).
    """
    prompt_ids = prompt_ids.astype(jnp.int32)
    prompt_mask = prompt_mask.astype(jnp.int32)
    b, p = prompt_ids.shape
    n = cfg.max_new_tokens
    slots = p + n - 1  # token i < N - 1 is fed back at slot P + i; the last one never is
    cache = model.init_cache(b, slots, cfg.cache_dtype)
    cache_mask = jnp.concatenate([prompt_mask, jnp.zeros((b, n - 1), jnp.int32)], axis=1)  # [B, S]
    positions = mask_positions(prompt_mask)  # [B, P]
    # Two decode calls: the first P - 1 tokens only fill the cache (their logits are unused, so XLA
    # drops the [B, P - 1, V] LM head), the last one yields the next-token logits.
    if p > 1:
        _, cache = model.decode(prompt_ids[:, :-1], positions[:, :-1], cache, cache_mask, 0)
    logits, cache = model.decode(prompt_ids[:, -1:], positions[:, -1:], cache, cache_mask, p - 1)  # [B, 1, V]
    return PrefillState(cache, cache_mask, logits[:, 0].astype(jnp.float32), prompt_ids, prompt_mask)


def decode(
    model, state: PrefillState, rng: jax.Array, cfg: SamplingConfig, row_ids: jax.Array | None = None
) -> GenerationOutput:
    """Samples up to ``N`` tokens per row from a prefilled cache (``lax.while_loop``).

    Step ``i`` draws token ``i`` of row ``b`` with key ``fold_in(fold_in(rng, i), row_ids[b])``
    from the logits of step ``i - 1`` (or the prefill), then, unless every row has stopped, feeds
    it at slot ``P + i``. ``row_ids`` (``[B]`` int, default ``arange(B)``) makes samples a function
    of the row's id, not its place in the batch: pass global prompt indices and the responses do
    not change with the batch size or order.
    """
    b, p = state.prompt_ids.shape
    rows = jnp.arange(b, dtype=jnp.int32) if row_ids is None else jnp.asarray(row_ids, jnp.int32)
    row_keys = jax.vmap(jax.random.fold_in, (None, 0))
    n = cfg.max_new_tokens
    eos = jnp.asarray(cfg.eos_ids if cfg.eos_ids else (-1,), jnp.int32)
    prompt_len = state.prompt_mask.sum(-1).astype(jnp.int32)  # [B]

    def emit(i, logits, done, out):
        ids, mask, lp, mlp = out
        tok, logp, mlogp = sample_step(logits, row_keys(jax.random.fold_in(rng, i), rows), cfg)
        live = ~done
        tok = jnp.where(live, tok, cfg.pad_id)
        ids = jax.lax.dynamic_update_index_in_dim(ids, tok, i, axis=1)
        mask = jax.lax.dynamic_update_index_in_dim(mask, live.astype(jnp.int32), i, axis=1)
        lp = jax.lax.dynamic_update_index_in_dim(lp, jnp.where(live, logp, 0.0), i, axis=1)
        mlp = jax.lax.dynamic_update_index_in_dim(mlp, jnp.where(live, mlogp, 0.0), i, axis=1)
        done = done | (live & jnp.isin(tok, eos))
        return tok, done, (ids, mask, lp, mlp)

    out0 = (
        jnp.full((b, n), cfg.pad_id, jnp.int32),
        jnp.zeros((b, n), jnp.int32),
        jnp.zeros((b, n), jnp.float32),
        jnp.zeros((b, n), jnp.float32),
    )
    empty = prompt_len == 0  # no real prompt token: nothing to condition on, empty response
    tok, done, out = emit(0, state.logits, empty, out0)

    def cond(carry):
        i, _, done, *_ = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, tok, done, cache, cache_mask, out = carry
        slot = p + i - 1  # slot of token i - 1
        cache_mask = jax.lax.dynamic_update_index_in_dim(cache_mask, jnp.ones((b,), jnp.int32), slot, axis=1)
        positions = (prompt_len + i - 1)[:, None]  # [B, 1]
        logits, cache = model.decode(tok[:, None], positions, cache, cache_mask, slot)  # [B, 1, V]
        tok, done, out = emit(i, logits[:, 0].astype(jnp.float32), done, out)
        return i + 1, tok, done, cache, cache_mask, out

    carry = (jnp.int32(1), tok, done, state.cache, state.cache_mask, out)
    _, _, done, _, _, (ids, mask, lp, mlp) = jax.lax.while_loop(cond, body, carry)
    return GenerationOutput(state.prompt_ids, state.prompt_mask, ids, mask, lp, mlp, ~done & ~empty)


def generate(
    graphdef: nnx.GraphDef,
    params: Any,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    rng: jax.Array,
    row_ids: jax.Array | None = None,
    *,
    max_new_tokens: int,
    pad_id: int,
    eos_ids: Sequence[int] = (),
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    cache_dtype: Any = None,
) -> GenerationOutput:
    """Samples responses for left-padded prompts (pure; jit it with the keyword args static).

    Args:
      graphdef, params: ``nnx.split(model)`` of a decoder with ``init_cache``/``decode``.
      prompt_ids: ``[B, P]`` int, left-padded prompts.
      prompt_mask: ``[B, P]`` 0/1, 1 on real tokens; a row with none gets an empty response.
      rng: PRNG key (unused when ``greedy``).
      row_ids: optional ``[B]`` int ids seeding each row's draws (default ``arange(B)``); see
        :func:`decode`.
      max_new_tokens ... cache_dtype: see :class:`SamplingConfig`.

    Returns:
      :class:`GenerationOutput` with ``[B, N]`` responses, ``N = max_new_tokens``.
    """
    cfg = SamplingConfig(
        max_new_tokens=max_new_tokens,
        pad_id=pad_id,
        eos_ids=tuple(eos_ids),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        greedy=greedy,
        cache_dtype=cache_dtype,
    )
    model = nnx.merge(graphdef, params)
    return decode(model, prefill(model, prompt_ids, prompt_mask, cfg), rng, cfg, row_ids)


# ----------------------------------------------------------------------------------------------
# Jitted sampler with an optional generation layout
# ----------------------------------------------------------------------------------------------


def generation_shardings(param_shardings: Any, drop_axes: Sequence[str] = ("fsdp",)) -> Any:
    """The generation layout of a training layout: the same ``NamedSharding``s with the mesh axes
    in ``drop_axes`` removed (replicated over them), e.g. FSDP gathered, tensor-parallel kept."""
    drop = set(drop_axes)

    def one(s):
        if not isinstance(s, NamedSharding):
            raise TypeError(f"generation_shardings expects NamedSharding leaves, got {type(s).__name__}")
        dims = []
        for axes in s.spec:
            names = axes if isinstance(axes, tuple) else (axes,)
            kept = tuple(a for a in names if a is not None and a not in drop)
            dims.append(None if not kept else (kept if len(kept) > 1 else kept[0]))
        return NamedSharding(s.mesh, PartitionSpec(*dims))

    return jax.tree.map(one, param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))


def reshard(tree: Any, shardings: Any) -> Any:
    """Copies ``tree`` into ``shardings`` outside jit (``jax.device_put``)."""
    return jax.device_put(tree, shardings)


class Sampler:
    """A jitted :func:`generate` for one model structure and :class:`SamplingConfig`.

    ``sampler(params, prompt_ids, prompt_mask, rng, row_ids=None) -> GenerationOutput`` is one
    compiled call per prompt shape. ``sampler.prefill`` / ``sampler.decode`` are the two halves as
    separate jitted calls (for timing). ``sampler.traces`` counts traces of the fused call (a
    recompile check).

    With a ``mesh``, prompts and outputs are sharded on the batch axis over ``("data", "fsdp")``
    (axes that do not divide the batch are dropped). ``param_shardings`` (the training layout) are
    the params' input shardings; ``gen_param_shardings`` (the generation layout), when given, is
    applied to the params inside the call before prefill, so the decode loop runs on it.
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        cfg: SamplingConfig,
        *,
        mesh: Mesh | None = None,
        param_shardings: Any = None,
        gen_param_shardings: Any = None,
    ):
        if gen_param_shardings is not None and mesh is None:
            raise ValueError("make_sampler: gen_param_shardings needs a mesh")
        self.graphdef = graphdef
        self.config = cfg
        self.mesh = mesh
        self.param_shardings = param_shardings
        self.gen_param_shardings = gen_param_shardings
        self.traces = 0
        in_shardings = None
        if param_shardings is not None:
            in_shardings = (param_shardings, None, None, None, None)
        self._call = jax.jit(self._fused, in_shardings=in_shardings)
        self._prefill = jax.jit(self._prefill_fn)
        self._decode = jax.jit(self._decode_fn)

    # -- sharding helpers (trace time: shapes are static) --
    def _batch(self, x):
        if self.mesh is None:
            return x
        spec = shd.fit_spec(PartitionSpec(shd.BATCH_AXES), x.shape, self.mesh)
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def _params(self, params):
        if self.gen_param_shardings is None:
            return params
        return jax.lax.with_sharding_constraint(params, self.gen_param_shardings)

    def _out(self, out):
        return jax.tree.map(self._batch, out)

    def _fused(self, params, prompt_ids, prompt_mask, rng, row_ids):
        self.traces += 1
        model = nnx.merge(self.graphdef, self._params(params))
        state = prefill(model, self._batch(prompt_ids), self._batch(prompt_mask), self.config)
        return self._out(decode(model, state, rng, self.config, row_ids))

    def _prefill_fn(self, params, prompt_ids, prompt_mask):
        model = nnx.merge(self.graphdef, self._params(params))
        return prefill(model, self._batch(prompt_ids), self._batch(prompt_mask), self.config)

    def _decode_fn(self, params, state, rng, row_ids):
        model = nnx.merge(self.graphdef, self._params(params))
        return self._out(decode(model, state, rng, self.config, row_ids))

    def __call__(self, params, prompt_ids, prompt_mask, rng, row_ids=None) -> GenerationOutput:
        return self._call(params, prompt_ids, prompt_mask, rng, row_ids)

    def prefill(self, params, prompt_ids, prompt_mask) -> PrefillState:
        return self._prefill(params, prompt_ids, prompt_mask)

    def decode(self, params, state: PrefillState, rng, row_ids=None) -> GenerationOutput:
        return self._decode(params, state, rng, row_ids)

    def lower(self, params, prompt_ids, prompt_mask, rng, row_ids=None):
        """``jax.jit(...).lower`` of the fused call (ahead-of-time compile, HLO inspection)."""
        return self._call.lower(params, prompt_ids, prompt_mask, rng, row_ids)

    def timed(
        self, params, prompt_ids, prompt_mask, rng, row_ids=None
    ) -> tuple[GenerationOutput, dict[str, float]]:
        """Runs prefill and decode as two calls and returns the output with throughput:
        ``prefill_s``, ``decode_s``, ``prefill_tokens`` (real prompt tokens),
        ``decode_tokens`` (generated tokens), ``prefill_tok_s``, ``decode_tok_s``."""
        t0 = time.perf_counter()
        state = jax.block_until_ready(self.prefill(params, prompt_ids, prompt_mask))
        t1 = time.perf_counter()
        out = jax.block_until_ready(self.decode(params, state, rng, row_ids))
        t2 = time.perf_counter()
        ptoks = int(np.asarray(prompt_mask).sum())
        dtoks = int(np.asarray(out.response_mask).sum())
        stats = {
            "prefill_s": t1 - t0,
            "decode_s": t2 - t1,
            "prefill_tokens": ptoks,
            "decode_tokens": dtoks,
            "prefill_tok_s": ptoks / max(t1 - t0, 1e-9),
            "decode_tok_s": dtoks / max(t2 - t1, 1e-9),
        }
        return out, stats


def make_sampler(
    model_or_graphdef: nnx.Module | nnx.GraphDef,
    *,
    max_new_tokens: int,
    pad_id: int,
    eos_ids: Sequence[int] = (),
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    cache_dtype: Any = None,
    mesh: Mesh | None = None,
    param_shardings: Any = None,
    gen_param_shardings: Any = None,
) -> Sampler:
    """A jitted sampler: ``sampler(params, prompt_ids[B,P], prompt_mask[B,P], rng, row_ids=None)``.

    Args:
      model_or_graphdef: an NNX decoder (its graphdef is taken with ``nnx.split``) or a graphdef.
      max_new_tokens ... cache_dtype: see :class:`SamplingConfig`.
      mesh: device mesh; prompts/outputs are batch-sharded on it.
      param_shardings: pytree of ``NamedSharding`` of the params as passed (training layout).
      gen_param_shardings: pytree of ``NamedSharding``, the generation layout the params are
        resharded to inside the call (e.g. ``generation_shardings(param_shardings)``); ``None``
        decodes in the layout the params arrive in.
    """
    graphdef = model_or_graphdef
    if isinstance(model_or_graphdef, nnx.Module):
        graphdef = nnx.split(model_or_graphdef)[0]
    cfg = SamplingConfig(
        max_new_tokens=max_new_tokens,
        pad_id=pad_id,
        eos_ids=tuple(eos_ids),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        greedy=greedy,
        cache_dtype=cache_dtype,
    )
    return Sampler(
        graphdef, cfg, mesh=mesh, param_shardings=param_shardings, gen_param_shardings=gen_param_shardings
    )


__all__: list[str] = [
    "GenerationOutput",
    "PrefillState",
    "Sampler",
    "SamplingConfig",
    "decode",
    "generate",
    "generation_shardings",
    "make_sampler",
    "mask_positions",
    "prefill",
    "process_logits",
    "reshard",
    "sample_step",
    "top_k_mask",
    "top_p_mask",
]
