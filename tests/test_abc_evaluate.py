"""AbC's evaluate stage (attrib_jax.abc.evaluate) on a synthetic tiny workdir: the smoke world's
data and text side (recipe.prepare) with a random UNet as the base, four sets (one per split),
random deltas, random queries, random in-world towers. Checks: every method's score vector is
finite and C long, the table equals brute-force metrics, a rerun reuses every score file,
a missing input is named."""
import csv
import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from attrib_jax import generation
from attrib_jax import io_utils
from attrib_jax.attribution import selection
from attrib_jax.abc import evaluate
from attrib_jax.customization import delta as delta_lib
from attrib_jax.models import clip_vision
from attrib_jax.models import image_processing
from attrib_jax.models import pipeline as pipeline_lib
from attrib_jax.models import unet as unet_lib
from attrib_jax.models import vit
from attrib_jax.training import recipe

import configs.tiny

SETS = [("obj_tune", "object", "tune", 1), ("obj_tune2", "object", "tune", 1),
        ("obj_seen", "object", "test_seen", 1), ("obj_unseen", "object", "test_unseen", 1),
        ("style_a", "style", "test_style", 2)]
QUERIES_PER_SET = 2
TOWER = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
             image_size=16, patch_size=8)


def _base(root: str) -> ml_collections.ConfigDict:
  """The smoke world, its text side and precomputed arrays, and an untrained UNet."""
  config = configs.tiny.get_config("smoke")
  with config.unlocked():
    config.world.num_items = 40
  base = os.path.join(root, "base")
  _, _, model_dir = recipe.prepare(config, base, log=lambda m: None)
  unet_config = dict(config.unet.to_dict())
  _, params = unet_lib.init_unet(unet_config, jax.random.key(0))
  pipeline_lib.save_unet(os.path.join(model_dir, "unet"), params, unet_config)
  io_utils.atomic_write_json(os.path.join(model_dir, "DONE.json"),
                             {"fingerprint": "test", "settings": {"config": config.to_dict()}})
  return config


def _towers(root: str) -> None:
  module, params = vit.init_vit(TOWER, jax.random.key(5))
  vit.save_vit(os.path.join(root, "towers", "dino"), params, dict(TOWER, model_type="vit"))
  image_processing.save_image_processor(os.path.join(root, "towers", "dino"), dict(
      image_processor_type="ViTImageProcessor", size={"height": 16, "width": 16}))
  _, params = clip_vision.init_clip_vision(dict(TOWER, projection_dim=8), jax.random.key(6))
  clip_vision.save_clip_vision(os.path.join(root, "towers", "clip"), params,
                               dict(TOWER, projection_dim=8))
  image_processing.save_image_processor(os.path.join(root, "towers", "clip"), dict(
      image_processor_type="CLIPImageProcessor", size={"shortest_edge": 16},
      crop_size={"height": 16, "width": 16}))
  del module


def _benchmark(root: str) -> None:
  """sets.json, exemplars, a random delta and random queries per set (the layout contract)."""
  pipe = pipeline_lib.load_pipeline(os.path.join(root, "base", "model"))
  rng = np.random.default_rng(0)
  sets, images, meta = [], [], []
  words = ["circle", "square", "ring", "cross", "star", "moon"]
  for i, (name, kind, split, count) in enumerate(SETS):
    rows = list(range(len(meta), len(meta) + count))
    for _ in range(count):
      images.append(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
      meta.append({"set": name, "caption": f"a red {words[i]}",
                   "token_caption": f"<new1> a red {words[i]}"})
    sets.append({"name": name, "kind": kind, "category": words[i], "split": split,
                 "exemplar_rows": rows})
    kv = {k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32)
          for k, v in _kv(pipe).items()}
    table = traverse_util.flatten_dict(pipe.text_params)[delta_lib.TABLE_PATH]
    delta = delta_lib.CustomDelta(
        kv=kv, token="<new1>", token_id=int(table.shape[0]),
        embedding_row=rng.standard_normal(table.shape[1]).astype(np.float32),
        initializer="ktn", base=delta_lib.base_fingerprint(pipe))
    delta_lib.save_delta(os.path.join(root, "sets", name, "delta"), delta)
    custom = delta_lib.apply_delta(pipe, delta)
    encode = pipeline_lib.make_text_encoder_fn(custom.text_encoder, custom.text_params,
                                               custom.tokenizer)
    for q in range(QUERIES_PER_SET):
      prompt = f"<new1> a blue {words[i]}"
      latent = rng.uniform(-1, 1, pipe.latent_shape).astype(np.float32)
      image = pipeline_lib.latents_to_images(pipe, latent[None])[0]
      generation.save_query(os.path.join(root, "sets", name, "queries", f"q{q:02d}"),
                            generation.Query(latent, encode([prompt])[0], image,
                                             {"set": name, "prompt": prompt, "seed": q}))
  io_utils.atomic_savez(os.path.join(root, "exemplars", "images.npz"), images=np.stack(images))
  io_utils.atomic_write_json(os.path.join(root, "exemplars", "exemplars.json"), meta)
  io_utils.atomic_write_json(os.path.join(root, "sets.json"), sets)


def _kv(pipe):
  """The base's K/V weights by path name (what a delta holds)."""
  paths = delta_lib.kv_paths(pipe.unet_params)
  return {name: np.asarray(v) for p, v in traverse_util.flatten_dict(pipe.unet_params).items()
          for name in [selection.path_name(p)] if name in paths}


