"""In-world towers (attrib_jax.abc.world_towers): a tiny training run on fresh tiny-world renders
writes directories that load_tower and transformers read, with the same embeddings; the loss
falls; a seed gives the same files; a rerun reuses them; bad settings are named."""
import json
import os

import numpy as np
import pytest

from attrib_jax.abc import world_towers as wt
from attrib_jax.baselines import towers
from attrib_jax.data import tiny_world as tw
from attrib_jax.data import vocab
from attrib_jax.models import image_processing
from attrib_jax.models import tokenizer as tokenizer_lib

TINY = wt.WorldTowerSettings(
    image_size=16, patch_size=8, hidden_size=16, num_layers=1, num_heads=2,
    intermediate_size=32, projection_dim=8, text_hidden_size=16, text_num_layers=1,
    text_max_length=24, clip_steps=12, dino_steps=12, batch_size=8, learning_rate=3e-3,
    warmup_steps=2, seed=0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  rng = np.random.default_rng(0)
  scenes = [tw.sample_scene(rng, patterns=("plain",)) for _ in range(16)]
  images = np.stack([tw.render_scene(s, 16) for s in scenes])
  captions = [tw.caption_scene(s) for s in scenes]
  tok_dir = str(tmp_path_factory.mktemp("tok"))
  vocab.write_tokenizer_files(tok_dir, [c for cs in captions for c in cs], 24)
  return images, captions, tokenizer_lib.load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def built(world, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("towers"))
  seen = []
  dirs = wt.build_world_towers(out, *world, TINY, progress=seen.append)
  return out, dirs, seen


@pytest.fixture(scope="module")
def features(world, built):
  """Each image tower's features of the world's images, through load_tower (compiled once)."""
  return {kind: towers.load_tower(kind, built[1][kind])(world[0]) for kind in ("clip", "dino")}


def _files(directory):
  return {name: open(os.path.join(directory, name), "rb").read()
          for name in sorted(os.listdir(directory))}


def test_build_writes_loadable_towers_and_the_loss_falls(built, features):
  out, dirs, seen = built
  assert sorted(os.listdir(out)) == ["clip", "clip_text", "dino"]   # no staging leftovers
  assert [p.done for p in seen] == list(range(1, 13)) * 2
  assert {p.stage for p in seen} == {"towers/clip", "towers/dino"} and seen[-1].eta_s == 0
  for kind, dim in (("clip", 8), ("dino", 16)):
    assert {"config.json", "model.safetensors", "preprocessor_config.json",
            wt.RECORD_FILE} <= set(os.listdir(dirs[kind]))
    assert features[kind].shape == (16, dim) and np.isfinite(features[kind]).all()
    # Distinct images get distinct features (a collapsed tower would not).
    assert np.std(features[kind], axis=0).mean() > 1e-3
    losses = list(wt.read_record(dirs[kind])["losses"].values())
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05, losses
  record = wt.read_record(dirs["clip"])
  assert record["logit_scale"] > 0 and record["settings"] == json.loads(json.dumps(
      wt.dataclasses.asdict(TINY)))


def test_rerun_reuses_and_other_settings_are_named(world, built):
  out, dirs, _ = built
  before = {k: _files(d) for k, d in dirs.items()}
  stamps = {k: os.stat(os.path.join(d, "model.safetensors")).st_mtime_ns for k, d in dirs.items()}
  seen = []
  assert wt.build_world_towers(out, *world, TINY, progress=seen.append) == dirs
  assert not seen   # nothing trained
  assert {k: os.stat(os.path.join(d, "model.safetensors")).st_mtime_ns
          for k, d in dirs.items()} == stamps
  assert {k: _files(d) for k, d in dirs.items()} == before
  other = wt.dataclasses.replace(TINY, dino_steps=13)
  with pytest.raises(ValueError, match=r"dino tower trained with other settings \(dino_steps"):
    wt.build_world_towers(out, *world, other)
  images, captions, tok = world
  with pytest.raises(ValueError, match="trained on other data"):
    wt.build_world_towers(out, images[::-1].copy(), captions[::-1], tok, TINY)


def test_same_seed_same_files(world, built, tmp_path):
  _, dirs, _ = built
  again = wt.build_world_towers(str(tmp_path), *world, TINY)
  for kind in wt.KINDS:
    assert _files(again[kind])["model.safetensors"] == _files(dirs[kind])["model.safetensors"]


def test_transformers_reads_the_directories(world, built, features):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  images, captions, tok = world
  _, dirs, _ = built
  texts = [c[0] for c in captions]
  ours_text = wt.text_embedder(dirs["clip_text"], tok)(texts)
  ids = torch.from_numpy(tok(texts, 24).input_ids.astype(np.int64))
  for kind, cls, field in (("clip", transformers.CLIPVisionModelWithProjection, "image_embeds"),
                           ("dino", transformers.ViTModel, None)):
    ours = features[kind]
    pixels = image_processing.read_image_processor(dirs[kind])(images).transpose(0, 3, 1, 2)
    kwargs = {} if field else {"add_pooling_layer": False}
    model = cls.from_pretrained(dirs[kind], **kwargs).eval()
    with torch.no_grad():
      out = model(torch.from_numpy(np.ascontiguousarray(pixels)))
    theirs = (getattr(out, field) if field else out.last_hidden_state[:, 0]).numpy()
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max(), kind
  model = transformers.CLIPTextModelWithProjection.from_pretrained(dirs["clip_text"]).eval()
  with torch.no_grad():
    theirs = model(ids).text_embeds.numpy()
  assert np.abs(ours_text - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_bad_settings_and_captions_are_named(world):
  with pytest.raises(ValueError, match=r"unknown world tower settings \['clip_step'\]"):
    wt.WorldTowerSettings.from_config({"clip_step": 3})
  with pytest.raises(ValueError, match="patch_size 5 does not divide image_size 16"):
    wt.WorldTowerSettings.from_config({"image_size": 16, "patch_size": 5})
  with pytest.raises(ValueError, match="batch_size must be >= 2"):
    wt.WorldTowerSettings(batch_size=1)
  images, captions, tok = world
  with pytest.raises(ValueError, match="tokens long"):
    wt.tokenize_captions(tok, captions, 6)
  with pytest.raises(ValueError, match="16 images but 15 caption lists"):
    wt.build_world_towers("/nonexistent/never", images, captions[:15], tok, TINY)


def test_views_at_zero_strength_are_the_image_or_a_channel_permutation():
  import jax  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(0).standard_normal((4, 16, 16, 3)).astype(np.float32)
  still = wt.dataclasses.replace(TINY, crop_scale_min=1.0, brightness=0.0, noise_std=0.0)
  std = np.ones(3, np.float32)
  same = np.asarray(wt.augment(jax.random.key(0), x, still, std))
  np.testing.assert_allclose(same, x, atol=1e-5)   # a full-size crop resamples nothing
  swapped = np.asarray(wt.augment(jax.random.key(0), x,
                                  wt.dataclasses.replace(still, channel_shuffle=1.0), std))
  np.testing.assert_allclose(np.sort(swapped, -1), np.sort(x, -1), atol=1e-5)
  assert not np.allclose(swapped, x)   # 4 images: some permutation is not the identity
