"""AbU over query directories: the preconditioner and the pre losses once per model, then per
query unlearn -> sweep -> scores -> result files and pictures. What `launch/attribute.py` calls.

`AbUSettings.preconditioner` picks the method: "fisher" is AbU (the diagonal Fisher), "ekfac"
is AbU+ (EK-FAC factors of the selected layers, ekfac.py). Both share the loss sweep and its
cached pre losses; their results live in different directories (`out_dir_name`).

Everything lands under `out_dir` and is reused when present with the same fingerprint:
  fisher.npz | ekfac.npz         once per (model, settings), in `cache_dir` (default out_dir);
                                 one of other settings is set aside as fisher.<fingerprint>.npz
                                 (kept: switching back to its settings reuses it)
  pre_losses.npz                 once per (model, sweep settings), in `cache_dir`
  <query>/result.npz|json        scores, ranking, settings, model fingerprint (atomic)
  <query>/topk.png               the query beside its top-k with scores
  report.html, summary.json      every query, and recall of the ground truth where known
Several processes (jax.distributed): every process computes, process 0 alone writes these
files (and the partial checkpoints), and the others wait at a barrier before reading one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from attrib_jax import generation
from attrib_jax import io_utils
from attrib_jax import parallel
from attrib_jax.attribution import ekfac as ekfac_lib
from attrib_jax.attribution import fisher as fisher_lib
from attrib_jax.attribution import region as region_lib
from attrib_jax.attribution import report
from attrib_jax.attribution import scores as scores_lib
from attrib_jax.attribution import sweep as sweep_lib
from attrib_jax.attribution import unlearn as unlearn_lib


PRECONDITIONERS = ("fisher", "ekfac")
METHOD_PRECONDITIONER = {"abu": "fisher", "abu+": "ekfac"}   # the evaluation's method names


@dataclasses.dataclass(frozen=True)
class EKFACBlock:
  """AbU+'s factor estimation and damping (the config's `attribution.ekfac`). The layers are
  the unlearning step's selection, so they always match."""
  num_epochs: int = 1
  batch_size: int = 32
  seed: int = 0
  damping_scale: float = 0.1    # SPEC §2: d = 0.1 · mean(Λ), per layer
  min_snr_gamma: float | None = None   # the loss the factors describe (EKFACSettings)

  def __post_init__(self):
    scores_lib.require_at_least("attribution.ekfac", 1, num_epochs=self.num_epochs,
                                batch_size=self.batch_size)
    scores_lib.require_at_least("attribution.ekfac", 0, damping_scale=self.damping_scale)


@dataclasses.dataclass(frozen=True)
class AbUSettings:
  fisher: fisher_lib.FisherSettings
  unlearn: unlearn_lib.UnlearnSettings
  sweep: sweep_lib.SweepSettings
  preconditioner: str = "fisher"
  ekfac: EKFACBlock = EKFACBlock()

  def __post_init__(self):
    if self.preconditioner not in PRECONDITIONERS:
      raise ValueError(f"attribution.preconditioner {self.preconditioner!r} is not one of "
                       f"{PRECONDITIONERS}")

  @classmethod
  def from_config(cls, c: Mapping[str, Any]) -> "AbUSettings":
    """From a config's `attribution` block (unknown keys are an error, by the dataclasses)."""
    c = dict(c)
    unknown = sorted(set(c) - {"fisher", "unlearn", "sweep", "preconditioner", "ekfac"})
    if unknown:
      raise ValueError(f"Unknown attribution settings {unknown}")
    sweep = dict(c["sweep"])
    for key in ("timesteps", "flips"):
      if key in sweep:
        sweep[key] = tuple(sweep[key])
    return cls(fisher_lib.FisherSettings(**dict(c["fisher"])),
               unlearn_lib.UnlearnSettings(**dict(c["unlearn"])),
               sweep_lib.SweepSettings(**sweep),
               preconditioner=c.get("preconditioner", "fisher"),
               ekfac=EKFACBlock(**dict(c.get("ekfac", {}))))

  @property
  def method(self) -> str:
    return {v: k for k, v in METHOD_PRECONDITIONER.items()}[self.preconditioner]

  def ekfac_settings(self) -> ekfac_lib.EKFACSettings:
    return ekfac_lib.EKFACSettings(selection=self.unlearn.selection,
                                   num_epochs=self.ekfac.num_epochs,
                                   batch_size=self.ekfac.batch_size, seed=self.ekfac.seed,
                                   min_snr_gamma=self.ekfac.min_snr_gamma)

  def ekfac_unlearn_settings(self) -> ekfac_lib.EKFACUnlearnSettings:
    u = self.unlearn
    return ekfac_lib.EKFACUnlearnSettings(
        alpha=u.alpha, num_steps=u.num_steps, num_draws=u.num_draws, micro_batch=u.micro_batch,
        damping_scale=self.ekfac.damping_scale, seed=u.seed, selection=u.selection,
        min_snr_gamma=u.min_snr_gamma)

  def with_preconditioner(self, preconditioner: str) -> "AbUSettings":
    return dataclasses.replace(self, preconditioner=preconditioner)


