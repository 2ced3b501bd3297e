r"""Generates queries from a trained model: images plus everything attribution needs.

  python -m launch.generate --config=configs/tiny.py --workdir=runs/tiny

Reads workdir/model (from launch.train), writes workdir/queries/<name>/ (see
attrib_jax/generation.py for the format) and workdir/queries/overview.png. For the tiny world,
the queries are prompts of each planted rare concept (with their ground-truth training items)
and prompts of fresh scenes; for an image folder, the config's prompts or some training items'
captions. Existing complete queries are kept.
"""
import json
import os

from absl import app
from absl import flags
import numpy as np
from ml_collections import config_flags

from attrib_jax import generation
from attrib_jax import parallel
from attrib_jax import visualize
from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_PROMPTS = flags.DEFINE_multi_string("prompt", [], "Prompts to generate instead of the "
                                     "config's query set.")
flags.mark_flags_as_required(["config", "workdir"])


def query_plan(config, workdir: str) -> list[tuple[str, str, int, dict]]:
  """(name, prompt, seed, ground truth) of every query of the config."""
  g = config.generate
  if _PROMPTS.value:
    return [(f"prompt{i:03d}", p, g.seed + i, {}) for i, p in enumerate(_PROMPTS.value)]
  plan = []
  if config.world.kind == "tiny_world":
    from attrib_jax.data import tiny_world  # pylint: disable=g-import-not-at-top
    with open(os.path.join(workdir, "dataset_metadata.json")) as f:
      rare = json.load(f)["rare_concepts"]
    for name, concept in rare.items():
      for k in range(g.queries_per_rare_concept):
        prompt = concept["prompts"][k % len(concept["prompts"])]
        truth = {"concept": name, "influential_indices": concept["indices"]}
        if concept.get("kind") == "visual":
          # The caption is shared with common twins: the exemplars are the ground truth only
          # if the generated image shows their trait (checked after generation, in main).
          truth.update(trait=concept["trait"], exemplar_indices=concept["indices"])
        plan.append((f"rare_{name}_{k}", prompt, g.seed + len(plan), truth))
    rng = np.random.default_rng([g.seed, 7])
    for k in range(g.num_common_queries):
      scene = tiny_world.sample_scene(rng)
      plan.append((f"common_{k:03d}", tiny_world.caption_scene(scene)[0], g.seed + len(plan),
                   {"scene": scene}))
  elif config.world.kind == "image_folder":
    # The user's own images: the config's prompts, else the first captions of training items
    # spread evenly over the folder (each query records which item its prompt came from).
    for k, prompt in enumerate(g.get("prompts", ())):
      plan.append((f"prompt{k:03d}", prompt, g.seed + k, {}))
    if not plan and g.get("num_caption_queries", 0):
      from attrib_jax.training import recipe  # pylint: disable=g-import-not-at-top
      source = recipe.open_dataset(config, os.path.join(workdir, "tfds"))
      picks = np.unique(np.linspace(0, source.num_items - 1,
                                    min(g.num_caption_queries, source.num_items)).round()
                        ).astype(np.int64)
      _, captions, indices = source.get_items(picks)
      for k, (item_captions, index) in enumerate(zip(captions, indices)):
        plan.append((f"caption_{int(index):05d}", item_captions[0], g.seed + k,
                     {"caption_of": int(index)}))
  return plan


def _with_trait_check(truth: dict, image: np.ndarray) -> dict:
  """A visual-style query's ground truth: the exemplars only if the image shows the trait."""
  from attrib_jax.data import tiny_world_detector  # pylint: disable=g-import-not-at-top
  score = tiny_world_detector.trait_score(image, truth["trait"])
  seen = score > tiny_world_detector.TRAIT_THRESHOLD
  return dict(truth, trait_score=round(score, 4), trait_detected=bool(seen),
              influential_indices=truth["exemplar_indices"] if seen else [])


