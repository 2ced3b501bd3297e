"""The AbU kernels on the real UNet (a micro config) over a 2-device mesh, end to end.

test_attribution.py checks the numbers against float64 on a micro denoiser; this file checks
that the same kernels trace and shard the real `UNet2DConditionModel` (GroupNorm, resnets,
both attention kinds) and that unlearning a training item makes it rank first. One compile per
kernel: the layout invariances are tested on the micro denoiser.
"""
from __future__ import annotations

import jax
import numpy as np
from flax import traverse_util

from attrib_jax import parallel
from attrib_jax.attribution import fisher as fisher_lib
from attrib_jax.attribution import scores
from attrib_jax.attribution import selection
from attrib_jax.attribution import sweep as sweep_lib
from attrib_jax.attribution import unlearn as unlearn_lib
from attrib_jax.diffusion.schedules import NoiseSchedule
from attrib_jax.models import unet

CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
              block_out_channels=[8, 16], norm_num_groups=4,
              down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
              up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=2,
              cross_attention_dim=12)


def random_params(module: unet.UNet2DConditionModel) -> dict:
  """Fan-in scaled normal weights from the abstract tree (no init program to compile)."""
  rng = np.random.default_rng(0)
  flat = traverse_util.flatten_dict(unet.abstract_params(module))
  out = {}
  for path, leaf in flat.items():
    if path[-1] == "kernel":
      out[path] = (rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1])))
    elif path[-1] == "scale":
      out[path] = np.ones(leaf.shape)
    else:
      out[path] = 0.1 * rng.normal(size=leaf.shape)
  return traverse_util.unflatten_dict({p: v.astype(np.float32) for p, v in out.items()})


def test_abu_end_to_end_on_the_unet_over_two_devices():
  module = unet.UNet2DConditionModel(unet.UNetConfig.from_diffusers(CONFIG))
  params = random_params(module)
  apply_fn = lambda p, x, t, c: module.apply({"params": p}, x, t, c)
  rng = np.random.default_rng(0)
  n = 6
  arrays = {"latents": rng.normal(size=(n, 2, 8, 8, 4)).astype(np.float32),
            "text_states": rng.normal(size=(n, 2, 5, 12)).astype(np.float32),
            "num_captions": np.array([1, 2, 2, 1, 2, 2], np.int32),
            "index": np.arange(100, 100 + n)}
  schedule = NoiseSchedule.from_config({})
  mesh = parallel.make_mesh(2)

  fisher = fisher_lib.compute_fisher(apply_fn, params, arrays, schedule, mesh=mesh,
                                     settings=fisher_lib.FisherSettings(num_epochs=1,
                                                                        batch_size=4))
  assert sum(v.size for v in fisher.values.values()) == selection.count(
      params, selection.select(params)) == 960
  assert all((v > 0).all() for v in fisher.values.values())

  query = 1
  after = unlearn_lib.unlearn(
      apply_fn, params, fisher, arrays["latents"][query, 0], arrays["text_states"][query, 0],
      schedule, num_train=n, mesh=mesh,
      settings=unlearn_lib.UnlearnSettings(num_draws=8, draws_per_batch=8, micro_batch=4))

  settings = sweep_lib.SweepSettings(timesteps=(100, 600), num_captions=2, items_per_device=1)
  result = sweep_lib.sweep(apply_fn, params, after, arrays, schedule, settings=settings,
                           mesh=mesh)
  tau = scores.image_scores(result.delta)
  assert scores.rank(tau, result.index)[0] == arrays["index"][query]
  assert jax.tree.all(jax.tree.map(lambda a: bool(np.isfinite(a).all()), after))