def out_dir_name(settings: AbUSettings) -> str:
  """Where a workdir keeps one method's results: attribution/ (AbU), attribution_plus/ (AbU+)."""
  return "attribution" if settings.preconditioner == "fisher" else "attribution_plus"


def workdir_dirs(workdir: str, settings: AbUSettings, *, label: str = "") -> tuple[str, str]:
  """(out_dir, cache_dir) of a training run's workdir: each method's results in its own
  directory (a variant's `label` appended: attribution_plus@demo/), the preconditioners and pre
  losses shared in attribution/ (a file there of other settings is set aside, never mixed in)."""
  out = out_dir_name(settings) + (f"@{label}" if label else "")
  return os.path.join(workdir, out), os.path.join(workdir, "attribution")


def variant_settings(attribution: Any, name: str, overrides: Mapping[str, Any]) -> AbUSettings:
  """AbU's settings for evaluation method `name` ("abu", "abu+", or either with "@LABEL"):
  `attribution` (a config's block) with `overrides` merged into its sub-blocks and the name's
  preconditioner. A key the attribution block does not have is an error naming it."""
  base_name, _, label = name.partition("@")
  if base_name not in METHOD_PRECONDITIONER or (name != base_name and not label):
    raise ValueError(f"evaluation method {name!r}: AbU variants are named abu@LABEL or "
                     "abu+@LABEL")
  if overrides and not label:
    raise ValueError(f"evaluation.method_configs[{name!r}]: the plain {name!r} uses "
                     f"config.attribution; name a variant ({name}@LABEL) to change it")
  block = (attribution.to_dict() if hasattr(attribution, "to_dict")
           else json.loads(json.dumps(dict(attribution))))
  for section, values in overrides.items():
    sections = sorted(k for k, v in block.items() if isinstance(v, Mapping))
    if section not in sections:
      raise ValueError(f"evaluation.method_configs[{name!r}]: {section!r} is not a block of "
                       f"config.attribution ({sections})")
    unknown = sorted(set(values) - set(block[section]))
    if unknown:
      raise ValueError(f"evaluation.method_configs[{name!r}][{section!r}]: unknown key(s) "
                       f"{unknown}; known: {sorted(block[section])}")
    block[section] = dict(block[section], **values)
  return AbUSettings.from_config(block).with_preconditioner(
      METHOD_PRECONDITIONER[base_name])


