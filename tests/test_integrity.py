"""Results are never silently wrong: cache keys and resume points cover everything a result
depends on, stored results are checked on load, writes are atomic, non-finite values are
errors, and settings refuse impossible values at construction.

Built on the micro denoiser of test_attribution (same arrays, same settings), so each check
costs a compile of a tiny network.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

import test_attribution as ta
from attrib_jax import generation
from attrib_jax import io_utils
from attrib_jax import parallel
from attrib_jax.attribution import ekfac as ekfac_lib
from attrib_jax.attribution import fisher as fisher_lib
from attrib_jax.attribution import runner
from attrib_jax.attribution import scores
from attrib_jax.attribution import sweep as sweep_lib
from attrib_jax.attribution import unlearn as unlearn_lib
from attrib_jax.evaluation import counterfactual as cf
from attrib_jax.evaluation import eval_report
from attrib_jax.evaluation import lds as lds_lib


@pytest.fixture(scope="module")
def micro():
  arrays = ta.make_arrays(ta.N)
  params = jax.device_get(jax.jit(ta.MicroDenoiser().init)(
      jax.random.key(0), np.zeros((1,) + ta.LATENT), np.zeros((1,), np.int32),
      np.zeros((1, ta.L, ta.D)))["params"])
  return {"arrays": arrays, "params": params}


class Interrupt(Exception):
  pass


def interrupt_after(examples: int):
  def progress(p):
    if p.done >= examples:
      raise Interrupt
  return progress


# ------------------------------------------------------------------- resume points ---

def test_fisher_resumed_with_another_batch_size_and_device_count_counts_each_example_once(
    micro, tmp_path):
  settings = dataclasses.replace(ta.FISHER, batch_size=8, flush_every=1)
  reference = fisher_lib.compute_fisher(ta.APPLY, micro["params"], micro["arrays"], ta.SCHEDULE,
                                        settings=settings, mesh=parallel.make_mesh(8))
  path = str(tmp_path / "fisher_partial.npz")
  with pytest.raises(Interrupt):   # 3 batches of 8 = 24 examples summed and checkpointed
    fisher_lib.compute_fisher(ta.APPLY, micro["params"], micro["arrays"], ta.SCHEDULE,
                              settings=settings, mesh=parallel.make_mesh(8),
                              checkpoint_path=path, progress=interrupt_after(24),
                              progress_every=1)
  # Resumed with batches of 20 on 4 devices: 24 is not a multiple of 20.
  resumed = fisher_lib.compute_fisher(
      ta.APPLY, micro["params"], micro["arrays"], ta.SCHEDULE,
      settings=dataclasses.replace(settings, batch_size=20), mesh=parallel.make_mesh(4),
      checkpoint_path=path)
  for p, ref in reference.values.items():
    np.testing.assert_allclose(resumed.values[p], ref, rtol=1e-5, atol=1e-7 * ref.max())


def test_sweep_checkpoint_is_not_resumed_under_other_timestep_weights(micro, tmp_path):
  after = jax.tree.map(lambda p: p * 1.01, micro["params"])
  path = str(tmp_path / "sweep_partial.npz")
  run = lambda settings, **kw: sweep_lib.sweep(
      ta.APPLY, micro["params"], after, micro["arrays"], ta.SCHEDULE, settings=settings,
      mesh=parallel.make_mesh(8), checkpoint_path=path, checkpoint_every=1, **kw)
  with pytest.raises(Interrupt):
    run(ta.SWEEP, progress=interrupt_after(8), progress_every=1)
  weighted = dataclasses.replace(ta.SWEEP, min_snr_gamma=5.0)
  with pytest.raises(ValueError, match="another sweep"):
    run(weighted)


def test_sweep_checkpoint_is_not_resumed_under_another_schedule(micro, tmp_path):
  after = jax.tree.map(lambda p: p * 1.01, micro["params"])
  path = str(tmp_path / "sweep_partial.npz")
  with pytest.raises(Interrupt):
    sweep_lib.sweep(ta.APPLY, micro["params"], after, micro["arrays"], ta.SCHEDULE,
                    settings=ta.SWEEP, mesh=parallel.make_mesh(8), checkpoint_path=path,
                    checkpoint_every=1, progress=interrupt_after(8), progress_every=1)
  other = ta.NoiseSchedule.from_config({"beta_schedule": "squaredcos_cap_v2",
                                        "num_train_timesteps": 1000})
  with pytest.raises(ValueError, match="another sweep"):
    sweep_lib.sweep(ta.APPLY, micro["params"], after, micro["arrays"], other,
                    settings=ta.SWEEP, mesh=parallel.make_mesh(8), checkpoint_path=path)


# --------------------------------------------------------- results keyed by content ---

def make_query(seed: int, prompt: str) -> generation.Query:
  rng = np.random.default_rng(seed)
  return generation.Query(rng.normal(size=ta.LATENT).astype(np.float32),
                          rng.normal(size=(ta.L, ta.D)).astype(np.float32),
                          rng.integers(0, 256, (8, 8, 3)).astype(np.uint8),
                          {"prompt": prompt, "seed": seed})


def test_attribution_result_under_a_reused_name_is_of_the_new_query(micro, tmp_path):
  """launch.attribute --image=a.png --prompt=A, then the same file with --prompt=B: the
  query directory keeps its name, the result must be B's."""
  settings = runner.AbUSettings(dataclasses.replace(ta.FISHER, num_epochs=1), ta.UNLEARN,
                                ta.SWEEP)
  abu = runner.AbU(ta.APPLY, micro["params"], micro["arrays"], ta.SCHEDULE, settings,
                   str(tmp_path), mesh=parallel.make_mesh(2), log=lambda s: None)
  first = abu.score(make_query(1, "A"), "a")
  query_b = make_query(2, "B")
  second = abu.score(query_b, "a")
  assert second["meta"]["settings"]["query"]["prompt"] == "B"
  assert second["meta"]["settings"].get("query_digest") == generation.query_digest(query_b)
  assert not np.array_equal(second["scores"], first["scores"])
  assert generation.query_digest(make_query(1, "A")) != generation.query_digest(
      make_query(1, "B"))   # the prompt alone changes the key


