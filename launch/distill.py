r"""FastGDA: teacher data, student training, index and mAP(L) (SPEC §5).

  python -m launch.distill --config=configs/distill_tiny.py --workdir=runs/tiny
  python -m launch.distill --config=configs/distill_tiny.py --workdir=runs/tiny \
      --config.distill.stages='("train", "index", "eval")'     # some stages only

Reads workdir/model, workdir/precomputed and workdir/queries (the test queries, from
launch.generate); writes workdir/distill/:
  train_queries/<name>/    training queries (generated, fresh prompts)        stage "queries"
  teacher/<name>.npz       AbU+ over the query's C candidates                 stage "teacher"
  (test queries)           AbU+ over every item: workdir/attribution_plus/    stage "test"
  features.npz             the student's input features of every training item
  student.npz              the student (and student_regression.npz)           stage "train"
  embeddings.npy, index/   unit item embeddings and their ScaNN index         stage "index"
  eval.json                mAP(L) of the student beside baselines             stage "eval"
Every stage and every query is kept once done and reused by a rerun.
"""
import dataclasses
import hashlib
import json
import os
import time

from absl import app
from absl import flags
import numpy as np
from ml_collections import config_flags

from attrib_jax import baselines
from attrib_jax import generation
from attrib_jax import io_utils
from attrib_jax import parallel
from attrib_jax.attribution import runner
from attrib_jax.data import precompute
from attrib_jax.distill import index as index_lib
from attrib_jax.distill import metrics
from attrib_jax.distill import student as student_lib
from attrib_jax.distill import teacher as teacher_lib
from attrib_jax.training import recipe
from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
flags.mark_flags_as_required(["config", "workdir"])

STAGES = ("queries", "teacher", "test", "train", "index", "eval")


def training_prompts(config, test_prompts: set[str]) -> list[str]:
  """T prompts distinct from every test query's (and from each other)."""
  d = config.distill
  if d.prompts:
    prompts = [p for p in d.prompts if p not in test_prompts]
  elif config.world.kind == "tiny_world":
    from attrib_jax.data import tiny_world  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng([config.generate.seed, d.query_seed])
    prompts, seen = [], set(test_prompts)
    for _ in range(100 * d.num_train_queries):
      if len(prompts) == d.num_train_queries:
        break
      prompt = tiny_world.caption_scene(tiny_world.sample_scene(rng))[0]
      if prompt not in seen:
        seen.add(prompt)
        prompts.append(prompt)
  else:
    raise ValueError(f"distill: world kind {config.world.kind!r} has no scene sampler; set "
                     "config.distill.prompts to the training queries' prompts")
  if len(prompts) < d.num_train_queries:
    raise ValueError(f"distill: only {len(prompts)} training prompts distinct from the test "
                     f"queries' for distill.num_train_queries = {d.num_train_queries}")
  return prompts[:d.num_train_queries]