class AbU:
  """Attribution by Unlearning for one trained model and its precomputed training set."""

  def __init__(self, apply_fn: Callable, params: Any, arrays: Mapping[str, Any], schedule,
               settings: AbUSettings, out_dir: str, *, cache_dir: str | None = None, mesh=None,
               log: Callable[[str], None] = print):
    """`cache_dir` (default `out_dir`) holds the preconditioner and the pre losses, so AbU and
    AbU+ runs of one model can share the pre losses."""
    self.apply_fn, self.params, self.arrays, self.schedule = apply_fn, params, arrays, schedule
    self.settings, self.out_dir, self.mesh, self.log = settings, out_dir, mesh, log
    self.cache_dir = cache_dir or out_dir
    self.index = np.asarray(arrays["index"]).astype(np.int64)
    self.model_fingerprint = scores_lib.params_fingerprint(params)
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(self.cache_dir, exist_ok=True)
    self._fisher = self._ekfac = self._pre = None

  def _progress(self, p: scores_lib.Progress) -> None:
    self.log(str(p))

  def _cached(self, name: str, expected: str) -> str | None:
    """`cache_dir/<name>.npz` if it holds the preconditioner of fingerprint `expected`, else
    None. A file of other settings is set aside as <name>.<its fingerprint>.npz rather than
    lost (a Fisher can take hours), and one set aside earlier for `expected` comes back."""
    path = os.path.join(self.cache_dir, f"{name}.npz")
    if not parallel.is_main_process():   # process 0 sets files aside; then read what it left
      parallel.barrier(f"runner: {name} cache")
      return path if os.path.exists(path) else None
    found = self._cached_on_main(name, path, expected)
    parallel.barrier(f"runner: {name} cache")
    return found

  def _cached_on_main(self, name: str, path: str, expected: str) -> str | None:
    if os.path.exists(path):
      with io_utils.open_npz(path) as data:
        held = json.loads(str(data["__meta__"]))["fingerprint"]
      if held == expected:
        return path
      os.replace(path, os.path.join(self.cache_dir, f"{name}.{held}.npz"))
      self.log(f"{name}: {path} was computed with other settings or another model; set aside "
               f"as {name}.{held}.npz")
    aside = os.path.join(self.cache_dir, f"{name}.{expected}.npz")
    if os.path.exists(aside):
      os.replace(aside, path)
      return path
    return None

  @property
  def fisher(self) -> fisher_lib.Fisher:
    if self._fisher is None:
      path = os.path.join(self.cache_dir, "fisher.npz")
      expected = fisher_lib.expected_fingerprint(self.params, self.index, self.schedule,
                                                 self.settings.fisher)
      if self._cached("fisher", expected):
        self._fisher = fisher_lib.load_fisher(path, expected_fingerprint=expected)
        self.log(f"fisher: reusing {path}")
      else:
        t0 = time.time()
        # Named by the fingerprint: a partial pass of other settings is never resumed as this.
        partial = os.path.join(self.cache_dir, f"fisher_partial_{expected}.npz")
        self._fisher = fisher_lib.compute_fisher(
            self.apply_fn, self.params, self.arrays, self.schedule,
            settings=self.settings.fisher, mesh=self.mesh, checkpoint_path=partial,
            progress=self._progress)
        if parallel.is_main_process():
          fisher_lib.save_fisher(path, self._fisher)
          os.remove(partial)
        parallel.barrier("runner: fisher saved")
        self.log(f"fisher: {self._fisher.num_examples} examples in {time.time() - t0:.0f}s")
    return self._fisher

  @property
  def ekfac(self) -> ekfac_lib.EKFAC:
    """AbU+'s factors (two passes over the training set, each checkpointed as it goes)."""
    if self._ekfac is None:
      path = os.path.join(self.cache_dir, "ekfac.npz")
      settings = self.settings.ekfac_settings()
      expected = ekfac_lib.expected_fingerprint(self.params, self.index, self.schedule, settings)
      if self._cached("ekfac", expected):
        self._ekfac = ekfac_lib.load_ekfac(path, expected)
        self.log(f"ekfac: reusing {path}")
      else:
        t0 = time.time()
        # Named by the fingerprint: partial passes of other settings are never resumed as this.
        partial = os.path.join(self.cache_dir, f"ekfac_partial_{expected}")
        self._ekfac = ekfac_lib.compute_ekfac(self.apply_fn, self.params, self.arrays,
                                              self.schedule, settings=settings, mesh=self.mesh,
                                              progress=self._progress, checkpoint_path=partial)
        if parallel.is_main_process():
          ekfac_lib.save_ekfac(path, self._ekfac)
          for leftover in ekfac_lib.checkpoint_files(partial).values():
            if os.path.exists(leftover):
              os.remove(leftover)
        parallel.barrier("runner: ekfac saved")
        self.log(f"ekfac: {self._ekfac.num_examples} examples in {time.time() - t0:.0f}s")
    return self._ekfac

  def unlearn(self, query: generation.Query, region: region_lib.Region | None = None) -> Any:
    """θ' for one query, by the settings' preconditioner; with `region` (pixels of the query
    image) the step ascends the loss of that region's latent cells only."""
    mask = region_lib.query_mask(region, query.image, query.latent)
    if self.settings.preconditioner == "ekfac":
      return ekfac_lib.ekfac_unlearn(
          self.apply_fn, self.params, self.ekfac, query.latent, query.text_states,
          self.schedule, num_train=len(self.index),
          settings=self.settings.ekfac_unlearn_settings(), mesh=self.mesh, region_mask=mask)
    return unlearn_lib.unlearn(
        self.apply_fn, self.params, self.fisher, query.latent, query.text_states, self.schedule,
        num_train=len(self.index), settings=self.settings.unlearn, mesh=self.mesh,
        region_mask=mask)

  @property
  def pre_slot_losses(self) -> np.ndarray | None:
    """Cached θ0 losses per slot, when the sweep method reuses them."""
    if self.settings.sweep.method != "cached":
      return None
    if self._pre is None:
      path = os.path.join(self.cache_dir, "pre_losses.npz")
      key = sweep_lib.cache_key(self.model_fingerprint, self.settings.sweep, self.schedule)
      stale = os.path.exists(path) and sweep_lib.cached_key(path) != key
      parallel.barrier("runner: pre losses checked")   # all have read it before it goes
      if stale:
        # Other sweep settings (e.g. timesteps) or another model: these losses cannot serve.
        self.log(f"pre losses: {path} holds other settings; recomputing")
        if parallel.is_main_process():
          os.remove(path)
      if stale or not os.path.exists(path):
        # Named by the key: a partial pass of other settings is never taken for this one.
        partial = os.path.join(self.cache_dir, f"pre_partial_{key[:16]}.npz")
        t0 = time.time()
        result = sweep_lib.compute_pre_losses(
            self.apply_fn, self.params, self.arrays, self.schedule,
            settings=self.settings.sweep, mesh=self.mesh, progress=self._progress,
            checkpoint_path=partial)
        if parallel.is_main_process():
          sweep_lib.save_pre_cache(path, key, result)
          if os.path.exists(partial):
            os.remove(partial)
        parallel.barrier("runner: pre losses saved")
        self.log(f"pre losses: {len(self.index)} items in {time.time() - t0:.0f}s")
      self._pre = sweep_lib.load_pre_cache(path, key, self.index)
    return self._pre

  def score(self, query: generation.Query, name: str,
            region: region_lib.Region | None = None) -> dict:
    """Scores every training item for one query (for `region`: the query's loss over that
    region only); returns the loaded result. A region's result is kept apart from the whole
    query's, in <name>.region-x0-y0-x1-y1/."""
    want = (tuple(np.shape(self.arrays["latents"])[2:]),
            tuple(np.shape(self.arrays["text_states"])[2:]))
    got = (tuple(np.shape(query.latent)), tuple(np.shape(query.text_states)))
    if got != want:
      # A query of another model (or resolution): it would fail deep in a jitted step.
      raise ValueError(f"query {name}: latent {got[0]} and text states {got[1]}, but this "
                       f"model's training items have {want[0]} and {want[1]}: the query was "
                       "made for another model; generate it again with this workdir's model")
    if region is not None:
      region.check(query.image.shape[:2])
      name = f"{name}.{region.key}"
    region_meta = None if region is None else region.as_list()
    path = os.path.join(self.out_dir, name, "result")
    # The name is only where the result lives: it is reused only for the same query content
    # (latent, text states, prompt), so a name given to another image or prompt recomputes.
    digest = generation.query_digest(query)
    if os.path.exists(path + ".json"):
      try:
        done = scores_lib.load_result(path, expected_fingerprint=self.model_fingerprint)
        stored = json.loads(json.dumps(done["meta"]["settings"]["abu"]))
        if done["meta"]["settings"].get("query_digest") != digest:
          self.log(f"{name}: recomputing (the stored result is of another query: other "
                   "image, latent or prompt)")
        elif (stored == json.loads(json.dumps(dataclasses.asdict(self.settings)))
            and done["meta"]["settings"].get("region") == region_meta):
          return done
        else:
          self.log(f"{name}: recomputing (the stored result used other AbU settings)")
      except ValueError as e:  # another model or a torn write: recompute
        self.log(f"{name}: recomputing ({e})")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # The partial sweep is named by what its sums depend on besides θ0 (which its own
    # fingerprint checks): the query and the settings; another's partial is never resumed.
    partial = os.path.join(self.out_dir, name, "sweep_partial_" + scores_lib.settings_digest(
        {"query": digest, "abu": dataclasses.asdict(self.settings)}) + ".npz")
    t0 = time.time()
    params_after = self.unlearn(query, region)
    jax.block_until_ready(params_after)   # dispatch is asynchronous: time the work itself
    t1 = time.time()
    result = sweep_lib.sweep(
        self.apply_fn, self.params, params_after, self.arrays, self.schedule,
        settings=self.settings.sweep, mesh=self.mesh, pre_slot_losses=self.pre_slot_losses,
        checkpoint_path=partial,
        progress=self._progress)
    t2 = time.time()
    image_scores = scores_lib.image_scores(result.delta)
    ranking = scores_lib.rank(image_scores, result.index)
    settings = {"abu": dataclasses.asdict(self.settings), "query": query.info,
                "query_digest": digest,
                "region": region_meta, "seconds": {"unlearn": t1 - t0, "sweep": t2 - t1}}
    if parallel.is_main_process():
      scores_lib.save_result(path, image_scores, ranking, settings, self.model_fingerprint,
                             index=result.index, tau_per_flip=result.delta, pre=result.pre)
      if os.path.exists(partial):
        os.remove(partial)
    parallel.barrier(f"runner: {name} result saved")
    self.log(f"{name}: unlearn {t1 - t0:.1f}s, sweep {t2 - t1:.1f}s, top-5 {ranking[:5].tolist()}")
    return scores_lib.load_result(path, expected_fingerprint=self.model_fingerprint)


