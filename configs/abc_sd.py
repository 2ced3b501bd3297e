r"""AbC on Stable Diffusion 1.x with your own exemplar folders.

  python -m launch.abc --config=configs/abc_sd.py --workdir=W \
      --config.base_model_dir=/path/to/stable-diffusion-v1-4 \
      --config.regularization_dir=/path/to/regularization_images \
      --stages=customize,generate,evaluate

Local files it reads (nothing is downloaded):
  base_model_dir/               an SD 1.x diffusers snapshot: model_index.json, unet/, vae/,
                                text_encoder/, tokenizer/ (vocab.json, merges.txt), scheduler/
                                (its PNDM config loads as it is), *.safetensors weights
  regularization_dir/           Custom Diffusion's real regularisation images with captions
                                (image_folder's layout: captions.jsonl {"file", "caption"} or
                                captions.csv), num_regularization of them drawn (keyed)
  exemplar_dirs[<set>]["dir"]/  each set's exemplar images (.png/.jpg/.jpeg/.webp/.bmp, any size:
                                resized and centre-cropped to `resolution`), with an optional
                                captions.jsonl / .csv giving their plain captions
  evaluation.towers             (evaluate stage) the DINO ViT-B/16 and CLIP ViT-B/32
                                transformers directories (config.json + *.safetensors +
                                preprocessor_config.json), see docs/abc.md

exemplar_dirs maps a set's name to {"dir", "split" (tune | test_seen | test_unseen |
test_style), "kind" (object | style), "category" (the noun, e.g. "cat"; a style's name),
"caption" (plain caption when the folder has no captions file), "token_caption" (default
"photo of a <new1> <category>" / "<category> in the style of <new1>"), "prompts" (generation
prompts with <new1>, cycled to images_per_set)}. The example entries below are placeholders:
replace them with your folders.

Customization: Custom Diffusion's published single-concept recipe (250 steps, 4+4 images a
step, lr 8e-5 scaled as their script does by the batch, 200 regularisation images, prior
weight 1). Sampling: DDIM 50 steps, guidance 6 (their sample script's), 512 px.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg:
    raise ValueError(f"configs/abc_sd.py: no variants, got {arg!r}")
  c = ml_collections.ConfigDict()
  c.name = "abc-sd"
  c.kind = "sd"
  c.seed = 0
  c.base_model_dir = ""          # the SD 1.x snapshot
  c.regularization_dir = ""      # captioned real images (Custom Diffusion's retrieved set)
  c.resolution = 512
  c.sets = []                    # the tiny world's generated sets: none here
  c.exemplar_dirs = {
      "example_object": dict(dir="/path/to/exemplars/cat_toy", split="tune", kind="object",
                             category="toy", caption="a photo of a toy cat",
                             prompts=["photo of a <new1> toy on a beach",
                                      "photo of a <new1> toy in a garden"]),
      "example_style": dict(dir="/path/to/exemplars/painter", split="test_style", kind="style",
                            category="painting", caption="a painting",
                            prompts=["a landscape in the style of <new1>"]),
  }
  c.images_per_set = 10
  c.pad_exemplars = 4
  c.customization = ml_collections.ConfigDict(dict(
      modifier_token="<new1>", initializer="ktn", num_steps=250,
      learning_rate=8e-5 * 8, batch_size=4, num_regularization=200, prior_loss_weight=1.0,
      weight_decay=1e-2, grad_clip_norm=1.0, min_snr_gamma=None, seed=0))
  c.generate = ml_collections.ConfigDict(dict(
      sampler="ddim", num_steps=50, guidance_scale=6.0, eta=0.0, batch_size=4))
  c.check = ml_collections.ConfigDict(dict(validation_renders=0))
  c.towers = ml_collections.ConfigDict()
  c.evaluation = ml_collections.ConfigDict()
  c.compilation_cache = ""
  return c
