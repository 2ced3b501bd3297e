r"""Seconds per AbU query (unlearning + loss sweep): ours against the same algorithm in PyTorch.

One query of Attribution by Unlearning (SPEC §2) is two stages, timed separately:
  unlearn  θ' = θ + (α/N)·F⁻¹·ḡ on the cross-attention K/V weights, ḡ the query loss's gradient
           averaged over D (noise, timestep) draws, taken in micro-batches;
  sweep    the loss of every (item, flip, caption, timestep) slot under θ0 and θ', on identical
           noise, per slot change mean(d·(d + 2r)) (d = ε' − ε, r = ε − target), averaged over
           timesteps then captions; τ = max over flips.
Ours is `attrib_jax.attribution.unlearn.unlearn` + `sweep.sweep` (jitted, on the default mesh).
The PyTorch side (`TorchAbU` below) implements the same algorithm on diffusers'
`UNet2DConditionModel`, holding the same weights (our params through
`weights.to_torch_state_dict`, `load_state_dict(strict=True)`): the same diagonal Fisher
(computed once, shared, not timed), α, N, draws, micro-batch and forward batch, so both sides
run exactly the same number of UNet forwards and backwards (printed). It gets the very noise
ours derives inside its programs (`unlearn.query_draws`, `sweep.slot_noise`), materialised
beforehand and not timed, so both compute the same numbers: the scores must agree (Spearman).

Both run in this process: ours on JAX's default backend, torch on --torch_device, by default
this CPU (torch with os.cpu_count() threads; ours with XLA's default thread pool). With
--torch_device cuda the torch models, the Fisher and every input live on the GPU (moved there
before timing), each timed torch call ends with torch.cuda.synchronize(), and torch runs its
float32 matmuls and convolutions at the precision ours runs them on a GPU: TF32 in the
unlearning step (JAX's default precision), full float32 in the sweep ("highest", see
sweep.py). Ours' timed calls block on their results. Per repeat the sides alternate (ours
unlearn, torch unlearn, ours sweep, torch sweep), so load from other processes hits both
alike; reported are the median and best of the repeats after a warm-up. Ours' first calls
include compilation, reported separately.

Configs: `tiny` = configs/tiny.py's UNet (8x8x48 through the pixel codec, cross-attention 64, text states
16x64), `mscoco` = configs/mscoco.py's UNet (SPEC §1, 57.4M parameters; 16x16x4, text 77x1024)
over a few hundred items; random latents and text states; settings scaled to minutes on 2 cores.
Finally the sweep's throughput on 1, 2, 4, 8 fake CPU devices (subprocesses of this script with
XLA_FLAGS=--xla_force_host_platform_device_count=8 and --devices N); skipped with --no_devices
(alias --no_device_table) and whenever JAX's default backend is not the CPU.

  python benchmarks/abu_query.py                     # both configs + the device table
  python benchmarks/abu_query.py --quick             # small sizes, 1-2 repeats
  python benchmarks/abu_query.py --config mscoco --items 300 --draws 64 --timesteps 2
  python benchmarks/abu_query.py --config mscoco --torch_device cuda --items 1024 --draws 640 \
      --micro_batch 64 --items_per_forward 32 --items_per_device 64 --timesteps 2   # a GPU
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from attrib_jax import parallel
from attrib_jax.attribution import scores as scores_lib
from attrib_jax.attribution import selection
from attrib_jax.attribution import sweep as sweep_lib
from attrib_jax.attribution import unlearn as unlearn_lib
from attrib_jax.diffusion.schedules import NoiseSchedule
from attrib_jax.models import unet, weights

# torch's OpenMP threads spin while they wait; on a shared, oversubscribed CPU that made its
# 2-thread forwards 5-30x slower (and erratic) here. Passive waiting removes that, in torch's
# favour (set OMP_WAIT_POLICY=ACTIVE to see the default). torch is imported after this line.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_LENGTH = {"tiny": 16, "mscoco": 77}
# N of the step's α/N: the training-set size the model stands for (the tiny world's 1,000
# items; COCO-2017 train), so θ' moves as far as in a real query whatever subset is swept.
NUM_TRAIN = {"tiny": 1000, "mscoco": 118_287}
# Per config, full / --quick. Sized for minutes on 2 shared cores. A sweep forward is
# items_per_forward x 2 flips x captions x timesteps = 16 slots in every setting, the batch of an
# unlearning fwd+bwd is micro_batch; items are multiples of items_per_device (ours pads nothing).
DEFAULTS = {
    "tiny": (dict(items=128, draws=160, micro_batch=32, timesteps=4, captions=1,
                  items_per_forward=2, items_per_device=8, repeats=3),
             dict(items=64, draws=32, micro_batch=16, timesteps=2, captions=2,
                  items_per_forward=2, items_per_device=8, repeats=2)),
    "mscoco": (dict(items=200, draws=32, micro_batch=16, timesteps=1, captions=1,
                    items_per_forward=8, items_per_device=8, repeats=2),
               dict(items=16, draws=16, micro_batch=16, timesteps=1, captions=1,
                    items_per_forward=8, items_per_device=8, repeats=1)),
}
DEVICE_COUNTS = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Bench:
  """Everything that defines one comparison (both sides use all of it)."""
  name: str
  unet_config: dict
  text_length: int
  items: int
  draws: int
  micro_batch: int
  timesteps: tuple[int, ...]
  captions: int
  items_per_forward: int
  items_per_device: int
  alpha: float
  fisher_items: int
  num_train: int
  repeats: int
  flips: tuple[int, ...] = (0, 1)
  seed: int = 0

  @property
  def slots(self) -> int:
    return len(self.flips) * self.captions * len(self.timesteps)

  def unlearn_settings(self) -> unlearn_lib.UnlearnSettings:
    return unlearn_lib.UnlearnSettings(
        alpha=self.alpha, num_steps=1, num_draws=self.draws,
        draws_per_batch=80 if self.draws % 80 == 0 else self.draws,
        micro_batch=self.micro_batch, seed=self.seed)

  def sweep_settings(self) -> sweep_lib.SweepSettings:
    return sweep_lib.SweepSettings(
        timesteps=self.timesteps, num_captions=self.captions, flips=self.flips, seed=self.seed,
        method="paired", items_per_device=self.items_per_device,
        items_per_forward=self.items_per_forward)


def load_config(name: str):
  """configs/<name>.py's default config (the configs folder sits beside benchmarks/)."""
  spec = importlib.util.spec_from_file_location(f"configs_{name}",
                                                os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def make_bench(name: str, args: argparse.Namespace) -> Bench:
  defaults = DEFAULTS[name][1 if args.quick else 0]
  pick = lambda key: getattr(args, key) if getattr(args, key) is not None else defaults[key]
  config = load_config(name)
  unet_config = {k: list(v) if isinstance(v, tuple) else v
                 for k, v in config.unet.to_dict().items()}
  num_t = pick("timesteps")
  items_per_forward = pick("items_per_forward")
  return Bench(
      name=name, unet_config=unet_config, text_length=TEXT_LENGTH[name], items=pick("items"),
      draws=pick("draws"), micro_batch=pick("micro_batch"),
      # The centres of T equal bins of [0, 1000): 500; 250, 750; 125, 375, 625, 875; ...
      timesteps=tuple(int(1000 * (i + 0.5) / num_t) for i in range(num_t)),
      captions=pick("captions"),
      items_per_forward=items_per_forward,
      items_per_device=pick("items_per_device"), repeats=pick("repeats"),
      alpha=args.alpha, fisher_items=args.fisher_items,
      num_train=args.num_train or NUM_TRAIN[name])


# ----------------------------------------------------------------------------- world ---

@dataclasses.dataclass
class World:
  module: unet.UNet2DConditionModel
  apply_fn: Callable
  params: dict
  schedule: NoiseSchedule
  arrays: dict             # the sweep's arrays: latents [N,2,h,w,c], text_states [N,K,L,D], ...
  query_latent: np.ndarray  # [h, w, c]
  query_text: np.ndarray    # [L, D]
  query_item: int


def make_world(b: Bench) -> World:
  """Random weights (our init), random latents (flip = mirror image) and text states. The query
  is a training item's latent and first caption (its rank is printed, as a sanity check that
  both sides see alike; with untrained weights it need not be first)."""
  module, params = unet.init_unet(b.unet_config, jax.random.key(b.seed))
  apply_fn = lambda p, x, t, c: module.apply({"params": p}, x, t, c)
  config = load_config(b.name)
  schedule = NoiseSchedule.from_config(config.scheduler.to_dict())
  rng = np.random.default_rng(b.seed)
  side, channels = b.unet_config["sample_size"], b.unet_config["in_channels"]
  latents = rng.standard_normal((b.items, side, side, channels), np.float32)
  latents = np.stack([latents, latents[:, :, ::-1]], axis=1)
  text = rng.standard_normal((b.items, b.captions, b.text_length,
                              b.unet_config["cross_attention_dim"]), np.float32)
  arrays = {"latents": latents, "text_states": text,
            "num_captions": np.full(b.items, b.captions, np.int32),
            "index": np.arange(b.items, dtype=np.int64)}
  query = b.items // 3
  return World(module, apply_fn, params, schedule, arrays, latents[query, 0], text[query, 0],
               query)


def slot_noise_arrays(b: Bench, index: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """[n, F, K, T, *shape]: the noise ours derives inside the sweep, for the PyTorch side."""
  @jax.jit
  def noise(idx):
    grid = lambda: np.meshgrid(np.asarray(b.flips), np.arange(b.captions),
                               np.asarray(b.timesteps), indexing="ij")
    f, k, t = (jnp.asarray(a.reshape(-1), jnp.int32) for a in grid())
    per_item = lambda i: jax.vmap(lambda ff, kk, tt: sweep_lib.slot_noise(
        np.uint32(b.seed), i, ff, kk, tt, shape))(f, k, t)
    return jax.lax.map(per_item, idx)
  out = np.asarray(noise(jnp.asarray(index, jnp.uint32)))
  return out.reshape((len(index), len(b.flips), b.captions, len(b.timesteps)) + shape)


# ---------------------------------------------------------------------------- PyTorch ---

class TorchAbU:
  """The same unlearning step and paired loss sweep on diffusers' PyTorch UNet (NCHW).

  `before` holds θ0 and is the model the gradient flows through (only the selected weights
  require grad); `after` is a copy whose selected weights the step overwrites with θ'. Both,
  the Fisher and alphas_cumprod live on `device`; inputs go there through `put`.
  """

  def __init__(self, b: Bench, world: World, device: str = "cpu"):
    import torch  # pylint: disable=g-import-not-at-top
    from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
    self.torch, self.b, self.device = torch, b, torch.device(device)
    state = weights.to_torch_state_dict(jax.device_get(world.params))
    self.before = UNet2DConditionModel(**b.unet_config)
    self.before.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()},
                                strict=True)
    self.before.to(self.device).eval()
    # The selection (attn2 to_k / to_v) under torch keys.
    self.paths = {weights.torch_key(p): p for p in traverse_util.flatten_dict(
        world.params) if selection.SELECTIONS[selection.DEFAULT](p)}
    self.keys = sorted(self.paths)
    for name, p in self.before.named_parameters():
      p.requires_grad_(name in self.paths)
    self.after = copy.deepcopy(self.before).requires_grad_(False)
    self.alphas_cumprod = self.put(np.array(world.schedule.alphas_cumprod))
    self.prediction_type = world.schedule.prediction_type
    self.fisher = None

  def put(self, x):
    """A numpy array (shared, not copied, on the CPU) or a tensor, on this side's device."""
    return (self.torch.from_numpy(x) if isinstance(x, np.ndarray) else x).to(self.device)

  def _sync(self) -> None:
    """Ends a timed call: CUDA kernels run asynchronously, so wait for them."""
    if self.device.type == "cuda":
      self.torch.cuda.synchronize(self.device)

  def _tf32(self, allow: bool) -> None:
    """On a GPU, float32 matmuls and convolutions as ours runs them: TF32 allowed in the
    unlearning step (JAX's default precision), not in the sweep ("highest"). CPU: no effect."""
    if self.device.type == "cuda":
      self.torch.backends.cuda.matmul.allow_tf32 = allow
      self.torch.backends.cudnn.allow_tf32 = allow

  def _target(self, x0, noise, t):
    """What the network is trained to predict (the schedule's prediction_type), as ours."""
    if self.prediction_type == "epsilon":
      return noise
    if self.prediction_type == "sample":
      return x0.expand(noise.shape)
    a, s = self._coefficients(t)   # v = √ᾱ ε − √(1−ᾱ) x0
    return a * noise - s * x0

  def compute_fisher(self, arrays: dict, num_items: int, seed: int = 0) -> dict:
    """The shared diagonal Fisher (setup, not timed): mean squared per-example gradient over
    (item, flip) examples, each with a uniform timestep, a random caption and fresh noise.
    Stored here in torch layout; returned in ours ({path: float64, flax layout})."""
    torch = self.torch
    rng = np.random.default_rng(seed)
    params = dict(self.before.named_parameters())
    selected = [params[k] for k in self.keys]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in selected]
    examples = [(i, f) for i in range(num_items) for f in range(2)]
    for i, f in examples:
      x0 = self.put(np.ascontiguousarray(np.moveaxis(arrays["latents"][i, f], -1, 0)))
      text = self.put(arrays["text_states"][i, rng.integers(arrays["num_captions"][i])])
      t = self.put(torch.tensor([int(rng.integers(len(self.alphas_cumprod)))]))
      noise = self.put(rng.standard_normal((1,) + tuple(x0.shape), np.float32))
      a, s = self._coefficients(t)
      eps = self.before(a * x0 + s * noise, t, text[None]).sample
      target = self._target(x0[None], noise, t)
      for acc, g in zip(total, torch.autograd.grad((eps - target).square().mean(), selected)):
        acc.add_(g.double().square())
    self.fisher = {k: v / len(examples) for k, v in zip(self.keys, total)}
    return {self.paths[k]: v.cpu().numpy().T for k, v in self.fisher.items()}  # Linear (out, in)

  def _coefficients(self, t):
    a = self.alphas_cumprod[t]
    return a.sqrt().view(-1, 1, 1, 1), (1.0 - a).sqrt().view(-1, 1, 1, 1)

  def unlearn(self, x0, text, t, noise) -> dict:
    """θ' of the selected weights (on the device). x0 [C,H,W], text [L,D], t [D], noise
    [D,C,H,W], all on the device."""
    torch = self.torch
    self._tf32(True)
    params = dict(self.before.named_parameters())
    selected = [params[k] for k in self.keys]
    # (α/N)/F in float64, zero entries raised to the smallest positive F ("min_positive").
    floor = min(f[f > 0].min() for f in self.fisher.values())
    scale = [((self.b.alpha / self.b.num_train) / torch.where(f > 0, f, floor)).float()
             for f in (self.fisher[k] for k in self.keys)]
    total = [torch.zeros_like(p) for p in selected]
    num_draws = t.shape[0]
    for start in range(0, num_draws, self.b.micro_batch):
      t_m, noise_m = t[start:start + self.b.micro_batch], noise[start:start + self.b.micro_batch]
      a, s = self._coefficients(t_m)
      x_t = a * x0 + s * noise_m
      eps = self.before(x_t, t_m, text.expand(t_m.shape[0], -1, -1)).sample
      loss = (eps - self._target(x0[None], noise_m, t_m)).square().mean(dim=(1, 2, 3)).sum()
      for acc, g in zip(total, torch.autograd.grad(loss, selected)):
        acc.add_(g)
    after = dict(self.after.named_parameters())
    new = {}
    with torch.no_grad():
      for k, p, c, g in zip(self.keys, selected, scale, total):
        new[k] = p + c * (g / num_draws)
        after[k].copy_(new[k])
    self._sync()
    return new

  def sweep(self, latents, text, noise) -> tuple[np.ndarray, np.ndarray]:
    """(pre, delta) [n, F] float64 numpy. latents [n,F,C,H,W], text [n,K,L,D], noise
    [n,F,K,T,C,H,W], all on the device."""
    torch, b = self.torch, self.b
    self._tf32(False)
    n, num_f, num_k, num_t = noise.shape[:4]
    shape, text_shape = tuple(latents.shape[2:]), tuple(text.shape[2:])
    steps = self.put(torch.tensor(b.timesteps)).repeat(num_f * num_k)  # slot order (f, k, t)
    pre = torch.empty(n, num_f * num_k * num_t, device=self.device)
    delta = torch.empty(n, num_f * num_k * num_t, device=self.device)
    with torch.inference_mode():
      for i in range(0, n, b.items_per_forward):
        c = min(b.items_per_forward, n - i)
        x0 = latents[i:i + c, :, None, None].expand((c, num_f, num_k, num_t) + shape)
        states = text[i:i + c, None, :, None].expand((c, num_f, num_k, num_t) + text_shape)
        eps_true = noise[i:i + c].reshape((-1,) + shape)
        t = steps.repeat(c)
        a, s = self._coefficients(t)
        x_t = a * x0.reshape((-1,) + shape) + s * eps_true
        target = self._target(x0.reshape((-1,) + shape), eps_true, t)
        states = states.reshape((-1,) + text_shape)
        eps = self.before(x_t, t, states).sample
        eps_after = self.after(x_t, t, states).sample
        d, r = eps_after - eps, eps - target
        pre[i:i + c] = r.square().mean(dim=(1, 2, 3)).view(c, -1)
        delta[i:i + c] = (d * (d + 2.0 * r)).mean(dim=(1, 2, 3)).view(c, -1)
    average = lambda x: x.double().view(n, num_f, num_k, num_t).mean(-1).mean(-1).cpu().numpy()
    out = average(pre), average(delta)
    self._sync()
    return out


