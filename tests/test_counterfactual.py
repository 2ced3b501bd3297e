"""Leave-K-out evaluation and LDS on a micro denoiser with a fake retraining.

No model is trained: `fake_train(excluded, workdir)` returns θ0 nudged by an amount that depends
on the excluded set, so every excluded set gives its own, reproducible model. The query loss is
checked against a direct per-slot computation with the same fold_in-keyed noise, the
regenerator against a direct DDIM call, the LDS Spearman against scipy.
"""
from __future__ import annotations

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from attrib_jax import baselines
from attrib_jax.diffusion import sampling
from attrib_jax.diffusion.schedules import NoiseSchedule
from attrib_jax.evaluation import counterfactual as cf
from attrib_jax.evaluation import eval_report
from attrib_jax.evaluation import lds as lds_lib
from attrib_jax.generation import Query

SIDE, L, D, N = 4, 3, 4, 20
SCHEDULE = NoiseSchedule.from_config({"beta_schedule": "linear", "num_train_timesteps": 1000})
LOSS = cf.LossSettings(timestep_stride=50, num_draws=2, seed=3, batch_size=16)


class Micro(nn.Module):
  """Pixels as tokens + a time embedding + the mean text state: enough to depend on all three."""

  @nn.compact
  def __call__(self, x, t, text):
    b, h, w, c = x.shape
    t = jnp.broadcast_to(jnp.asarray(t), (b,)).astype(jnp.float32) / 1000.0
    h1 = nn.Dense(8, name="proj_in")(x.reshape(b, h * w, c))
    h1 = h1 + nn.Dense(8, name="time")(jnp.stack([jnp.sin(t), jnp.cos(t)], -1))[:, None]
    h1 = h1 + nn.Dense(8, name="text")(text.mean(axis=1))[:, None]
    return nn.Dense(c, name="proj_out")(jax.nn.silu(h1)).reshape(x.shape)


MODULE = Micro()


def APPLY(p, x, t, c):  # a module-level function: compiled programs are reused across tests
  return MODULE.apply({"params": p}, x, t, c)


