"""One process of the multi-host test (tests/test_multihost.py); not a test module itself.

    python tests/multihost_worker.py OUT_DIR [PROCESS_ID NUM_PROCESSES PORT]

With the last three, it joins a `jax.distributed` run on localhost first. Every process then
runs the same program on a mesh over all devices of all processes: the training loop (with an
interruption and a resume), the Fisher, the AbU step, the loss sweep (paired and jvp), EK-FAC
and the AbU+ step, on a micro denoiser. Process 0 writes the results to OUT_DIR/results.npz;
the test compares them with one process on as many devices. The device count per process comes
from XLA_FLAGS, set by the test.
"""
from __future__ import annotations

import math
import os
import sys

import jax

if len(sys.argv) == 5:  # before any computation: the runtime must know every process
  jax.distributed.initialize(coordinator_address=f"localhost:{sys.argv[4]}",
                             num_processes=int(sys.argv[3]), process_id=int(sys.argv[2]),
                             initialization_timeout=60)

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

from attrib_jax import parallel
from attrib_jax.attribution import ekfac
from attrib_jax.attribution import fisher as fisher_lib
from attrib_jax.attribution import selection
from attrib_jax.attribution import sweep as sweep_lib
from attrib_jax.attribution import unlearn as unlearn_lib
from attrib_jax.diffusion.schedules import NoiseSchedule
from attrib_jax.training import loop

N, K, L, D, WIDTH = 12, 2, 3, 6, 8
LATENT = (4, 4, 2)
SCHEDULE = NoiseSchedule.from_config({"beta_schedule": "linear", "num_train_timesteps": 1000})


class CrossAttention(nn.Module):
  @nn.compact
  def __call__(self, tokens, text):
    q = nn.Dense(WIDTH, use_bias=False, name="to_q")(tokens)
    k = nn.Dense(WIDTH, use_bias=False, name="to_k")(text)
    v = nn.Dense(WIDTH, use_bias=False, name="to_v")(text)
    attn = jax.nn.softmax(jnp.einsum("bqd,bkd->bqk", q, k) / math.sqrt(WIDTH), -1)
    return nn.Dense(WIDTH, name="to_out_0")(jnp.einsum("bqk,bkd->bqd", attn, v))