def validate_trait_detector(config, workdir: str) -> dict | None:
  """For a visual-style tiny world: the trait detector on the real dataset images first.

  Exemplars against every other item with their captions; written to
  workdir/queries/trait_detector.json. None for other worlds.
  """
  if config.world.kind != "tiny_world" or config.world.get("rare_style") != "visual":
    return None
  from attrib_jax import parallel  # pylint: disable=g-import-not-at-top,reimported
  from attrib_jax.data import tiny_world_detector  # pylint: disable=g-import-not-at-top
  from attrib_jax.training import recipe  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, "dataset_metadata.json")) as f:
    rare = json.load(f)["rare_concepts"]
  source = recipe.open_dataset(config, os.path.join(workdir, "tfds"))
  wanted = sorted({int(i) for c in rare.values() for i in c["caption_sharing_indices"]})
  images, _, indices = source.get_items(np.asarray(wanted, np.int64))
  by_index = dict(zip((int(i) for i in indices), images))
  result = tiny_world_detector.validate_trait_detector(by_index, rare)
  per = ", ".join(f"{n} {r['exemplars_seen']}/{r['exemplars']} exemplars, "
                  f"{r['others_seen']}/{r['others']} twins" for n, r in result["per_trait"].items())
  common.log(f"generate: trait detector on {result['items']} real dataset images (exemplars "
             f"and the items sharing their captions): {100 * result['accuracy']:.1f} % correct "
             f"({per})")
  if result["accuracy"] < 0.95:
    raise ValueError(f"the trait detector is {100 * result['accuracy']:.1f} % correct on real "
                     "images (< 95 %): its reading of the queries would not be trusted")
  if parallel.is_main_process():
    os.makedirs(os.path.join(workdir, "queries"), exist_ok=True)
    with open(os.path.join(workdir, "queries", "trait_detector.json"), "w") as f:
      json.dump(result, f, indent=1)
  return result


def main(argv):
  del argv
  common.start()
  config, workdir = _CONFIG.value, _WORKDIR.value
  validate_trait_detector(config, workdir)
  pipe = common.load_trained_pipeline(workdir, config)
  for prompt in list(_PROMPTS.value) + list(config.generate.get("prompts", ())):
    pipe.tokenizer.check_fits(prompt)   # the user's own prompts are never cut (captions are)
  root = os.path.join(workdir, "queries")
  g = config.generate
  # A query is kept only if it was generated as asked now: same prompt, seed and sampler.
  asked = lambda prompt, seed: {"prompt": prompt, "seed": int(seed), "sampler": g.sampler,
                                "num_steps": g.num_steps, "guidance_scale": g.guidance_scale,
                                "eta": g.eta}
  plan = [q for q in query_plan(config, workdir)
          if not generation.is_generated_as(os.path.join(root, q[0]), asked(q[1], q[2]))]
  if not plan and not generation.list_queries(root):
    raise ValueError("generate: no queries to make: pass --prompt=... or set "
                     "config.generate.prompts / num_caption_queries")
  common.log(f"generate: {len(plan)} queries to make with {g.sampler}, {g.num_steps} steps")
  # Several processes: process 0 generates (on its own devices) and writes; the others wait.
  if plan and parallel.is_main_process():
    queries = generation.generate(pipe, [p for _, p, _, _ in plan], [s for _, _, s, _ in plan],
                                  sampler=g.sampler, num_steps=g.num_steps,
                                  guidance_scale=g.guidance_scale, eta=g.eta,
                                  batch_size=g.batch_size)
    for (name, _, _, truth), query in zip(plan, queries):
      if "trait" in truth:
        truth = _with_trait_check(truth, query.image)
      generation.save_query(os.path.join(root, name), query,
                            dict(truth, model_dir=os.path.abspath(os.path.join(workdir, "model"))))
  parallel.barrier("generate: queries written", timeout_s=24 * 3600)
  done = [generation.load_query(d) for d in generation.list_queries(root)]
  if parallel.is_main_process():
    visualize.save_image_grid(os.path.join(root, "overview.png"),
                              np.stack([q.image for q in done]),
                              [q.info["prompt"] for q in done], columns=6, scale=6)
  common.log(f"generate: {len(done)} queries in {root} (overview.png shows them)")
  traits = [q for q in done if "trait" in q.info]
  if traits:
    seen = [q for q in traits if q.info.get("trait_detected")]
    common.log(f"generate: {len(seen)} of {len(traits)} visual-concept queries show their "
               "exemplars' trait (only those carry ground truth)")


if __name__ == "__main__":
  app.run(main)