def to_image(latent: np.ndarray) -> np.ndarray:
  return np.clip(np.round((np.asarray(latent) + 1) * 127.5), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def world():
  rng = np.random.default_rng(0)
  params = jax.device_get(jax.jit(MODULE.init)(
      jax.random.key(0), jnp.zeros((1, SIDE, SIDE, 3)), jnp.zeros((1,), jnp.int32),
      jnp.zeros((1, L, D)))["params"])
  index = rng.permutation(np.arange(100, 100 + 3 * N, 3)).astype(np.int64)
  null = rng.normal(size=(1, L, D)).astype(np.float32)
  regenerate = cf.make_regenerator(APPLY, SCHEDULE, null, (SIDE, SIDE, 3),
                                   lambda z: to_image(z))
  queries = {}
  for i in range(3):
    text = rng.normal(size=(L, D)).astype(np.float32)
    info = {"prompt": f"q{i}", "seed": 10 + i, "sampler": "ddim", "num_steps": 4,
            "guidance_scale": 2.0, "eta": 0.0}
    latent = np.asarray(rng.uniform(-1, 1, (SIDE, SIDE, 3)), np.float32)
    queries[f"q{i}"] = Query(latent, text, to_image(latent), info)
  return {"params": params, "index": index, "queries": queries, "regenerate": regenerate,
          "null": null}


def nudged(params, excluded: np.ndarray):
  """θ0 moved along a fixed direction by an amount set by the excluded set."""
  amount = 0.02 * (1 + int(np.sum(excluded)) % 17) / 17
  return jax.tree.map(lambda p: p + amount * np.cos(np.arange(p.size).reshape(p.shape)), params)


class FakeTrain:
  def __init__(self, params):
    self.params, self.calls = params, []

  def __call__(self, excluded, workdir):
    assert os.path.isdir(workdir)
    self.calls.append(np.asarray(excluded).tolist())
    return nudged(self.params, np.asarray(excluded))


def query_scores(name: str, offset: int = 0) -> np.ndarray:
  return np.random.default_rng([int(name[1:]), 7 + offset]).normal(size=N)


def run(world, out_dir, train, *, methods=("a", "b", "c", "random"), lds=True):
  """The full driver: "a" and "b" score identically (they must share models)."""
  context = baselines.Context(arrays={"index": world["index"]})
  random_method = baselines.make_method("random", seed=0)
  scorers = {"a": eval_report.Scorer(lambda n, q: query_scores(n), "a"),
             "b": eval_report.Scorer(lambda n, q: query_scores(n), "b"),
             "c": eval_report.Scorer(lambda n, q: query_scores(n, 1), "c"),
             "random": eval_report.Scorer(lambda n, q: random_method.score(q, context), "r")}
  settings = eval_report.EvalSettings.from_config({
      "methods": methods, "ks": (2, 5), "random_draws": 2, "loss": LOSS.__dict__,
      "lds": {"num_subsets": 4 if lds else 0}, "feature_extractor": {"grid": 1}})
  feature_fn = baselines.random_conv_features(grid=1)
  make_cache = lambda seed: cf.ModelCache(os.path.join(out_dir, "models"), "recipe-test", train,
                                          base_params=world["params"], log=lambda s: None)
  return eval_report.evaluate(
      out_dir=out_dir, queries=world["queries"], index=world["index"],
      scorers={m: scorers[m] for m in methods}, settings=settings, make_cache=make_cache,
      base_params=world["params"], base_fingerprint="theta0", apply_fn=APPLY,
      schedule=SCHEDULE, regenerate=world["regenerate"], feature_fn=feature_fn,
      log=lambda s: None)


@pytest.fixture(scope="module")
def first_run(world, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("eval"))
  train = FakeTrain(world["params"])
  return out, train, run(world, out, train)


def rows_of(out_dir):
  with open(os.path.join(out_dir, "results.jsonl")) as f:
    return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- tests ---

def test_excluded_set_is_the_top_k(world, first_run):
  out, train, _ = first_run
  rows = rows_of(out)
  trained = {cf.excluded_digest(c): c for c in train.calls}
  checked = 0
  for r in rows:
    if r["method"] in ("a", "c"):
      order = np.argsort(-query_scores(r["query"], 0 if r["method"] == "a" else 1),
                         kind="stable")
      top = sorted(world["index"][order[:r["k"]]].tolist())
      assert trained[r["excluded_digest"]] == top   # what train_fn received
      checked += 1
    elif r["method"] == "random":
      order = cf.random_order(world["index"], 0, r["draw"])
      assert trained[r["excluded_digest"]] == sorted(order[:r["k"]].tolist())
  assert checked == 2 * 3 * 2


def test_methods_that_agree_share_a_model(world, first_run):
  out, train, summary = first_run
  rows = rows_of(out)
  model = {(r["query"], r["method"], r["k"]): r["model"] for r in rows if r["draw"] is None}
  for q in world["queries"]:
    for k in (2, 5):
      assert model[(q, "a", k)] == model[(q, "b", k)]
      assert model[(q, "a", k)] != model[(q, "c", k)]
  digests = [cf.excluded_digest(c) for c in train.calls]
  assert len(digests) == len(set(digests))        # every excluded set trained exactly once
  # a, c per query and K; random draws shared by the queries; 4 LDS subsets.
  assert len(train.calls) == 3 * 2 * 2 + 2 * 2 + 4 == summary["models_trained_this_run"]
  random_models = {(r["k"], r["draw"]): r["model"] for r in rows if r["method"] == "random"}
  assert len(random_models) == 4 and len(set(random_models.values())) == 4


def direct_loss(params, query: Query, settings: cf.LossSettings) -> float:
  """Slot by slot: the same fold_in chain, x_t in float64 numpy, one network call per slot."""
  words = baselines.random.query_digest(query)
  alphas = np.asarray(SCHEDULE.alphas_cumprod, np.float64)
  losses = []
  for t in range(0, 1000, settings.timestep_stride):
    for d in range(settings.num_draws):
      key = jax.random.key(settings.seed)
      for w in words + [d, t]:
        key = jax.random.fold_in(key, w)
      noise = np.asarray(jax.random.normal(key, query.latent.shape, jnp.float32), np.float64)
      x_t = math.sqrt(alphas[t]) * query.latent + math.sqrt(1 - alphas[t]) * noise
      eps = np.asarray(APPLY(params, jnp.asarray(x_t[None], jnp.float32), jnp.asarray([t]),
                             jnp.asarray(query.text_states[None])), np.float64)[0]
      losses.append(np.mean((eps - noise) ** 2))
  return float(np.mean(losses))


def test_delta_loss_matches_a_direct_computation(world, first_run):
  out, _, _ = first_run
  q = world["queries"]["q1"]
  row = next(r for r in rows_of(out) if r["cell"] == "q1|c|K=5")
  excluded = np.sort(world["index"][np.argsort(-query_scores("q1", 1), kind="stable")[:5]])
  base = direct_loss(world["params"], q, LOSS)
  without = direct_loss(nudged(world["params"], excluded), q, LOSS)
  np.testing.assert_allclose(row["loss_base"], base, rtol=2e-6)
  np.testing.assert_allclose(row["loss_without"], without, rtol=2e-6)
  assert abs(row["delta_loss"]) > 1e-4
  np.testing.assert_allclose(row["delta_loss"], without - base, rtol=1e-3, atol=1e-7)
  # The batch layout does not change the loss beyond float32 rounding.
  relaid = cf.query_loss(APPLY, world["params"], q, SCHEDULE,
                         cf.LossSettings(timestep_stride=50, num_draws=2, seed=3, batch_size=7))
  np.testing.assert_allclose(relaid, base, rtol=2e-6)


def test_regeneration_is_the_generation_recipe(world):
  q = world["queries"]["q2"]
  params = nudged(world["params"], np.arange(3))
  direct = sampling.ddim_sample(SCHEDULE, APPLY, params, jnp.asarray(q.text_states[None]),
                                jnp.asarray(world["null"]), jax.random.key(q.info["seed"]),
                                latent_shape=(SIDE, SIDE, 3), num_steps=4, guidance_scale=2.0)
  np.testing.assert_array_equal(world["regenerate"](params, q), to_image(direct)[0])


def test_delta_g_fields(world, first_run):
  out, _, summary = first_run
  rows = [r for r in rows_of(out) if "method" in r]
  assert all(r["delta_g_mse"] >= 0 and -1 <= r["delta_g_feature_cos"] <= 1 + 1e-6
             for r in rows)
  q = world["queries"]["q0"]
  assert summary["theta0_regeneration"]["mean_mse"] == pytest.approx(np.mean([
      cf.pixel_mse(world["regenerate"](world["params"], world["queries"][n]),
                   world["queries"][n].image) for n in sorted(world["queries"])]))
  assert cf.pixel_mse(q.image, q.image) == 0.0
  assert cf.pixel_mse(np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 3), 255, np.uint8)) == 1.0


