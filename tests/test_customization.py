"""Custom Diffusion customization (attrib_jax.customization) on a tiny random SD-1-layout
pipeline saved as a snapshot (PNDM scheduler config, VAE, CLIP text tower, vocab.json +
merges.txt) and loaded by load_pipeline."""
import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from attrib_jax import customization as cu
from attrib_jax.customization import delta as delta_lib
from attrib_jax.customization import validation
from attrib_jax.data import vocab
from attrib_jax.models import clip_text
from attrib_jax.models import pipeline as pipeline_lib
from attrib_jax.models import tokenizer as tokenizer_lib
from attrib_jax.models import unet as unet_lib
from attrib_jax.models import vae as vae_lib

SD1_TINY = dict(sample_size=8, block_out_channels=[32, 64], layers_per_block=1,
                down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                attention_head_dim=4, cross_attention_dim=48, norm_num_groups=8)
VAE_TINY = dict(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8,
                latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, sample_size=16)
PNDM = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.7.0.dev0",
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "trained_betas": None, "clip_sample": False}
CAPTIONS = ["a red circle", "a blue square on the left", "a green ring at the top"]
SETTINGS = cu.CustomizationSettings(num_steps=3, batch_size=2, num_regularization=3,
                                    learning_rate=1e-2, initializer="ktn")


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("sd1"))
  vocab.write_tokenizer_files(os.path.join(d, "tokenizer"), CAPTIONS, 16)
  tok = tokenizer_lib.load_tokenizer(os.path.join(d, "tokenizer"))
  text_config = {"vocab_size": len(tok), "hidden_size": 48, "intermediate_size": 64,
                 "num_hidden_layers": 1, "num_attention_heads": 2,
                 "max_position_embeddings": 16, "hidden_act": "quick_gelu",
                 "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                 "pad_token_id": tok.pad_token_id}
  _, text_params = clip_text.init_clip_text(text_config, jax.random.key(1))
  clip_text.save_clip_text(os.path.join(d, "text_encoder"), text_params, text_config)
  _, unet_params = unet_lib.init_unet(SD1_TINY, jax.random.key(2))
  pipeline_lib.save_unet(os.path.join(d, "unet"), unet_params, SD1_TINY)
  _, vae_params = vae_lib.init_vae(VAE_TINY, jax.random.key(3))
  vae_lib.save_vae(os.path.join(d, "vae"), vae_params, VAE_TINY)
  pipeline_lib.save_scheduler(os.path.join(d, "scheduler"), PNDM)
  pipeline_lib.save_model_index(d, pixel_space=False)
  return d


def _customize(pipe, steps=SETTINGS.num_steps):
  s = SETTINGS if steps == SETTINGS.num_steps else cu.CustomizationSettings(
      **{**SETTINGS.__dict__, "num_steps": steps})
  prep = cu.prepare_pipeline(pipe, s)
  images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  ex = cu.exemplar_items(prep, images, ["a <new1> circle", "<new1> on the left"],
                         modifier_token="<new1>")
  reg_latents = np.random.default_rng(1).normal(size=(3, 8, 8, 4)).astype(np.float32)
  reg = cu.regularization_items(pipe, reg_latents, CAPTIONS)
  return cu.customize(pipe, ex, reg, s)


@pytest.fixture(scope="module")
def trained(sd_dir):
  pipe = pipeline_lib.load_pipeline(sd_dir)
  before = jax.tree.map(np.array, (pipe.unet_params, pipe.text_params))
  delta = _customize(pipe)
  return pipe, before, delta


def test_pndm_snapshot_loads_with_its_betas(sd_dir):
  pipe = pipeline_lib.load_pipeline(sd_dir)
  assert pipe.schedule.clip_sample is False and pipe.schedule.steps_offset == 1
  np.testing.assert_allclose(float(pipe.schedule.betas[-1]), 0.012, rtol=1e-5)


def test_only_kv_and_the_new_row_change_and_the_base_is_untouched(trained):
  pipe, (unet0, text0), delta = trained
  for a, b in zip(jax.tree.leaves((unet0, text0)), jax.tree.leaves((pipe.unet_params,
                                                                  pipe.text_params))):
    np.testing.assert_array_equal(a, np.asarray(b))          # the base pipeline is untouched
  custom = cu.apply_delta(pipe, delta)
  flat0, flat1 = traverse_util.flatten_dict(unet0), traverse_util.flatten_dict(custom.unet_params)
  changed = {"/".join(p) for p in flat0 if not np.array_equal(flat0[p], np.asarray(flat1[p]))}
  assert changed == set(delta.kv) == set(delta_lib.kv_paths(pipe.unet_params))  # every K/V
  assert all("attn2" in c and c.split("/")[-2] in ("to_k", "to_v") for c in changed)
  table0 = traverse_util.flatten_dict(text0)[delta_lib.TABLE_PATH]
  table1 = np.asarray(traverse_util.flatten_dict(custom.text_params)[delta_lib.TABLE_PATH])
  np.testing.assert_array_equal(table1[:-1], table0)        # the old rows are the base's
  start = cu.initial_row(pipe, "ktn")
  assert not np.allclose(table1[-1], start)                 # the new row was trained
  t1 = traverse_util.flatten_dict(custom.text_params)
  for p, v in traverse_util.flatten_dict(text0).items():
    if p != delta_lib.TABLE_PATH:
      np.testing.assert_array_equal(np.asarray(t1[p]), v)
  ids = custom.tokenizer("a <new1> circle").input_ids[0]
  assert delta.token_id in ids and delta.token_id == table0.shape[0]


def test_delta_round_trips_and_loads_on_the_base(trained, sd_dir, tmp_path):
  pipe, _, delta = trained
  cu.save_delta(str(tmp_path / "delta"), delta)
  back = cu.load_delta(str(tmp_path / "delta"))
  assert set(back.kv) == set(delta.kv) and back.token == "<new1>"
  for k in delta.kv:
    np.testing.assert_array_equal(back.kv[k], delta.kv[k])
  np.testing.assert_array_equal(back.embedding_row, delta.embedding_row)
  a = cu.apply_delta(pipe, delta)
  b = cu.load_customized(sd_dir, str(tmp_path / "delta"))
  ids = a.tokenizer("a <new1> circle").input_ids
  out_a = a.text_encoder.apply({"params": a.text_params}, ids).last_hidden_state
  out_b = b.text_encoder.apply({"params": b.text_params}, ids).last_hidden_state
  np.testing.assert_array_equal(np.asarray(out_a), np.asarray(out_b))


def test_a_mismatched_base_or_a_damaged_delta_is_named(trained, tmp_path):
  pipe, _, delta = trained
  other = dict(delta.kv)
  name = sorted(other)[0]
  other[name] = other[name][:, :-1]
  with pytest.raises(cu.DeltaMismatchError, match="K/V shape mismatch.*" + name.split("/")[0]):
    cu.apply_delta(pipe, cu.CustomDelta(**{**delta.__dict__, "kv": other}))
  with pytest.raises(cu.DeltaMismatchError, match="token embedding row"):
    cu.apply_delta(pipe, cu.CustomDelta(**{**delta.__dict__,
                                           "embedding_row": delta.embedding_row[:-1]}))
  with pytest.raises(cu.DeltaMismatchError, match="another text encoder"):
    cu.apply_delta(pipe, cu.CustomDelta(**{**delta.__dict__, "base": {
        **delta.base, "text_table_sha256": "0" * 16}}))
  d = str(tmp_path / "delta")
  cu.save_delta(d, delta)
  path = os.path.join(d, delta_lib.DELTA_FILE)
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(ValueError, match="delta.npz"):
    cu.load_delta(d)
  with pytest.raises(FileNotFoundError, match="not a customization delta"):
    cu.load_delta(str(tmp_path / "nothing"))


def test_tokenizer_add_tokens_matches_transformers(sd_dir):
  transformers = pytest.importorskip("transformers")
  ref = transformers.CLIPTokenizer.from_pretrained(os.path.join(sd_dir, "tokenizer"))
  ref.add_tokens(["<new1>"])
  ours = tokenizer_lib.load_tokenizer(os.path.join(sd_dir, "tokenizer")).add_tokens(["<new1>"])
  for p in ["a <new1> red circle", "<NEW1>circle", "x<new1>y"]:
    assert ours(p, 16).input_ids[0].tolist() == ref(p, padding="max_length", max_length=16,
                                                     truncation=True).input_ids
  with pytest.raises(ValueError, match="already in the tokenizer"):
    ours.add_tokens(["<new1>"])


def test_settings_and_measure():
  with pytest.raises(ValueError, match="unknown customization settings.*'stepz'"):
    cu.CustomizationSettings.from_config({"stepz": 3})
  exemplars = np.zeros((2, 8, 8, 3), np.uint8)
  exemplars[1] = 200
  images = np.stack([np.full((8, 8, 3), 190, np.uint8), np.full((8, 8, 3), 100, np.uint8)])
  np.testing.assert_allclose(validation.nearest_exemplar_distance(images, exemplars), [10, 100])
  with pytest.raises(ValueError, match="no images"):
    validation.nearest_exemplar_distance(images[:0], exemplars)
