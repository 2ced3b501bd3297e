"""Building AbC's benchmark: exemplar sets -> customized models (deltas) -> generated queries.

The workdir layout it writes (the contract with attrib_jax.abc.evaluate):

  W/exemplars/images.npz      "images": uint8 [E, H, W, 3], every set's exemplars, rows grouped
                              by set in the config's order
  W/exemplars/exemplars.json  per row: {"set", "caption" (plain), "token_caption" ("<new1>")}
  W/sets.json                 per set: {"name", "kind", "category", "split", "exemplar_rows"}
  W/sets/<name>/delta/        the customization delta (customization.save_delta)
  W/sets/<name>/customized.json   what the delta was made from (settings, exemplars, base):
                              a delta whose record differs is made again
  W/sets/<name>/queries/q000/ generated queries (generation.save_query); query.json's info:
                              prompt, seed, sampler settings, "set", "split", "kind", "delta"
                              (the delta's digest: a query of an older delta is made again)
  W/check/<name>.json         the concept check (customized with the token vs base without it)

Every step is resumable: a finished set (delta + matching record) or query is kept, an
interrupted one (a staging folder, no record) is redone; every file is written atomically.

Sets come from the tiny world (attrib_jax.abc.concepts) or from a user's folders
(`folder_set`, for real models: configs/abc_sd.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
from PIL import Image

from attrib_jax import customization as cu
from attrib_jax import generation
from attrib_jax import io_utils
from attrib_jax.abc import concepts
from attrib_jax.attribution import scores as scores_lib
from attrib_jax.customization import delta as delta_lib
from attrib_jax.customization import validation
from attrib_jax.data import _common
from attrib_jax.data import image_folder
from attrib_jax.data import precompute
from attrib_jax.models import pipeline as pipeline_lib

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RECORD = "customized.json"
Log = Callable[[str], None]


# ------------------------------------------------------------------------------- sets ---

def folder_set(name: str, entry: Mapping[str, Any], *, resolution: int, num_prompts: int,
               seed: int, token: str = "<new1>") -> concepts.ExemplarSet:
  """An exemplar set from a user's folder of images (a real model's benchmark).

  entry: {"dir": folder, "split", "kind": "object"|"style", "category": noun or style name,
  "caption": plain caption (used for every image unless the folder has captions.jsonl / .csv,
  image_folder's format), "token_caption": the token caption (must hold the token; default
  "photo of a <token> <category>" for objects, "<category> in the style of <token>" for styles),
  "prompts": generation prompts holding the token (cycled to `num_prompts`)}.
  Images of any size are resized (shorter side) and centre-cropped to `resolution`.
  """
  folder = entry.get("dir", "")
  kind, split = entry.get("kind"), entry.get("split")
  concepts.check_split(name, kind, split)
  if not folder or not os.path.isdir(folder):
    raise FileNotFoundError(f"set {name!r}: exemplar folder {folder!r} does not exist")
  has_captions = any(os.path.exists(os.path.join(folder, f))
                     for f in image_folder.DEFAULT_CAPTION_FILES)
  if has_captions:
    rows = image_folder.read_captions(folder)
    files, plain = [f for f, _ in rows], [c[0] for _, c in rows]
  else:
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if files and not entry.get("caption"):
      raise ValueError(f"set {name!r}: {folder} has no captions file; give the set a 'caption'")
    plain = [entry.get("caption", "")] * len(files)
  if not files:
    raise ValueError(f"set {name!r}: exemplar folder {folder} holds no images "
                     f"({', '.join(IMAGE_EXTENSIONS)})")
  category = entry.get("category") or name
  default = (f"photo of a {token} {category}" if kind == "object"
             else f"{category} in the style of {token}")
  token_caption = entry.get("token_caption") or default
  if token not in token_caption:
    raise ValueError(f"set {name!r}: token_caption {token_caption!r} does not hold {token!r}")
  prompts = list(entry.get("prompts") or [token_caption])
  missing = [p for p in prompts if token not in p]
  if missing:
    raise ValueError(f"set {name!r}: prompts without {token!r}: {missing[:3]}")
  images = []
  for f in files:
    with Image.open(os.path.join(folder, f)) as im:
      images.append(np.asarray(_common.resize_center_crop(im.convert("RGB"), resolution)))
  return concepts.ExemplarSet(
      name, kind, category, split, np.stack(images), plain, [token_caption] * len(files),
      [prompts[k % len(prompts)] for k in range(num_prompts)],
      [seed * 1000 + k for k in range(num_prompts)])


def sets_from_config(config: Any, resolution: int) -> list[concepts.ExemplarSet]:
  """The config's sets: `config.sets` (tiny world) and/or `config.exemplar_dirs` (folders)."""
  token = config.customization.modifier_token
  out = concepts.build_sets(list(config.get("sets", None) or []), resolution=resolution,
                            num_prompts=config.images_per_set,
                            style_exemplars=config.get("style_exemplars", 4), seed=config.seed,
                            token=token)
  dirs = config.get("exemplar_dirs", None) or {}
  dirs = dirs.to_dict() if hasattr(dirs, "to_dict") else dict(dirs)
  for name, entry in sorted(dirs.items()):
    if any(s.name == name for s in out):
      raise ValueError(f"set {name!r} is named twice (sets and exemplar_dirs)")
    out.append(folder_set(name, entry, resolution=resolution, num_prompts=config.images_per_set,
                          seed=concepts.set_seed_of(config.seed, name), token=token))
  if not out:
    raise ValueError("the config names no exemplar sets (config.sets / config.exemplar_dirs)")
  return out


