"""Attribution by Unlearning (AbU): Fisher, unlearning step, loss sweep, scores (SPEC §2).

The pipeline for one query, each stage a pure jitted kernel over the `data` mesh:

  fisher = compute_fisher(apply_fn, params, arrays, schedule)            # once per model
  params_after = unlearn(apply_fn, params, fisher, query_latent, query_text, schedule,
                         num_train=N)
  result = sweep(apply_fn, params, params_after, arrays, schedule)
  tau = scores.image_scores(result.delta); ranking = scores.rank(tau, result.index)
"""
from attrib_jax.attribution import ekfac, fisher, scores, selection, sweep, unlearn
from attrib_jax.attribution.ekfac import (EKFAC, EKFACSettings, EKFACUnlearnSettings,
                                          compute_ekfac, ekfac_unlearn, load_ekfac, save_ekfac)
from attrib_jax.attribution.fisher import (Fisher, FisherSettings, compute_fisher, load_fisher,
                                           save_fisher)
from attrib_jax.attribution.scores import (average_precision, image_scores,
                                           load_result, mean_average_precision,
                                           params_fingerprint, rank, recall_at_k, save_result)
from attrib_jax.attribution.selection import merge, select, split
from attrib_jax.attribution.sweep import (SweepResult, SweepSettings, cache_key,
                                          compute_pre_losses, load_pre_cache, save_pre_cache)
from attrib_jax.attribution.unlearn import UnlearnSettings, preconditioner, query_gradient

# The functions share their modules' names; expose them under verbs that do not shadow them.
run_sweep = sweep.sweep
run_unlearn = unlearn.unlearn

__all__ = [
    "ekfac", "fisher", "scores", "selection", "sweep", "unlearn",
    "EKFAC", "EKFACSettings", "EKFACUnlearnSettings", "compute_ekfac", "ekfac_unlearn",
    "load_ekfac", "save_ekfac",
    "Fisher", "FisherSettings", "compute_fisher", "load_fisher", "save_fisher",
    "average_precision", "image_scores", "load_result", "mean_average_precision",
    "params_fingerprint", "rank", "recall_at_k", "save_result",
    "merge", "select", "split",
    "SweepResult", "SweepSettings", "cache_key", "compute_pre_losses", "load_pre_cache",
    "save_pre_cache", "UnlearnSettings", "preconditioner", "query_gradient",
    "run_sweep", "run_unlearn",
]
