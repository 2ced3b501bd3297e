r"""AbC (attribution by customization) on the tiny world: exemplar sets, customized models, queries.

  python -m launch.abc --config=configs/abc_tiny.py --workdir=runs/abc \
      --config.base_workdir=runs/tiny-demo          # a finished configs/tiny.py:demo run
  python -m launch.abc --config=configs/abc_tiny.py --workdir=W --stages=customize,generate
  # about a minute, for tests: 3 sets, 2 images each, a 16x16 base trained in W/base
  python -m launch.abc --config=configs/abc_tiny.py:smoke --workdir=/tmp/abc_smoke

Base model: `base_workdir` (a launch.train workdir: model/, precomputed/); empty, the launcher
trains `base` (configs/tiny.py:demo, or :smoke) into W/base itself. Exemplar sets
(attrib_jax/abc/concepts.py): object categories the base world never shows (one exemplar per
set) and styles (4 exemplars each). Splits: tune (categories the tuned features and the
calibrator learn from), test_seen (new instances of tune categories), test_unseen (categories
never in tune), test_style. Towers: in-world DINO / CLIP stand-ins trained on the base world's
images and captions (attrib_jax.abc.world_towers), since no pretrained tower exists here.

Customization: Custom Diffusion's recipe (K/V + the <new1> row, 4 exemplar + 4 regularisation
draws a step, prior weight 1, AdamW) scaled to the tiny model: fewer steps and a rate fitted to
a 64-wide pixel-space UNet (docs/abc.md, "Benchmark build", has the measurements).
"""
import ml_collections

from configs import tiny as tiny_config

# (name, category, colour, colour2, size, position, background)
_TUNE = (
    ("heart_red", "heart", "red", "red", "large", "left", "gray"),
    ("bowtie_orange", "bowtie", "orange", "cyan", "large", "center", "white"),
    ("arrow_yellow", "arrow", "yellow", "yellow", "large", "right", "black"),
    ("house_green", "house", "green", "purple", "large", "center", "gray"),
    ("tee_cyan", "tee", "cyan", "cyan", "large", "top", "white"),
    ("hexagon_blue", "hexagon", "blue", "red", "large", "center", "black"),
    ("hollowsquare_purple", "hollowsquare", "purple", "purple", "large", "bottom", "gray"),
    ("chevron_pink", "chevron", "pink", "yellow", "large", "center", "white"),
    ("beachball_red", "beachball", "red", "green", "large", "left", "black"),
    ("candy_orange", "candy", "orange", "cyan", "large", "right", "gray"),
    ("heart_blue", "heart", "blue", "blue", "large", "center", "white"),
    ("arrow_purple", "arrow", "purple", "purple", "large", "center", "gray"),
)
_SEEN = (
    ("heart_green", "heart", "green", "green", "large", "right", "black"),
    ("bowtie_red", "bowtie", "red", "blue", "large", "left", "gray"),
    ("house_orange", "house", "orange", "blue", "large", "right", "white"),
    ("hexagon_yellow", "hexagon", "yellow", "purple", "large", "left", "gray"),
    ("beachball_blue", "beachball", "blue", "yellow", "large", "center", "white"),
)
_UNSEEN = (
    ("hourglass_yellow", "hourglass", "yellow", "blue", "large", "center", "gray"),
    ("halfdisc_green", "halfdisc", "green", "green", "large", "top", "black"),
    ("capsule_cyan", "capsule", "cyan", "pink", "large", "center", "black"),
    ("totem_blue", "totem", "blue", "red", "large", "left", "white"),
)
_STYLES = ("frame", "scanlines", "sepia", "dotgrid")


def _object(row, split):
  name, category, colour, colour2, size, position, background = row
  return dict(name=name, kind="object", split=split, category=category, colour=colour,
              colour2=colour2, size=size, position=position, background=background)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  if variant not in ("default", "smoke"):
    raise ValueError(f"configs/abc_tiny.py: unknown variant {variant!r} (default, smoke)")
  smoke = variant == "smoke"
  c = ml_collections.ConfigDict()
  c.name = f"abc-tiny-{variant}"
  c.kind = "tiny_world"
  c.seed = 0
  # A launch.train workdir of `base` (model/, precomputed/); "": train `base` into W/base.
  c.base_workdir = ""
  c.base = tiny_config.get_config("smoke" if smoke else "demo")

  sets = ([_object(r, "tune") for r in _TUNE] + [_object(r, "test_seen") for r in _SEEN]
          + [_object(r, "test_unseen") for r in _UNSEEN]
          + [dict(name=f"style_{s}", kind="style", split="test_style", style=s)
             for s in _STYLES])
  if smoke:
    sets = [sets[0], sets[len(_TUNE) + len(_SEEN)], sets[-1]]
  c.sets = sets
  c.style_exemplars = 4                  # exemplars per style set (AbC: a few)
  c.images_per_set = 2 if smoke else 10  # generated queries per set (the bar: >= 10)

  # Custom Diffusion scaled to the tiny model (measured: docs/abc.md, "Benchmark build").
  c.customization = ml_collections.ConfigDict(dict(
      modifier_token="<new1>", initializer="ktn", num_steps=4 if smoke else 200,
      learning_rate=1e-3 if smoke else 1e-2, batch_size=4,
      num_regularization=16 if smoke else 200, prior_loss_weight=1.0, weight_decay=1e-2,
      grad_clip_norm=1.0, min_snr_gamma=None if smoke else 5.0, seed=0))
  # The base's own sampler settings (configs/tiny.py).
  c.generate = ml_collections.ConfigDict(dict(
      sampler="ddim", num_steps=5 if smoke else 50, guidance_scale=2.0, eta=0.0,
      batch_size=16))
  # The concept check (stage "check"): base model, same prompts without the token, same seeds.
  c.check = ml_collections.ConfigDict(dict(validation_renders=6 if smoke else 40))

  # Stages of other modules read their own blocks (towers, tune, evaluate): placeholders the
  # owners fill; the launcher passes the whole config.
  c.towers = ml_collections.ConfigDict()
  # AbU / AbU+ on one query per set (25 a protocol): they are the costliest methods, and two
  # per set would not fit the benchmark's 45 minutes on 2 cores (timings: docs/abc.md).
  c.evaluation = ml_collections.ConfigDict(dict(abu=dict(queries_per_set=1)))
  c.compilation_cache = ""   # "": W/xla_cache
  return c
