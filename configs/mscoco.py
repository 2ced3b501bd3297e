r"""The MSCOCO model of the AbU / FastGDA papers (SPEC §1), from the user's local files.

  python -m launch.train --config=configs/mscoco.py --workdir=$WORKDIR \
      --config.world.manual_dir=/data/coco2017 \
      --config.pretrained_dir=/data/stable-diffusion-2-base --multihost
  python -m launch.generate --config=configs/mscoco.py --workdir=$WORKDIR
  python -m launch.attribute --config=configs/mscoco.py --workdir=$WORKDIR

Local files it reads (nothing is downloaded):
  world.manual_dir    a COCO-2017 copy: train2017/*.jpg, annotations/captions_train2017.json
  pretrained_dir      a Stable Diffusion 2 snapshot in the diffusers layout, of which only
                      text_encoder/ (OpenCLIP ViT-H text tower, 1024-d states), tokenizer/ and
                      vae/ (scaling 0.18215) are used; the UNet is trained from scratch here.
`:local` shrinks everything to run in minutes on fake data of the same layout.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  if variant not in ("default", "local"):
    raise ValueError(f"configs/mscoco.py: unknown variant {variant!r} (default, local)")
  local = variant == "local"
  c = ml_collections.ConfigDict()
  c.name = f"mscoco-{variant}"
  c.seed = 0
  c.world = ml_collections.ConfigDict(dict(kind="coco2017_captions", manual_dir="",
                                           resolution=128))
  c.pretrained_dir = ""
  c.precompute_dtype = "float16"     # 93 GB for COCO in the reference, as here
  c.num_captions = 5
  c.pixel_patch = 1

  c.unet = ml_collections.ConfigDict(dict(
      sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
      block_out_channels=(128, 256, 256, 256),
      down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
      attention_head_dim=8, cross_attention_dim=1024))
  c.scheduler = ml_collections.ConfigDict(dict(
      _class_name="DDPMScheduler", num_train_timesteps=1000, beta_schedule="linear",
      beta_start=1e-4, beta_end=0.02, prediction_type="epsilon", clip_sample=False))

  # 200 epochs of 118,287 images at batch 128 = 184,824 steps.
  c.train = ml_collections.ConfigDict(dict(
      batch_size=8 if local else 128, num_steps=4 if local else 184_824, learning_rate=1e-4,
      warmup_steps=0 if local else 1000, weight_decay=0.0, grad_clip_norm=1.0,
      random_flip=True, caption_dropout=0.1, ema_decay=None,
      checkpoint_every=2 if local else 5000, log_every=1 if local else 100,
      sample_every=0, num_devices=0))
  c.generate = ml_collections.ConfigDict(dict(
      sampler="ddpm", num_steps=10 if local else 1000, guidance_scale=7.5, eta=0.0, seed=0,
      batch_size=4 if local else 64, queries_per_rare_concept=0, num_common_queries=0))

  # SPEC §2: 5 Fisher epochs at batch 32; α 0.01, one step of 50,000 draws (625 x 80);
  # 20 timesteps x 5 captions x 2 flips per item. AbU, the paper's method; AbU+ (EK-FAC, damping
  # 0.1 x mean Λ, SPEC §2) with --config.attribution.preconditioner=ekfac.
  c.attribution = ml_collections.ConfigDict(dict(
      preconditioner="fisher",
      ekfac=dict(num_epochs=1, batch_size=32, seed=0, damping_scale=0.1),
      fisher=dict(selection="cross-attn-kv", num_epochs=1 if local else 5, batch_size=32,
                  seed=0),
      unlearn=dict(alpha=0.01, num_steps=1, num_draws=80 if local else 50_000,
                   draws_per_batch=80, micro_batch=80, seed=0, selection="cross-attn-kv"),
      sweep=dict(timesteps=tuple(range(0, 1000, 50)), num_captions=5, flips=(0, 1), seed=0,
                 method="paired", items_per_device=4)))
  c.attribution_top_k = 10
  return c