def test_score_store_under_a_reused_name_scores_the_new_query(tmp_path):
  index = np.arange(5)
  store = eval_report.ScoreStore(str(tmp_path), index)
  scorer = eval_report.Scorer(lambda name, q: q.latent.reshape(-1)[:5].astype(np.float64), "k")
  query_a, query_b = make_query(1, "A"), make_query(2, "B")
  store.get("m", "q", query_a, scorer)
  np.testing.assert_array_equal(store.get("m", "q", query_b, scorer),
                                query_b.latent.reshape(-1)[:5])


class FakeCache:
  """A ModelCache that 'retrains' to θ0 itself and counts the models asked for."""
  recipe_fingerprint = "recipe"

  def __init__(self, params):
    self.base, self.calls = params, 0

  def key(self, excluded):
    return cf.model_key(excluded, self.recipe_fingerprint)

  def params(self, excluded):
    self.calls += 1
    return self.base


LOSS = cf.LossSettings(timestep_stride=250, batch_size=4)


def test_counterfactual_cells_are_keyed_by_query_content_and_feature_settings(micro, tmp_path):
  cache = FakeCache(micro["params"])
  store = cf.ResultStore(str(tmp_path / "cells"))
  cells = [cf.Cell("q", "m", 2, None, (1000, 1007))]
  run = lambda query, **kw: cf.run_counterfactual(
      cells, {"q": query}, cache=cache, base_params=micro["params"], base_fingerprint="θ0",
      apply_fn=ta.APPLY, schedule=ta.SCHEDULE, store=store, loss=LOSS, log=lambda s: None, **kw)
  run(make_query(1, "A"))
  query_b = make_query(2, "B")
  row = run(query_b)[0]
  assert row["loss_base"] == pytest.approx(cf.query_loss(ta.APPLY, micro["params"], query_b,
                                                         ta.SCHEDULE, LOSS))
  # ΔG cells: another feature extractor's settings measure again.
  features = dict(regenerate=lambda params, q: q.image,
                  feature_fn=lambda images: images.reshape(len(images), -1) + 1.0)
  run(query_b, feature_key={"grid": 1}, **features)
  calls = cache.calls
  run(query_b, feature_key={"grid": 1}, **features)
  assert cache.calls == calls            # same settings: reused
  run(query_b, feature_key={"grid": 2}, **features)
  assert cache.calls == calls + 1        # other settings: measured again


