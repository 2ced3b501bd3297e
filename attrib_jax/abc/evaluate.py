"""AbC's evaluate stage: every method's scores over the candidates, metrics per split, the
calibrator, tables and the report (issue 18, items 5-8). What `launch/abc.py` calls:

  summary = run_evaluation(config, workdir, progress=print)

Candidates (the same C = E + N rows for every query): all E exemplars of every set (rows
0..E-1, in `exemplars/images.npz` order), then the base model's N training items (the
distractors). A query's positives are its own set's exemplar rows. Exemplars get dataset
indices base_max + 1 + e, so the keyed noise of the sweep / TRAK never collides with a base
item's.

Methods and what they run on:
  image-only, one score per query: `random`, `pixel`, `features` (the *base* UNet's mid block),
    `dino` / `clip` (the in-world towers, $W/towers/<kind> or `evaluation.towers`), `tuned-dino`
    / `tuned-clip` (AbC's two linear maps trained on the tune split's queries, attrib_jax.abc.
    tuning; their untuned backbone is the `dino` / `clip` row).
  per protocol (the candidates' captions): `caption`, `caption-words`, `trak`, `d-trak`, `abu`,
    `abu+`. Protocol "token": exemplars captioned "<new1> ..." and encoded by the query's own
    customized text encoder (the reference's protocol); "plain": their plain captions, encoded by
    the base text encoder (which the customized one equals on every old token). Base items keep
    their own precomputed captions in both. TRAK / D-TRAK / AbU / AbU+ run on the query's
    customized model (base + its set's delta); their per-model work (Fisher, EK-FAC, TRAK's Φ) is
    computed once per (set, protocol) and cached under evaluation/cache/.
  AbU / AbU+ run on `evaluation.abu.queries_per_set` queries per set (the first by name, the same
  for both protocols); the table's n says how many.

Outputs ($W/evaluation/): scores/<method>/<set>/<query>.npz (atomic; each holds the key of
what it depends on, so a rerun reuses it and an interrupted run resumes), table.csv/.md,
summary.json, calibration.csv/.md, reliability.png, report.html.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from attrib_jax import baselines
from attrib_jax import generation
from attrib_jax import io_utils
from attrib_jax.attribution import fisher as fisher_lib
from attrib_jax.attribution import runner
from attrib_jax.attribution import scores as scores_lib
from attrib_jax.attribution import sweep as sweep_lib
from attrib_jax.attribution import unlearn as unlearn_lib
from attrib_jax.baselines import towers as towers_lib
from attrib_jax.customization import delta as delta_lib
from attrib_jax.data import precompute
from attrib_jax.models import pipeline as pipeline_lib

SPLITS = ("tune", "test_seen", "test_unseen", "test_style")
PROTOCOLS = ("token", "plain")
IMAGE_METHODS = ("random", "pixel", "features", "dino", "clip")
TUNED_METHODS = {"tuned-dino": "dino", "tuned-clip": "clip"}
TEXT_METHODS = ("caption", "caption-words")
MODEL_METHODS = ("trak", "d-trak", "abu", "abu+")
ALL_METHODS = IMAGE_METHODS + tuple(TUNED_METHODS) + TEXT_METHODS + MODEL_METHODS

# The evaluate block of an AbC config (`config.evaluation`); every key optional, unknown keys an
# error. AbU's settings are SPEC §2's Custom-Diffusion ones (α 0.1, 160 draws per step, loss at
# 10 timesteps, 1 caption) scaled to the tiny model: fewer steps (AbC runs 100) and draws.
DEFAULTS: dict[str, Any] = {
    "methods": ALL_METHODS,
    "protocols": PROTOCOLS,
    "towers": {},                 # kind -> transformers directory (default $W/towers/<kind>)
    "recall_fraction": 0.1,       # the third Recall@K: K = round(fraction * C)
    "random_seed": 0,
    "abu": {"queries_per_set": 2, "alpha": 0.1, "num_steps": 1, "num_draws": 160,
            "draws_per_batch": 80, "timesteps": tuple(range(0, 1000, 100)), "num_captions": 1,
            "fisher_epochs": 1, "ekfac_epochs": 1, "damping_scale": 0.1, "batch_size": 32,
            "items_per_device": 8, "seed": 0,
            # "base": one Fisher / EK-FAC of the base model serves every customized model
            # (customization moves only K/V, slightly); "customized": each model its own.
            "preconditioner_model": "base"},
    # Two timesteps: Φ is recomputed for every (customized model, protocol), 537 rows each on
    # the tiny benchmark (measured 2 min a model with 5 timesteps on the loaded machine).
    "trak": {"proj_dim": 256, "timesteps": (250, 750),
             "selection": "cross-attn-kv", "batch_size": 16, "damping": 1e-3},
    "tuning": {},                 # attrib_jax.abc.tuning.TuningSettings fields
    # Tune sets dealt into this many folds; each fold's tune queries are scored by maps trained
    # on the others (held-out tune scores for the table's tune row and the calibrator).
    "tuning_folds": 4,
    "calibration": {},            # attrib_jax.abc.calibration.fit_calibrator keyword arguments
    "report": {"top_k": 10, "queries_per_set": 1},
}


def settings_from_config(config: Any) -> dict[str, Any]:
  """DEFAULTS overridden by `config.evaluation` (nested blocks merged key by key)."""
  given = config.get("evaluation", None) if config is not None else None
  given = given.to_dict() if isinstance(given, ml_collections.ConfigDict) else dict(given or {})
  unknown = sorted(set(given) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"config.evaluation: unknown setting(s) {unknown}; known: {sorted(DEFAULTS)}")
  out = {}
  for key, default in DEFAULTS.items():
    value = given.get(key, default)
    if isinstance(default, dict) and key not in ("towers", "tuning", "calibration"):
      bad = sorted(set(value) - set(default))
      if bad:
        raise ValueError(f"config.evaluation.{key}: unknown setting(s) {bad}; known: "
                         f"{sorted(default)}")
      value = dict(default, **value)
    out[key] = value
  out["methods"] = tuple(out["methods"])
  out["protocols"] = tuple(out["protocols"])
  bad = [m for m in out["methods"] if m not in ALL_METHODS]
  if bad:
    raise ValueError(f"config.evaluation.methods: unknown method(s) {bad}; known: {ALL_METHODS}")
  bad = [p for p in out["protocols"] if p not in PROTOCOLS]
  if bad:
    raise ValueError(f"config.evaluation.protocols: unknown {bad}; known: {PROTOCOLS}")
  return out


def _log_fn(progress: Callable[[str], None] | None) -> Callable[[str], None]:
  return progress or (lambda message: print(message, flush=True))


def _need(path: str, what: str) -> str:
  if not os.path.exists(path):
    raise FileNotFoundError(f"AbC evaluate: {what} is missing: {path}")
  return path


# ------------------------------------------------------------------------ the inputs ---

@dataclasses.dataclass
class Benchmark:
  """Everything read from a workdir: sets, exemplars, queries, the base model and its data."""
  workdir: str
  sets: list[dict]
  exemplar_images: np.ndarray            # uint8 [E, H, W, 3]
  exemplar_meta: list[dict]              # per row: set, caption, token_caption
  queries: dict[str, list[tuple[str, generation.Query]]]   # set -> [(query name, query)]
  base_dir: str
  base_pipe: pipeline_lib.Pipeline
  base_arrays: dict[str, np.ndarray]
  base_images: np.ndarray                # uint8 [N, H, W, 3]
  base_captions: list[list[str]]
  digest: str                            # of the candidates (exemplars + base index)

  @property
  def num_exemplars(self) -> int:
    return int(self.exemplar_images.shape[0])

  @property
  def num_candidates(self) -> int:
    return self.num_exemplars + int(self.base_images.shape[0])

  def positives(self, set_name: str) -> np.ndarray:
    out = np.zeros(self.num_candidates, bool)
    out[self.set_by_name[set_name]["exemplar_rows"]] = True
    return out

  @property
  def set_by_name(self) -> dict[str, dict]:
    return {s["name"]: s for s in self.sets}

  def candidate_images(self, rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows)
    e = self.num_exemplars
    out = np.empty((rows.size,) + self.exemplar_images.shape[1:], np.uint8)
    low = rows < e
    out[low] = self.exemplar_images[rows[low]]
    out[~low] = self.base_images[rows[~low] - e]
    return out

  def candidate_captions(self, protocol: str) -> list[list[str]]:
    field = "token_caption" if protocol == "token" else "caption"
    return [[m[field]] for m in self.exemplar_meta] + [list(c) for c in self.base_captions]


def _base_source(base_dir: str, config: Any):
  """The base training set's images and captions: the dataset the base model was trained on
  (its DONE.json's config, or `config.base` when given), read through the recipe."""
  from attrib_jax.training import recipe  # pylint: disable=g-import-not-at-top
  base_config = config.get("base", None) if config is not None else None
  if base_config is None:
    done = os.path.join(base_dir, "model", "DONE.json")
    with open(_need(done, "the base model's DONE.json (its training config)")) as f:
      base_config = ml_collections.ConfigDict(json.load(f)["settings"]["config"])
  return recipe.open_dataset(base_config, os.path.join(base_dir, "tfds"))


def load_benchmark(config: Any, workdir: str, log: Callable[[str], None] = print) -> Benchmark:
  """Reads and checks the workdir's layout (docs: brief abc.md); a missing file is named."""
  sets_path = _need(os.path.join(workdir, "sets.json"), "the exemplar sets list (sets.json)")
  with open(sets_path) as f:
    sets = json.load(f)
  if not sets:
    raise ValueError(f"{sets_path} lists no sets")
  images_path = _need(os.path.join(workdir, "exemplars", "images.npz"), "the exemplar images")
  meta_path = _need(os.path.join(workdir, "exemplars", "exemplars.json"),
                    "the exemplar captions (exemplars.json)")
  with io_utils.open_npz(images_path) as data:
    key = "images" if "images" in data.files else data.files[0]
    exemplar_images = np.asarray(data[key])
  with open(meta_path) as f:
    exemplar_meta = json.load(f)
  if len(exemplar_meta) != exemplar_images.shape[0]:
    raise ValueError(f"{meta_path} describes {len(exemplar_meta)} exemplars, {images_path} holds "
                     f"{exemplar_images.shape[0]}")
  for s in sets:
    for field in ("name", "split", "exemplar_rows"):
      if field not in s:
        raise ValueError(f"{sets_path}: set {s.get('name', '?')!r} has no {field!r}")
    if s["split"] not in SPLITS:
      raise ValueError(f"{sets_path}: set {s['name']!r} has split {s['split']!r}, not one of "
                       f"{SPLITS}")
    rows = np.asarray(s["exemplar_rows"], np.int64)
    if rows.size == 0 or rows.min() < 0 or rows.max() >= len(exemplar_meta):
      raise ValueError(f"{sets_path}: set {s['name']!r} exemplar_rows {rows.tolist()} out of "
                       f"range 0..{len(exemplar_meta) - 1}")
  queries = {}
  for s in sets:
    root = os.path.join(workdir, "sets", s["name"], "queries")
    dirs = generation.list_queries(_need(root, f"the queries of set {s['name']!r}"))
    if not dirs:
      raise FileNotFoundError(f"AbC evaluate: set {s['name']!r} has no complete query under "
                              f"{root}")
    queries[s["name"]] = [(os.path.basename(d), generation.load_query(d)) for d in dirs]
  base_dir = (config.get("base_workdir", None) if config is not None else None) or os.path.join(
      workdir, "base")
  _need(os.path.join(base_dir, "model"), "the base model")
  pipe = pipeline_lib.load_pipeline(os.path.join(base_dir, "model"))
  arrays = precompute.load(_need(os.path.join(base_dir, "precomputed"),
                                 "the base model's precomputed arrays"), mmap=False)
  arrays.pop("manifest", None)
  source = _base_source(base_dir, config)
  images, captions, index = source.get_items(np.asarray(arrays["index"]))
  if not np.array_equal(np.asarray(index), np.asarray(arrays["index"])):
    raise ValueError(f"{base_dir}: the dataset's items are not the precomputed arrays' rows")
  digest = scores_lib.settings_digest({
      "images": scores_lib.params_fingerprint({"x": exemplar_images}),
      "meta": exemplar_meta, "index": scores_lib.params_fingerprint(
          {"i": np.asarray(arrays["index"], np.int64)}),
      "base": scores_lib.params_fingerprint(pipe.unet_params)})
  log(f"evaluate: {len(sets)} sets, {exemplar_images.shape[0]} exemplars + {len(index)} "
      f"distractors, {sum(len(q) for q in queries.values())} queries")
  return Benchmark(workdir, sets, exemplar_images, exemplar_meta, queries, base_dir, pipe, arrays,
                   np.asarray(images), [list(c) for c in captions], digest)


def _encoders(pipe: pipeline_lib.Pipeline):
  encode_images = lambda x: np.asarray(pipeline_lib.images_to_latents(
      x, vae=pipe.vae, vae_params=pipe.vae_params, pixel_patch=pipe.pixel_patch,
      key=jax.random.key(0)))
  encode_text = pipeline_lib.make_text_encoder_fn(pipe.text_encoder, pipe.text_params,
                                                  pipe.tokenizer)
  return encode_images, encode_text


def exemplar_arrays(bench: Benchmark, pipe: pipeline_lib.Pipeline, protocol: str,
                    out_dir: str, log: Callable[[str], None]) -> dict[str, np.ndarray]:
  """The exemplars' precomputed arrays (data.precompute: latents with flips, the protocol's
  caption under `pipe`'s text encoder, padded to the base's K captions), resumable on disk."""
  field = "token_caption" if protocol == "token" else "caption"
  num_captions = int(bench.base_arrays["text_states"].shape[1])
  first = int(np.asarray(bench.base_arrays["index"]).max()) + 1
  encode_images, encode_text = _encoders(pipe)

  def get_items(rows):
    rows = np.asarray(rows)
    return (bench.exemplar_images[rows], [[bench.exemplar_meta[int(r)][field]] for r in rows],
            first + rows)

  fingerprint = {"candidates": bench.digest, "protocol": protocol,
                 "text": scores_lib.params_fingerprint(pipe.text_params)}
  # One directory per fingerprint: another delta's arrays are never mistaken for these.
  out_dir = os.path.join(out_dir, scores_lib.settings_digest(fingerprint))
  precompute.precompute(out_dir, num_items=bench.num_exemplars, get_items=get_items,
                        encode_images=encode_images, encode_text=encode_text,
                        num_captions=num_captions,
                        dtype=str(np.dtype(bench.base_arrays["latents"].dtype)),
                        fingerprint=fingerprint, log=lambda m: None)
  out = precompute.load(out_dir, mmap=False)
  out.pop("manifest", None)
  return out


def candidate_arrays(bench: Benchmark, ex_arrays: Mapping[str, np.ndarray]) -> dict:
  """Exemplar rows then base rows, in the `data.precompute` layout."""
  out = {k: np.concatenate([np.asarray(ex_arrays[k]), np.asarray(bench.base_arrays[k])])
         for k in precompute.ARRAYS}
  out["null_text_states"] = np.asarray(bench.base_arrays["null_text_states"])
  return out


# ------------------------------------------------------------------------- the store ---

class ScoreStore:
  """scores/<method>/<set>/<query>.npz: one score vector [C] and the key it was made with."""

  def __init__(self, root: str):
    self.root = root
    self.reused = 0
    self.written = 0

  def path(self, method: str, set_name: str, query: str) -> str:
    return os.path.join(self.root, method, set_name, query + ".npz")

  def get(self, method: str, set_name: str, query: str, key: str) -> np.ndarray | None:
    path = self.path(method, set_name, query)
    if not os.path.exists(path):
      return None
    try:
      with io_utils.open_npz(path) as data:
        if str(data["key"]) != key:
          return None
        scores = np.asarray(data["scores"], np.float64)
    except (ValueError, KeyError):
      return None          # a damaged file: computed again
    self.reused += 1
    return scores

  def put(self, method: str, set_name: str, query: str, key: str, scores: np.ndarray) -> None:
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 1 or not np.isfinite(scores).all():
      raise ValueError(f"{method}: scores of {set_name}/{query} are not a finite vector")
    path = self.path(method, set_name, query)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    io_utils.atomic_savez(path, scores=scores, key=np.asarray(key))
    self.written += 1


def method_key(method: str, settings: Any, bench: Benchmark, query: generation.Query,
               model: str = "base") -> str:
  return scores_lib.settings_digest({"method": method, "settings": settings,
                                     "candidates": bench.digest,
                                     "query": generation.query_digest(query), "model": model})


def _delta_digest(delta_dir: str) -> str:
  """What a customized model depends on: the delta's files (content digests)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256()
  for name in (delta_lib.DELTA_FILE, delta_lib.META_FILE):
    with open(_need(os.path.join(delta_dir, name), "a customization delta file"), "rb") as f:
      h.update(f.read())
  return h.hexdigest()[:16]


# ----------------------------------------------------------------------- the methods ---

def _base_context(bench: Benchmark, arrays: Mapping[str, np.ndarray], cache_dir: str,
                  log) -> baselines.Context:
  pipe = bench.base_pipe
  encode_images, _ = _encoders(pipe)
  return baselines.Context(
      arrays=arrays, images=bench.candidate_images(np.arange(bench.num_candidates)),
      apply_fn=pipe.apply_unet, params=pipe.unet_params, schedule=pipe.schedule,
      module=pipe.unet, encode_images=encode_images, cache_dir=cache_dir,
      progress=lambda p: log(str(p)))


def _tower_dir(bench: Benchmark, settings: dict, kind: str) -> str:
  directory = settings["towers"].get(kind) or os.path.join(bench.workdir, "towers", kind)
  _need(os.path.join(directory, "config.json"), f"the {kind} tower (config.json)")
  return directory


def _image_method(name: str, settings: dict, bench: Benchmark) -> baselines.Method:
  config: dict[str, Any] = {}
  if name in ("pixel", "features", "dino", "clip"):
    config["flips"] = (0,)      # queries and exemplars are unflipped; the base trains unflipped
  if name in ("dino", "clip"):
    config["weights"] = _tower_dir(bench, settings, name)
  if name == "random":
    config["seed"] = int(settings["random_seed"])
  return baselines.make_method(name, **config)


def tower_features(bench: Benchmark, settings: dict, kind: str, cache_dir: str
                   ) -> tuple[np.ndarray, dict[tuple[str, str], np.ndarray]]:
  """(candidate features [C, D], {(set, query): feature [D]}) of a tower, cached on disk."""
  tower = towers_lib.load_tower(kind, _tower_dir(bench, settings, kind))
  names = [(s, q) for s, items in bench.queries.items() for q, _ in items]
  query_digests = [generation.query_digest(query) for items in bench.queries.values()
                   for _, query in items]
  key = scores_lib.settings_digest({"tower": tower.fingerprint, "candidates": bench.digest,
                                    "queries": query_digests})
  path = os.path.join(cache_dir, f"{kind}-features-{key}.npz")
  if os.path.exists(path):
    with io_utils.open_npz(path) as data:
      real, gen = np.asarray(data["real"]), np.asarray(data["generated"])
  else:
    real = tower(bench.candidate_images(np.arange(bench.num_candidates)))
    gen = tower(np.stack([query.image for items in bench.queries.values() for _, query in items]))
    os.makedirs(cache_dir, exist_ok=True)
    io_utils.atomic_savez(path, real=real, generated=gen)
  return real, dict(zip(names, gen))


def _split_of(bench: Benchmark) -> dict[str, str]:
  return {s["name"]: s["split"] for s in bench.sets}


def run_tuned(bench: Benchmark, settings: dict, store: ScoreStore, cache_dir: str, log) -> None:
  """AbC's tuned features on each requested backbone: maps trained on the tune split's queries.

  Real rows seen in training are the tune sets' exemplars and the distractors only: a test
  set's exemplar is never a training negative (the maps could learn to demote those very rows).
  Test queries are scored by maps trained on every tune query. Tune queries are cross-fitted:
  the tune sets are dealt into `tuning_folds` folds and a fold's queries are scored by maps
  trained on the other folds, so the tune rows of the table and the calibrator fitted on them
  (calibration_rows) see held-out scores, as for every untrained method. In-sample tune scores
  were 1.0 mAP and gave the calibrator inverse temperature 36 (test NLL 18.4 vs softmax 6.3).
  With fewer than two tune sets there is nothing to hold out: the tune scores stay in-sample.
  """
  from attrib_jax.abc import tuning  # pylint: disable=g-import-not-at-top
  split = _split_of(bench)
  tune_sets = [s["name"] for s in bench.sets if s["split"] == "tune"]
  folds = min(int(settings["tuning_folds"]), len(tune_sets))
  fold_of = {name: i % max(folds, 1) for i, name in enumerate(tune_sets)}
  train_rows = np.concatenate([
      np.asarray([r for s in bench.sets if s["split"] == "tune" for r in s["exemplar_rows"]],
                 np.int64),
      np.arange(bench.num_exemplars, bench.num_candidates)])
  for method, kind in TUNED_METHODS.items():
    if method not in settings["methods"]:
      continue
    real, gen = tower_features(bench, settings, kind, cache_dir)
    tune = [(s, q) for (s, q) in gen if split[s] == "tune"]
    if not tune:
      raise ValueError(f"{method}: no set has split 'tune', nothing to train the maps on")
    tuning_settings = tuning.TuningSettings(**settings["tuning"])
    key_settings = {"tuning": dataclasses.asdict(tuning_settings), "kind": kind,
                    "folds": folds, "train_rows": "tune-exemplars+distractors"}
    keys = {(s, q): method_key(method, key_settings, bench, query)
            for s, items in bench.queries.items() for q, query in items}
    if all(store.get(method, s, q, keys[(s, q)]) is not None for (s, q) in keys):
      continue
    t0 = time.time()

    def fit(queries):
      positives = np.stack([bench.positives(s)[train_rows] for s, _ in queries])
      return tuning.train_maps(real[train_rows], np.stack([gen[k] for k in queries]), positives,
                               tuning_settings)

    names = list(gen)
    params = fit(tune)
    scores = dict(zip(names, np.asarray(tuning.tuned_scores(
        params, np.stack([gen[k] for k in names]), real))))
    if folds >= 2:
      for fold in range(folds):
        held = [k for k in tune if fold_of[k[0]] == fold]
        fold_params = fit([k for k in tune if fold_of[k[0]] != fold])
        for k, row in zip(held, np.asarray(tuning.tuned_scores(
            fold_params, np.stack([gen[k] for k in held]), real))):
          scores[k] = row
    else:
      log(f"evaluate: {method}: {len(tune_sets)} tune set(s), tune scores are in-sample")
    for (s, q) in names:
      store.put(method, s, q, keys[(s, q)], scores[(s, q)])
    log(f"evaluate: {method} trained on {len(tune)} tune queries ({folds} cross-fit folds) in "
        f"{time.time() - t0:.0f}s")


def run_image_methods(bench: Benchmark, settings: dict, store: ScoreStore, cache_dir: str,
                      log) -> None:
  """random, pixel, features, dino, clip: one base-model context for every query."""
  wanted = [m for m in IMAGE_METHODS if m in settings["methods"]]
  if not wanted:
    return
  ex = exemplar_arrays(bench, bench.base_pipe, "plain", os.path.join(cache_dir, "arrays_plain"),
                       log)
  context = _base_context(bench, candidate_arrays(bench, ex),
                          os.path.join(cache_dir, "baselines"), log)
  for name in wanted:
    method = _image_method(name, settings, bench)
    t0, count = time.time(), 0
    for s, items in bench.queries.items():
      for q, query in items:
        key = method_key(name, method.config(), bench, query)
        if store.get(name, s, q, key) is None:
          store.put(name, s, q, key, method.score(query, context))
          count += 1
    log(f"evaluate: {name}: {count} queries scored in {time.time() - t0:.1f}s")


def _abu_settings(settings: dict, preconditioner: str) -> runner.AbUSettings:
  a = settings["abu"]
  return runner.AbUSettings(
      fisher=fisher_lib.FisherSettings(selection="cross-attn-kv", num_epochs=a["fisher_epochs"],
                                       batch_size=a["batch_size"], seed=a["seed"]),
      unlearn=unlearn_lib.UnlearnSettings(
          alpha=a["alpha"], num_steps=a["num_steps"], num_draws=a["num_draws"],
          draws_per_batch=a["draws_per_batch"], micro_batch=a["draws_per_batch"],
          seed=a["seed"], selection="cross-attn-kv"),
      sweep=sweep_lib.SweepSettings(timesteps=tuple(a["timesteps"]),
                                    num_captions=a["num_captions"], flips=(0,), seed=a["seed"],
                                    method="jvp", items_per_device=a["items_per_device"]),
      preconditioner=preconditioner,
      ekfac=runner.EKFACBlock(num_epochs=a["ekfac_epochs"], batch_size=a["batch_size"],
                              seed=a["seed"], damping_scale=a["damping_scale"]))


class _SharedUnlearn(runner.AbU):
  """runner.AbU whose unlearning step is shared between the protocols' instances: θ' depends
  on the query, the model and the preconditioner, not on the candidates' captions. With
  `preconditioner` given (the base model's Fisher / EK-FAC), that one is used instead of the
  customized model's own."""

  def __init__(self, *args, shared: dict, preconditioner: Any = None, **kwargs):
    super().__init__(*args, **kwargs)
    self._shared = shared
    if preconditioner is not None:
      if self.settings.preconditioner == "ekfac":
        self._ekfac = preconditioner
      else:
        self._fisher = preconditioner

  def unlearn(self, query, region=None):
    key = (generation.query_digest(query), self.settings.preconditioner, region is None)
    if key not in self._shared:
      self._shared.clear()        # one query at a time: θ' is a whole model
      self._shared[key] = super().unlearn(query, region)
    return self._shared[key]


def abu_queries(bench: Benchmark, settings: dict) -> dict[str, list[str]]:
  """The queries AbU / AbU+ run on: the first `queries_per_set` of each set, by name."""
  k = int(settings["abu"]["queries_per_set"])
  return {s: [q for q, _ in items][:k] if k > 0 else [q for q, _ in items]
          for s, items in bench.queries.items()}


def run_set_methods(bench: Benchmark, settings: dict, store: ScoreStore, cache_dir: str,
                    log) -> dict[str, float]:
  """caption, caption-words, trak, d-trak, abu, abu+ per (set, protocol) on the set's
  customized model. Returns seconds spent per method."""
  wanted = [m for m in TEXT_METHODS + MODEL_METHODS if m in settings["methods"]]
  seconds = {m: 0.0 for m in wanted}
  if not wanted:
    return seconds
  base_ex = None
  if "plain" in settings["protocols"]:
    base_ex = exemplar_arrays(bench, bench.base_pipe, "plain",
                              os.path.join(cache_dir, "arrays_plain"), log)
  apply_fn = bench.base_pipe.apply_unet   # one object: jitted programs compile once for all sets
  abu_subset = abu_queries(bench, settings)
  trak_config = {"proj_dim": settings["trak"]["proj_dim"],
                 "timesteps": tuple(settings["trak"]["timesteps"]),
                 "selection": settings["trak"]["selection"], "flips": (0,),
                 "batch_size": settings["trak"]["batch_size"],
                 "damping": settings["trak"]["damping"]}
  base_preconditioners: dict[str, Any] = {}

  def base_preconditioner(method_name: str, abu_settings: runner.AbUSettings) -> Any:
    """The base model's Fisher / EK-FAC over the plain-protocol candidates, once (on disk)."""
    if method_name not in base_preconditioners:
      ex = base_ex if base_ex is not None else exemplar_arrays(
          bench, bench.base_pipe, "plain", os.path.join(cache_dir, "arrays_plain"), log)
      base = runner.AbU(apply_fn, bench.base_pipe.unet_params, candidate_arrays(bench, ex),
                        bench.base_pipe.schedule, abu_settings,
                        os.path.join(cache_dir, "abu", "base"),
                        cache_dir=os.path.join(cache_dir, "abu", "base"), log=log)
      t0 = time.time()
      base_preconditioners[method_name] = (base.ekfac if abu_settings.preconditioner == "ekfac"
                                           else base.fisher)
      log(f"evaluate: the base model's {abu_settings.preconditioner} in {time.time() - t0:.0f}s")
    return base_preconditioners[method_name]

  meter = scores_lib.ProgressMeter("evaluate sets", len(bench.sets), "sets")
  for number, s in enumerate(bench.sets, 1):
    name = s["name"]
    delta_dir = os.path.join(bench.workdir, "sets", name, "delta")
    _need(os.path.join(delta_dir, delta_lib.META_FILE), f"the customization delta of {name!r}")
    model = _delta_digest(delta_dir)
    items = bench.queries[name]
    pipe = None
    shared: dict = {}

    def customized():
      nonlocal pipe
      if pipe is None:
        pipe = delta_lib.apply_delta(bench.base_pipe, delta_lib.load_delta(delta_dir))
      return pipe

    for protocol in settings["protocols"]:
      set_cache = os.path.join(cache_dir, "models", name, protocol)
      contexts: dict[str, Any] = {}

      def context():
        if "c" not in contexts:
          ex = base_ex if protocol == "plain" else exemplar_arrays(
              bench, customized(), "token", os.path.join(set_cache, "arrays"), log)
          p = customized()
          contexts["c"] = baselines.Context(
              arrays=candidate_arrays(bench, ex), captions=bench.candidate_captions(protocol),
              apply_fn=apply_fn, params=p.unet_params, schedule=p.schedule, module=p.unet,
              cache_dir=set_cache, progress=None)
        return contexts["c"]

      for method_name in wanted:
        label = f"{method_name}.{protocol}"
        t0 = time.time()
        if method_name in TEXT_METHODS + ("trak", "d-trak"):
          config = trak_config if method_name in ("trak", "d-trak") else {}
          method = baselines.make_method(method_name, **config)
          todo = [(q, query) for q, query in items
                  if store.get(label, name, q, method_key(label, method.config(), bench, query,
                                                          model)) is None]
          if todo:
            scores = method.score_many([query for _, query in todo], context())
            for (q, query), row in zip(todo, scores):
              store.put(label, name, q, method_key(label, method.config(), bench, query, model),
                        row)
        else:
          abu_settings = _abu_settings(settings, runner.METHOD_PRECONDITIONER[method_name])
          key_settings = json.loads(json.dumps(dataclasses.asdict(abu_settings), default=str))
          key_settings["preconditioner_model"] = settings["abu"]["preconditioner_model"]
          todo = [(q, query) for q, query in items if q in abu_subset[name]
                  and store.get(label, name, q, method_key(label, key_settings, bench, query,
                                                           model)) is None]
          if todo:
            c = context()
            shared_preconditioner = None
            if settings["abu"]["preconditioner_model"] == "base":
              shared_preconditioner = base_preconditioner(method_name, abu_settings)
            abu = _SharedUnlearn(
                apply_fn, c.params, c.arrays, c.schedule, abu_settings,
                os.path.join(cache_dir, "abu", name, protocol,
                             settings["abu"]["preconditioner_model"],
                             runner.out_dir_name(abu_settings)),
                cache_dir=os.path.join(cache_dir, "abu", name, "preconditioners"),
                log=lambda m: None, shared=shared, preconditioner=shared_preconditioner)
            for q, query in todo:
              result = abu.score(query, q)
              if not np.array_equal(result["index"], c.arrays["index"]):
                raise ValueError(f"{label}: AbU's result is not aligned with the candidates")
              store.put(label, name, q, method_key(label, key_settings, bench, query, model),
                        result["scores"])
        seconds[method_name] += time.time() - t0
    done = meter(number)
    log(f"evaluate: set {number}/{len(bench.sets)} ({name}) done, ETA {done.eta_s:.0f}s")
  return seconds


# ----------------------------------------------------------------------- the metrics ---

def method_labels(settings: dict) -> list[str]:
  """Every score column, in table order: image methods, tuned, then per protocol."""
  out = [m for m in IMAGE_METHODS if m in settings["methods"]]
  for tuned, backbone in TUNED_METHODS.items():
    if tuned in settings["methods"]:
      out.append(tuned)
  for m in TEXT_METHODS + MODEL_METHODS:
    if m in settings["methods"]:
      out += [f"{m}.{p}" for p in settings["protocols"]]
  return out


def collect(bench: Benchmark, store: ScoreStore, label: str) -> dict[tuple[str, str], np.ndarray]:
  """(set, query) -> scores of every query the store holds for `label` (any key: call after
  the runs, which have rewritten every stale file)."""
  out = {}
  for s, items in bench.queries.items():
    for q, _ in items:
      path = store.path(label, s, q)
      if os.path.exists(path):
        with io_utils.open_npz(path) as data:
          out[(s, q)] = np.asarray(data["scores"], np.float64)
  return out


def metric_rows(bench: Benchmark, scores: Mapping[str, Mapping[tuple[str, str], np.ndarray]],
                recall_fraction: float) -> tuple[list[dict], dict]:
  """Rows (method, split) with Recall@5/@10/@K and mAP (mean ± s.e. over queries, n), and the
  per-query AP of every (method, split) for paired comparisons."""
  from attrib_jax.abc import metrics  # pylint: disable=g-import-not-at-top
  split = _split_of(bench)
  k_big = max(1, int(round(recall_fraction * bench.num_candidates)))
  rows, per_query = [], {}
  for label, by_query in scores.items():
    for sp in SPLITS:
      keys = sorted(k for k in by_query if split[k[0]] == sp)
      if not keys:
        continue
      s = np.stack([by_query[k] for k in keys])
      pos = np.stack([bench.positives(k[0]) for k in keys])
      values = {"recall@5": metrics.recall_at_k(s, pos, 5),
                "recall@10": metrics.recall_at_k(s, pos, 10),
                "recall@K": metrics.recall_at_k(s, pos, k_big),   # K = k_big (summary)
                "map": metrics.average_precision(s, pos)}
      row = {"method": label.split(".")[0],
             "protocol": label.split(".")[1] if "." in label else "-",
             "split": sp, "n": len(keys)}
      for name, v in values.items():
        mean, se = metrics.mean_and_se(np.asarray(v, np.float64))
        row[name], row[name + "_se"] = float(mean), float(se)
      rows.append(row)
      per_query[(label, sp)] = dict(zip(keys, np.asarray(values["map"], np.float64)))
  return rows, {"k_big": k_big, "per_query_ap": per_query}


def paired_difference(per_query_ap: Mapping, a: str, b: str, sp: str) -> dict | None:
  """AP(a) − AP(b) over the queries both scored in split `sp`: mean, s.e., z, n."""
  from attrib_jax.abc import metrics  # pylint: disable=g-import-not-at-top
  pa, pb = per_query_ap.get((a, sp)), per_query_ap.get((b, sp))
  if not pa or not pb:
    return None
  keys = sorted(set(pa) & set(pb))
  diff = np.asarray([pa[k] - pb[k] for k in keys], np.float64)
  mean, se = metrics.mean_and_se(diff)
  z = float(mean / se) if se > 0 else (math.inf if mean > 0 else 0.0)
  return {"a": a, "b": b, "split": sp, "n": len(keys), "mean": float(mean), "se": float(se),
          "z": z, "beats_by_2se": bool(mean > 2 * se)}


def calibration_rows(bench: Benchmark, scores: Mapping[str, Mapping], labels: Sequence[str],
                     settings: dict) -> tuple[list[dict], dict]:
  """Per method: a calibrator fitted on the tune split's queries; per test split, NLL of the
  calibrated probabilities vs the uncalibrated softmax, true mass, top-1 ECE
  (`calibration.top1_reliability`). Returns the rows and the reliability curves (the figure)."""
  from attrib_jax.abc import calibration  # pylint: disable=g-import-not-at-top
  split = _split_of(bench)
  rows, curves = [], {}
  for label in labels:
    by_query = scores.get(label, {})
    tune = sorted(k for k in by_query if split[k[0]] == "tune")
    if not tune:
      continue
    s_tune = np.stack([by_query[k] for k in tune])
    pos_tune = np.stack([bench.positives(k[0]) for k in tune])
    cal = calibration.fit_calibrator(s_tune, pos_tune, **settings["calibration"])
    test = sorted(k for k in by_query if split[k[0]] != "tune")
    for sp in ("all_test",) + SPLITS[1:]:
      keys = [k for k in test if sp == "all_test" or split[k[0]] == sp]
      if not keys:
        continue
      s = np.stack([by_query[k] for k in keys])
      pos = np.stack([bench.positives(k[0]) for k in keys])
      p_cal = np.asarray(calibration.probabilities(cal, s))
      p_raw = np.asarray(calibration.softmax_probabilities(s))
      rel = calibration.top1_reliability(p_cal, pos)
      rel_raw = calibration.top1_reliability(p_raw, pos)
      nll_cal = np.asarray(calibration.negative_log_likelihood(p_cal, pos), np.float64)
      nll_raw = np.asarray(calibration.negative_log_likelihood(p_raw, pos), np.float64)
      row = {"method": label, "split": sp, "n": len(keys), "inv_tau": float(cal.inv_tau),
             "bias": float(cal.bias),
             "nll": float(nll_cal.mean()), "nll_se": float(nll_cal.std(ddof=1) / np.sqrt(
                 len(keys))) if len(keys) > 1 else float("nan"),
             "nll_softmax": float(nll_raw.mean()),
             "true_mass": float(np.mean(calibration.true_mass(p_cal, pos))),
             "true_mass_softmax": float(np.mean(calibration.true_mass(p_raw, pos))),
             "ece": float(rel["ece"]), "ece_softmax": float(rel_raw["ece"]),
             "top1_confidence": float(np.mean(p_cal.max(axis=1))),
             "top1_confidence_softmax": float(np.mean(p_raw.max(axis=1)))}
      row["calibrated_lower_nll"] = bool(row["nll"] < row["nll_softmax"])
      rows.append(row)
      if sp == "all_test":
        curves[label] = {"calibrated": rel, "softmax": rel_raw}
  return rows, curves


def calibrators(bench: Benchmark, scores: Mapping[str, Mapping], labels: Sequence[str],
                settings: dict) -> dict:
  """label -> the calibrator fitted on the tune split (for the report's probabilities)."""
  from attrib_jax.abc import calibration  # pylint: disable=g-import-not-at-top
  split = _split_of(bench)
  out = {}
  for label in labels:
    tune = sorted(k for k in scores.get(label, {}) if split[k[0]] == "tune")
    if tune:
      out[label] = calibration.fit_calibrator(
          np.stack([scores[label][k] for k in tune]),
          np.stack([bench.positives(k[0]) for k in tune]), **settings["calibration"])
  return out


# ------------------------------------------------------------------------- the stage ---

def run_evaluation(config: Any, workdir: str,
                   progress: Callable[[str], None] | None = None) -> dict:
  """The evaluate stage (module doc). Returns summary.json's content."""
  from attrib_jax.abc import report  # pylint: disable=g-import-not-at-top
  log = _log_fn(progress)
  settings = settings_from_config(config)
  t_start = time.time()
  bench = load_benchmark(config, workdir, log)
  out_dir = os.path.join(workdir, "evaluation")
  cache_dir = os.path.join(out_dir, "cache", bench.digest)
  store = ScoreStore(os.path.join(out_dir, "scores"))
  timings = {}

  t0 = time.time()
  run_image_methods(bench, settings, store, cache_dir, log)
  timings["image_methods"] = time.time() - t0
  t0 = time.time()
  run_tuned(bench, settings, store, os.path.join(workdir, "features"), log)
  timings["tuned"] = time.time() - t0
  t0 = time.time()
  timings.update({f"set_methods/{k}": v for k, v in
                  run_set_methods(bench, settings, store, cache_dir, log).items()})
  timings["set_methods"] = time.time() - t0

  labels = method_labels(settings)
  scores = {label: collect(bench, store, label) for label in labels}
  rows, extra = metric_rows(bench, scores, settings["recall_fraction"])
  k_big = extra["k_big"]
  bar = []
  for tuned, backbone in TUNED_METHODS.items():
    if tuned in labels and backbone in labels:
      for sp in SPLITS:
        found = paired_difference(extra["per_query_ap"], tuned, backbone, sp)
        if found:
          bar.append(found)
  feature_methods = [m for m in ("pixel", "features", "dino", "clip") if m in labels]
  tune_map = {r["method"]: r["map"] for r in rows if r["split"] == "tune"
              and r["protocol"] == "-"}
  best_feature = max(feature_methods, key=lambda m: tune_map.get(m, -1.0), default=None)
  cal_labels = [m for m in labels]      # cheap: every method with tune scores
  cal_rows, curves = calibration_rows(bench, scores, cal_labels, settings)
  # The best feature method and its tuned versions, and the unlearning method and the text
  # baseline in the reference's protocol: AbU+'s raw softmax is the overconfident one.
  shown = [m for m in ([best_feature] if best_feature else []) + list(TUNED_METHODS)
           + ["abu+.token", "caption.token"] if m in curves]
  report.write_tables(out_dir, rows, k_big, cal_rows)
  report.plot_reliability(os.path.join(out_dir, "reliability.png"),
                          {m: curves[m] for m in shown})
  cals = calibrators(bench, scores, labels, settings)
  report.write_html(os.path.join(out_dir, "report.html"), bench, scores, cals, rows, k_big,
                    cal_rows, settings)
  timings["total"] = time.time() - t_start
  summary = {
      "num_sets": len(bench.sets), "num_queries": sum(len(v) for v in bench.queries.values()),
      "num_candidates": bench.num_candidates, "num_exemplars": bench.num_exemplars,
      "recall_k": [5, 10, k_big], "methods": labels,
      "abu_queries_per_set": int(settings["abu"]["queries_per_set"]),
      "tuned_vs_backbone": bar,
      "bar_tuned_beats_backbone_unseen_2se": {
          b["a"]: b["beats_by_2se"] for b in bar if b["split"] == "test_unseen"},
      "best_feature_method_on_tune": best_feature,
      "calibration": cal_rows, "table": rows, "seconds": timings,
      "scores": {"reused": store.reused, "written": store.written},
      "settings": json.loads(json.dumps(settings, default=str)),
  }
  io_utils.atomic_write_json(os.path.join(out_dir, "summary.json"), summary)
  log(f"evaluate: done in {timings['total']:.0f}s ({store.written} score files written, "
      f"{store.reused} reused); table in {os.path.join(out_dir, 'table.md')}")
  return summary
