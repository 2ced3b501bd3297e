r"""The embedded default: a tiny text-to-image world, made, trained and sampled on 2 CPU cores.

  python -m launch.train --config=configs/tiny.py --workdir=runs/tiny
  python -m launch.generate --config=configs/tiny.py --workdir=runs/tiny
  # seconds-long smoke variant (tests, CI):
  python -m launch.train --config=configs/tiny.py:smoke --workdir=/tmp/smoke

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
Both are saved in the model directory like any Stable Diffusion pipeline's.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  if variant not in ("default", "smoke"):
    raise ValueError(f"configs/tiny.py: unknown variant {variant!r} (default, smoke)")
  smoke = variant == "smoke"
  c = ml_collections.ConfigDict()
  c.name = f"tiny-{variant}"
  c.seed = 0

  # Single objects on plain grey backgrounds (the grid and gradient patterns are off: they cost
  # a 10-minute model capacity that colour and shape need); the rare "galaxy" background stays.
  # Rare concepts are exemplar sets (10 near-copies of one scene each, 1 % of the items):
  # planted as 5 varied scenes none was drawn recognisably, even from its items' own captions;
  # as 5 exemplars, partly; as 10, the rainbow's bands, the galaxy's specks and the checker
  # are drawn (see the README).
  c.world = ml_collections.ConfigDict(dict(
      kind="tiny_world", seed=0, num_items=64 if smoke else 1000,
      resolution=16 if smoke else 32, rare_count=3 if smoke else 10, patterns=("plain",),
      rare_style="exemplar"))
  c.precompute_dtype = "float32"
  # The pixel codec: each p x p patch of the image folded into channels (lossless; see
  # models/pipeline.py). p = 4 runs the default UNet at 8x8x48, twice the training throughput
  # of p = 2 at 16x16x12 on 2 cores; with the x0 target below it draws clean patches.
  c.pixel_patch = 2 if smoke else 4
  c.num_captions = 3                     # the tiny world writes 3 captions per item

  c.tokenizer_max_length = 16
  c.text_encoder = ml_collections.ConfigDict(dict(
      seed=1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, hidden_act="quick_gelu"))

  # diffusers UNet2DConditionModel config on the codec's latent. Attention (self + cross) only
  # at the 4x4 level and the mid block: attention is what costs most on a CPU.
  # addition_embed_type="text" also pools the prompt into the time embedding (diffusers'
  # TextTimeEmbedding), so every resnet sees it. AbU still unlearns the cross-attention K/V,
  # the paper's selection.
  # Narrow on purpose (24/48/48 channels, 0.8M parameters): on 2 cores the number of updates,
  # not the width, decides how well the prompt is followed. Same 10 minutes, 100 fresh prompts,
  # guidance 3: 64/128/128 for 1,800 steps of 32 drew colour and shape right on 14 %; 32/64/64
  # for 5,400 steps of 32, 32 %, for 9,000 steps of 16, 42 %; 24/48/48 for 13,000 steps of
  # 16, 45 % (52 % at guidance 2; measured).
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

  # Not the MSCOCO schedule (linear betas, ε target): at 32 px that model's samples stayed noise
  # after 20k training samples, because every error of an ε estimate leaks noise into x0. The
  # x0 ("sample") target with the cosine schedule gives clean images from the first few hundred
  # steps (measured; see the tiny-world issue). clip_sample bounds x0 to the pixel range.
  c.scheduler = ml_collections.ConfigDict(dict(
      _class_name="DDPMScheduler", num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
      prediction_type="sample", clip_sample=True))

  c.train = ml_collections.ConfigDict(dict(
      # 13,000 steps of 16 fit the 10-minute budget on 2 cores (~30 steps/s); the rate decays
      # to zero over them (a constant rate showed loss spikes late in a run). Many small steps
      # beat fewer large ones here: conditioning on the prompt is learnt late, per update.
      batch_size=16, num_steps=6 if smoke else 13000,
      learning_rate=1e-3 if smoke else 2e-3,
      warmup_steps=2 if smoke else 100, lr_schedule="cosine", weight_decay=0.0,
      grad_clip_norm=1.0,
      random_flip=False,       # captions name left/right positions: a flip would contradict them
      caption_dropout=0.1, ema_decay=None if smoke else 0.999,
      # Min-SNR-5: the x0 loss weighted min(SNR, 5). The plain x0 loss weighs the nearly clean
      # timesteps so little that predictions stayed blurred even from a nearly clean input,
      # and blurred shapes are unreadable; this weighting sharpens them (measured: colour and
      # shape jointly right 11 % against 5 %, same 1,800 steps).
      min_snr_gamma=0.0 if smoke else 5.0,
      checkpoint_every=3 if smoke else 1000, log_every=2 if smoke else 250,
      sample_every=0 if smoke else 3000, num_devices=0))  # 0: every device

  # Guidance 2 against 3 on this model (measured with the earlier small objects, radii
  # 0.14 / 0.24): colour and shape right on 52 % / 45 % of 100 fresh prompts (colour 94 % /
  # 89 %); 5 over-saturates (measured on the 32/64/64 model: 25 %).
  c.generate = ml_collections.ConfigDict(dict(
      sampler="ddim", num_steps=10 if smoke else 50, guidance_scale=2.0, eta=0.0, seed=0,
      batch_size=16, queries_per_rare_concept=1 if smoke else 2,
      num_common_queries=2))        # rare-concept queries carry the ground truth

  # Attribution by Unlearning (attrib_jax/attribution). The MSCOCO settings of SPEC §2 scaled
  # to a 1,000-item world: α, one step and the cross-attention K/V selection are the paper's;
  # fewer Fisher epochs, draws and timesteps keep a query to about 20 s on 2 cores.
  # AbU+ (EK-FAC) by default: on the 10 rare-concept queries of runs/tiny_r10 it reached
  # Recall@10 0.34 at SPEC's damping (0.1 x mean Λ, 1 epoch of factors), 0.45 at 0.01, 0.49 at
  # 0.001; with 4 / 8 factor epochs 0.60 / 0.61 at 0.001, and 8 epochs 0.66 at 1e-4, 0.68 at
  # 1e-5 (AbU with the diagonal Fisher: 0.11; pixel nearest neighbours: 0.49). The rare
  # concepts' words move the K/V inputs along directions the rest of the data hardly uses;
  # EK-FAC sees them as small eigenvalues and, lightly damped, the step amplifies them.
  #
  # The loss the preconditioner describes: the model was trained on the Min-SNR-5 weighted
  # loss, so the Fisher and the EK-FAC factors weigh each example by its timestep's training
  # weight (min_snr_gamma below; the curvature of the objective the model minimised). Measured
  # on runs/tiny_r10 with the sweep below: AbU+ Recall@10 0.79 -> 0.80 on the 10 demo queries
  # (0.77 -> 0.77 on 20 held-out ones; with the "jvp" sweep below 0.83 -> 0.98 on the demo's),
  # AbU with the diagonal Fisher 0.16 -> 0.69 (held out 0.20 -> 0.26: it does not carry over;
  # 0.35 / 0.27 with "jvp"). The query gradient stays SPEC's plain mean: weighting it too fell
  # to 0.67 (0.54 with plain factors): the prompt's hold on the K/V weights shows at the noisy
  # timesteps the weights discount.
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
      # Flips are off in training (captions name positions), so only the unflipped view.
      # Timesteps 0, 100, ..., 900, one noise draw each; τ weighs each as training weighed its
      # loss (Min-SNR-5 on the x0 target: min(SNR, 5), attribution/sweep.py), so τ is the rise
      # of the loss this model was trained on (AbU+ Recall@10 on the demo's 10 queries of
      # runs/tiny_r10: 0.66 with every timestep weighing the same, 0.79 with these weights).
      #
      # method="jvp": τ is the loss change of the network linearised at θ0 along the step
      # (d = ∂ε/∂θ · Δθ, then mean(d (d + 2r))), not of the network at θ'. With the light damping
      # above, α = 0.01 moves the rare directions far enough that the network's own curvature
      # decides which items' losses rise most: the exact finite step ("cached") ranked the
      # galaxy's exemplars first for every star query. Measured with AbU+ (runs/tiny_r10,
      # demo's 10 queries / 20 held-out): "cached" at α = 0.01 0.80 / 0.77, at α = 0.001
      # 0.85 / 0.87 (its rankings move with α, Spearman 0.76 between the two: not the linear
      # regime), "jvp" 0.98 / 0.965 (independent of α up to the d² term). It costs a jvp
      # per slot instead of a cached-pre forward (~24 s per query against ~18 s).
      sweep=dict(timesteps=((0, 200, 400, 600, 800, 800) if smoke else
                            tuple(range(0, 1000, 100))),
                 min_snr_gamma=c.train.min_snr_gamma or None,
                 num_captions=3,
                 flips=(0,), seed=0, method="jvp", items_per_device=8, noise="per_item")))
  c.attribution_top_k = 10
  return c
