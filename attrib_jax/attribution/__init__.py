"""Attribution by Unlearning (AbU, AbU+): Fisher / EK-FAC, unlearning step, loss sweep, scores.

Over query directories, with caching and resumption (what `launch.attribute` runs):

  settings = AbUSettings.from_config(config.attribution)     # or AbUSettings(fisher=..., ...)
  runner = AbU(apply_fn, params, arrays, schedule, settings, out_dir)
  result = runner.score(query, name)           # or attribute_queries(runner, query_dirs, ...)

The kernels for one query, each a pure jitted function over the `data` mesh:

  fisher = compute_fisher(apply_fn, params, arrays, schedule)            # once per model
  params_after = run_unlearn(apply_fn, params, fisher, query.latent, query.text_states,
                             schedule, num_train=N)      # AbU+: compute_ekfac, ekfac_unlearn
  result = run_sweep(apply_fn, params, params_after, arrays, schedule)
  ranking = rank(image_scores(result.delta), result.index)
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
from attrib_jax.attribution import runner  # after the kernels' modules, which it imports
from attrib_jax.attribution.runner import (AbU, AbUSettings, EKFACBlock, attribute_queries,
                                           workdir_dirs)

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
    "runner", "AbU", "AbUSettings", "EKFACBlock", "attribute_queries", "workdir_dirs",
]