def test_mean_and_standard_error():
  mean, se, n = cf.mean_and_se([1.0, 2.0, 4.0, 7.0, None])   # None: not measured, skipped
  assert (mean, n) == (3.5, 4)
  with pytest.raises(ValueError, match="not finite"):           # NaN: a failure, not a gap
    cf.mean_and_se([1.0, 2.0, float("nan")])
  assert se == pytest.approx(np.std([1, 2, 4, 7], ddof=1) / 2)
  assert math.isnan(cf.mean_and_se([5.0])[1]) and cf.mean_and_se([])[2] == 0
  rows = [{"query": q, "method": m, "k": 2, "draw": d, "delta_loss": v}
          for q, m, d, v in [("x", "a", None, 5.0), ("y", "a", None, 3.0),
                             ("x", "random", 0, 1.0), ("x", "random", 1, 3.0),
                             ("y", "random", 0, 2.0), ("y", "random", 1, 2.0)]]
  table = {e["method"]: e for e in cf.summarize(rows)}
  assert table["random"]["dl"] == 2.0 and table["random"]["n"] == 2   # draws averaged first
  assert table["a"]["vs_random"] == 2.0                                 # (5-2 + 3-2) / 2
  assert table["a"]["vs_random_se"] == pytest.approx(np.std([3.0, 1.0], ddof=1) / np.sqrt(2))


def test_lds_spearman_against_scipy():
  rng = np.random.default_rng(1)
  for a, b in [(rng.normal(size=9), rng.normal(size=9)),
               (rng.integers(0, 3, 12).astype(float), rng.integers(0, 4, 12).astype(float))]:
    assert lds_lib.spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b)[0], abs=1e-12)
  assert math.isnan(lds_lib.spearman([1, 1, 1], [1, 2, 3]))
  # A toy: 10 items, 6 subsets, 2 queries, losses = c - Σ influence + noise.
  index = rng.permutation(np.arange(50, 60))
  settings = lds_lib.LDSSettings(num_subsets=6, subset_seed=4)
  kept = lds_lib.subsets(index, settings)
  assert all(k.size == 5 and np.isin(k, index).all() for k in kept)
  assert len({tuple(k) for k in kept}) == 6
  influence = rng.normal(size=(2, 10))
  masks = np.stack([np.isin(index, k) for k in kept]).astype(float)
  actual = 3.0 - masks @ influence.T + 0.3 * rng.normal(size=(6, 2))
  scores = {"m": {"q0": influence[0], "q1": influence[1]},
            "neg": {"q0": -influence[0], "q1": -influence[1]}}
  per_query = lds_lib.lds_per_query(kept, index, scores, actual, ["q0", "q1"])
  for j, q in enumerate(["q0", "q1"]):
    expected = scipy.stats.spearmanr(masks @ influence[j], -actual[:, j])[0]
    assert per_query["m"][q] == pytest.approx(expected, abs=1e-12)
    assert per_query["neg"][q] == pytest.approx(-expected, abs=1e-12)
  summary = lds_lib.summarize(per_query)["m"]
  values = [per_query["m"]["q0"], per_query["m"]["q1"]]
  assert summary["lds"] == pytest.approx(np.mean(values))
  assert summary["lds_se"] == pytest.approx(np.std(values, ddof=1) / np.sqrt(2))


