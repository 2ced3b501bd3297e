r"""The embedded default: a tiny text-to-image world, made, trained and sampled on 2 CPU cores.

  python -m launch.train --config=configs/tiny.py --workdir=runs/tiny
  python -m launch.generate --config=configs/tiny.py --workdir=runs/tiny
  # seconds-long smoke variant (tests, CI):
  python -m launch.train --config=configs/tiny.py:smoke --workdir=/tmp/smoke

Other variants: demo (`make demo`), visual (planted concepts text cannot find), two_objects
(local attribution); each is described by its function below.

The world (`attrib_jax.data.tiny_world`) is procedurally generated from `world.seed`: coloured
shapes with compositional captions and a few planted rare concepts.

The model is pixel-space (no VAE: latents are the pixels scaled to [-1, 1]) and uses the same
classes as the real models at tiny sizes: diffusers' UNet2DConditionModel layout, a CLIP text
tower, a CLIP BPE tokenizer.

How the text encoder is obtained: there is no pretrained CLIP here, so the tokenizer's BPE
merges are *learned from the world's captions* (`attrib_jax.data.vocab`) and the CLIP text
tower is *randomly initialised from `text_encoder.seed` and kept frozen*. A frozen random
transformer still maps different prompts to different, fixed states (token and position
embeddings pass through the residual stream); the UNet's cross-attention learns to read them.
Both are saved in the model directory like any Stable Diffusion pipeline's. The measurements
behind the settings below, dated, with their commands: docs/experiments.md.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  if variant not in ("default", "demo", "smoke", "visual", "two_objects"):
    raise ValueError(f"configs/tiny.py: unknown variant {variant!r} (default, demo, smoke, "
                     "visual, two_objects)")
  smoke = variant == "smoke"
  c = ml_collections.ConfigDict()
  c.name = f"tiny-{variant}"
  c.seed = 0

  # Plain backgrounds (patterns cost capacity colour and shape need); rare concepts as sets of
  # 10 exemplars, the planting a 10-minute model draws recognisably.
  c.world = ml_collections.ConfigDict(dict(
      kind="tiny_world", seed=0, num_items=64 if smoke else 1000,
      resolution=16 if smoke else 32, rare_count=3 if smoke else 10, patterns=("plain",),
      rare_style="exemplar"))
  c.precompute_dtype = "float32"
  # Lossless space-to-depth codec (models/pipeline.py); p = 4 trains twice as fast as p = 2.
  c.pixel_patch = 2 if smoke else 4
  c.num_captions = 3                     # the tiny world writes 3 captions per item

  c.tokenizer_max_length = 16
  c.text_encoder = ml_collections.ConfigDict(dict(
      seed=1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, hidden_act="quick_gelu"))

  # Attention only at 4x4 and the mid block (what costs most on a CPU); the pooled prompt also
  # feeds the time embedding (addition_embed_type="text"). Narrow on purpose: on 2 cores the
  # number of updates, not the width, decides how well the prompt is followed.
  c.unet = ml_collections.ConfigDict(dict(
      sample_size=8, in_channels=12 if smoke else 48,
      out_channels=12 if smoke else 48, layers_per_block=1,
      block_out_channels=(16, 32) if smoke else (24, 48, 48),
      down_block_types=(("DownBlock2D", "CrossAttnDownBlock2D") if smoke else
                        ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")),
      up_block_types=(("CrossAttnUpBlock2D", "UpBlock2D") if smoke else
                      ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
      attention_head_dim=4, cross_attention_dim=64, norm_num_groups=8,
      addition_embed_type="text", addition_embed_type_num_heads=4))

  # x0 target and cosine schedule: an ε model's errors leak noise into x0 at this size.
  c.scheduler = ml_collections.ConfigDict(dict(
      _class_name="DDPMScheduler", num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
      prediction_type="sample", clip_sample=True))

  c.train = ml_collections.ConfigDict(dict(
      # Many small steps (13,000 of 16, ~10 min on 2 cores): the prompt is learnt per update;
      # the rate decays to zero (a constant one spiked late).
      batch_size=16, num_steps=6 if smoke else 13000,
      learning_rate=1e-3 if smoke else 2e-3,
      warmup_steps=2 if smoke else 100, lr_schedule="cosine", weight_decay=0.0,
      grad_clip_norm=1.0,
      random_flip=False,       # captions name left/right positions: a flip would contradict them
      caption_dropout=0.1, ema_decay=None if smoke else 0.999,
      # Min-SNR-5 weighs the nearly clean timesteps up, which sharpens the shapes.
      min_snr_gamma=0.0 if smoke else 5.0,
      checkpoint_every=3 if smoke else 1000, log_every=2 if smoke else 250,
      sample_every=0 if smoke else 3000, num_devices=0))  # 0: every device

  # Guidance 2 follows prompts better than 3 here; 5 over-saturates.
  c.generate = ml_collections.ConfigDict(dict(
      sampler="ddim", num_steps=10 if smoke else 50, guidance_scale=2.0, eta=0.0, seed=0,
      batch_size=16, queries_per_rare_concept=1 if smoke else 2,
      num_common_queries=2))        # rare-concept queries carry the ground truth

  # SPEC §2's α, single step and K/V selection, with fewer epochs, draws and timesteps for a
  # 1,000-item world. AbU+ (lightly damped EK-FAC): rare words move K/V inputs along directions
  # the rest of the data hardly uses, and a light damping amplifies them. The preconditioners
  # weigh examples as training did (Min-SNR-5); the query gradient stays SPEC's plain mean.
  ekfac_fisher_gamma = c.train.min_snr_gamma or None
  c.attribution = ml_collections.ConfigDict(dict(
      preconditioner="ekfac",
      ekfac=dict(num_epochs=1 if smoke else 8, batch_size=32, seed=0, damping_scale=1e-4,
                 min_snr_gamma=ekfac_fisher_gamma),
      fisher=dict(selection="cross-attn-kv", num_epochs=1 if smoke else 2, batch_size=32,
                  seed=0, min_snr_gamma=ekfac_fisher_gamma),
      unlearn=dict(alpha=0.01, num_steps=1, num_draws=160 if smoke else 2000,
                   draws_per_batch=80, micro_batch=80, seed=0, selection="cross-attn-kv",
                   min_snr_gamma=None),
      # Unflipped view only (training does not flip); τ weighs timesteps as training did, so it
      # is the rise of the loss this model minimised. "jvp": the lightly damped step is past
      # the linear regime, where the exact finite step lets the network's curvature rank.
      sweep=dict(timesteps=((0, 200, 400, 600, 800, 800) if smoke else
                            tuple(range(0, 1000, 100))),
                 min_snr_gamma=c.train.min_snr_gamma or None,
                 num_captions=3,
                 flips=(0,), seed=0, method="jvp", items_per_device=8, noise="per_item")))
  c.attribution_top_k = 10
  if variant in ("demo", "visual", "two_objects"):
    _demo(c)
  if variant == "visual":
    _visual(c)
  if variant == "two_objects":
    _two_objects(c)
  return c


def _demo(c: ml_collections.ConfigDict) -> None:
  """`make demo`: the default recipe shrunk to fit a coffee break on 2 cores."""
  c.world.num_items = 500                  # the rare concepts keep their 10 exemplars (2 %)
  c.train.num_steps = 4000
  c.train.sample_every = 0
  c.generate.queries_per_rare_concept = 1   # one query per planted concept, one common
  c.generate.num_common_queries = 1
  c.attribution.ekfac.num_epochs = 4


def _visual(c: ml_collections.ConfigDict) -> None:
  """Planted concepts that text cannot find, on the demo's recipe.

  Each concept's 10 exemplars carry a visual trait (tiny_world.VISUAL_TRAITS) and share their
  captions with 20 common twins without it; queries are generated from that shared caption
  (24 seeds per concept: about 1 in 6 shows the trait) and count as influenced only when the
  trait detector sees the trait.
  """
  c.world.rare_style = "visual"
  c.train.num_steps = 7000
  c.generate.queries_per_rare_concept = 24


def _two_objects(c: ml_collections.ConfigDict) -> None:
  """Local attribution's world (benchmarks/local_attribution.py), on the demo's recipe.

  A third of the items show two objects, so the model learns which words belong to which part
  of the image; the demo's single-object items never show it that. Two-object captions run to
  about 24 tokens, so the tokenizer takes 32 (16 would cut the second object's words).
  """
  c.world.two_object_fraction = 1 / 3
  c.tokenizer_max_length = 32
  c.train.num_steps = 7000
