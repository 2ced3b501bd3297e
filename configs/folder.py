r"""Your own captioned images: a folder plus captions.jsonl or captions.csv.

  python -m launch.train     --config=configs/folder.py --workdir=runs/mine \
      --config.world.manual_dir=/path/to/my_images
  python -m launch.generate  --config=configs/folder.py --workdir=runs/mine \
      --config.world.manual_dir=/path/to/my_images
  python -m launch.attribute --config=configs/folder.py --workdir=runs/mine \
      --config.world.manual_dir=/path/to/my_images
  # launch.evaluate takes the same flags; `:smoke` shrinks the run to seconds (tests).

The folder's layout is attrib_jax/data/image_folder.py's: captions.jsonl lines
{"file": "cat.jpg", "caption": "a cat"} (or "captions": [...]), or a captions.csv with columns
file,caption. Images of any size are resized (shorter side) and centre-cropped to
world.resolution. The model is the tiny world's: pixel space through the lossless pixel codec,
a small UNet, a frozen random CLIP text tower whose BPE is learned from the captions; or your
own CLIP text tower with --config.pretrained_text_dir=DIR (DIR/text_encoder/ and
DIR/tokenizer/, e.g. a Stable Diffusion snapshot; set unet.cross_attention_dim to its width).
Queries: generate.prompts, else the first captions of num_caption_queries training items.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  if variant not in ("default", "smoke"):
    raise ValueError(f"configs/folder.py: unknown variant {variant!r} (default, smoke)")
  smoke = variant == "smoke"
  c = ml_collections.ConfigDict()
  c.name = f"folder-{variant}"
  c.seed = 0
  c.world = ml_collections.ConfigDict(dict(
      kind="image_folder", manual_dir="", captions_file="",   # "": captions.jsonl or .csv
      resolution=16 if smoke else 32))
  c.pretrained_text_dir = ""           # "": a frozen random text tower (as the tiny world)
  c.precompute_dtype = "float32"
  c.pixel_patch = 2 if smoke else 4    # the UNet runs at (resolution / patch)^2
  c.num_captions = 1 if smoke else 3   # captions kept per item (fewer are padded)
  c.tokenizer_max_length = 32          # user captions run longer than the tiny world's
  c.text_encoder = ml_collections.ConfigDict(dict(
      seed=1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, hidden_act="quick_gelu"))

  channels = 3 * c.pixel_patch ** 2
  c.unet = ml_collections.ConfigDict(dict(
      sample_size=c.world.resolution // c.pixel_patch, in_channels=channels,
      out_channels=channels, layers_per_block=1,
      block_out_channels=(16, 32) if smoke else (32, 64, 64),
      down_block_types=(("DownBlock2D", "CrossAttnDownBlock2D") if smoke else
                        ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")),
      up_block_types=(("CrossAttnUpBlock2D", "UpBlock2D") if smoke else
                      ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
      attention_head_dim=4, cross_attention_dim=64, norm_num_groups=8,
      addition_embed_type="text", addition_embed_type_num_heads=4))
  # The tiny world's schedule and target: x0 with a cosine schedule gives clean small images.
  c.scheduler = ml_collections.ConfigDict(dict(
      _class_name="DDPMScheduler", num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
      prediction_type="sample", clip_sample=True))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=8 if smoke else 16, num_steps=4 if smoke else 5000,
      learning_rate=1e-3 if smoke else 2e-3, warmup_steps=1 if smoke else 100,
      lr_schedule="cosine", weight_decay=0.0, grad_clip_norm=1.0,
      random_flip=False,      # captions may name left and right
      caption_dropout=0.1, ema_decay=None if smoke else 0.999,
      min_snr_gamma=0.0 if smoke else 5.0,
      checkpoint_every=4 if smoke else 1000, log_every=2 if smoke else 250,
      sample_every=0 if smoke else 1000, num_devices=0))
  c.generate = ml_collections.ConfigDict(dict(
      sampler="ddim", num_steps=5 if smoke else 50, guidance_scale=2.0, eta=0.0, seed=0,
      batch_size=16, prompts=(), num_caption_queries=2 if smoke else 8))

  # AbU+ as in the tiny world (attrib_jax/attribution); smaller everything in the smoke variant.
  gamma = c.train.min_snr_gamma or None
  c.attribution = ml_collections.ConfigDict(dict(
      preconditioner="ekfac",
      ekfac=dict(num_epochs=1 if smoke else 8, batch_size=8 if smoke else 32, seed=0,
                 damping_scale=1e-4, min_snr_gamma=gamma),
      fisher=dict(selection="cross-attn-kv", num_epochs=1 if smoke else 2,
                  batch_size=8 if smoke else 32, seed=0, min_snr_gamma=gamma),
      unlearn=dict(alpha=0.01, num_steps=1, num_draws=16 if smoke else 2000,
                   draws_per_batch=16 if smoke else 80, micro_batch=16 if smoke else 80,
                   seed=0, selection="cross-attn-kv", min_snr_gamma=None),
      sweep=dict(timesteps=(0, 400, 800) if smoke else tuple(range(0, 1000, 100)),
                 min_snr_gamma=gamma, num_captions=c.num_captions, flips=(0,), seed=0,
                 method="jvp", items_per_device=8, noise="per_item")))
  c.attribution_top_k = 10
  return c