def test_lds_rows_are_keyed_by_query_content(micro, tmp_path):
  cache = FakeCache(micro["params"])
  store = cf.ResultStore(str(tmp_path / "lds"))
  index = np.arange(1000, 1010)
  kept = lds_lib.subsets(index, lds_lib.LDSSettings(num_subsets=3))
  run = lambda query: lds_lib.subset_losses(
      kept, index, {"q": query}, [cache], apply_fn=ta.APPLY, schedule=ta.SCHEDULE, store=store,
      base_fingerprint="θ0", loss=LOSS, log=lambda s: None)
  run(make_query(1, "A"))
  query_b = make_query(2, "B")
  np.testing.assert_allclose(run(query_b)[0, :, 0], cf.query_loss(
      ta.APPLY, micro["params"], query_b, ta.SCHEDULE, LOSS))


# ------------------------------------------------------------------ stored versions ---

def test_stored_results_of_another_format_version_are_refused(micro, tmp_path):
  path = str(tmp_path / "result")
  scores.save_result(path, np.zeros(3), np.arange(3), {}, "m")
  meta = json.loads((tmp_path / "result.json").read_text())
  (tmp_path / "result.json").write_text(json.dumps(dict(meta, version=99)))
  with pytest.raises(ValueError, match="version 99"):
    scores.load_result(path)
  fisher = fisher_lib.Fisher({("w",): np.ones(2)}, 4, {"version": 99, "fingerprint": "f",
                                                        "num_examples": 4})
  fisher_lib.save_fisher(str(tmp_path / "fisher.npz"), fisher)
  with pytest.raises(ValueError, match="version 99"):
    fisher_lib.load_fisher(str(tmp_path / "fisher.npz"))
  factors = ekfac_lib.EKFAC(layers={}, num_examples=4,
                            meta={"version": 99, "fingerprint": "f", "num_examples": 4})
  ekfac_lib.save_ekfac(str(tmp_path / "ekfac.npz"), factors)
  with pytest.raises(ValueError, match="version 99"):
    ekfac_lib.load_ekfac(str(tmp_path / "ekfac.npz"))


# ------------------------------------------------------------- non-finite values ---

def test_infinite_scores_are_refused_by_rank():
  for bad in (np.inf, -np.inf, np.nan):
    with pytest.raises(ValueError, match="non-finite"):
      scores.rank(np.array([0.1, bad, 0.3]), np.array([5, 6, 7]))


def test_a_nan_delta_loss_is_an_error_not_a_gap():
  rows = [{"method": "m", "k": 2, "query": f"q{i}", "delta_loss": 0.1 * i} for i in range(15)]
  rows[3]["delta_loss"] = float("nan")
  with pytest.raises(ValueError, match="not finite"):
    cf.summarize(rows)


def test_zero_norm_features_are_an_error_not_a_score_of_zero():
  from attrib_jax.baselines import features  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="norm zero"):
    features.normalize_rows(np.array([[1.0, 2.0], [0.0, 0.0]]))
  image = np.zeros((4, 4, 3), np.uint8)
  with pytest.raises(ValueError, match="undefined"):
    cf.feature_cosine(lambda images: np.zeros((len(images), 3)), image, image)


# ------------------------------------------------------------------ training resume ---