def write_layout(workdir: str, sets: Sequence[concepts.ExemplarSet]) -> list[dict]:
  """W/exemplars/{images.npz, exemplars.json} and W/sets.json; returns sets.json's list."""
  images, meta, records, row = [], [], [], 0
  for s in sets:
    n = len(s.images)
    images.append(s.images)
    meta += [{"set": s.name, "caption": c, "token_caption": t}
             for c, t in zip(s.captions, s.token_captions)]
    records.append({"name": s.name, "kind": s.kind, "category": s.category, "split": s.split,
                    "exemplar_rows": list(range(row, row + n))})
    row += n
  shapes = {tuple(i.shape[1:]) for i in images}
  if len(shapes) != 1:
    raise ValueError(f"exemplar images of several sizes {sorted(shapes)}: one model, one size")
  os.makedirs(os.path.join(workdir, "exemplars"), exist_ok=True)
  io_utils.atomic_savez(os.path.join(workdir, "exemplars", "images.npz"),
                        images=np.concatenate(images).astype(np.uint8))
  io_utils.atomic_write_json(os.path.join(workdir, "exemplars", "exemplars.json"), meta)
  io_utils.atomic_write_json(os.path.join(workdir, "sets.json"), records)
  return records


# --------------------------------------------------------------------------- customize ---

def settings_from_config(config: Any) -> cu.CustomizationSettings:
  return cu.CustomizationSettings.from_config(config.customization)


def regularization_from_precomputed(pipe: pipeline_lib.Pipeline, precomputed_dir: str,
                                    settings: cu.CustomizationSettings) -> Optional[cu.Items]:
  """Custom Diffusion's regularisation items from the base's own training set: the keyed
  draw of rows, their latents and their first caption's text states (precomputed)."""
  del pipe
  if settings.prior_loss_weight == 0:
    return None
  arrays = precompute.load(precomputed_dir)
  rows = cu.draw_regularization(len(arrays["index"]), settings.num_regularization,
                                settings.seed)
  return cu.Items(np.asarray(arrays["latents"][rows, 0], np.float32),
                  text_states=np.asarray(arrays["text_states"][rows, 0], np.float32))


def regularization_from_folder(pipe: pipeline_lib.Pipeline, folder: str, resolution: int,
                               settings: cu.CustomizationSettings) -> Optional[cu.Items]:
  """Regularisation items from a captioned folder (image_folder's captions.jsonl / .csv), as
  Custom Diffusion's retrieved real images: the keyed draw of `num_regularization` of them."""
  if settings.prior_loss_weight == 0:
    return None
  if not folder or not os.path.isdir(folder):
    raise FileNotFoundError(f"regularisation folder {folder!r} does not exist")
  rows = image_folder.read_captions(folder)
  picks = cu.draw_regularization(len(rows), settings.num_regularization, settings.seed)
  images, captions = [], []
  for k in picks:
    f, c = rows[int(k)]
    with Image.open(os.path.join(folder, f)) as im:
      images.append(np.asarray(_common.resize_center_crop(im.convert("RGB"), resolution)))
    captions.append(c[0])
  latents = pipeline_lib.images_to_latents(np.stack(images), vae=pipe.vae,
                                           vae_params=pipe.vae_params,
                                           pixel_patch=pipe.pixel_patch,
                                           key=jax.random.key(settings.seed))
  return cu.regularization_items(pipe, np.asarray(latents), captions)