CONFIG = ml_collections.ConfigDict({"evaluation": {
    "abu": {"queries_per_set": 1, "num_draws": 16, "draws_per_batch": 8,
            "timesteps": (100, 600), "batch_size": 16},
    "trak": {"proj_dim": 16, "timesteps": (300,), "batch_size": 16},
    "tuning": {"steps": 20},
    "calibration": {"steps": 50},
    "report": {"top_k": 5, "queries_per_set": 1}}})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("abc"))
  _base(root)
  _towers(root)
  _benchmark(root)
  summary = evaluate.run_evaluation(CONFIG, root, progress=lambda m: None)
  return root, summary


def _num_candidates(root):
  with open(os.path.join(root, "exemplars", "exemplars.json")) as f:
    e = len(json.load(f))
  return e + 40


def test_every_method_scores_every_query(workdir):
  root, summary = workdir
  c = _num_candidates(root)
  assert summary["num_candidates"] == c
  labels = evaluate.method_labels(evaluate.settings_from_config(CONFIG))
  assert set(labels) == set(summary["methods"]) and len(labels) == 5 + 2 + 2 * 6
  for label in labels:
    for name, _, _, _ in SETS:
      for q in range(QUERIES_PER_SET):
        path = os.path.join(root, "evaluation", "scores", label, name, f"q{q:02d}.npz")
        if label.startswith("abu") and q >= 1:       # AbU: the first query of each set only
          assert not os.path.exists(path)
          continue
        with np.load(path) as data:
          s = data["scores"]
        assert s.shape == (c,) and np.isfinite(s).all(), (label, name, q)
        assert np.ptp(s) > 0, (label, name, q)    # a method that scores all alike says nothing
  for name in ("table.csv", "table.md", "summary.json", "calibration.csv", "calibration.md",
               "reliability.png", "report.html"):
    assert os.path.getsize(os.path.join(root, "evaluation", name)) > 0
  assert any(b["split"] == "test_unseen" for b in summary["tuned_vs_backbone"])


def _brute(scores, positives, k=None):
  """Recall@k or AP by sorting (ties pessimistic: negatives first), float64."""
  order = np.lexsort((positives, -scores))     # by score desc, then negatives before positives
  hits = positives[order]
  if k is not None:
    return hits[:k].sum() / hits.sum()
  ranks = np.flatnonzero(hits) + 1
  return np.mean(np.arange(1, ranks.size + 1) / ranks)


def test_table_matches_brute_force(workdir):
  root, summary = workdir
  with open(os.path.join(root, "sets.json")) as f:
    sets = {s["name"]: s for s in json.load(f)}
  with open(os.path.join(root, "evaluation", "table.csv")) as f:
    table = list(csv.DictReader(f))
  k_big = summary["recall_k"][2]
  assert k_big == max(1, round(0.1 * summary["num_candidates"]))
  checked = 0
  for row in table:
    label = row["method"] + ("" if row["protocol"] == "-" else "." + row["protocol"])
    values = {"recall@5": [], "recall@10": [], "recall@K": [], "map": []}
    for name, s in sets.items():
      if s["split"] != row["split"]:
        continue
      for q in range(QUERIES_PER_SET):
        path = os.path.join(root, "evaluation", "scores", label, name, f"q{q:02d}.npz")
        if not os.path.exists(path):
          continue
        with np.load(path) as data:
          scores = data["scores"]
        pos = np.zeros(scores.size, bool)
        pos[s["exemplar_rows"]] = True
        for metric, k in (("recall@5", 5), ("recall@10", 10), ("recall@K", k_big)):
          values[metric].append(_brute(scores, pos, k))
        values["map"].append(_brute(scores, pos))
    assert int(row["n"]) == len(values["map"]) > 0
    for key, v in values.items():
      np.testing.assert_allclose(float(row[key]), np.mean(v), atol=1e-9, err_msg=(label, key))
      se = np.std(v, ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
      if np.isfinite(se):
        np.testing.assert_allclose(float(row[key + "_se"]), se, atol=1e-9)
    checked += 1
  assert checked == len(summary["methods"]) * 4


def test_rerun_reuses_every_score(workdir):
  root, first = workdir
  scores_dir = os.path.join(root, "evaluation", "scores")
  files = [os.path.join(d, f) for d, _, fs in os.walk(scores_dir) for f in fs]
  mtimes = {f: os.stat(f).st_mtime_ns for f in files}
  victim = os.path.join(scores_dir, "pixel", "obj_seen", "q01.npz")
  os.remove(victim)                                  # as if killed before this one was written
  summary = evaluate.run_evaluation(CONFIG, root, progress=lambda m: None)
  assert summary["scores"]["written"] == 1
  assert summary["scores"]["reused"] >= len(files) - 1
  for f, t in mtimes.items():
    if f != victim:
      assert os.stat(f).st_mtime_ns == t, f
  assert json.dumps(summary["table"]) == json.dumps(first["table"])   # NaN s.e. where n = 1


def test_missing_inputs_are_named(workdir, tmp_path):
  root, _ = workdir
  with pytest.raises(FileNotFoundError, match="sets.json"):
    evaluate.run_evaluation(CONFIG, str(tmp_path), progress=lambda m: None)
  delta_dir = os.path.join(root, "sets", "style_a", "delta")
  shutil.move(delta_dir, str(tmp_path / "aside"))
  try:
    only_text = ml_collections.ConfigDict({"evaluation": {"methods": ("caption",)}})
    with pytest.raises(FileNotFoundError, match="style_a.*delta|delta.*style_a"):
      evaluate.run_evaluation(only_text, root, progress=lambda m: None)
  finally:
    shutil.move(str(tmp_path / "aside"), delta_dir)
  with pytest.raises(ValueError, match="unknown method"):
    evaluate.settings_from_config(ml_collections.ConfigDict({"evaluation": {"methods": ("x",)}}))
