"""Does a customized tiny model draw its concept? (docs/abc.md, "Customization").

  python -m benchmarks.customization_concept --base=$W/model --precomputed=$W/precomputed \
      --out=$W/custom_corner_square

The concept: a visual trait (tiny_world.VISUAL_TRAITS) the demo world never shows, painted on
a few common scenes (the exemplars, captioned "<new1> " + their caption). Customize, then draw
fresh scenes' captions with "<new1>" from the customized model and without it from the base,
same seeds; report the trait detector (validated on renders with and without the trait first)
and the nearest-exemplar pixel distance.
"""
import argparse
import time

import numpy as np

from attrib_jax import customization as cu
from attrib_jax import generation
from attrib_jax.customization import validation
from attrib_jax.data import precompute
from attrib_jax.data import tiny_world as tw
from attrib_jax.models import pipeline


def scenes(rng, pipe, n, trait):
  out = []
  while len(out) < n:
    scene = tw.sample_scene(rng, patterns=("plain",))
    caption = tw.caption_scene(scene)[0]
    if len(pipe.tokenizer.tokenize("<new1> " + caption)) + 2 > pipe.tokenizer.model_max_length:
      continue
    if trait:
      scene["trait"] = trait
    out.append((scene, caption))
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--base", required=True)
  p.add_argument("--precomputed", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--trait", default="corner-square")
  p.add_argument("--num_exemplars", type=int, default=4)
  p.add_argument("--num_prompts", type=int, default=16)
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--lr", type=float, default=1e-3)
  a = p.parse_args()
  pipe = pipeline.load_pipeline(a.base)
  res = pipe.latent_shape[0] * pipe.pixel_patch
  rng = np.random.default_rng(18)
  ex = scenes(rng, pipe, a.num_exemplars, a.trait)
  ex_images = np.stack([tw.render_scene(s, res) for s, _ in ex])
  # The measure, validated first: the detector on renders with and without the trait.
  check = scenes(np.random.default_rng(7), pipe, 50, None)
  plain = np.stack([tw.render_scene(s, res) for s, _ in check])
  marked = np.stack([tw.render_scene(dict(s, trait=a.trait), res) for s, _ in check])
  print(f"detector on real renders: with trait {np.mean(validation.trait_scores(marked, a.trait) > 0.5):.2f} "
        f"seen, without {np.mean(validation.trait_scores(plain, a.trait) > 0.5):.2f} seen")
  s = cu.CustomizationSettings(num_steps=a.steps, learning_rate=a.lr, batch_size=4,
                               num_regularization=200, initializer="ktn", min_snr_gamma=5.0)
  prep = cu.prepare_pipeline(pipe, s)
  items = cu.exemplar_items(prep, ex_images, ["<new1> " + c for _, c in ex],
                            modifier_token=s.modifier_token)
  arrays = precompute.load(a.precomputed)
  rows = cu.draw_regularization(len(arrays["index"]), s.num_regularization, s.seed)
  reg = cu.Items(np.asarray(arrays["latents"][rows, 0], np.float32),
                 text_states=np.asarray(arrays["text_states"][rows, 0], np.float32))
  t0 = time.time()
  delta = cu.customize(pipe, items, reg, s, progress=lambda i, l, sec: print(
      f"customize: step {i}/{s.num_steps} loss {l:.4f} {sec:.0f}s") if i % 100 == 0 else None)
  print(f"customized in {time.time() - t0:.0f}s")
  cu.save_delta(a.out, delta)
  custom = cu.load_customized(a.base, a.out)
  prompts = [c for _, c in scenes(np.random.default_rng(99), pipe, a.num_prompts, None)]
  seeds = list(range(a.num_prompts))
  kw = dict(num_steps=50, guidance_scale=2.0)
  img_c = np.stack([q.image for q in generation.generate(custom, ["<new1> " + c for c in prompts], seeds, **kw)])
  img_b = np.stack([q.image for q in generation.generate(pipe, prompts, seeds, **kw)])
  img_cb = np.stack([q.image for q in generation.generate(custom, prompts, seeds, **kw)])
  for name, imgs in (("customized, with <new1>", img_c), ("base, without", img_b),
                     ("customized, without <new1>", img_cb)):
    sc = validation.trait_scores(imgs, a.trait)
    d = validation.nearest_exemplar_distance(imgs, ex_images)
    print(f"| {name} | {np.mean(sc > 0.5):.2f} | {sc.mean():.2f} ± {sc.std(ddof=1) / np.sqrt(len(sc)):.2f} "
          f"| {d.mean():.1f} ± {d.std(ddof=1) / np.sqrt(len(d)):.1f} |")


if __name__ == "__main__":
  main()
