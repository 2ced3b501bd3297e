r"""The tiny world sized for the counterfactual evaluation: about an hour on 2 CPU cores.

  python -m launch.train --config=configs/tiny_eval.py --workdir=runs/eval       # ~1 min
  python -m launch.generate --config=configs/tiny_eval.py --workdir=runs/eval    # ~20 s
  python -m launch.attribute --config=configs/tiny_eval.py --workdir=runs/eval   # ~3 min
  python -m launch.evaluate --config=configs/tiny_eval.py --workdir=runs/eval    # ~50 min
  # the issue-17 scale (60 queries, 3 K, 32 LDS subsets; ~1,250 retrainings: hours on 2 cores):
  for s in train generate attribute evaluate; do
    python -m launch.$s --config=configs/tiny_eval.py:full --workdir=runs/eval-full; done
  # a reduced evaluation (any key of the `evaluation` block below can be overridden):
  python -m launch.evaluate --config=configs/tiny_eval.py --workdir=runs/eval \
      --config.evaluation.queries='("rare_moon_0",)' --config.evaluation.lds.num_subsets=0
  # seconds-long variant (tests):
  python -m launch.train --config=configs/tiny_eval.py:smoke --workdir=/tmp/eval_smoke

Smaller than configs/tiny.py because the evaluation retrains the model from scratch up to
~190 times (per query, method and K; per random draw; per LDS subset): 256 items with the 5
rare concepts at 4 items each, a two-level 32/64 UNet, 500 steps of 16 (~28 s per retraining
in a one-core worker). Everything not overridden below comes from configs/tiny.py. Queries are
the rare-concept prompts only (3 per concept): they carry ground truth. The measured table and
why 15 queries: docs/experiments.md section 3.
"""
import copy

import ml_collections

try:
  from configs import tiny
except ModuleNotFoundError as error:
  # config_flags loads this file by path; from outside the repository root `configs` is not
  # importable, so load the sibling file the same way.
  if error.name != "configs":
    raise
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  _spec = importlib.util.spec_from_file_location(
      "configs_tiny", os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))
  tiny = importlib.util.module_from_spec(_spec)
  _spec.loader.exec_module(tiny)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  if variant not in ("default", "full", "smoke"):
    raise ValueError(f"configs/tiny_eval.py: unknown variant {variant!r} (default, full, smoke)")
  smoke = variant == "smoke"
  c = tiny.get_config("smoke" if smoke else None)
  c.name = f"tiny-eval-{variant}"

  c.world.num_items = 64 if smoke else 256
  c.world.rare_count = 3 if smoke else 4
  if "patterns" in c.world:
    # A list, not a tuple: the precomputed arrays' manifest stores its fingerprint as JSON,
    # where a tuple reads back as a list, so every retraining's `recipe.prepare` would see a
    # tuple-valued world setting as "other settings" and refuse the shared arrays.
    patterns = list(c.world.patterns)
    del c.world["patterns"]
    c.world.patterns = patterns

  if not smoke:
    c.unet.block_out_channels = (32, 64)
    c.unet.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D")
    c.unet.up_block_types = ("CrossAttnUpBlock2D", "UpBlock2D")
    # Min-SNR weighting (γ 5) spends the few steps on the timesteps that decide layout and
    # colour rather than on barely visible noise.
    c.train.update(dict(
        batch_size=16, num_steps=500, learning_rate=3e-3, lr_schedule="cosine",
        warmup_steps=20, ema_decay=None, min_snr_gamma=5.0,
        checkpoint_every=500, log_every=100, sample_every=500))

  # The guidance the evaluation's table was measured with.
  c.generate.guidance_scale = 3.0
  c.generate.queries_per_rare_concept = 1 if smoke else 3
  c.generate.num_common_queries = 1 if smoke else 0

  # The attribution the evaluation's table measured: one draw per timestep, unweighted τ,
  # Fisher and EK-FAC, the exact finite step ("cached"), not configs/tiny.py's later settings.
  c.attribution.sweep.timesteps = tuple(range(0, 1000, 200 if smoke else 100))
  c.attribution.sweep.min_snr_gamma = None
  c.attribution.sweep.method = "cached"
  c.attribution.fisher.min_snr_gamma = None
  c.attribution.ekfac.min_snr_gamma = None

  # launch/evaluate.py's block (see its docstring for every key).
  c.evaluation = ml_collections.ConfigDict(dict(
      # caption and caption-words never look at an image: the text-only floor.
      methods=("abu", "abu+", "pixel", "features", "trak", "d-trak", "caption",
               "caption-words", "random"),
      method_configs={},
      ks=(2, 3) if smoke else (6, 12), k_fractions=(), random_draws=3, random_seed=0,
      loss=dict(timestep_stride=5, num_draws=1, seed=0, batch_size=100),
      regenerate=True, queries=(),
      lds=dict(num_subsets=3 if smoke else 5, fraction=0.5, subset_seed=0),
      retrain_workers=-1))   # one single-core retraining process per core (retrain_pool.py)

  if variant == "full":
    # The decisive scale: 60 queries (8 per rare concept, 20 common prompts, each its own
    # seed), K at 0.8 / 2.3 / 4.7 % of the 256 items, 5 random draws, 32 LDS half-subsets.
    # AbU and AbU+ twice: at SPEC's settings (the exact step, unweighted: the plain names) and
    # at the demo's (`@demo`: configs/tiny.py's jvp sweep and Min-SNR-weighted factors).
    c.generate.queries_per_rare_concept = 8
    c.generate.num_common_queries = 20
    demo = tiny.get_config().attribution
    c.evaluation.methods = ("abu", "abu+", "abu@demo", "abu+@demo", "pixel", "caption",
                            "caption-words", "random")
    demo_blocks = {"sweep": {"method": demo.sweep.method,
                             "min_snr_gamma": demo.sweep.min_snr_gamma},
                   "fisher": {"min_snr_gamma": demo.fisher.min_snr_gamma},
                   "ekfac": {"min_snr_gamma": demo.ekfac.min_snr_gamma}}
    c.evaluation.method_configs = {"abu@demo": copy.deepcopy(demo_blocks),
                                   "abu+@demo": copy.deepcopy(demo_blocks)}
    c.evaluation.ks = (2, 6, 12)
    c.evaluation.random_draws = 5
    c.evaluation.lds.num_subsets = 32
  return c
