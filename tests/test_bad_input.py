"""Bad input: each case a clear error that names the file, setting or key, and nothing already
computed is deleted or overwritten by the failed run.

The bad-input matrix and where each row is tested:
  damaged training checkpoint      here (truncated, emptied, another model's)
  damaged .npz / .npy caches       here (every loader: empty, truncated, one flipped byte),
                                   also Fisher, EK-FAC and sweep checkpoints and query arrays
  mis-shaped weights               test_unet.py::test_weight_problems_name_the_key and
                                   test_weights.py (strict loading, unreadable safetensors);
                                   here: precomputed arrays and queries of another shape
  empty dataset                    here (tiny world, precompute); test_training.py (every item
                                   excluded); test_folder.py (an image folder without captions)
  unknown config key               here (--config.x overrides, config.train); test_configs.py
                                   (config.attribution); test_counterfactual.py
                                   (config.evaluation)
  query image of another size      here
  prompt longer than the tokenizer here
  workdir from another config      here (generate / attribute / check_prompts, and train)
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import zipfile

import jax
import numpy as np
import pytest

import test_attribution as ta
import test_training as tt
from attrib_jax import generation
from attrib_jax import io_utils
from attrib_jax import parallel
from attrib_jax.attribution import fisher as fisher_lib
from attrib_jax.attribution import runner
from attrib_jax.attribution import scores as scores_lib
from attrib_jax.attribution import sweep as sweep_lib
from attrib_jax.data import precompute
from attrib_jax.data import vocab
from attrib_jax.evaluation import eval_report
from attrib_jax.models import clip_text
from attrib_jax.models import pipeline as pipeline_lib
from attrib_jax.models import tokenizer as tokenizer_lib
from attrib_jax.models import unet as unet_lib
from attrib_jax.training import loop
from attrib_jax.training import recipe


def _damage(path: str, how: str) -> None:
  """Damages a file in place as a full disk, a cut copy or bad storage would."""
  data = open(path, "rb").read()
  if how == "emptied":
    data = b""
  elif how == "truncated":
    data = data[:len(data) // 2]
  elif how == "flipped byte":
    # One byte in the middle of every member of the zip, so whichever the loader reads first
    # fails its CRC (a plain .npy: the middle of the file).
    data = bytearray(data)
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as z:
        for info in z.infolist():
          start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
          data[start + info.compress_size // 2] ^= 0xFF
    else:
      data[len(data) // 2] ^= 0xFF
    data = bytes(data)
  else:
    raise ValueError(how)
  with open(path, "wb") as f:
    f.write(data)


# ------------------------------------------------------------- training checkpoints ---

def _micro_denoiser(width=8):
  """test_attribution's micro denoiser on test_training's arrays (a UNet's step would cost
  minutes of compiling on a busy 2-core machine; the checkpoint does not care)."""
  module = ta.MicroDenoiser(width=width)
  params = jax.device_get(jax.jit(module.init)(
      jax.random.key(0), np.zeros((1, 8, 8, 3)), np.zeros((1,), np.int32),
      np.zeros((1, 4, 8)))["params"])
  return (lambda p, x, t, c: module.apply({"params": p}, x, t, c)), params


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
  """A micro training stopped after step 3 (checkpoints at steps 2 and 3) and its arguments."""
  apply_fn, params = _micro_denoiser()
  kwargs = dict(arrays=tt._arrays(), apply_fn=apply_fn, init_params=params, schedule=tt.SCHEDULE,
                settings=loop.TrainSettings(num_steps=6, batch_size=8, learning_rate=1e-2,
                                            seed=1, checkpoint_every=2), log=lambda _: None,
                mesh=parallel.make_mesh(1))
  workdir = str(tmp_path_factory.mktemp("interrupted"))
  loop.train(workdir=workdir, stop_after=3, **kwargs)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3"]
  return workdir, kwargs


def _files(root):
  return {os.path.relpath(os.path.join(d, f), root): os.path.getsize(os.path.join(d, f))
          for d, _, names in os.walk(root) for f in names}


@pytest.mark.parametrize("damage", ["truncated", "emptied", "another model"])
def test_damaged_training_checkpoint_is_named_and_kept(interrupted_run, tmp_path, damage):
  source, kwargs = interrupted_run
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  step3 = os.path.join(workdir, "checkpoints", "3")
  if damage == "another model":
    # The same workdir resumed with another network: the checkpoint's tree does not fit it.
    apply_fn, params = _micro_denoiser(width=16)
    kwargs = dict(kwargs, init_params=params, apply_fn=apply_fn)
  else:
    for path in _files(step3):
      if damage == "emptied" or _files(step3)[path] > 1000:
        _damage(os.path.join(step3, path), damage)
  before = _files(workdir)
  with pytest.raises(loop.CheckpointError) as error:
    loop.train(workdir=workdir, **kwargs)
  message = str(error.value)
  assert step3 in message and "step 3" in message, message
  assert f"delete {step3} to resume from step 2" in message, message
  assert _files(workdir) == before    # nothing deleted, nothing written over


# ----------------------------------------------------------- damaged .npz / .npy ---

@pytest.fixture(scope="module")
def micro():
  arrays = ta.make_arrays(ta.N)
  params = jax.device_get(jax.jit(ta.MicroDenoiser().init)(
      jax.random.key(0), np.zeros((1,) + ta.LATENT), np.zeros((1,), np.int32),
      np.zeros((1, ta.L, ta.D)))["params"])
  return {"arrays": arrays, "params": params}


def _abu(micro, out_dir, **settings):
  base = runner.AbUSettings(ta.FISHER, ta.UNLEARN, ta.SWEEP)
  import dataclasses  # pylint: disable=g-import-not-at-top
  return runner.AbU(ta.APPLY, micro["params"], micro["arrays"], ta.SCHEDULE,
                    dataclasses.replace(base, **settings), str(out_dir),
                    mesh=parallel.make_mesh(1), log=lambda _: None)


def _some_npz(path, **arrays):
  """A well-formed .npz with the members a loader reads first (then damaged by the test)."""
  meta = json.dumps({"fingerprint": "0" * 16, "padding": "x" * 2000})
  io_utils.atomic_savez(path, __meta__=np.asarray(meta), key=np.asarray("k" * 64),
                        fingerprint=np.asarray("f" * 16), **arrays)


def _fisher_cache(micro, tmp_path):
  path = str(tmp_path / "fisher.npz")
  _some_npz(path)
  return path, lambda: _abu(micro, tmp_path).fisher


def _ekfac_cache(micro, tmp_path):
  path = str(tmp_path / "ekfac.npz")
  _some_npz(path)
  return path, lambda: _abu(micro, tmp_path, preconditioner="ekfac").ekfac


def _pre_losses(micro, tmp_path):
  import dataclasses  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "pre_losses.npz")
  _some_npz(path)
  return path, lambda: _abu(micro, tmp_path,
                            sweep=dataclasses.replace(ta.SWEEP, method="cached")).pre_slot_losses


def _fisher_checkpoint(micro, tmp_path):
  path = str(tmp_path / "fisher_partial.npz")
  _some_npz(path)
  return path, lambda: fisher_lib.compute_fisher(
      ta.APPLY, micro["params"], micro["arrays"], ta.SCHEDULE, settings=ta.FISHER,
      mesh=parallel.make_mesh(1), checkpoint_path=path)


def _ekfac_checkpoint(micro, tmp_path):
  from attrib_jax.attribution import ekfac as ekfac_lib  # pylint: disable=g-import-not-at-top
  prefix = str(tmp_path / "ekfac_partial")
  path = ekfac_lib.checkpoint_files(prefix)["covariance_pass"]
  _some_npz(path)
  return path, lambda: ekfac_lib.compute_ekfac(
      ta.APPLY, micro["params"], micro["arrays"], ta.SCHEDULE, mesh=parallel.make_mesh(1),
      checkpoint_path=prefix)


def _query_dir(micro, tmp_path):
  directory = str(tmp_path / "queries" / "q")
  generation.save_query(directory, generation.Query(
      np.zeros(ta.LATENT, np.float32), np.zeros((ta.L, ta.D), np.float32),
      np.zeros((4, 4, 3), np.uint8), {"prompt": "p"}))
  return os.path.join(directory, "latent.npy"), lambda: generation.load_query(directory)


def _sweep_checkpoint(micro, tmp_path):
  path = str(tmp_path / "sweep_partial.npz")
  _some_npz(path)
  after = jax.tree.map(lambda a: a * 1.01, micro["params"])
  return path, lambda: sweep_lib.sweep(ta.APPLY, micro["params"], after, micro["arrays"],
                                       ta.SCHEDULE, settings=ta.SWEEP,
                                       mesh=parallel.make_mesh(1), checkpoint_path=path)


def _result(micro, tmp_path):
  base = str(tmp_path / "q" / "result")
  scores = np.linspace(0, 1, 5)
  scores_lib.save_result(base, scores, scores_lib.rank(scores), {"x": 1}, "m" * 16)
  return base + ".npz", lambda: scores_lib.load_result(base)


def _score_store(micro, tmp_path):
  index = np.arange(5)
  store = eval_report.ScoreStore(str(tmp_path / "scores"), index)
  scorer = eval_report.Scorer(lambda name, q: np.arange(5.0), {"method": "toy"})
  query = generation.Query(np.zeros(ta.LATENT, np.float32), np.zeros((ta.L, ta.D), np.float32),
                           np.zeros((4, 4, 3), np.uint8), {"prompt": "p"})
  store.get("toy", "q", query, scorer)   # writes scores/toy/q-<digest>.npz
  (path,) = glob.glob(str(tmp_path / "scores" / "toy" / "q-*.npz"))
  return path, lambda: store.get("toy", "q", query, scorer)


def _precomputed(micro, tmp_path):
  out = str(tmp_path / "precomputed")
  precompute.precompute(
      out, num_items=3, get_items=lambda rows: (np.zeros((len(rows), 4, 4, 3), np.uint8),
                                                [["a cap"]] * len(rows), np.asarray(rows)),
      encode_images=lambda x: np.zeros((len(x), 2, 2, 3), np.float32),
      encode_text=lambda p: np.zeros((len(p), 3, 4), np.float32), num_captions=1,
      log=lambda _: None)
  return os.path.join(out, "latents.npy"), lambda: precompute.load(out)


CACHES = {"fisher.npz": _fisher_cache, "ekfac.npz": _ekfac_cache,
          "pre_losses.npz": _pre_losses, "Fisher checkpoint": _fisher_checkpoint,
          "EK-FAC checkpoint": _ekfac_checkpoint, "query latent.npy": _query_dir,
          "sweep checkpoint": _sweep_checkpoint, "result.npz": _result,
          "evaluation score store": _score_store, "precomputed latents.npy": _precomputed}


@pytest.mark.parametrize("damage", ["emptied", "truncated", "flipped byte"])
@pytest.mark.parametrize("cache", sorted(CACHES))
def test_damaged_cache_is_named_and_kept(micro, tmp_path, cache, damage):
  path, read = CACHES[cache](micro, tmp_path)
  if damage == "flipped byte" and not zipfile.is_zipfile(path):
    pytest.skip("a flipped byte in a raw .npy array is not detectable (no checksum)")
  _damage(path, damage)
  before = _files(str(tmp_path))
  with pytest.raises(io_utils.CorruptFileError, match="truncated or damaged") as error:
    read()
  assert path in str(error.value) and "Delete it" in str(error.value)
  assert _files(str(tmp_path)) == before   # the damaged file is kept; nothing else written


# ------------------------------------------------------------- mis-shaped arrays ---

def test_precomputed_array_of_another_shape_is_named(tmp_path):
  _, read = _precomputed(None, tmp_path)
  path = str(tmp_path / "precomputed" / "text_states.npy")
  np.save(path, np.zeros((3, 1, 5, 4), np.float32))   # another run's text width
  with pytest.raises(ValueError, match="text_states.npy has shape"):
    read()


def test_query_of_another_model_is_named(micro, tmp_path):
  abu = _abu(micro, tmp_path)
  query = generation.Query(np.zeros((8, 8, 2), np.float32), np.zeros((ta.L, ta.D), np.float32),
                           np.zeros((8, 8, 3), np.uint8), {"prompt": "p"})
  with pytest.raises(ValueError, match=r"query big: latent \(8, 8, 2\).*another model"):
    abu.score(query, "big")
  assert not os.path.exists(tmp_path / "big")


# ----------------------------------------------------------------- empty dataset ---

def test_empty_datasets_are_named(tmp_path):
  from attrib_jax.data import tiny_world  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="num_items must be >= 1"):
    tiny_world.config(num_items=0)
  with pytest.raises(ValueError, match=f"empty dataset.*{tmp_path}"):
    precompute.precompute(str(tmp_path), num_items=0, get_items=None, encode_images=None,
                          encode_text=None, num_captions=1)


# --------------------------------------------------------------- unknown config key ---

def _parse(*overrides):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = ["prog", "--config=configs/tiny.py:smoke", *overrides]
  values = flags.FlagValues()
  # sys_argv: config_flags defines a flag per override it finds there (else in sys.argv).
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


def test_unknown_override_names_the_key():
  assert _parse("--config.train.num_steps=3").train.num_steps == 3
  # ml_collections refuses it while parsing the flags (a traceback, but the key is named).
  with pytest.raises(AttributeError, match='num_stepz.*Did you mean "num_steps"'):
    _parse("--config.train.num_stepz=3")
  with pytest.raises(KeyError, match='trian.*Did you mean "train"'):
    _parse("--config.trian.num_steps=3")


def test_unknown_train_setting_in_a_config_is_named_before_any_work(tmp_path, monkeypatch):
  config = _parse()
  config.unlock()
  config.train.learning_rte = 1e-3
  monkeypatch.setattr(recipe, "prepare", lambda *a, **k: pytest.fail("reached prepare"))
  with pytest.raises(ValueError, match="config.train.*'learning_rte'"):
    recipe.run(config, str(tmp_path))


# ------------------------------------------------- query images and prompts (user's) ---

@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
  """A pixel-space pipeline of random text weights: 8x8 images through a 2x2 codec, an 8-token
  tokenizer (its captions' BPE)."""
  tok_dir = str(tmp_path_factory.mktemp("tokenizer"))
  vocab.write_tokenizer_files(tok_dir, ["a red circle", "a blue square on the left"], 8)
  tok = tokenizer_lib.load_tokenizer(tok_dir)
  text_config = {"vocab_size": max(tok.vocab.values()) + 1, "hidden_size": 8,
                 "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                 "max_position_embeddings": 8, "hidden_act": "quick_gelu",
                 "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                 "pad_token_id": tok.pad_token_id}
  text, text_params = clip_text.init_clip_text(text_config, jax.random.key(1))
  unet_config = dict(tt.UNET, sample_size=4, in_channels=12, out_channels=12)
  # The UNet's weights play no part in making a query: the module alone, not initialised.
  unet = unet_lib.UNet2DConditionModel(unet_lib.UNetConfig.from_diffusers(unet_config))
  return pipeline_lib.Pipeline(unet, None, text, text_params, tok, tt.SCHEDULE, None,
                               None, {"unet": unet_config, "text_encoder": text_config,
                                      "vae": None}, pixel_patch=2)


@pytest.mark.parametrize("shape", [(16, 16, 3), (9, 8, 3), (8, 8, 4), (8, 8)])
def test_query_image_of_another_size_is_named(tiny_pipe, shape):
  image = np.zeros(shape, np.uint8)
  with pytest.raises(ValueError, match=rf"the query image is {'x'.join(map(str, shape))}, "
                                       r"but the model takes 8x8x3"):
    generation.query_from_image(tiny_pipe, image, "a red circle")


def test_query_image_of_the_model_size_is_encoded(tiny_pipe):
  query = generation.query_from_image(tiny_pipe, np.zeros((8, 8, 3), np.uint8), "a red circle")
  assert query.latent.shape == (4, 4, 12)


def test_prompt_longer_than_the_tokenizer_is_named(tiny_pipe):
  long_prompt = "a red circle a blue square on the left"
  with pytest.raises(ValueError, match=r"the prompt 'a red circle a blue square on the left' "
                                       r"is \d+ tokens long .* at most 8"):
    generation.query_from_image(tiny_pipe, np.zeros((8, 8, 3), np.uint8), long_prompt)
  tiny_pipe.tokenizer.check_fits("a red circle")   # fits: no error
  # Training captions are still cut, as in every diffusion recipe.
  assert tiny_pipe.tokenizer([long_prompt]).input_ids.shape == (1, 8)


# ------------------------------------------------------- workdir from another config ---

def _finished_workdir(tmp_path, config):
  """A workdir whose DONE.json records `config` (the weights are not needed to refuse it)."""
  model = tmp_path / "model"
  model.mkdir(parents=True)
  (model / "DONE.json").write_text(json.dumps({"fingerprint": "0" * 16, "settings": {
      "config": config.to_dict(), "excluded": []}}))
  return str(tmp_path)


def test_launchers_refuse_a_workdir_of_another_config(tmp_path):
  from launch import common  # pylint: disable=g-import-not-at-top
  workdir = _finished_workdir(tmp_path, _parse())
  with pytest.raises(ValueError, match=r"another config \(train.learning_rate, "
                                       r"world.num_items differ"):
    common.load_trained_pipeline(workdir, _parse("--config.train.learning_rate=0.5",
                                                 "--config.world.num_items=32"))
  # Settings that cannot change the weights pass the check (and the load then finds no UNet).
  for same in (_parse(), _parse("--config.attribution.unlearn.alpha=0.5",
                                "--config.train.log_every=1", "--config.name=other")):
    with pytest.raises(FileNotFoundError, match="no unet/"):
      common.load_trained_pipeline(workdir, same)


def test_train_refuses_a_finished_workdir_of_another_config(tmp_path, monkeypatch):
  workdir = _finished_workdir(tmp_path, _parse())
  monkeypatch.setattr(recipe, "prepare", lambda *a, **k: pytest.fail("reached prepare"))
  with pytest.raises(ValueError, match=r"other settings.*train.num_steps"):
    recipe.run(_parse("--config.train.num_steps=4"), workdir)
  # The finished model's fingerprint covers every train key: the refusal names even those that
  # only change the reporting, and an exclusion.
  with pytest.raises(ValueError, match=r"other settings \(train.log_every differ"):
    recipe.run(_parse("--config.train.log_every=1"), workdir)
  with pytest.raises(ValueError, match=r"other settings \(excluded differ"):
    recipe.run(_parse(), workdir, excluded=(3,))
