r"""Local attribution on two-object scenes: does attributing one object's region rank the
training items that show that object above those that show the other?

Queries are real two-object scenes of the tiny world (`tiny_world.sample_scene(two_objects=
True)`, rendered and captioned by the world itself, never seen in training), made into queries
by the pixel codec (`generation.query_from_image`). Objects A and B of a scene differ in colour
and in shape. Each scene is attributed by the config's method (AbU+ on the tiny default) for
region A (A's bounding box) and region B (and the whole image with --whole). For a region,
the score is the AUC of the items showing its own object against the items showing the other
one (P(τ of a random own item > τ of a random other item); 0.5 is chance, 1 a perfect split):
an item shows an object when one of its objects has the object's colour and shape ("colour and
shape" columns) or its colour ("colour" columns; a weaker, larger set). The whole image's AUC
(--whole) is of A's items over B's, for reference; --swapped attributes the whole image again
with the prompt naming B first, which shows how much the word order alone decides. The region
effect, AUC(region A) + AUC(region B) - 1, is how far the region moves the ranking towards its
own object: AUC(A over B) under region A minus the same under region B; 0 when the region does
not matter (whatever the text does).
"A−B contrast" is a diagnostic, not a method (it uses both regions): the AUC of A's items
over B's by the difference of the two regions' z-scored τ, which cancels what the rankings
share (the prompt's words) and keeps what the region adds.
Text-only baselines: `caption` and `caption-words` rank items by the prompt alone, so they
give one AUC of A's items over B's whatever the region ("text (A over B)"): how far the words
by themselves favour one object.
Beside each: the same AUC for pixel-space nearest neighbours inside the region (negative
squared distance of the query's crop to each item's same crop), a baseline that sees only
pixels.

  .venv/bin/python -m benchmarks.local_attribution --config=configs/tiny.py:demo \
      --workdir=runs/tiny-demo --out=runs/tiny-demo/local_attribution --num_scenes=10

Reuses the workdir's preconditioner cache (workdir/attribution/, as launch.attribute); results
per scene and region go to --out (rerunning reuses them). Prints a markdown table and writes it
with the numbers to --out/local_attribution.md|json.
"""
import os
import time

from absl import app
from absl import flags
import numpy as np
from ml_collections import config_flags

from attrib_jax import baselines
from attrib_jax import generation
from attrib_jax import io_utils
from attrib_jax.attribution import region as region_lib
from attrib_jax.attribution import runner
from attrib_jax.data import precompute
from attrib_jax.data import tiny_world
from attrib_jax.training import recipe
from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "A trained tiny-world run's workdir.")
_OUT = flags.DEFINE_string("out", None, "Where results and the table go.")
_NUM_SCENES = flags.DEFINE_integer("num_scenes", 12, "Two-object scenes to attribute.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the scenes.")
_WHOLE = flags.DEFINE_bool("whole", False, "Also attribute each whole scene (the reference "
                            "column; half again the time).")
_SWAPPED = flags.DEFINE_bool("swapped", False, "Also attribute each whole scene captioned with "
                              "its objects named in the other order (B first): does word order, "
                              "rather than the image, decide which object's items rank first?")
_PROMPT = flags.DEFINE_enum("prompt", "caption", ["caption", "empty"], "The queries' prompt: "
                            "the scene's caption, or the empty prompt (the image alone decides)")
_MIN_ITEMS = flags.DEFINE_integer("min_items", 3, "Each object's colour and shape must be shown "
                                  "by at least this many training items.")
flags.mark_flags_as_required(["config", "workdir", "out"])