def test_interrupted_training_rerun_with_other_settings_is_refused(tmp_path, monkeypatch):
  """launch.train interrupted, rerun with another learning rate, step count or --excluded:
  an error naming what differs, not a resume of the old run under the new name."""
  import importlib  # pylint: disable=g-import-not-at-top
  from attrib_jax.training import recipe  # pylint: disable=g-import-not-at-top
  config = importlib.import_module("configs.tiny").get_config("smoke")
  arrays = {"text_states": np.zeros((1, 1, 1, config.unet.cross_attention_dim), np.float32)}
  monkeypatch.setattr(recipe, "prepare",
                      lambda config, workdir, log: (None, arrays, os.path.join(workdir, "model")))
  monkeypatch.setattr(recipe, "dataset_version", lambda config: "v")
  monkeypatch.setattr(recipe.unet_lib, "init_unet", lambda *a: (None, None))

  def interrupted_training(*, workdir, **kwargs):
    os.makedirs(os.path.join(workdir, "checkpoints", "40"), exist_ok=True)   # a step was saved
    raise Interrupt
  monkeypatch.setattr(recipe.loop, "train", interrupted_training)
  workdir = str(tmp_path / "run")
  with pytest.raises(Interrupt):
    recipe.run(config, workdir, log=lambda s: None)
  other_lr = config.copy_and_resolve_references()
  other_lr.train.learning_rate = 2 * config.train.learning_rate
  with pytest.raises(ValueError, match="train.learning_rate"):
    recipe.run(other_lr, workdir, log=lambda s: None)
  other_steps = config.copy_and_resolve_references()
  other_steps.train.num_steps = config.train.num_steps + 1
  with pytest.raises(ValueError, match="train.num_steps"):
    recipe.run(other_steps, workdir, log=lambda s: None)
  with pytest.raises(ValueError, match="excluded"):
    recipe.run(config, workdir, excluded=(1, 2), log=lambda s: None)
  with pytest.raises(Interrupt):   # the same settings resume
    recipe.run(config, workdir, log=lambda s: None)
  assert not os.path.exists(os.path.join(workdir, "model", "DONE.json"))


# ------------------------------------------------------------- EK-FAC checkpoints ---

EKFAC = ekfac_lib.EKFACSettings(num_epochs=1, batch_size=8, flush_every=1)


def test_ekfac_factor_passes_resume_from_their_checkpoints(micro, tmp_path, monkeypatch):
  monkeypatch.setattr(ekfac_lib, "_PROGRESS_EVERY", 1)
  compute = lambda **kw: ekfac_lib.compute_ekfac(ta.APPLY, micro["params"], micro["arrays"],
                                                 ta.SCHEDULE, settings=EKFAC, **kw)
  reference = compute(mesh=parallel.make_mesh(8))
  prefix = str(tmp_path / "ekfac_partial")
  seen = []

  def interrupt(stage, examples):
    def progress(p):
      seen.append((p.stage, p.done))
      if p.stage == stage and p.done >= examples:
        raise Interrupt
    return progress
  # Killed within pass 1, resumed on 4 devices with another batch size, killed in pass 2.
  with pytest.raises(Interrupt):
    compute(mesh=parallel.make_mesh(8), checkpoint_path=prefix,
            progress=interrupt("ekfac-covariance", 16))
  seen.clear()
  with pytest.raises(Interrupt):
    ekfac_lib.compute_ekfac(ta.APPLY, micro["params"], micro["arrays"], ta.SCHEDULE,
                            settings=dataclasses.replace(EKFAC, batch_size=12),
                            mesh=parallel.make_mesh(4), checkpoint_path=prefix,
                            progress=interrupt("ekfac-eigenvalues", 24))
  assert seen[0] == ("ekfac-covariance", 16 + 12)     # pass 1 continued after its 16
  seen.clear()
  resumed = compute(mesh=parallel.make_mesh(8), checkpoint_path=prefix, progress=seen.append)
  assert {p.stage for p in seen} == {"ekfac-eigenvalues"}   # pass 1 not run again
  assert seen[0].done == 24 + 8                               # pass 2 continued after its 24
  for m, ref in reference.layers.items():
    for field in ("activation_cov", "gradient_cov", "eigenvalues"):
      np.testing.assert_allclose(getattr(resumed.layers[m], field), getattr(ref, field),
                                 rtol=1e-5, atol=1e-7 * np.abs(getattr(ref, field)).max())
  other = dataclasses.replace(EKFAC, seed=1)
  with pytest.raises(ValueError, match="other settings"):
    ekfac_lib.compute_ekfac(ta.APPLY, micro["params"], micro["arrays"], ta.SCHEDULE,
                            settings=other, mesh=parallel.make_mesh(8), checkpoint_path=prefix)


# -------------------------------------------------------------- settings validation ---