# ------------------------------------------------------------------------------ timing ---

def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def _load() -> str:
  return "load average %.2f %.2f %.2f" % os.getloadavg()


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
  rank = lambda x: np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(np.float64)
  return float(np.corrcoef(rank(a), rank(b))[0, 1])


def _step_difference(after: dict, before: dict, torch_abu: TorchAbU, torch_new: dict) -> float:
  """max over the selected weights of max|Δθ ours − Δθ torch| / max|Δθ torch|."""
  flat_after, flat_before = (traverse_util.flatten_dict(t) for t in (after, before))
  torch_before = dict(torch_abu.before.named_parameters())
  worst = 0.0
  for key in torch_abu.keys:
    path = torch_abu.paths[key]
    ours = np.asarray(flat_after[path]) - np.asarray(flat_before[path])
    theirs = (torch_new[key] - torch_before[key]).detach().cpu().numpy().T  # Linear (out, in)
    worst = max(worst, float(np.abs(ours - theirs).max() / np.abs(theirs).max()))
  return worst


def compare(b: Bench, args: argparse.Namespace) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.torch_threads or os.cpu_count())
  mesh = parallel.make_mesh()
  world = make_world(b)
  n_params = sum(x.size for x in jax.tree.leaves(world.params))
  n_selected = selection.count(world.params, selection.select(world.params))

  # The Fisher, shared by both sides and not timed (a few items: its values only set the
  # preconditioner's shape, and both sides use the same one).
  torch_abu = TorchAbU(b, world, args.torch_device)
  start = time.perf_counter()
  fisher = torch_abu.compute_fisher(world.arrays, min(b.fisher_items, b.items), b.seed)
  fisher_s = time.perf_counter() - start

  # The draws both sides use: ours derives them in its programs; torch gets them as arrays,
  # put on its device here, before any timing.
  us, ss = b.unlearn_settings(), b.sweep_settings()
  shape = world.query_latent.shape
  q_t, q_noise = unlearn_lib.query_draws(b.seed, 0, us, shape,
                                         world.schedule.num_train_timesteps)
  nchw = lambda x: np.ascontiguousarray(np.moveaxis(x, -1, -3))
  put = lambda **arrays: {k: torch_abu.put(v) for k, v in arrays.items()}
  tq = put(x0=nchw(world.query_latent), text=world.query_text, t=q_t.astype(np.int64),
           noise=nchw(q_noise))
  noise = slot_noise_arrays(b, world.arrays["index"], shape)
  ts = put(latents=nchw(world.arrays["latents"]), text=world.arrays["text_states"],
           noise=nchw(noise))

  ours_unlearn = lambda: jax.block_until_ready(unlearn_lib.unlearn(
      world.apply_fn, world.params, fisher, world.query_latent, world.query_text,
      world.schedule, num_train=b.num_train, settings=us, mesh=mesh))
  ours_sweep = lambda after, rows=None: sweep_lib.sweep(
      world.apply_fn, world.params, after, world.arrays, world.schedule, settings=ss,
      mesh=mesh, rows=rows)

  # Warm-up: ours' first calls compile (the sweep's program does not depend on the number of
  # items, so one batch compiles it); torch runs once too (allocator, thread pool).
  first_unlearn_s, after = _timed(ours_unlearn)
  one_batch = np.arange(min(b.items, b.items_per_device * mesh.size))
  first_sweep_s, _ = _timed(lambda: ours_sweep(after, one_batch))
  torch_abu.unlearn(**tq)
  torch_abu.sweep(*(v[:b.items_per_forward] for v in ts.values()))

  times = {k: [] for k in ("ours_unlearn", "torch_unlearn", "ours_sweep", "torch_sweep")}
  for _ in range(b.repeats):
    s, after = _timed(ours_unlearn)
    times["ours_unlearn"].append(s)
    s, torch_new = _timed(lambda: torch_abu.unlearn(**tq))
    times["torch_unlearn"].append(s)
    s, result = _timed(lambda: ours_sweep(after))
    times["ours_sweep"].append(s)
    s, (torch_pre, torch_delta) = _timed(lambda: torch_abu.sweep(**ts))
    times["torch_sweep"].append(s)

  # Ours' per-call host work in `sweep` besides the programs (measured once, for the reader).
  probe = (np.zeros((1,) + shape, np.float32), np.zeros((1,), np.int32),
           np.zeros((1,) + world.query_text.shape, np.float32))
  fixed_s, _ = _timed(lambda: (
      sweep_lib._changed_leaves(world.params, after),  # pylint: disable=protected-access
      sweep_lib.low_precision_dtypes(world.apply_fn, world.params, *probe)))

  # Agreement of the two implementations.
  step_err = _step_difference(after, world.params, torch_abu, torch_new)
  tau_ours = scores_lib.image_scores(result.delta)
  tau_torch = scores_lib.image_scores(torch_delta)
  rho = _spearman(tau_ours, tau_torch)
  tau_err = np.abs(tau_ours - tau_torch).max() / np.abs(tau_torch).max()
  pre_err = np.abs(result.pre - torch_pre).max() / np.abs(torch_pre).max()
  rank_ours = int(np.flatnonzero(scores_lib.rank(tau_ours) == world.query_item)[0]) + 1
  rank_torch = int(np.flatnonzero(scores_lib.rank(tau_torch) == world.query_item)[0]) + 1

  # Forward counts (ours pads draws to whole micro-batches per device, items to whole batches).
  layout = unlearn_lib._layout  # pylint: disable=protected-access
  micro, per_device = layout(b.draws, b.micro_batch, mesh.size)
  ours_draws = per_device * mesh.size
  batch = b.items_per_device * mesh.size
  ours_items = -(-b.items // batch) * batch
  torch_draws = b.draws
  torch_forwards = 2 * b.items * b.slots
  cfg = b.unet_config

  med = {k: statistics.median(v) for k, v in times.items()}
  best = {k: min(v) for k, v in times.items()}
  print(f"\n== {b.name}: UNet {n_params / 1e6:.2f}M params ({n_selected:,} selected: attn2 "
        f"to_k/to_v), {cfg['sample_size']}x{cfg['sample_size']}x{cfg['in_channels']} latents, "
        f"text {b.text_length}x{cfg['cross_attention_dim']}, {b.items} random items swept")
  if torch_abu.device.type == "cuda":
    torch_on = (f"on cuda ({torch.cuda.get_device_name(torch_abu.device)}; TF32 as ours: "
                "unlearn on, sweep off)")
  else:
    torch_on = (f"on cpu with {torch.get_num_threads()} threads "
                f"(OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']})")
  jax_device = jax.devices()[0]
  jax_kind = f" ({jax_device.device_kind})" if jax_device.platform != "cpu" else ""
  print(f"   {os.cpu_count()} cores, torch {torch.__version__} {torch_on}, jax "
        f"{jax.__version__} on {mesh.size} {jax_device.platform} device(s){jax_kind}; "
        f"{_load()}")
  print(f"   unlearn: α={b.alpha}, N={b.num_train:,}, 1 step, D={b.draws} draws (timesteps "
        f"distinct within batches of {us.draws_per_batch}), micro-batch {b.micro_batch}; "
        f"Fisher from {2 * min(b.fisher_items, b.items)} examples ({fisher_s:.0f} s, shared, "
        "not timed)")
  print(f"   sweep: flips {b.flips} x {b.captions} caption(s) x timesteps {b.timesteps} = "
        f"{b.slots} slots/item, θ0 and θ' on identical noise; {b.items_per_forward} item(s) "
        f"= {b.items_per_forward * b.slots} slots per forward; ours {b.items_per_device} "
        f"items per jitted call")
  print(f"   UNet passes per query: unlearn ours {ours_draws} fwd+bwd ({ours_draws // micro} "
        f"x {micro}), torch {torch_draws} fwd+bwd ({-(-torch_draws // b.micro_batch)} x "
        f"{b.micro_batch}); sweep ours 2 x {ours_items} x {b.slots} = "
        f"{2 * ours_items * b.slots} forwards, torch 2 x {b.items} x {b.slots} = "
        f"{torch_forwards}" + ("" if ours_draws == torch_draws and ours_items == b.items else
                               "  (ours padded: the extra slots are masked)"))
  print(f"   ours first calls (compile included): unlearn {first_unlearn_s:.1f} s "
        f"(~{first_unlearn_s - med['ours_unlearn']:.1f} s compile), sweep over one batch "
        f"{first_sweep_s:.1f} s")
  print(f"   per query, seconds, median (best) of {b.repeats} alternating repeats:")
  print(f"     {'':8s} {'ours':>16s} {'torch':>16s}   torch s / ours s")
  for stage in ("unlearn", "sweep"):
    o, t = f"ours_{stage}", f"torch_{stage}"
    print(f"     {stage:8s} {med[o]:8.2f} ({best[o]:5.2f}) {med[t]:8.2f} ({best[t]:5.2f})   "
          f"{med[t] / med[o]:5.2f}x ({best[t] / best[o]:.2f}x best)")
  totals = {side: [u + s for u, s in zip(times[f"{side}_unlearn"], times[f"{side}_sweep"])]
            for side in ("ours", "torch")}
  to, tt = statistics.median(totals["ours"]), statistics.median(totals["torch"])
  bo, bt = min(totals["ours"]), min(totals["torch"])
  print(f"     {'total':8s} {to:8.2f} ({bo:5.2f}) {tt:8.2f} ({bt:5.2f})   {tt / to:5.2f}x "
        f"({bt / bo:.2f}x best)")
  verdict = "faster" if tt >= to else "SLOWER"
  print(f"   => per query, ours is {verdict} by {max(tt / to, to / tt):.2f}x (median; "
        f"unlearn {med['torch_unlearn'] / med['ours_unlearn']:.2f}x, sweep "
        f"{med['torch_sweep'] / med['ours_sweep']:.2f}x as torch/ours)")
  print(f"   of ours' sweep, {fixed_s:.2f} s per call is fixed host work (change "
        "detection, precision check), independent of the items")
  print(f"   sweep throughput: ours {b.items / med['ours_sweep']:.1f} items/s "
        f"({torch_forwards / med['ours_sweep']:.0f} forwards/s), torch "
        f"{b.items / med['torch_sweep']:.1f} items/s ({torch_forwards / med['torch_sweep']:.0f} "
        f"forwards/s)")
  print(f"   agreement: Spearman(τ ours, τ torch) = {rho:.6f} over {b.items} items; "
        f"max|Δτ|/max|τ| = {tau_err:.1e}; pre-loss max rel diff {pre_err:.1e}; update θ'-θ0 "
        f"max rel diff {step_err:.1e}; the query's own item ranks {rank_ours} (ours), "
        f"{rank_torch} (torch); τ/pre ~ {np.abs(tau_torch).mean() / torch_pre.mean():.1e}")
  if rho < 0.99:
    print("   WARNING: the two implementations disagree (Spearman < 0.99)")


# ------------------------------------------------------------------ device throughput ---

def sweep_throughput(b: Bench, num_devices: int, repeats: int, out: str) -> None:
  """Child mode: ours' sweep alone on a mesh of `num_devices`; prints one RESULT line and saves
  the per-item τ (the parent checks they agree across device counts)."""
  mesh = parallel.make_mesh(num_devices)
  world = make_world(b)
  flat = traverse_util.flatten_dict(world.params)
  rng = np.random.default_rng(1)
  mask = traverse_util.flatten_dict(selection.select(world.params))
  after = traverse_util.unflatten_dict({  # any θ' that differs on the selection will do
      p: v + 1e-3 * rng.standard_normal(v.shape).astype(np.float32) if mask[p] else v
      for p, v in flat.items()})
  run = lambda rows=None: sweep_lib.sweep(world.apply_fn, world.params, after, world.arrays,
                                          world.schedule, settings=b.sweep_settings(),
                                          mesh=mesh, rows=rows)
  first_s, _ = _timed(lambda: run(np.arange(min(b.items, b.items_per_device * num_devices))))
  times = []
  for _ in range(repeats):
    s, result = _timed(run)
    times.append(s)
  np.save(out, scores_lib.image_scores(result.delta))
  print(f"RESULT devices={num_devices} median_s={statistics.median(times):.4f} "
        f"best_s={min(times):.4f} first_s={first_s:.3f}", flush=True)


def device_table(b: Bench, args: argparse.Namespace) -> None:
  env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                                     " --xla_force_host_platform_device_count=8").strip()}
  batch = b.items_per_device * max(DEVICE_COUNTS)
  print(f"\n== sweep throughput of ours on fake CPU devices ({b.name} config, {b.items} items, "
        f"{b.slots} slots/item, {b.items_per_device} items per device per call; "
        f"XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  print(f"   All fake devices share the same {os.cpu_count()} CPU cores: this shows that the "
        "sharded path works and what it costs, not a speed-up." +
        (f" Items are padded to multiples of {b.items_per_device} x devices "
         f"(at 8: {-(-b.items // batch) * batch})." if b.items % batch else ""))
  print(f"   {'devices':>7s} {'items/s':>9s} {'best':>9s} {'vs 1':>6s} {'1st call s':>10s}   "
        "τ vs 1 device (max rel diff)")
  base, base_tau = None, None
  with tempfile.TemporaryDirectory() as tmp:
    for n in DEVICE_COUNTS:
      out = os.path.join(tmp, f"tau_{n}.npy")
      cmd = [sys.executable, os.path.abspath(__file__), "--config", b.name, "--devices",
             str(n), "--out", out, "--repeats", str(b.repeats), "--items", str(b.items),
             "--draws", str(b.draws), "--micro_batch", str(b.micro_batch), "--timesteps",
             str(len(b.timesteps)), "--captions", str(b.captions), "--items_per_forward",
             str(b.items_per_forward), "--items_per_device", str(b.items_per_device)]
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
      match = re.search(r"RESULT devices=(\d+) median_s=(\S+) best_s=(\S+) first_s=(\S+)",
                        proc.stdout)
      if proc.returncode or not match:
        print(f"   {n:7d}   failed (exit {proc.returncode}): {proc.stderr.strip()[-400:]}")
        continue
      median_s, best_s, first_s = map(float, match.groups()[1:])
      rate = b.items / median_s
      base = base or rate
      tau = np.load(out)
      base_tau = tau if base_tau is None else base_tau
      diff = np.abs(tau - base_tau).max() / np.abs(base_tau).max()
      print(f"   {n:7d} {rate:9.1f} {b.items / best_s:9.1f} {rate / base:5.2f}x "
            f"{first_s:10.1f}   {diff:.1e}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", choices=["all", *DEFAULTS], default="all")
  parser.add_argument("--quick", action="store_true", help="small sizes, 1-2 repeats")
  parser.add_argument("--items", type=int, help="N: items swept (tiny 256, mscoco 200)")
  parser.add_argument("--draws", type=int, help="D: query draws of the step (160 / 32)")
  parser.add_argument("--micro_batch", type=int, help="draws per fwd+bwd (32 / 16)")
  parser.add_argument("--timesteps", type=int, help="T: evenly spaced sweep timesteps (4 / 2)")
  parser.add_argument("--captions", type=int, help="K: captions per item (2 / 1)")
  parser.add_argument("--items_per_forward", type=int,
                      help="items per UNet call in the sweep, both sides (1 / 4)")
  parser.add_argument("--items_per_device", type=int,
                      help="ours: items per device per jitted sweep call (8 / 8)")
  parser.add_argument("--alpha", type=float, default=0.01)
  parser.add_argument("--num_train", type=int, default=0,
                      help="N in α/N (0: tiny 1,000, mscoco 118,287)")
  parser.add_argument("--fisher_items", type=int, default=8,
                      help="items (x 2 flips) of the shared Fisher")
  parser.add_argument("--repeats", type=int, help="timed repeats per side (3 / 2)")
  parser.add_argument("--torch_threads", type=int, default=0, help="0: os.cpu_count()")
  parser.add_argument("--torch_device", choices=["cpu", "cuda"], default="cpu",
                      help="where the PyTorch reference runs (ours: JAX's default backend)")
  parser.add_argument("--no_devices", "--no_device_table", action="store_true",
                      help="skip the fake-device table (skipped anyway unless JAX runs on CPU)")
  parser.add_argument("--devices_config", choices=list(DEFAULTS), default="tiny",
                      help="config of the fake-device table")
  parser.add_argument("--devices", type=int, default=0, help=argparse.SUPPRESS)  # child mode
  parser.add_argument("--out", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.torch_device == "cuda":
    import torch  # pylint: disable=g-import-not-at-top
    if not torch.cuda.is_available():
      parser.error(f"--torch_device cuda: torch {torch.__version__} sees no CUDA device "
                   "(torch.cuda.is_available() is False); use --torch_device cpu")

  if args.devices:
    name = args.config if args.config != "all" else args.devices_config
    sweep_throughput(make_bench(name, args), args.devices, args.repeats, args.out)
    return
  print(f"abu_query: {_load()}")
  for name in (DEFAULTS if args.config == "all" else [args.config]):
    compare(make_bench(name, args), args)
  if not args.no_devices:
    if jax.default_backend() == "cpu":
      device_table(make_bench(args.devices_config, args), args)
    else:
      print(f"\n(fake-CPU-device table skipped: JAX runs on {jax.default_backend()})")
  print(f"\nabu_query done: {_load()}")


if __name__ == "__main__":
  main()