def auc(scores: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> float:
  """P(score of a random positive > score of a random negative), ties counted half."""
  pos, neg = scores[positive][:, None], scores[negative][None, :]
  return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def object_box(obj: dict, resolution: int) -> region_lib.Region:
  """The pixel bounding box of a rendered object (its centre ± radius, outward-rounded)."""
  lo = lambda c: int(np.clip(np.floor((c - obj["radius"]) * resolution), 0, resolution - 1))
  hi = lambda c: int(np.clip(np.ceil((c + obj["radius"]) * resolution), 1, resolution))
  return region_lib.Region(lo(obj["cx"]), lo(obj["cy"]), hi(obj["cx"]), hi(obj["cy"]))


def shows(scenes, colour: str, shape: str | None) -> np.ndarray:
  """[N] bool: items with an object of this colour (and shape, unless None)."""
  return np.array([any(o["colour"] == colour and (shape is None or o["shape"] == shape)
                       for o in s["objects"]) for s in scenes])


def short_prompts(scene: dict) -> list[str]:
  """The scene's caption, then shorter ones: the tiny model's tokenizer takes 16 tokens and a
  two-object caption runs to about 22."""
  a, b = scene["objects"]
  where = lambda o: {"left": "on the left", "right": "on the right", "top": "at the top",
                     "bottom": "at the bottom"}[o["position"]]
  art = lambda word: "an" if word[0] in "aeiou" else "a"
  pair = [f"{art(o['colour'])} {o['colour']} {o['shape']}" for o in (a, b)]
  return [tiny_world.caption_scene(scene)[0],
          f"{pair[0]} {where(a)} and {pair[1]} {where(b)} on {art(scene['background'])} "
          f"{scene['background']} background",
          f"{pair[0]} {where(a)} and {pair[1]} {where(b)}",
          f"{pair[0]} and {pair[1]}"]


def fitting_prompt(tokenizer, scene: dict) -> str:
  """The most detailed of `short_prompts` that the tokenizer takes."""
  for prompt in short_prompts(scene):
    try:
      tokenizer.check_fits(prompt)
      return prompt
    except ValueError:
      continue
  raise ValueError(f"no prompt of {short_prompts(scene)} fits the tokenizer")


def draw_scenes(seed: int, count: int, scenes, min_items: int, patterns) -> list[dict]:
  """Two-object scenes whose objects differ in colour and shape, each object's colour and
  shape shown by >= min_items training items (so the AUCs have items to compare)."""
  rng = np.random.default_rng([seed, 17])
  out = []
  while len(out) < count:
    scene = tiny_world.sample_scene(rng, two_objects=True, patterns=patterns)
    a, b = scene["objects"]
    if a["colour"] == b["colour"] or a["shape"] == b["shape"]:
      continue
    if min(shows(scenes, o["colour"], o["shape"]).sum() for o in (a, b)) < min_items:
      continue
    out.append(scene)
  return out


def main(argv):
  del argv
  common.start()
  config, workdir, out = _CONFIG.value, _WORKDIR.value, _OUT.value
  w = config.world
  if _SWAPPED.value and _PROMPT.value == "empty":
    raise ValueError("--swapped reorders the caption's objects: it needs --prompt=caption")
  if w.kind != "tiny_world":
    raise ValueError("this benchmark needs a tiny_world config (its scenes' metadata)")
  pipe = common.load_trained_pipeline(workdir)
  arrays = precompute.load(os.path.join(workdir, "precomputed"))
  index = np.asarray(arrays["index"]).astype(np.int64)
  world = tiny_world.generate_world(**recipe.tiny_world_settings(w))
  # The regenerated world must be the one the model was trained on, item for item.
  source = recipe.open_dataset(config, os.path.join(workdir, "tfds"))
  images, captions, _ = source.get_items(index)
  if [list(c) for c in captions] != [world.captions[i] for i in index]:
    raise ValueError("the regenerated tiny world's captions differ from the dataset's")
  item_scenes = [world.attributes[i] for i in index]
  context = baselines.Context(arrays=arrays, captions=captions)
  text_methods = {name: baselines.make_method(name) for name in ("caption", "caption-words")}
  settings = runner.AbUSettings.from_config(config.attribution)
  abu = runner.AbU(pipe.apply_unet, pipe.unet_params, arrays, pipe.schedule, settings,
                   os.path.join(out, runner.out_dir_name(settings)),
                   cache_dir=os.path.join(workdir, "attribution"), log=common.log)

  rows = []
  t_start = time.time()
  for s, scene in enumerate(draw_scenes(_SEED.value, _NUM_SCENES.value, item_scenes,
                                        _MIN_ITEMS.value, tuple(w.patterns))):
    image = tiny_world.render_scene(scene, w.resolution)
    prompt = fitting_prompt(pipe.tokenizer, scene) if _PROMPT.value == "caption" else ""
    query = generation.query_from_image(pipe, image, prompt)
    a, b = scene["objects"]
    boxes = {"A": object_box(a, w.resolution), "B": object_box(b, w.resolution)}
    cells = {k: r.latent_mask(image.shape[:2], query.latent.shape[:2]) for k, r in boxes.items()}
    if (cells["A"] * cells["B"]).any():
      raise ValueError(f"scene {s}: the two boxes share latent cells {boxes}")
    name = f"scene_{s:02d}"
    tau = {"A": abu.score(query, name, boxes["A"])["scores"],
           "B": abu.score(query, name, boxes["B"])["scores"]}
    tau["whole"] = abu.score(query, name)["scores"] if _WHOLE.value else None
    tau["swapped"] = None
    if _SWAPPED.value:
      swapped = generation.query_from_image(
          pipe, image, fitting_prompt(pipe.tokenizer, dict(scene, objects=[b, a])))
      tau["swapped"] = abu.score(swapped, f"{name}_swapped")["scores"]
    text = {name: m.score(query, context) for name, m in text_methods.items()}
    row = {"scene": s, "prompt": prompt, "A": f"{a['colour']} {a['shape']}",
           "B": f"{b['colour']} {b['shape']}", "box_A": boxes["A"].as_list(),
           "box_B": boxes["B"].as_list()}
    for kind, shape_of in (("colour+shape", lambda o: o["shape"]), ("colour", lambda o: None)):
      in_a = shows(item_scenes, a["colour"], shape_of(a))
      in_b = shows(item_scenes, b["colour"], shape_of(b))
      own_a, own_b = in_a & ~in_b, in_b & ~in_a   # items showing both compare nothing
      row[f"n_{kind}"] = [int(own_a.sum()), int(own_b.sum())]
      row[f"auc_A_{kind}"] = auc(tau["A"], own_a, own_b)
      row[f"auc_B_{kind}"] = auc(tau["B"], own_b, own_a)
      # How far the region moves the ranking towards its own object: AUC(A over B) under
      # region A minus the same under region B (0 when the region does not matter).
      row[f"effect_{kind}"] = row[f"auc_A_{kind}"] + row[f"auc_B_{kind}"] - 1
      # Diagnostic, not a method (it needs both regions): the z-scored difference τ_A − τ_B
      # removes what the two rankings share (the prompt), leaving what the region adds.
      z = lambda v: (v - v.mean()) / v.std()
      row[f"contrast_{kind}"] = auc(z(tau["A"]) - z(tau["B"]), own_a, own_b)
      row[f"auc_whole_{kind}"] = (auc(tau["whole"], own_a, own_b) if _WHOLE.value
                                  else float("nan"))
      row[f"auc_swapped_{kind}"] = (auc(tau["swapped"], own_a, own_b) if _SWAPPED.value
                                    else float("nan"))
      for name, scores in text.items():
        row[f"{name}_auc_{kind}"] = auc(scores, own_a, own_b)
      for k, r in boxes.items():
        crop = lambda x: x[..., r.y0:r.y1, r.x0:r.x1, :].astype(np.float32)
        pixel = -np.square(crop(images) - crop(image)[None]).sum(axis=(1, 2, 3))
        pos, neg = (own_a, own_b) if k == "A" else (own_b, own_a)
        row[f"pixel_auc_{k}_{kind}"] = auc(pixel, pos, neg)
    rows.append(row)
    common.log(f"{name}: {prompt!r}: AUC A {row['auc_A_colour+shape']:.2f}, "
               f"B {row['auc_B_colour+shape']:.2f} ({time.time() - t_start:.0f}s)")

  method = settings.method.upper()
  lines = [f"Local attribution ({method}, {len(rows)} two-object scenes, {len(index)} training "
           f"items; AUC of items showing the region's object over items showing the other; "
           "0.5 = chance)", "",
           "| scene | object A | object B | items A / B | region A | region B | whole (A over B) "
           "| whole, B named first (A over B) | region effect | A−B contrast | region A, colour "
           "| region B, colour | pixel NN A / B | text (A over B): caption / caption-words |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  whole = lambda v: "–" if np.isnan(v) else f"{v:.2f}"   # not run without --whole
  for r in rows:
    n = r["n_colour+shape"]
    lines.append(f"| {r['scene']} | {r['A']} | {r['B']} | {n[0]} / {n[1]} "
                 f"| {r['auc_A_colour+shape']:.2f} | {r['auc_B_colour+shape']:.2f} "
                 f"| {whole(r['auc_whole_colour+shape'])} "
                 f"| {whole(r['auc_swapped_colour+shape'])} | {r['effect_colour+shape']:+.2f} "
                 f"| {r['contrast_colour+shape']:.2f} "
                 f"| {r['auc_A_colour']:.2f} "
                 f"| {r['auc_B_colour']:.2f} | {r['pixel_auc_A_colour+shape']:.2f} / "
                 f"{r['pixel_auc_B_colour+shape']:.2f} "
                 f"| {r['caption_auc_colour+shape']:.2f} / "
                 f"{r['caption-words_auc_colour+shape']:.2f} |")

  def mean_se(key):
    v = np.array([r[key] for r in rows] if not isinstance(key, tuple) else
                 [r[k] for r in rows for k in key])
    return f"{v.mean():.2f} ± {v.std(ddof=1) / np.sqrt(v.size):.2f}"
  both = sum(r["auc_A_colour+shape"] > 0.5 and r["auc_B_colour+shape"] > 0.5 for r in rows)
  lines += [f"| **mean ± s.e.** | | | | {mean_se('auc_A_colour+shape')} "
            f"| {mean_se('auc_B_colour+shape')} "
            f"| {mean_se('auc_whole_colour+shape') if _WHOLE.value else '–'} "
            f"| {mean_se('auc_swapped_colour+shape') if _SWAPPED.value else '–'} "
            f"| {mean_se('effect_colour+shape')} | {mean_se('contrast_colour+shape')} "
            f"| {mean_se('auc_A_colour')} | {mean_se('auc_B_colour')} "
            f"| {mean_se(('pixel_auc_A_colour+shape', 'pixel_auc_B_colour+shape'))} "
            f"| {mean_se('caption_auc_colour+shape')} / "
            f"{mean_se('caption-words_auc_colour+shape')} |", "",
            f"Scenes where both regions rank their own object's items first (AUC > 0.5 for A "
            f"and for B): {both} of {len(rows)}. Mean AUC over both regions: "
            f"{mean_se(('auc_A_colour+shape', 'auc_B_colour+shape'))} ({method}), "
            f"{mean_se(('pixel_auc_A_colour+shape', 'pixel_auc_B_colour+shape'))} "
            f"(pixel NN in the region). {time.time() - t_start:.0f} s."]
  table = "\n".join(lines)
  print(table, flush=True)
  io_utils.atomic_write_text(os.path.join(out, "local_attribution.md"), table + "\n")
  io_utils.atomic_write_json(os.path.join(out, "local_attribution.json"), {"rows": rows})


if __name__ == "__main__":
  app.run(main)