def exemplar_digest(s: concepts.ExemplarSet) -> str:
  h = hashlib.sha256(np.ascontiguousarray(s.images).tobytes())
  h.update(json.dumps([s.kind, s.split, s.token_captions]).encode())
  return h.hexdigest()[:16]


def _record(pipe: pipeline_lib.Pipeline, s: concepts.ExemplarSet,
            settings: cu.CustomizationSettings, pad_to: int) -> dict:
  return json.loads(json.dumps({
      "set": s.name, "settings": dataclasses.asdict(settings), "exemplars": exemplar_digest(s),
      "pad_to": pad_to, "base": delta_lib.base_fingerprint(pipe)}))


def is_customized(set_dir: str, record: dict) -> bool:
  path = os.path.join(set_dir, RECORD)
  if not (os.path.exists(path) and os.path.exists(os.path.join(set_dir, "delta",
                                                               delta_lib.META_FILE))):
    return False
  with open(path) as f:
    return json.load(f) == record


def exemplar_items(pipe: pipeline_lib.Pipeline, s: concepts.ExemplarSet,
                   settings: cu.CustomizationSettings, pad_to: int) -> cu.Items:
  """The set's exemplars as customization items, repeated up to a multiple of `pad_to` rows.

  Why: each step draws its batch uniformly from the rows, so k copies of every exemplar draw
  the same distribution; but every set then has the same array shapes and one compiled step
  serves all sets (an object set has 1 exemplar, a style set 4).
  """
  prep = cu.prepare_pipeline(pipe, settings)
  items = cu.exemplar_items(prep, s.images, s.token_captions,
                            modifier_token=settings.modifier_token)
  n = len(s.images)
  copies = max(1, -(-pad_to // n)) if pad_to else 1
  if copies == 1:
    return items
  return cu.Items(np.repeat(items.latents, copies, axis=0),
                  token_ids=np.repeat(np.asarray(items.token_ids), copies, axis=0))


def customize_set(pipe: pipeline_lib.Pipeline, s: concepts.ExemplarSet,
                  regularization: Optional[cu.Items], settings: cu.CustomizationSettings,
                  set_dir: str, *, pad_to: int = 4,
                  progress: Optional[Callable[[int, float, float], None]] = None) -> bool:
  """Customizes `pipe` toward set `s` into set_dir/delta (+ its record). False if it was
  already done with the same settings, exemplars and base; True if made now."""
  record = _record(pipe, s, settings, pad_to)
  if is_customized(set_dir, record):
    return False
  # The record goes last and is removed first: a delta without a matching record is redone.
  if os.path.exists(os.path.join(set_dir, RECORD)):
    os.remove(os.path.join(set_dir, RECORD))
  items = exemplar_items(pipe, s, settings, pad_to)
  delta = cu.customize(pipe, items, regularization, settings, progress=progress)
  os.makedirs(set_dir, exist_ok=True)
  cu.save_delta(os.path.join(set_dir, "delta"), delta)
  io_utils.atomic_write_json(os.path.join(set_dir, RECORD), record)
  return True


# ---------------------------------------------------------------------------- generate ---

def delta_digest(delta_dir: str) -> str:
  h = hashlib.sha256()
  for name in (delta_lib.DELTA_FILE, delta_lib.META_FILE):
    with open(os.path.join(delta_dir, name), "rb") as f:
      h.update(f.read())
  return h.hexdigest()[:16]


def query_name(k: int) -> str:
  return f"q{k:03d}"


def _request(s: concepts.ExemplarSet, k: int, gen: Mapping[str, Any], digest: str) -> dict:
  return {"prompt": s.prompts[k], "seed": int(s.seeds[k]), "sampler": gen["sampler"],
          "num_steps": int(gen["num_steps"]), "guidance_scale": float(gen["guidance_scale"]),
          "eta": float(gen["eta"]), "set": s.name, "delta": digest}


def pending_queries(s: concepts.ExemplarSet, set_dir: str, gen: Mapping[str, Any]) -> list[int]:
  """Indices of the set's queries not yet generated as asked (with this delta)."""
  digest = delta_digest(os.path.join(set_dir, "delta"))
  root = os.path.join(set_dir, "queries")
  return [k for k in range(len(s.prompts))
          if not generation.is_generated_as(os.path.join(root, query_name(k)),
                                            _request(s, k, gen, digest))]


def generate_set(base: pipeline_lib.Pipeline, s: concepts.ExemplarSet, set_dir: str,
                 gen: Mapping[str, Any]) -> int:
  """Generates the set's missing queries with base + its delta; returns how many were made."""
  delta_dir = os.path.join(set_dir, "delta")
  todo = pending_queries(s, set_dir, gen)
  if not todo:
    return 0
  digest = delta_digest(delta_dir)
  custom = delta_lib.apply_delta(base, delta_lib.load_delta(delta_dir))
  queries = generation.generate(custom, [s.prompts[k] for k in todo], [s.seeds[k] for k in todo],
                                sampler=gen["sampler"], num_steps=int(gen["num_steps"]),
                                guidance_scale=float(gen["guidance_scale"]),
                                eta=float(gen["eta"]), batch_size=int(gen["batch_size"]))
  for k, q in zip(todo, queries):
    generation.save_query(os.path.join(set_dir, "queries", query_name(k)), q,
                          {"set": s.name, "split": s.split, "kind": s.kind, "delta": digest})
  return len(todo)


# ------------------------------------------------------------------------ concept check ---

def without_token(prompt: str, token: str) -> str:
  return " ".join(prompt.replace(token, " ").split())


def _mean_se(x: np.ndarray) -> tuple[float, float]:
  x = np.asarray(x, np.float64)
  return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def concept_check(base: pipeline_lib.Pipeline, s: concepts.ExemplarSet, set_dir: str,
                  gen: Mapping[str, Any], token: str, validation_renders: int) -> dict:
  """Does the customized model draw its concept? Its <token> queries against the base model's
  images for the same prompts without the token, same seeds, read by the set's detector
  (tiny-world sets: cut fitted on real renders, then validated on a fresh draw) and by the
  continuous measure behind it; folder sets: nearest-exemplar pixel distance only."""
  root = os.path.join(set_dir, "queries")
  names = [query_name(k) for k in range(len(s.prompts))]
  custom = np.stack([generation.load_query(os.path.join(root, n)).image for n in names])
  plain = [without_token(p, token) for p in s.prompts]
  base_images = np.stack([q.image for q in generation.generate(
      base, plain, s.seeds, sampler=gen["sampler"], num_steps=int(gen["num_steps"]),
      guidance_scale=float(gen["guidance_scale"]), eta=float(gen["eta"]),
      batch_size=int(gen["batch_size"]))])
  out = {"set": s.name, "kind": s.kind, "split": s.split, "queries": len(names)}
  pixel_c = validation.nearest_exemplar_distance(custom, s.images)
  pixel_b = validation.nearest_exemplar_distance(base_images, s.images)
  out["pixel_distance"] = {"customized": _mean_se(pixel_c), "base": _mean_se(pixel_b),
                           "closer_fraction": float(np.mean(pixel_c < pixel_b))}
  if s.kind == "style" or s.instance is not None:
    threshold = concepts.fit_threshold(s, validation_renders, 1)
    valid = concepts.validate_detectors([s], validation_renders, 0)
    close_c = concepts.concept_closeness(custom, s)
    close_b = concepts.concept_closeness(base_images, s)
    out["detector"] = {
        "threshold": threshold, "validation_accuracy": valid["accuracy"],
        "customized_detected": float(np.mean(close_c < threshold)),
        "base_detected": float(np.mean(close_b < threshold)),
        "closeness_customized": _mean_se(close_c), "closeness_base": _mean_se(close_b),
        "closer_fraction": float(np.mean(close_c < close_b))}
  io_utils.atomic_savez(os.path.join(set_dir, "check_images.npz"), customized=custom,
                        base=base_images)
  return out


# ------------------------------------------------------------------------------ stages ---

def base_dir_of(config, workdir: str) -> str:
  return config.get("base_workdir", "") or os.path.join(workdir, "base")


def prepare_base(config, workdir: str, log: Log = print) -> str:
  """The base model's directory (a diffusers-layout model dir). Trains the tiny recipe into
  W/base when no base_workdir is given; a named base that is missing is an error."""
  if config.kind == "sd":
    model_dir = config.base_model_dir
    if not model_dir or not os.path.exists(os.path.join(model_dir, "model_index.json")):
      raise FileNotFoundError(f"config.base_model_dir {model_dir!r} is not a diffusers "
                              "snapshot (no model_index.json)")
    return model_dir
  base = base_dir_of(config, workdir)
  done = os.path.join(base, "model", "DONE.json")
  if config.get("base_workdir", ""):
    if not os.path.exists(done) or not os.path.isdir(os.path.join(base, "precomputed")):
      raise FileNotFoundError(f"config.base_workdir {base!r} holds no finished launch.train run "
                              f"(model/DONE.json and precomputed/ needed)")
    return os.path.join(base, "model")
  if not os.path.exists(done):
    from attrib_jax.training import recipe  # pylint: disable=g-import-not-at-top
    log(f"abc: training the base model ({config.base.name}) into {base}")
    recipe.run(config.base, base, log=log)
  return os.path.join(base, "model")


def resolution_of(pipe: pipeline_lib.Pipeline) -> int:
  scale = (pipe.pixel_patch if pipe.vae is None
           else 2 ** (len(pipe.configs["vae"]["block_out_channels"]) - 1))
  return pipe.latent_shape[0] * scale


def regularization(config, workdir: str, pipe, settings, resolution: int):
  if config.kind == "sd":
    return regularization_from_folder(pipe, config.regularization_dir, resolution,
                                            settings)
  return regularization_from_precomputed(
      pipe, os.path.join(base_dir_of(config, workdir), "precomputed"), settings)


def _eta_line(meter, done: int, what: str) -> str:
  p = meter(done)
  return (f"{p.stage}: {p.done}/{p.total} {p.unit} {what}, "
          f"ETA {p.eta_s:.0f}s" if np.isfinite(p.eta_s) else f"{p.stage}: {p.done}/{p.total} "
          f"{p.unit} {what}")


def run_customize(config, workdir: str, pipe: pipeline_lib.Pipeline,
                  sets: Sequence[concepts.ExemplarSet], resolution: int, log: Log = print) -> None:
  """The customize stage: every set not yet customized as asked, with ETA lines."""
  settings = settings_from_config(config)
  todo = [s for s in sets if not is_customized(
      os.path.join(workdir, "sets", s.name),
      _record(pipe, s, settings, config.get("pad_exemplars", 4)))]
  log(f"customize: {len(todo)} of {len(sets)} sets to customize, {settings.num_steps} "
             f"steps each (lr {settings.learning_rate}, batch {settings.batch_size}+"
             f"{settings.batch_size})")
  if not todo:
    return
  reg = regularization(config, workdir, pipe, settings, resolution)
  steps_total = len(todo) * settings.num_steps
  meter = scores_lib.ProgressMeter("customize", steps_total, "steps")
  every = max(1, settings.num_steps // 4)
  t0 = time.time()
  for k, s in enumerate(todo):
    began = time.time()

    def progress(i, loss, _sec, k=k, s=s):
      if i % every == 0 or i == settings.num_steps:
        log(_eta_line(meter, k * settings.num_steps + i,
                             f"(set {k + 1}/{len(todo)} {s.name} step {i}, loss {loss:.4f})"))

    customize_set(pipe, s, reg, settings, os.path.join(workdir, "sets", s.name),
                        pad_to=config.get("pad_exemplars", 4), progress=progress)
    log(f"customize: {s.name} done in {time.time() - began:.1f}s")
  log(f"customize: {len(todo)} sets in {time.time() - t0:.1f}s")


def run_generate(config, workdir: str, pipe: pipeline_lib.Pipeline,
                 sets: Sequence[concepts.ExemplarSet], log: Log = print) -> None:
  """The generate stage: every set's missing queries, with ETA lines."""
  gen = config.generate.to_dict()
  plan = []
  for s in sets:
    set_dir = os.path.join(workdir, "sets", s.name)
    if not os.path.exists(os.path.join(set_dir, "delta", "delta.json")):
      raise FileNotFoundError(f"generate: set {s.name!r} has no delta in {set_dir}/delta: run "
                              "the customize stage first")
    plan.append((s, len(pending_queries(s, set_dir, gen))))
  total = sum(n for _, n in plan)
  log(f"generate: {total} queries to make over {sum(n > 0 for _, n in plan)} sets "
             f"({gen['sampler']}, {gen['num_steps']} steps, guidance {gen['guidance_scale']})")
  meter = scores_lib.ProgressMeter("generate", total, "queries")
  done, t0 = 0, time.time()
  for s, n in plan:
    if n:
      done += generate_set(pipe, s, os.path.join(workdir, "sets", s.name), gen)
      log(_eta_line(meter, done, f"(set {s.name})"))
  log(f"generate: {done} queries in {time.time() - t0:.1f}s")


def run_check(config, workdir: str, pipe: pipeline_lib.Pipeline,
              sets: Sequence[concepts.ExemplarSet], log: Log = print) -> dict:
  """The check stage: `concept_check` per set (kept while its delta is), and a summary."""
  gen = config.generate.to_dict()
  token = config.customization.modifier_token
  renders = config.get("check", {}).get("validation_renders", 40)
  out_dir = os.path.join(workdir, "check")
  os.makedirs(out_dir, exist_ok=True)
  meter = scores_lib.ProgressMeter("check", len(sets), "sets")
  results = []
  for k, s in enumerate(sets):
    set_dir = os.path.join(workdir, "sets", s.name)
    path = os.path.join(out_dir, s.name + ".json")
    digest = delta_digest(os.path.join(set_dir, "delta"))
    result = None
    if os.path.exists(path):
      with open(path) as f:
        result = json.load(f)
      # Kept only for the same delta, prompts and seeds (a set's queries changed: redo).
      if (result.get("delta") != digest or result.get("prompts") != list(s.prompts)
          or result.get("seeds") != [int(x) for x in s.seeds]):
        result = None
    if result is None:
      if pending_queries(s, set_dir, gen):
        raise FileNotFoundError(f"check: set {s.name!r} has queries still to generate: run the "
                                "generate stage first")
      result = dict(concept_check(pipe, s, set_dir, gen, token, renders), delta=digest,
                    prompts=list(s.prompts), seeds=[int(x) for x in s.seeds])
      io_utils.atomic_write_json(path, result)
    results.append(result)
    log(_eta_line(meter, k + 1, f"({s.name}: {_check_line(result)})"))
  summary = summarize_check(results)
  io_utils.atomic_write_json(os.path.join(out_dir, "summary.json"), summary)
  log(f"check: {json.dumps(summary['overall'])}")
  return summary


def _check_line(r: dict) -> str:
  d = r.get("detector")
  px = r["pixel_distance"]
  line = (f"pixel distance customized {px['customized'][0]:.1f} vs base {px['base'][0]:.1f}")
  if d:
    line += (f"; detector customized {d['customized_detected']:.2f} vs base "
             f"{d['base_detected']:.2f} (validated {d['validation_accuracy']:.3f})")
  return line


def summarize_check(results: list[dict]) -> dict:
  """Per split and overall: detection rates, closer fractions, the detectors' validation."""
  def agg(rows):
    det = [r["detector"] for r in rows if "detector" in r]
    out = {"sets": len(rows), "queries": int(sum(r["queries"] for r in rows)),
           "pixel_closer_fraction": float(np.mean([r["pixel_distance"]["closer_fraction"]
                                                   for r in rows]))}
    if det:
      out.update(
          customized_detected=float(np.mean([d["customized_detected"] for d in det])),
          base_detected=float(np.mean([d["base_detected"] for d in det])),
          closer_fraction=float(np.mean([d["closer_fraction"] for d in det])),
          validation_accuracy_min=float(min(d["validation_accuracy"] for d in det)),
          sets_detected_more=int(sum(d["customized_detected"] > d["base_detected"]
                                     for d in det)))
    return out
  splits = sorted({r["split"] for r in results})
  return {"overall": agg(results),
          "per_split": {sp: agg([r for r in results if r["split"] == sp]) for sp in splits},
          "per_set": {r["set"]: r for r in results}}
