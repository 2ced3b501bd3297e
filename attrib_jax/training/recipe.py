"""From a config to a trained model directory: dataset -> text side -> precompute -> train.

`run(config, workdir)` is what `launch/train.py` calls. Every stage leaves its result in the
workdir and is skipped when that result is already there and made with the same settings, so
a second run reuses the trained model and an interrupted one resumes:
  workdir/tfds/           the TFDS dataset (array_record)
  workdir/model/          the model directory (diffusers layout, see models/pipeline.py)
  workdir/precomputed/    latents and text states (data/precompute.py)
  workdir/train/          Orbax checkpoints and sample grids
  workdir/model/DONE.json written last: the settings the finished model was trained with
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from attrib_jax import io_utils
from attrib_jax import parallel
from attrib_jax.data import precompute
from attrib_jax.data import reader
from attrib_jax.data import vocab
from attrib_jax.models import clip_text
from attrib_jax.models import pipeline as pipeline_lib
from attrib_jax.models import tokenizer as tokenizer_lib
from attrib_jax.models import unet as unet_lib
from attrib_jax.models import vae as vae_lib
from attrib_jax.training import loop
from attrib_jax.visualize import save_image_grid


# Config blocks that do not change the trained weights (FastGDA's `distill` reads a trained
# model: configs/distill_tiny.py's model is the demo's, and must be reusable as it).
NOT_TRAINING_KEYS = frozenset({"name", "generate", "attribution", "attribution_top_k",
                               "evaluation", "distill"})


class DatasetSource(NamedTuple):
  num_items: int
  get_items: Callable[[np.ndarray], tuple]  # indices -> (images uint8, captions, indices)
  metadata: dict


def fingerprint(tree: Any) -> str:
  return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:16]


# config.train settings that change how a run reports and checkpoints, not its weights.
REPORTING_TRAIN_KEYS = frozenset({"sample_every", "log_every", "checkpoint_every"})
# Every config.train setting `run` reads: another key is a typo that would silently train with
# the default it meant to change.
TRAIN_KEYS = REPORTING_TRAIN_KEYS | frozenset({
    "batch_size", "num_steps", "learning_rate", "warmup_steps", "lr_schedule", "weight_decay",
    "grad_clip_norm", "random_flip", "caption_dropout", "ema_decay", "min_snr_gamma",
    "num_devices"})


def trained_with_differences(config: ml_collections.ConfigDict, done: dict, *,
                             include_reporting: bool = False) -> list[str]:
  """The settings (dotted keys, sorted) in which `config`'s recipe differs from the one a
  finished model was trained with (`done`: its DONE.json). Blocks that cannot change the
  weights (NOT_TRAINING_KEYS) and REPORTING_TRAIN_KEYS are left out; tuples and lists compare
  equal (DONE.json stores JSON). `include_reporting`: also those keys (the scope of the
  fingerprint `run` compares)."""
  def flat(tree, prefix=()):
    if not isinstance(tree, dict):
      return {prefix: tree}
    return {p: v for k, sub in tree.items() for p, v in flat(sub, prefix + (k,)).items()}

  def recipe_of(tree):
    tree = json.loads(json.dumps(tree, default=str))
    return {p: v for p, v in flat({k: v for k, v in tree.items()
                                   if k not in NOT_TRAINING_KEYS}).items()
            if include_reporting or not (p[0] == "train" and p[-1] in REPORTING_TRAIN_KEYS)}

  ours, theirs = recipe_of(config.to_dict()), recipe_of(done["settings"]["config"])
  return sorted(".".join(p) for p in set(ours) | set(theirs) if ours.get(p) != theirs.get(p))


def _claim_run(config: ml_collections.ConfigDict, train_dir: str, trained_with: dict,
               settings: dict) -> None:
  """Records in `train_dir`/RUN.json what the run there trains, before its first step; a rerun
  with other settings is refused, naming what differs. Resuming another recipe's checkpoints
  would end in a model (and a DONE.json) that claims settings it was not trained with."""
  path = os.path.join(train_dir, "RUN.json")
  record = {"fingerprint": fingerprint(trained_with), "settings": settings,
            "data_version": trained_with["data_version"]}
  if os.path.exists(path):
    with open(path) as f:
      held = json.load(f)
    if held["fingerprint"] == record["fingerprint"]:
      return
    differ = trained_with_differences(config, held)
    if held["settings"]["excluded"] != settings["excluded"]:
      differ.append(f"excluded ({len(held['settings']['excluded'])} items then, "
                    f"{len(settings['excluded'])} now)")
    if held.get("data_version") != record["data_version"]:
      differ.append(f"dataset version ({held.get('data_version')} then, "
                    f"{record['data_version']} now)")
    raise ValueError(
        f"{train_dir} holds an interrupted run with other settings ("
        f"{', '.join(differ) or 'recipe'} differ): rerun with its settings to resume it, or "
        f"use another --workdir (or delete {train_dir})")
  checkpoints = os.path.join(train_dir, "checkpoints")
  if os.path.isdir(checkpoints) and os.listdir(checkpoints):
    raise ValueError(f"{checkpoints} holds checkpoints with no record of their settings "
                     f"({path} missing): they cannot be resumed safely; delete {train_dir}")
  if parallel.is_main_process():   # the others checked the same record above (read-only)
    io_utils.atomic_write_json(path, record, sort_keys=False)


def _builder_class(kind: str):
  """The TFDS builder class of a `config.world.kind` (imported on demand: each pulls its own
  dependencies)."""
  if kind == "tiny_world":
    from attrib_jax.data import tiny_world  # pylint: disable=g-import-not-at-top
    return tiny_world.TinyWorld
  if kind == "coco2017_captions":
    from attrib_jax.data import coco  # pylint: disable=g-import-not-at-top
    return coco.Coco2017Captions
  if kind == "image_folder":
    from attrib_jax.data import image_folder  # pylint: disable=g-import-not-at-top
    return image_folder.ImageFolderCaptions
  raise ValueError(f"config.world.kind: unknown dataset {kind!r} (tiny_world, "
                   "coco2017_captions, image_folder)")


def _folder_digest(world: ml_collections.ConfigDict) -> str:
  """A digest of an image folder's captions and of its captioned files' sizes and times.

  The folder is the user's and may change between runs under the same path: the digest names
  the TFDS dataset and enters the fingerprints made from it, so edited captions or replaced
  images are rebuilt instead of read stale. Raises (from `read_captions`) with the problem
  named: no folder, no captions file, a captioned file missing, an uncaptioned image.
  """
  from attrib_jax.data import image_folder  # pylint: disable=g-import-not-at-top
  if not world.get("manual_dir"):
    raise ValueError("config.world.manual_dir: the image folder is not set (pass "
                     "--config.world.manual_dir=path/to/images)")
  items = image_folder.read_captions(world.manual_dir, world.get("captions_file") or None)
  stats = [(name, os.stat(os.path.join(world.manual_dir, name))) for name, _ in items]
  return fingerprint({"items": items, "resolution": world.resolution,
                      "files": [(n, s.st_size, s.st_mtime_ns) for n, s in stats]})


def dataset_version(config: ml_collections.ConfigDict) -> str:
  """The version of the config's dataset builder: part of the fingerprints of what is made from
  the data (precomputed arrays, trained models), because a generator change (e.g. the tiny
  world's geometry) can change the items while the config stays the same."""
  version = str(_builder_class(config.world.kind).VERSION)
  if config.world.kind == "image_folder":
    version += "+" + _folder_digest(config.world)
  return version


def tiny_world_settings(world: ml_collections.ConfigDict) -> dict[str, Any]:
  """The `world` block of a tiny_world config as keyword arguments of `tiny_world.config` and
  `tiny_world.generate_world` (keys the block leaves out keep the generator's defaults), so a
  benchmark regenerates exactly the world the dataset was built from."""
  settings = dict(seed=world.seed, num_items=world.num_items, resolution=world.resolution,
                  rare_count=world.rare_count)
  if "patterns" in world:
    settings["patterns"] = tuple(world.patterns)
  if "rare_style" in world:
    settings["rare_style"] = world.rare_style
  if "two_object_fraction" in world:
    settings["two_object_fraction"] = float(world.two_object_fraction)
  return settings


def open_dataset(config: ml_collections.ConfigDict, data_dir: str) -> DatasetSource:
  """Builds (once) and opens the config's TFDS dataset for random access."""
  kind = config.world.kind
  builder_class = _builder_class(kind)
  if kind == "tiny_world":
    from attrib_jax.data import tiny_world  # pylint: disable=g-import-not-at-top
    w = config.world
    builder = builder_class(data_dir=data_dir,
                            config=tiny_world.config(**tiny_world_settings(config.world)))
    metadata = lambda b: {"rare_concepts": tiny_world.rare_concepts_of(b)}
  elif kind == "image_folder":
    from attrib_jax.data import image_folder  # pylint: disable=g-import-not-at-top
    w = config.world
    digest = _folder_digest(w)
    # One TFDS config per folder content (see _folder_digest), so a changed folder is rebuilt.
    builder = builder_class(data_dir=data_dir, manual_dir=w.manual_dir,
                            config=image_folder.ImageFolderConfig(
                                name=f"r{w.resolution}_{digest}", resolution=w.resolution,
                                captions_file=w.get("captions_file") or None))
    metadata = lambda b: {"folder": os.path.abspath(w.manual_dir), "digest": digest}
  else:  # coco2017_captions
    from attrib_jax.data import coco  # pylint: disable=g-import-not-at-top
    builder = builder_class(data_dir=data_dir, config=coco.config(
        resolution=config.world.resolution), manual_dir=config.world.manual_dir)
    metadata = lambda b: {}
  builder.download_and_prepare()
  source = reader.load_split(builder)   # random access by the items' stable `index`
  if len(source) == 0:
    raise ValueError(f"The {kind} dataset in {data_dir} is empty")

  def get_items(indices: np.ndarray):
    records = source.get_many(indices)
    images = np.stack([np.asarray(r["image"]) for r in records])
    return images, [list(r["captions"]) for r in records], np.asarray(
        [int(r["index"]) for r in records])

  return DatasetSource(len(source), get_items, metadata(builder))


def _random_text_encoder(config, model_dir: str, source: DatasetSource) -> None:
  """The tiny world's text side: BPE learned from the captions, a frozen random CLIP tower."""
  captions = [c for start in range(0, source.num_items, 512)
              for item in source.get_items(np.arange(start, min(start + 512,
                                                                source.num_items)))[1]
              for c in item]
  vocab.write_tokenizer_files(os.path.join(model_dir, "tokenizer"), captions,
                              config.tokenizer_max_length)
  tok = tokenizer_lib.load_tokenizer(os.path.join(model_dir, "tokenizer"))
  t = config.text_encoder
  text_config = {"vocab_size": max(tok.vocab.values()) + 1, "hidden_size": t.hidden_size,
                 "intermediate_size": t.intermediate_size,
                 "num_hidden_layers": t.num_hidden_layers,
                 "num_attention_heads": t.num_attention_heads,
                 "max_position_embeddings": config.tokenizer_max_length,
                 "hidden_act": t.hidden_act, "bos_token_id": tok.bos_token_id,
                 "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
  _, params = clip_text.init_clip_text(text_config, jax.random.key(t.seed))
  clip_text.save_clip_text(os.path.join(model_dir, "text_encoder"), params, text_config)


def _copy_pretrained(config, model_dir: str, field: str = "pretrained_dir",
                     names=("vae", "tokenizer", "text_encoder")) -> None:
  """Real models: the text encoder, tokenizer (and VAE) are the user's local files.

  Each component lands whole or not at all (a staging copy renamed into place), text_encoder
  last: `prepare` takes text_encoder/config.json as the sign that the text side is complete,
  so a run killed while copying copies again rather than going on without a VAE.
  """
  src = config[field]
  for name in names:
    if not os.path.isdir(os.path.join(src, name)):
      raise FileNotFoundError(f"config.{field}={src} has no {name}/ directory")
  for name in sorted(names, key=lambda n: n == "text_encoder"):
    with io_utils.atomic_directory(os.path.join(model_dir, name)) as staging:
      shutil.copytree(os.path.join(src, name), staging, dirs_exist_ok=True)


def _encoders(config, model_dir: str):
  """(encode_images, encode_text) for precompute."""
  text, text_params, _ = clip_text.load_clip_text(os.path.join(model_dir, "text_encoder"))
  tok = tokenizer_lib.load_tokenizer(os.path.join(model_dir, "tokenizer"))
  encode_text = pipeline_lib.make_text_encoder_fn(text, text_params, tok)
  vae = vae_params = None
  if os.path.isdir(os.path.join(model_dir, "vae")):
    vae, vae_params, _ = vae_lib.load_vae(os.path.join(model_dir, "vae"))
  encode = jax.jit(functools.partial(pipeline_lib.images_to_latents, vae=vae,
                                     vae_params=vae_params,
                                     pixel_patch=pipeline_lib.read_pixel_patch(model_dir)))
  calls = iter(range(1 << 62))  # each call a fresh, reproducible key for the VAE sample

  def encode_images(images):
    return np.asarray(encode(images, key=jax.random.fold_in(jax.random.key(config.seed),
                                                            next(calls))))
  return encode_images, encode_text


# How long the other processes wait for process 0 to build the dataset and precompute
# (hours at MSCOCO scale); a coordination-service barrier, not a device collective.
PREPARE_BARRIER_S = 48 * 3600


def prepare(config: ml_collections.ConfigDict, workdir: str, log=print):
  """Dataset, text side and precomputed arrays; returns (source, arrays, model_dir).

  Several processes (jax.distributed): process 0 builds and writes everything, the others wait
  at a barrier and then open what it wrote (the workdir must be a shared filesystem)."""
  if parallel.is_main_process():
    built = _build_prepared(config, workdir, log)
  parallel.barrier("recipe.prepare", timeout_s=PREPARE_BARRIER_S)
  if parallel.is_main_process():
    return built
  return (open_dataset(config, os.path.join(workdir, "tfds")),
          precompute.load(os.path.join(workdir, "precomputed")), os.path.join(workdir, "model"))


def _build_prepared(config: ml_collections.ConfigDict, workdir: str, log=print):
  """`prepare`'s work, on process 0 only: it writes the dataset, model side and arrays."""
  model_dir = os.path.join(workdir, "model")
  source = open_dataset(config, os.path.join(workdir, "tfds"))
  # text_encoder/config.json is written last of the text side (save_component writes the
  # weights first; _copy_pretrained copies text_encoder last), so it marks the side complete.
  if not os.path.exists(os.path.join(model_dir, "text_encoder", "config.json")):
    os.makedirs(model_dir, exist_ok=True)
    if config.world.kind == "coco2017_captions":
      _copy_pretrained(config, model_dir)
    else:  # pixel space, with a random text tower or the user's CLIP text directory
      # Before the marker: a run killed between the two would otherwise resume without the
      # codec file and read the model as unpatched pixels (read_pixel_patch's default 1).
      pipeline_lib.write_pixel_patch(model_dir, config.pixel_patch)
      if config.get("pretrained_text_dir"):
        _copy_pretrained(config, model_dir, "pretrained_text_dir", ("tokenizer", "text_encoder"))
      else:
        _random_text_encoder(config, model_dir, source)
  pipeline_lib.save_scheduler(os.path.join(model_dir, "scheduler"), config.scheduler.to_dict())
  pipeline_lib.save_model_index(model_dir,
                                pixel_space=not os.path.isdir(os.path.join(model_dir, "vae")))
  metadata_path = os.path.join(workdir, "dataset_metadata.json")
  io_utils.atomic_write_json(metadata_path, source.metadata, sort_keys=False)

  encode_images, encode_text = _encoders(config, model_dir)
  pre_dir = os.path.join(workdir, "precomputed")
  precompute.precompute(
      pre_dir, num_items=source.num_items, get_items=source.get_items,
      encode_images=encode_images, encode_text=encode_text, num_captions=config.num_captions,
      dtype=config.precompute_dtype,
      fingerprint={"world": config.world.to_dict(), "text": config.text_encoder.to_dict()
                   if "text_encoder" in config else None, "seed": config.seed,
                   **({"text_dir": config.pretrained_text_dir}
                      if config.get("pretrained_text_dir") else {}),
                   "data_version": dataset_version(config)}, log=log)
  return source, precompute.load(pre_dir), model_dir


def run(config: ml_collections.ConfigDict, workdir: str, *, excluded=(), log=print,
        checkpoints: bool = True) -> str:
  """Trains the config's model in `workdir` (or reuses it); returns the model directory.

  `checkpoints=False`: no training checkpoints at all (leave-K-out retrainings, where the
  final save would cost more than rerunning an interrupted one); the weights are the same,
  and so is the model's fingerprint."""
  unknown = sorted(set(config.train) - TRAIN_KEYS)
  if unknown:
    raise ValueError(f"config.train: unknown setting(s) {unknown}; known: {sorted(TRAIN_KEYS)}")
  model_dir = os.path.join(workdir, "model")
  done_path = os.path.join(model_dir, "DONE.json")
  settings = {"config": config.to_dict(), "excluded": sorted(int(i) for i in excluded)}
  # Blocks that cannot change the trained weights are left out of the fingerprint, so that
  # e.g. an attribution override does not make the finished model look stale.
  trained_with = {"config": {k: v for k, v in settings["config"].items()
                             if k not in NOT_TRAINING_KEYS}, "excluded": settings["excluded"],
                  "data_version": dataset_version(config)}
  if os.path.exists(done_path):
    with open(done_path) as f:
      done = json.load(f)
    if done["fingerprint"] == fingerprint(trained_with):
      log(f"train: reusing the trained model in {model_dir}")
      return model_dir
    differ = trained_with_differences(config, done, include_reporting=True)
    if done["settings"].get("excluded") != settings["excluded"]:
      differ.append("excluded")
    differ = differ or ["the dataset version"]   # the one part DONE.json does not spell out
    raise ValueError(f"{model_dir} holds a model trained with other settings ({', '.join(differ)}"
                     " differ); use another --workdir (or delete it)")
  _claim_run(config, os.path.join(workdir, "train"), trained_with, settings)
  _, arrays, model_dir = prepare(config, workdir, log=log)
  width = np.shape(arrays["text_states"])[-1]
  if width != config.unet.cross_attention_dim:
    # A user's own text tower (pretrained_text_dir) sets the width the UNet must read.
    raise ValueError(f"the text encoder in {model_dir}/text_encoder gives {width}-d states but "
                     f"config.unet.cross_attention_dim is {config.unet.cross_attention_dim}: "
                     f"set --config.unet.cross_attention_dim={width}")

  t = config.train
  mesh = parallel.make_mesh(t.num_devices or None)
  unet_config = dict(config.unet.to_dict())
  unet, init_params = unet_lib.init_unet(unet_config, jax.random.key(config.seed))
  apply_fn = lambda p, x, ts, c: unet.apply({"params": p}, x, ts, c)
  schedule = pipeline_lib.schedules.NoiseSchedule.from_config(config.scheduler.to_dict())
  settings_for_loop = loop.TrainSettings.from_config(config)
  if not checkpoints:
    settings_for_loop = dataclasses.replace(settings_for_loop, checkpoint_every=0)
  sample_fn = None
  if t.sample_every:
    sample_fn = _grid_writer(config, model_dir, arrays, apply_fn, schedule, workdir, mesh)
  state = loop.train(
      arrays=arrays, apply_fn=apply_fn, init_params=init_params, schedule=schedule,
      workdir=os.path.join(workdir, "train"), settings=settings_for_loop,
      excluded=excluded, sample_fn=sample_fn, mesh=mesh, log=log,
      # The step depends on the network and noise schedule only through these two configs.
      model_key=json.dumps({"unet": unet_config, "scheduler": config.scheduler.to_dict()},
                           sort_keys=True, default=str))
  params = state.ema_params if state.ema_params is not None else state.params
  params = parallel.to_host(params)   # replicated: every process holds the same weights
  if parallel.is_main_process():
    pipeline_lib.save_unet(os.path.join(model_dir, "unet"), params, unet_config)
    io_utils.atomic_write_json(done_path, {"fingerprint": fingerprint(trained_with),
                                           "settings": settings}, sort_keys=False)
  parallel.barrier("recipe.run: model written")   # the others may read it next
  log(f"train: model written to {model_dir}")
  return model_dir


def _grid_writer(config, model_dir, arrays, apply_fn, schedule, workdir, mesh):
  """A sample grid of fixed prompts (the first caption of the first 8 items) as PNG.

  Sampled on the training mesh, replicated like the parameters (every process runs it: with
  several, the parameters are global arrays); written by process 0."""
  text_states = parallel.replicate(np.asarray(arrays["text_states"][:8, 0], np.float32), mesh)
  null = parallel.replicate(np.asarray(arrays["null_text_states"], np.float32)[None], mesh)
  shape = tuple(arrays["latents"].shape[2:])
  g = config.generate

  def write(params, step):
    from attrib_jax.diffusion import sampling  # pylint: disable=g-import-not-at-top
    latents = sampling.ddim_sample(schedule, apply_fn, params, text_states, null,
                                   jax.random.key(g.seed), latent_shape=shape,
                                   num_steps=g.num_steps, guidance_scale=g.guidance_scale)
    if os.path.isdir(os.path.join(model_dir, "vae")):
      return  # latent space: decoding needs the VAE, which training does not load
    pixels = pipeline_lib.depth_to_space(latents, pipeline_lib.read_pixel_patch(model_dir))
    images = parallel.to_host(jnp.clip(jnp.round((pixels + 1) * 127.5), 0, 255)).astype(np.uint8)
    if parallel.is_main_process():
      save_image_grid(os.path.join(workdir, "train", f"samples_{step:06d}.png"), images)

  return write