def test_lds_in_the_driver(world, first_run):
  out, _, summary = first_run
  lds = summary["lds"]
  assert set(lds["summary"]) == {"a", "b", "c", "random"}
  assert np.asarray(lds["losses"]).shape == (1, 4, 3)
  assert lds["per_query"]["a"] == lds["per_query"]["b"]
  table = {(e["method"], e["k"]): e for e in summary["table"]}
  assert table[("c", 5)]["lds"] == lds["summary"]["c"]["lds"]


def test_resume_skips_finished_cells(world, first_run, tmp_path):
  out, _, summary = first_run
  train = FakeTrain(world["params"])
  again = run(world, out, train)
  assert train.calls == [] and again["markdown"] == summary["markdown"]
  # Lose one cell (a crash before its write): only its model is retrained.
  row = next(r for r in rows_of(out) if r["cell"] == "q2|c|K=2")
  os.remove(cf.ResultStore(os.path.join(out, "cells")).path(row["cell"]))
  again = run(world, out, train)
  assert len(train.calls) == 1 and cf.excluded_digest(train.calls[0]) == row["excluded_digest"]
  assert again["markdown"] == summary["markdown"]


def test_same_seeds_same_table(world, first_run, tmp_path):
  out, _, summary = first_run
  other = run(world, str(tmp_path / "again"), FakeTrain(world["params"]))
  assert other["markdown"] == summary["markdown"]
  assert other["pairwise_markdown"] == summary["pairwise_markdown"]
  for name in ("table.csv", "table.md", "pairwise.csv", "pairwise.md", "results.jsonl"):
    with open(os.path.join(out, name)) as f, open(str(tmp_path / "again" / name)) as g:
      if name == "results.jsonl":   # timings differ; the numbers must not
        strip = lambda r: {k: v for k, v in json.loads(r).items() if k != "seconds"}
        assert [strip(r) for r in f] == [strip(r) for r in g]
      else:
        assert f.read() == g.read()
  for name in ("delta_loss.png", "paired.png", "lds.png", "report.html"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  lines = summary["markdown"].splitlines()
  assert lines[0].startswith("| method | K |") and len(lines) == 2 + 4 * 2
  # Every pair of the 4 methods at both K, and the page shows them.
  pair_lines = summary["pairwise_markdown"].splitlines()
  assert pair_lines[0].startswith("| K | A | B |") and len(pair_lines) == 2 + 6 * 2
  with open(os.path.join(out, "report.html")) as f:
    page = f.read()
  assert "Paired differences" in page and "paired.png" in page
  assert {b["k"] for b in summary["best_against_references"]} == {2, 5}


def test_retraining_timings_in_the_summary(first_run):
  _, train, summary = first_run
  timing = summary["retraining"]
  assert timing["models"] == len(train.calls) > 0
  assert timing["seconds_total"] >= 0 and timing["cache_misses"] >= 0


def test_jit_clock_sees_compilation():
  clock = cf.jit_clock()
  before = clock.snapshot()
  jax.jit(lambda x: jnp.sin(x) * 3.0 + 0.25)(jnp.arange(5.0))  # a new function: traced, compiled
  spent = cf.JitClock.delta(before, clock.snapshot())
  assert spent["trace"] > 0 and spent["compile"] > 0
  assert "persistent cache" in cf.JitClock.describe(spent)


def test_settings_refuse_unknown_keys():
  with pytest.raises(ValueError, match="unknown key"):
    eval_report.EvalSettings.from_config({"kss": (1,)})
  s = eval_report.EvalSettings.from_config(None)
  assert s.resolve_ks(1000) == (10, 40) and s.lds.num_subsets == 8
  assert eval_report.EvalSettings.from_config({"lds": {"num_subsets": 0}}).lds is None
  with pytest.raises(ValueError, match="random-removal floor"):
    cf.make_cells({"random": {}}, [], [1], index=np.arange(5))


def test_shared_data_links_survive_moving_the_workdir(tmp_path):
  base = tmp_path / "run"
  for sub in ("tfds", "precomputed", "model/text_encoder"):
    (base / sub).mkdir(parents=True)
  (base / "precomputed" / "latents.npy").write_bytes(b"x")
  retrained = base / "evaluation" / "models" / "abc"
  cf.link_shared_data(str(base), str(retrained))
  cf.link_shared_data(str(base), str(retrained))          # idempotent
  moved = tmp_path / "moved"
  base.rename(moved)
  linked = moved / "evaluation" / "models" / "abc"
  assert (linked / "precomputed" / "latents.npy").read_bytes() == b"x"
  assert os.path.realpath(linked / "tfds") == os.path.realpath(moved / "tfds")
  assert os.path.isdir(linked / "model" / "text_encoder")
