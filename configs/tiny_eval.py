r"""The tiny world sized for the counterfactual evaluation (issue 6): an hour on 2 CPU cores.

  python -m launch.train --config=configs/tiny_eval.py --workdir=runs/eval       # ~1 min
  python -m launch.generate --config=configs/tiny_eval.py --workdir=runs/eval    # ~20 s
  python -m launch.attribute --config=configs/tiny_eval.py --workdir=runs/eval   # ~3 min
  python -m launch.evaluate --config=configs/tiny_eval.py --workdir=runs/eval    # ~50 min
  # a reduced evaluation (any key of the `evaluation` block below can be overridden):
  python -m launch.evaluate --config=configs/tiny_eval.py --workdir=runs/eval \
      --config.evaluation.queries='("rare_moon_0",)' --config.evaluation.lds.num_subsets=0
  # seconds-long variant (tests):
  python -m launch.train --config=configs/tiny_eval.py:smoke --workdir=/tmp/eval_smoke

Why smaller than configs/tiny.py. The evaluation retrains the model from scratch once per
(query, method, K) cell whose top-K no other cell shares, once per random draw and K, and once
per LDS subset: with 15 queries, 2 K, 6 ranked methods, 3 random draws and 5 LDS subsets, up to
15·2·6 + 3·2 + 5 = 191 retrainings (the measured run needed 188: 53 min 32 s for all four
commands). The default tiny model trains for about 7 minutes; here a retraining takes ~28 s in
a one-core worker process, two at a time on 2 cores (evaluation.retrain_workers; ~14 s of wall
time per model). So: 256 items instead of 1,000 (the 5 planted rare concepts kept, 4 items
each), a two-level UNet of 32/64 channels instead of three levels of 24/48/48, and 500 steps of
16 instead of 13,000 at a higher peak rate (cosine decay; no EMA, which would average in the
early weights of so short a run). The image side (32 px through the 4x4 pixel codec, x0 target,
cosine noise schedule) and everything else not overridden below come from configs/tiny.py.

The queries are the rare-concept prompts only (3 per concept, 15 in all): they carry ground
truth (each concept's 4 items). With 2 per concept AbU beat random by 1.7 s.e. at K = 6 (the
per-query ΔL varies by more than the retraining noise); 3 per concept is what fits the hour.
K = 6 and 12 are 2.3 % and 4.7 % of N: the removal effect grows with K while the retraining
noise (about 1.2e-3 in a query's ΔL) does not.
"""
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
  if variant not in ("default", "smoke"):
    raise ValueError(f"configs/tiny_eval.py: unknown variant {variant!r} (default, smoke)")
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

  # The guidance the evaluation's table was measured with (configs/tiny.py moved to 2.0 later,
  # for its own model).
  c.generate.guidance_scale = 3.0
  c.generate.queries_per_rare_concept = 1 if smoke else 3
  c.generate.num_common_queries = 1 if smoke else 0

  # AbU and AbU+: configs/tiny.py's settings (launch.attribute runs its default, AbU+). On 256
  # items a query takes ~8 s (unlearn 3 s, sweep 5 s) after the factors and the pre losses
  # (once); the evaluation reuses those results and computes the other method's itself.

  # The attribution of the evaluation's table: one sweep draw per timestep, every timestep
  # weighing the same in τ, the Fisher and the EK-FAC factors, τ from the exact finite step
  # (configs/tiny.py later moved its own model to the training's Min-SNR weights and "jvp").
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
  return c
