"""Train the in-world towers on a tiny-world workdir and measure whether they are useful.

  PYTHONPATH=. nice -n 5 python -u -m benchmarks.world_towers --workdir=$W --out=$OUT

$W is a `configs/tiny.py:<variant>` workdir (tfds/, model/tokenizer, precomputed/, queries/),
read only. Writes $OUT/towers/{clip,clip_text,dino} (attrib_jax.abc.world_towers) and
$OUT/validation.json, and prints:
- the training time of each tower (world_tower.json),
- CLIP image -> caption retrieval top-1 / top-5 among the training items' captions (per
  phrasing; a hit is the item's own caption text, so identical captions of an exemplar set
  count) and among fresh renders' captions (held out; tiny_world.sample_scene),
- nearest-neighbour agreement: how often an image's nearest other image (cosine of the DINO
  CLS, of CLIP's image_embeds, or raw-pixel L2) shows the same shape / colour / both, on the
  training items and on fresh renders (scene metadata from tiny_world),
- the `dino` / `clip` / `pixel` baselines through `baselines.make_method` on the workdir's
  rare-concept queries: Recall@10 of the concept's training items.
"""
import argparse
import json
import os
import time

import numpy as np

from attrib_jax import baselines
from attrib_jax import generation
from attrib_jax import io_utils
from attrib_jax.abc import world_towers as wt
from attrib_jax.baselines import towers
from attrib_jax.data import precompute
from attrib_jax.data import tiny_world as tw
from attrib_jax.models import tokenizer as tokenizer_lib
from attrib_jax.training import recipe
from configs import tiny


def retrieval(image_embeds, text_embeds, texts, own_texts, ks=(1, 5)):
  """Fraction of images whose own caption text is among the k most similar captions."""
  sims = wt_normalize(image_embeds) @ wt_normalize(text_embeds).T
  order = np.argsort(-sims, axis=1)
  texts, own = np.asarray(texts, object), np.asarray(own_texts, object)
  hits = texts[order] == own[:, None]
  return {f"top{k}": float(hits[:, :k].any(1).mean()) for k in ks}


def wt_normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def neighbour_agreement(features, scenes, metric="cosine"):
  """How often each item's nearest other item shares shape / colour / both."""
  f = np.asarray(features, np.float64).reshape(len(features), -1)
  if metric == "cosine":
    d = -wt_normalize(f) @ wt_normalize(f).T
  else:
    sq = (f * f).sum(1)
    d = sq[:, None] + sq[None] - 2 * f @ f.T
  np.fill_diagonal(d, np.inf)
  nn = d.argmin(1)
  shape = np.array([s["objects"][0]["shape"] for s in scenes], object)
  colour = np.array([s["objects"][0]["colour"] for s in scenes], object)
  same_shape, same_colour = shape[nn] == shape, colour[nn] == colour
  return {"shape": float(same_shape.mean()), "colour": float(same_colour.mean()),
          "both": float((same_shape & same_colour).mean())}