class Denoiser(nn.Module):
  """Pixels as tokens, a time embedding, one cross-attention (`attn2`, what AbU/AbU+ select)."""

  @nn.compact
  def __call__(self, x, t, text):
    b, h, w, c = x.shape
    t = jnp.broadcast_to(jnp.asarray(t), (b,)).astype(jnp.float32)
    freqs = jnp.exp(-jnp.arange(WIDTH // 2) * (math.log(1000.0) / (WIDTH // 2)))
    emb = jnp.concatenate([jnp.sin(t[:, None] * freqs), jnp.cos(t[:, None] * freqs)], -1)
    tokens = (nn.Dense(WIDTH, name="proj_in")(x.reshape(b, h * w, c))
              + nn.Dense(WIDTH, name="time")(emb)[:, None])
    tokens = tokens + CrossAttention(name="attn2")(tokens, text)
    return nn.Dense(c, name="proj_out")(jax.nn.silu(tokens)).reshape(x.shape)


MODULE = Denoiser()
APPLY = lambda p, x, t, c: MODULE.apply({"params": p}, x, t, c)


def world():
  """Parameters and arrays from numpy seeds: the same on every process, no device needed."""
  abstract = jax.eval_shape(MODULE.init, jax.random.key(0), jnp.zeros((1,) + LATENT),
                            jnp.zeros((1,), jnp.int32), jnp.zeros((1, L, D)))["params"]
  rng = np.random.default_rng(0)
  params = traverse_util.unflatten_dict({
      p: (rng.normal(size=a.shape) / math.sqrt(a.shape[0] if len(a.shape) > 1 else 10)
          ).astype(np.float32)
      for p, a in traverse_util.flatten_dict(abstract).items()})
  arrays = {"latents": rng.normal(size=(N, 2) + LATENT).astype(np.float32),
            "text_states": rng.normal(size=(N, K, L, D)).astype(np.float32),
            "num_captions": rng.integers(1, K + 1, N).astype(np.int32),
            "index": (500 + 3 * rng.permutation(N)).astype(np.int64),
            "null_text_states": np.zeros((L, D), np.float32)}
  return params, arrays


def flat(tree, prefix: str) -> dict:
  return {prefix + selection.path_name(p): np.asarray(v)
          for p, v in traverse_util.flatten_dict(parallel.to_host(tree)).items()}


def main(out_dir: str) -> None:
  params, arrays = world()
  mesh = parallel.make_mesh()
  # Training shares one folder (Orbax writes it together); the attribution checkpoints go to a
  # folder per process, so that the test sees that only process 0 writes them.
  own_dir = os.path.join(out_dir, f"process_{jax.process_index()}")
  os.makedirs(own_dir)
  results = {**flat(params, "theta0/"), "process_count": np.asarray(jax.process_count()),
             "mesh_size": np.asarray(mesh.size),
             # [process, rows]: which rows of a global batch of 8 each process reads
             "rows_of_process": multihost_utils.process_allgather(
                 parallel.process_rows(mesh, 8))}

  # Training: 2 steps, an interruption, then a resume from the Orbax checkpoint to step 3.
  train_dir = os.path.join(out_dir, "train")
  recipe = dict(num_steps=3, batch_size=8, learning_rate=1e-2, ema_decay=0.9,
                checkpoint_every=1, log_every=1)
  # loop.train is moving to a settings object (TrainSettings); run with either signature.
  if hasattr(loop, "TrainSettings"):
    recipe = {"settings": loop.TrainSettings(**recipe)}
  common = dict(arrays=arrays, apply_fn=APPLY, init_params=params, schedule=SCHEDULE,
                workdir=train_dir, mesh=mesh, log=lambda m: None, **recipe)
  loop.train(stop_after=2, **common)
  state = loop.train(**common)
  results.update(flat(state.params, "train/"))
  results["train/step"] = np.asarray(parallel.to_host(state.step))

  fisher = fisher_lib.compute_fisher(
      APPLY, params, arrays, SCHEDULE, mesh=mesh,
      settings=fisher_lib.FisherSettings(num_epochs=2, batch_size=8, flush_every=2),
      checkpoint_path=os.path.join(own_dir, "fisher_ckpt.npz"))
  results.update({"fisher/" + selection.path_name(p): v for p, v in fisher.values.items()})

  query = 3
  x0, text = arrays["latents"][query, 0], arrays["text_states"][query, 0]
  after = unlearn_lib.unlearn(
      APPLY, params, fisher, x0, text, SCHEDULE, num_train=N, mesh=mesh,
      settings=unlearn_lib.UnlearnSettings(num_draws=40, draws_per_batch=20, micro_batch=4))
  results.update(flat(after, "unlearn/"))

  for method in ("paired", "jvp"):
    swept = sweep_lib.sweep(
        APPLY, params, after, arrays, SCHEDULE, mesh=mesh,
        settings=sweep_lib.SweepSettings(timesteps=(0, 250, 500, 750), num_captions=K,
                                         items_per_device=2, method=method),
        checkpoint_path=os.path.join(own_dir, f"sweep_{method}.npz"), checkpoint_every=1)
    results[f"sweep_{method}/pre"], results[f"sweep_{method}/delta"] = swept.pre, swept.delta

  factors = ekfac.compute_ekfac(
      APPLY, params, arrays, SCHEDULE, mesh=mesh,
      settings=ekfac.EKFACSettings(selection="cross-attn", num_epochs=1, batch_size=8,
                                   flush_every=2))
  for module, f in factors.layers.items():
    name = "ekfac/" + "/".join(module)
    results[name + "/A"], results[name + "/G"] = f.activation_cov, f.gradient_cov
    results[name + "/eigenvalues"] = f.eigenvalues
  after_plus = ekfac.ekfac_unlearn(
      APPLY, params, factors, x0, text, SCHEDULE, num_train=N, mesh=mesh,
      settings=ekfac.EKFACUnlearnSettings(num_draws=37, micro_batch=4, selection="cross-attn"))
  results.update(flat(after_plus, "ekfac_unlearn/"))

  if parallel.is_main_process():
    np.savez(os.path.join(out_dir, "results.npz"), **results)
  print(f"process {jax.process_index()}: done", flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