@pytest.mark.parametrize("make, setting", [
    (lambda: fisher_lib.FisherSettings(num_epochs=0), "FisherSettings.num_epochs"),
    (lambda: fisher_lib.FisherSettings(batch_size=0), "FisherSettings.batch_size"),
    (lambda: fisher_lib.FisherSettings(flush_every=0), "FisherSettings.flush_every"),
    (lambda: ekfac_lib.EKFACSettings(num_epochs=0), "EKFACSettings.num_epochs"),
    (lambda: ekfac_lib.EKFACSettings(batch_size=-1), "EKFACSettings.batch_size"),
    (lambda: runner.EKFACBlock(num_epochs=0), "attribution.ekfac.num_epochs"),
    (lambda: unlearn_lib.UnlearnSettings(num_draws=0, draws_per_batch=1),
     "UnlearnSettings.num_draws"),
    (lambda: unlearn_lib.UnlearnSettings(draws_per_batch=0), "UnlearnSettings.draws_per_batch"),
    (lambda: sweep_lib.SweepSettings(items_per_device=0), "SweepSettings.items_per_device"),
    (lambda: eval_report.EvalSettings(random_draws=0), "evaluation.random_draws"),
    (lambda: eval_report.EvalSettings(ks=(5, 0)), r"evaluation.ks\[1\]"),
    (lambda: eval_report.EvalSettings(k_fractions=(1.5,)), r"evaluation.k_fractions\[0\]"),
])
def test_settings_refuse_impossible_values_naming_the_setting(make, setting):
  with pytest.raises(ValueError, match=setting):
    make()


# ------------------------------------------------------------------ query directories ---

def test_a_query_generated_with_another_prompt_is_not_kept(tmp_path):
  """launch.generate --prompt=X, then --prompt=Y: the directory prompt000 must be remade."""
  directory = str(tmp_path / "prompt000")
  generation.save_query(directory, make_query(1, "X"))
  assert generation.is_generated_as(directory, {"prompt": "X", "seed": 1})
  assert not generation.is_generated_as(directory, {"prompt": "Y", "seed": 1})
  assert not generation.is_generated_as(directory, {"prompt": "X", "seed": 2})


def test_a_query_directory_is_complete_or_absent(tmp_path):
  directory = str(tmp_path / "q")
  generation.save_query(directory, make_query(1, "A"))

  broken = make_query(2, "B")._replace(image=None)   # the image write fails midway
  with pytest.raises(Exception):
    generation.save_query(directory, broken)
  kept = generation.load_query(directory)             # the old query, whole
  assert kept.info["prompt"] == "A"
  np.testing.assert_array_equal(kept.latent, make_query(1, "A").latent)
  assert generation.list_queries(str(tmp_path)) == [directory]   # no staging leftovers
  # Arrays of another query beside this query.json: refused, not read as this query.
  np.save(os.path.join(directory, "latent.npy"), make_query(3, "C").latent)
  with pytest.raises(ValueError, match="mixes two queries"):
    generation.load_query(directory)


def test_atomic_writes_leave_no_temporary_files(tmp_path):
  path = str(tmp_path / "a.json")
  io_utils.atomic_write_json(path, {"x": 1})
  io_utils.atomic_savez(str(tmp_path / "b.npz"), a=np.arange(3))
  with pytest.raises(TypeError):
    io_utils.atomic_write_json(path, {"x": 1}, default=None, nonsense=True)
  assert sorted(os.listdir(tmp_path)) == ["a.json", "b.npz"]
  assert json.loads(open(path).read()) == {"x": 1}


def test_every_writer_goes_through_the_atomic_helper():
  """No hand-rolled temporary-file writes outside io_utils (a fixed '.tmp' name, no fsync:
  two writers collide and a crash can leave a torn file). Renaming whole existing files
  aside (the runner's set-aside preconditioners) is not a write and stays allowed."""
  import re  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  pattern = re.compile(r"""\.tmp["'{]|open\([^)]*["'][wa]b?["']""")
  offenders = []
  for folder in ("attrib_jax", "launch"):
    for dirpath, _, files in os.walk(os.path.join(root, folder)):
      for name in files:
        path = os.path.join(dirpath, name)
        if not name.endswith(".py") or name == "io_utils.py":
          continue
        for number, line in enumerate(open(path, encoding="utf-8"), 1):
          if pattern.search(line) and "staging" not in line:
            offenders.append(f"{os.path.relpath(path, root)}:{number}: {line.strip()}")
  assert not offenders, "\n".join(offenders)