def fresh_scenes(seed, n, patterns, tokenizer, max_length):
  rng = np.random.default_rng(seed)
  out = []
  while len(out) < n:
    scene = tw.sample_scene(rng, patterns=patterns)
    if all(len(tokenizer.tokenize(c)) + 2 <= max_length for c in tw.caption_scene(scene)):
      out.append(scene)
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--variant", default="demo", help="configs/tiny.py variant of the workdir")
  p.add_argument("--out", required=True)
  p.add_argument("--settings", default="{}", help="JSON of WorldTowerSettings overrides")
  p.add_argument("--heldout", type=int, default=500)
  a = p.parse_args()
  config = tiny.get_config(a.variant)
  settings = wt.WorldTowerSettings.from_config(json.loads(a.settings))

  # The world as every launcher reads it (TFDS source by stable index), and its scenes.
  source = recipe.open_dataset(config, os.path.join(a.workdir, "tfds"))
  index = np.arange(source.num_items)
  images, captions, got = source.get_items(index)
  assert (got == index).all()
  w = config.world
  world = tw.generate_world(**recipe.tiny_world_settings(w))
  if not np.array_equal(world.images, images):
    raise ValueError("the regenerated world differs from the workdir's dataset")
  tokenizer = tokenizer_lib.load_tokenizer(os.path.join(a.workdir, "model", "tokenizer"))

  began = time.perf_counter()
  last = [0.0]

  def progress(p):
    if p.done == p.total or time.perf_counter() - last[0] > 15:
      last[0] = time.perf_counter()
      print(f"  {p}", flush=True)

  dirs = wt.build_world_towers(os.path.join(a.out, "towers"), images, captions, tokenizer,
                               settings, progress)
  wall = time.perf_counter() - began
  result = {"settings": json.loads(a.settings), "build_wall_s": round(wall, 1),
            "train_s": {k: wt.read_record(dirs[k])["seconds"] for k in ("clip", "dino")},
            "loss": {k: [wt.read_record(dirs[k])["loss_first"], wt.read_record(dirs[k])[
                "loss_last"]] for k in ("clip", "dino")},
            "logit_scale": wt.read_record(dirs["clip"])["logit_scale"]}
  print(f"built in {wall:.1f}s (0 if reused): {result['train_s']}, losses {result['loss']}")

  clip, dino = towers.load_tower("clip", dirs["clip"]), towers.load_tower("dino", dirs["dino"])
  text = wt.text_embedder(dirs["clip_text"], tokenizer)
  heldout = fresh_scenes(2026, a.heldout, tuple(w.patterns), tokenizer,
                         settings.text_max_length)
  held_images = np.stack([tw.render_scene(s, w.resolution) for s in heldout])
  held_captions = [tw.caption_scene(s) for s in heldout]
  sets = {"train": (images, captions, world.attributes),
          "heldout": (held_images, held_captions, heldout)}
  for name, (imgs, caps, scenes) in sets.items():
    image_embeds = clip(imgs)
    for k in range(3):
      texts = [c[k] for c in caps]
      r = retrieval(image_embeds, text(texts), texts, texts)
      result[f"clip_retrieval_{name}_caption{k}"] = r
    chance = {"top1": 1 / len(imgs), "top5": 5 / len(imgs)}
    result[f"clip_retrieval_{name}_chance"] = chance
    result[f"nn_{name}"] = {
        "dino": neighbour_agreement(dino(imgs), scenes),
        "clip": neighbour_agreement(image_embeds, scenes),
        "pixel": neighbour_agreement(imgs, scenes, metric="l2"),
    }
    print(f"{name}: CLIP retrieval per phrasing "
          f"{[result[f'clip_retrieval_{name}_caption{k}'] for k in range(3)]} (chance {chance})")
    print(f"{name}: nearest neighbour shares shape/colour/both: {result[f'nn_{name}']}")

  # The baselines' code path: make_method with the directories, on the workdir's queries.
  arrays = precompute.load(os.path.join(a.workdir, "precomputed"))
  context = baselines.Context(arrays=arrays, images=images[np.asarray(arrays["index"])])
  methods = {"dino": baselines.make_method("dino", weights=dirs["dino"], flips=(0,)),
             "clip": baselines.make_method("clip", weights=dirs["clip"], flips=(0,)),
             "pixel": baselines.make_method("pixel", flips=(0,))}
  recall = {m: {} for m in methods}
  for qdir in generation.list_queries(os.path.join(a.workdir, "queries")):
    query = generation.load_query(qdir)
    if "influential_indices" not in query.info:   # a common query: no ground truth
      continue
    truth = set(query.info["influential_indices"])
    row_is_truth = np.array([int(i) in truth for i in arrays["index"]])
    for m, method in methods.items():
      top = np.argsort(-method.score(query, context))[:10]
      recall[m][os.path.basename(qdir)] = float(row_is_truth[top].sum() / row_is_truth.sum())
  result["baseline_recall_at_10"] = {m: {"mean": float(np.mean(list(v.values()))), **v}
                                     for m, v in recall.items() if v}
  print(f"baselines on the rare-concept queries, Recall@10: "
        f"{ {m: v['mean'] for m, v in result['baseline_recall_at_10'].items()} }")
  io_utils.atomic_write_json(os.path.join(a.out, "validation.json"), result)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