def digest(*arrays: np.ndarray) -> str:
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(str((a.dtype, a.shape)).encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def main(argv):
  del argv
  common.start()
  config, workdir = _CONFIG.value, _WORKDIR.value
  d = config.distill
  unknown = sorted(set(d.stages) - set(STAGES))
  if unknown:
    raise ValueError(f"distill.stages: unknown {unknown}; stages are {STAGES}")
  out = os.path.join(workdir, "distill")
  os.makedirs(out, exist_ok=True)
  t_start = time.time()
  pipe = common.load_trained_pipeline(workdir)
  arrays = precompute.load(os.path.join(workdir, "precomputed"))
  num_items = len(arrays["index"])
  settings = runner.AbUSettings.from_config(config.attribution)
  out_dir, cache_dir = runner.workdir_dirs(workdir, settings)
  abu = runner.AbU(pipe.apply_unet, pipe.unet_params, arrays, pipe.schedule, settings, out_dir,
                   cache_dir=cache_dir, mesh=parallel.make_mesh(), log=common.log)
  featurizer = teacher_lib.Featurizer(pipe, arrays,
                                      teacher_lib.FeatureSettings(**dict(d.features)))
  test_dirs = generation.list_queries(os.path.join(workdir, "queries"))
  test_queries = [generation.load_query(q) for q in test_dirs]
  test_names = [os.path.basename(q.rstrip("/")) for q in test_dirs]
  timings = {}

  # Item features: every stage after "queries" reads them.
  features_path = os.path.join(out, "features.npz")
  model_key = abu.model_fingerprint + json.dumps(dict(d.features), sort_keys=True)
  if os.path.exists(features_path) and str(np.load(features_path)["key"]) == model_key:
    item_features = np.load(features_path)["features"]
  else:
    t0 = time.time()
    item_features = featurizer.items()
    io_utils.atomic_savez(features_path, features=item_features, key=np.asarray(model_key))
    common.log(f"features: {num_items} items, {item_features.shape[1]}-d, "
               f"{time.time() - t0:.1f}s")
  image_dim = item_features.shape[1] - arrays["text_states"].shape[-1]

  def item_captions() -> list:
    source = recipe.open_dataset(config, os.path.join(workdir, "tfds"))
    return source.get_items(np.asarray(arrays["index"]))[1]

  # Stage "queries": the training queries, generated from fresh prompts.
  train_root = os.path.join(out, "train_queries")
  prompts = training_prompts(config, {q.info.get("prompt") for q in test_queries})
  names = [f"train_{i:05d}" for i in range(len(prompts))]
  if "queries" in d.stages:
    t0 = time.time()
    g = config.generate
    todo = [i for i, n in enumerate(names)
            if not os.path.exists(os.path.join(train_root, n, "query.json"))]
    common.log(f"queries: {len(names) - len(todo)} of {len(names)} training queries kept, "
               f"{len(todo)} to generate")
    eta = common.Eta("queries", len(todo))
    for start in range(0, len(todo), g.batch_size):
      batch = todo[start:start + g.batch_size]
      made = generation.generate(
          pipe, [prompts[i] for i in batch], [100_000 * d.query_seed + i for i in batch],
          sampler=g.sampler, num_steps=g.num_steps, guidance_scale=g.guidance_scale, eta=g.eta,
          batch_size=g.batch_size)
      for i, query in zip(batch, made):
        generation.save_query(os.path.join(train_root, names[i]), query, {"split": "train"})
      eta(start + len(batch), "queries")
    timings["queries"] = time.time() - t0

  # Stage "teacher": AbU+ over each training query's candidates.
  teacher_root = os.path.join(out, "teacher")
  os.makedirs(teacher_root, exist_ok=True)
  candidates_by = d.get("candidates_by", "image")
  if "teacher" in d.stages:
    t0 = time.time()
    eta = common.Eta("teacher", len(names))
    words = None
    if candidates_by == "caption-words":
      words = baselines.make_method("caption-words")
      context = baselines.Context(arrays=arrays, captions=item_captions())
    for i, name in enumerate(names):
      query = generation.load_query(os.path.join(train_root, name))
      q_feature = featurizer.queries([query])[0]
      rows = teacher_lib.candidate_rows(
          q_feature, item_features, d.num_candidates, image_dim, by=candidates_by,
          word_scores=None if words is None else words.score(query, context))
      path = os.path.join(teacher_root, name + ".npz")
      kept = teacher_lib.is_current(path, abu.model_fingerprint, rows)
      if not kept:   # the stage only writes files; a current one need not be read again
        teacher_lib.score_candidates(abu, query, rows, path, log=common.log)
      eta(i + 1, f"training queries ({name}, {rows.size} candidates)", reused=kept)
    timings["teacher"] = time.time() - t0

  # Stage "test": AbU+ over every item for the test queries (shared with launch.attribute).
  if "test" in d.stages:
    t0 = time.time()
    eta = common.Eta("test", len(test_dirs))
    for i, (name, query) in enumerate(zip(test_names, test_queries)):
      abu.score(query, name)
      eta(i + 1, f"test queries ({name}, all {num_items} items)")
    timings["test"] = time.time() - t0

  # Stage "train": the student (and the score-regression baseline) on the teacher data.
  def teacher_data() -> student_lib.TeacherData:
    missing = [n for n in names if not os.path.exists(os.path.join(teacher_root, n + ".npz"))]
    if missing:
      raise FileNotFoundError(f"distill: no teacher data for {len(missing)} training queries "
                              f"({missing[:3]}...): run the 'teacher' stage")
    loaded = [np.load(os.path.join(teacher_root, n + ".npz")) for n in names]
    queries = [generation.load_query(os.path.join(train_root, n)) for n in names]
    return student_lib.TeacherData(featurizer.queries(queries),
                                   np.stack([x["ranked_rows"] for x in loaded]),
                                   np.stack([x["tau"] for x in loaded]))

  students = {"student": student_lib.StudentSettings(
      **dict(d.student, hidden=tuple(d.student.hidden)))}
  if d.regression_baseline:
    students["student_regression"] = dataclasses.replace(students["student"], loss="regression")
  if "train" in d.stages:
    t0 = time.time()
    data = teacher_data()
    data_key = digest(data.query_features, data.ranked_rows, item_features)
    for name, s in students.items():
      path = os.path.join(out, name + ".npz")
      if os.path.exists(path):
        held_settings, _, meta = student_lib.load(path)
        if held_settings == s and meta.get("data") == data_key:
          common.log(f"train: reusing {path}")
          continue
      params, losses = student_lib.train(s, data, item_features, log=common.log)
      student_lib.save(path, s, params, {"data": data_key, "losses": losses})
      common.log(f"train: {name} ({s.loss}) on {data.ranked_rows.size} pairs, loss "
                 f"{losses[0]:.4f} -> {losses[-1]:.4f}")
    timings["train"] = time.time() - t0

  # Stage "index": embed every item once; the ScaNN index over the unit embeddings.
  index_settings = index_lib.IndexSettings(**dict(d.index))
  index_settings = dataclasses.replace(index_settings, k=min(index_settings.k, num_items))
  if "index" in d.stages:
    t0 = time.time()
    s, params, _ = student_lib.load(os.path.join(out, "student.npz"))
    embeddings = student_lib.embed(s, params, item_features)
    io_utils.atomic_save_npy(os.path.join(out, "embeddings.npy"), embeddings)
    index = index_lib.build_index(embeddings, index_settings)
    index.save(os.path.join(out, "index"))
    timings["index"] = time.time() - t0
    common.log(f"index: {index.kind} over {num_items} items ({embeddings.shape[1]}-d) in "
               f"{timings['index']:.1f}s")

  # Stage "eval": mAP(L) on the test queries (teacher = AbU+ over every item).
  if "eval" in d.stages:
    row_of = teacher_lib.index_to_row(arrays)
    teacher_rankings = []
    for name, query in zip(test_names, test_queries):
      result = abu.score(query, name)
      teacher_rankings.append(np.array([row_of[int(i)] for i in result["ranking"]]))
    ls = sorted(set(metrics.scaled_l(d.paper_l, num_items)))   # a tiny world merges some
    rankings = {}
    q_features = featurizer.queries(test_queries)
    for name in students:
      s, params, _ = student_lib.load(os.path.join(out, name + ".npz"))
      rankings[name] = list(student_lib.rank_items(
          params, student_lib.embed(s, params, q_features),
          student_lib.embed(s, params, item_features)))
    untuned = q_features @ item_features.T
    rankings["features (untuned input)"] = list(np.argsort(-untuned, axis=1, kind="stable"))
    image_only = q_features[:, :image_dim] @ item_features[:, :image_dim].T
    rankings["unet image features"] = list(np.argsort(-image_only, axis=1, kind="stable"))
    context = baselines.Context(arrays=arrays, captions=item_captions())
    for method_name in ("caption", "caption-words"):
      method = baselines.make_method(method_name)
      rankings[method_name] = [np.argsort(-method.score(q, context), kind="stable")
                               for q in test_queries]
    table = {name: {str(l): metrics.map_at(r, teacher_rankings, l) for l in ls}
             for name, r in rankings.items()}
    header = " | ".join(f"mAP({l})" for l in ls)
    lines = [f"| method | {header} |", "|---" * (len(ls) + 1) + "|"]
    for name, row in table.items():
      lines.append(f"| {name} | " + " | ".join(f"{m:.3f} ± {se:.3f}" for m, se in row.values())
                   + " |")
    common.log(f"eval: {len(test_queries)} test queries over {num_items} items, L = {ls} "
               f"(scaled from {list(d.paper_l)} of 118,287)\n" + "\n".join(lines))
    io_utils.atomic_write_json(os.path.join(out, "eval.json"), {
        "L": ls, "paper_L": list(d.paper_l), "num_test_queries": len(test_queries),
        "num_items": num_items, "map": table, "table": lines})
  timings["total"] = time.time() - t_start
  common.log(f"distill: done in {timings['total']:.0f}s; stage seconds "
             + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
  io_utils.atomic_write_json(os.path.join(out, "timings.json"), timings)


if __name__ == "__main__":
  app.run(main)
