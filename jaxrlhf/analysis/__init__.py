"""What preference optimisation does to a model: weight divergence, activation divergence, head ablation.

Pure functions over parameters and activations, plus a CLI (``python -m jaxrlhf.analysis
divergence|activations|heads``, see ``__main__`` and docs/analysis.md)::

    divergence.divergence_dirs(base_dir, model_dir)       # per-HF-tensor MSE + weight/bias/norm summaries
    divergence.divergence_run(base_dir, workdir)           # the same per orbax checkpoint of a run
    divergence.divergence_params(base, params, config)     # in-memory flat params (our layout)
    activations.layer_token_stats(gd_m, p_m, gd_b, p_b, seq)   # cos / logit-lens KL [L+1, B, T]
    activations.activation_divergence((gd, p), (gd_b, p_b), batches, labels=...)
    heads.head_ablation(gd, p, seq_batches=..., prompt_batches=..., sampler=..., reward=...)
    trees.tree_vdot / tree_norm / tree_cosine / tree_sq_diff   # parameter-shaped pytrees

The model side: ``Transformer(ids, mask, return_hidden=True) -> (out, hidden)`` (``L + 1``
residual streams), ``Transformer.unembed(h)`` (the logit lens) and ``head_mask [L, H]``.
"""

from jaxrlhf.analysis import activations, divergence, heads, inputs, trees
from jaxrlhf.analysis.activations import activation_divergence, cosine_similarity, kl_from_logits
from jaxrlhf.analysis.divergence import divergence_dirs, divergence_params, divergence_run, tensor_kind
from jaxrlhf.analysis.heads import ablate_params, head_ablation, single_head_mask
from jaxrlhf.analysis.trees import tree_cosine, tree_norm, tree_sq_diff, tree_vdot

__all__ = [
    "ablate_params",
    "activation_divergence",
    "activations",
    "cosine_similarity",
    "divergence",
    "divergence_dirs",
    "divergence_params",
    "divergence_run",
    "head_ablation",
    "heads",
    "inputs",
    "kl_from_logits",
    "single_head_mask",
    "tensor_kind",
    "tree_cosine",
    "tree_norm",
    "tree_sq_diff",
    "tree_vdot",
    "trees",
]