def attribute_queries(abu: AbU, query_dirs: Sequence[str],
                      get_images: Callable[[np.ndarray], np.ndarray], *, top_k: int = 10,
                      baselines: Mapping[str, Callable[[generation.Query], np.ndarray]] = {},
                      region: region_lib.Region | None = None) -> dict:
  """Scores every query, writes its picture, then the HTML report and summary.json.

  Args:
    get_images: dataset indices -> uint8 training images (for the pictures).
    region: attribute this pixel box of every query only (local attribution; the report and
      pictures then describe the region's results, the box drawn on the query).
    baselines: name -> (query -> scores aligned with abu.index): their top-k shown beside AbU's,
      with Recall@10 where a query has ground truth (`influential_indices` in its query.json).
  """
  entries, query_images = [], {}
  meter = scores_lib.ProgressMeter("attribute", len(query_dirs), "queries")
  for number, directory in enumerate(query_dirs, 1):
    name = os.path.basename(directory.rstrip("/"))
    query = generation.load_query(directory)
    result = abu.score(query, name, region)
    shown = query   # the picture's query: with the region's box drawn on it
    if region is not None:
      name = f"{name}.{region.key}"
      shown = query._replace(image=region_lib.draw_box(query.image, region))
    done = meter(number)
    abu.log(f"attribute: {number}/{len(query_dirs)} queries, ETA {done.eta_s:.0f}s")
    ranking, scores = result["ranking"], result["scores"]
    score_of = dict(zip(result["index"].tolist(), scores.tolist()))
    top = ranking[:top_k]
    picture = os.path.join(abu.out_dir, name, "topk.png")
    truth = query.info.get("influential_indices")
    if parallel.is_main_process():
      report.save_topk_picture(picture, shown, get_images(top), top,
                               [score_of[int(i)] for i in top], truth)
    entry = {"name": name, "prompt": query.info.get("prompt"), "picture": picture,
             "top": top.tolist(), "seconds": result["meta"]["settings"]["seconds"]}
    # Every method's top-k goes on the report side by side; recall where truth is known.
    rankings = {abu.settings.method: ranking}
    for method, fn in baselines.items():
      rankings[method] = scores_lib.rank(fn(query), abu.index)
    entry["topk"] = {m: r[:top_k].tolist() for m, r in rankings.items()}
    if truth:
      entry["truth"] = [int(t) for t in truth]
      entry["recall@10"] = {m: scores_lib.recall_at_k(r, truth, 10) for m, r in rankings.items()}
    entries.append(entry)
    query_images[name] = shown.image
  summary = report.summarise(entries)
  suffix = "" if region is None else f".{region.key}"   # a region's report beside the whole's
  if parallel.is_main_process():
    report.write_report(os.path.join(abu.out_dir, f"report{suffix}.html"), entries, summary,
                        get_images=get_images, query_images=query_images)
    scores_lib.atomic_write_json(os.path.join(abu.out_dir, f"summary{suffix}.json"),
                                 {"queries": entries, "summary": summary, "region": (
                                     None if region is None else region.as_list())})
  parallel.barrier("runner: report written")
  return summary
