"""AbC's benchmark build (attrib_jax/abc/build.py, concepts.py, configs/abc_*.py) on a tiny
random pixel-space base: the smoke config's sets customized and generated end to end, the
layout files agreeing with each other, resuming (a rerun does nothing, an interrupted set or
query is redone), the folder path of real models, and bad input named."""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from attrib_jax import generation
from attrib_jax.abc import build
from attrib_jax.abc import concepts
from attrib_jax.data import precompute
from attrib_jax.data import tiny_world as tw
from attrib_jax.data import vocab
from attrib_jax.models import clip_text
from attrib_jax.models import pipeline as pipeline_lib
from attrib_jax.models import tokenizer as tokenizer_lib
from attrib_jax.models import unet as unet_lib
from configs import abc_sd
from configs import abc_tiny

RES, PATCH, MAX_LEN = 16, 2, 20
UNET = dict(sample_size=RES // PATCH, in_channels=3 * PATCH ** 2, out_channels=3 * PATCH ** 2,
            layers_per_block=1, block_out_channels=[16, 32],
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=4,
            cross_attention_dim=32, norm_num_groups=8)
SCHEDULER = dict(_class_name="DDPMScheduler", num_train_timesteps=1000,
                 beta_schedule="squaredcos_cap_v2", prediction_type="sample", clip_sample=True)


def _captions(n=12):
  rng = np.random.default_rng(0)
  scenes = [tw.sample_scene(rng, patterns=("plain",)) for _ in range(n)]
  return scenes, [tw.caption_scene(s) for s in scenes]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """As launch.abc: a persistent XLA cache, so the many same-shaped sampler programs (each
  generate call jits anew) compile once."""
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  old = [getattr(jax.config, k) for k in keys]
  jax.config.update(keys[0], str(tmp_path_factory.mktemp("xla_cache")))
  jax.config.update(keys[1], 0.0)
  yield
  for k, v in zip(keys, old):
    jax.config.update(k, v)


@pytest.fixture(scope="module")
def base_workdir(tmp_path_factory):
  """A launch.train-shaped workdir: model/ (random tiny pixel-space pipeline, DONE.json) and
  precomputed/ (12 tiny-world items)."""
  w = str(tmp_path_factory.mktemp("base"))
  model = os.path.join(w, "model")
  scenes, captions = _captions()
  words = [c for cs in captions for c in cs] + [
      concepts.object_prompt(sz, p, b) for sz in tw.SIZES for p in tw.POSITIONS
      for b in tw.BACKGROUNDS] + [f"in {w_}" for w_ in concepts.STYLE_WORDS.values()]
  vocab.write_tokenizer_files(os.path.join(model, "tokenizer"), words, MAX_LEN)
  tok = tokenizer_lib.load_tokenizer(os.path.join(model, "tokenizer"))
  text_config = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 32,
                 "num_hidden_layers": 1, "num_attention_heads": 2,
                 "max_position_embeddings": MAX_LEN, "hidden_act": "quick_gelu",
                 "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                 "pad_token_id": tok.pad_token_id}
  _, text_params = clip_text.init_clip_text(text_config, jax.random.key(1))
  clip_text.save_clip_text(os.path.join(model, "text_encoder"), text_params, text_config)
  _, unet_params = unet_lib.init_unet(UNET, jax.random.key(2))
  pipeline_lib.save_unet(os.path.join(model, "unet"), unet_params, UNET)
  pipeline_lib.save_scheduler(os.path.join(model, "scheduler"), SCHEDULER)
  pipeline_lib.write_pixel_patch(model, PATCH)
  pipeline_lib.save_model_index(model, pixel_space=True)
  with open(os.path.join(model, "DONE.json"), "w") as f:
    json.dump({"fingerprint": "test", "settings": {}}, f)
  pipe = pipeline_lib.load_pipeline(model)
  images = np.stack([tw.render_scene(s, RES) for s in scenes])
  encode = pipeline_lib.make_text_encoder_fn(pipe.text_encoder, pipe.text_params, pipe.tokenizer)
  precompute.precompute(
      os.path.join(w, "precomputed"), num_items=len(images),
      get_items=lambda rows: (images[rows], [captions[i] for i in rows], rows),
      encode_images=lambda x: np.asarray(pipeline_lib.images_to_latents(x, pixel_patch=PATCH)),
      encode_text=encode, num_captions=3, log=lambda _: None)
  return w


def _config(base_workdir):
  c = abc_tiny.get_config("smoke")
  c.unlock()
  c.base_workdir = base_workdir
  c.customization.num_steps = 2
  c.customization.num_regularization = 4
  c.generate.num_steps = 2
  c.check.validation_renders = 4
  return c


def _mtimes(root):
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      out[os.path.join(d, f)] = os.stat(os.path.join(d, f)).st_mtime_ns
  return out


def test_smoke_end_to_end_layout_and_resume(base_workdir, tmp_path):
  config, w = _config(base_workdir), str(tmp_path / "abc")
  model_dir = build.prepare_base(config, w)
  pipe = pipeline_lib.load_pipeline(model_dir)
  res = build.resolution_of(pipe)
  assert res == RES
  sets = build.sets_from_config(config, res)
  records = build.write_layout(w, sets)
  build.run_customize(config, w, pipe, sets, res, log=lambda _: None)
  build.run_generate(config, w, pipe, sets, log=lambda _: None)

  # The layout: sets.json rows index images.npz, exemplars.json says which set owns each row.
  with open(os.path.join(w, "sets.json")) as f:
    assert json.load(f) == records
  with np.load(os.path.join(w, "exemplars", "images.npz")) as data:
    images = data["images"]
  with open(os.path.join(w, "exemplars", "exemplars.json")) as f:
    meta = json.load(f)
  assert images.dtype == np.uint8 and images.shape[1:] == (RES, RES, 3)
  assert len(meta) == len(images) == sum(len(s.images) for s in sets)
  assert sorted(r for s in records for r in s["exemplar_rows"]) == list(range(len(images)))
  assert {s["split"] for s in records} == {"tune", "test_unseen", "test_style"}
  for s, r in zip(sets, records):
    assert set(r) == {"name", "kind", "category", "split", "exemplar_rows"}
    assert all(meta[i]["set"] == r["name"] for i in r["exemplar_rows"])
    assert all("<new1>" in meta[i]["token_caption"] and "<new1>" not in meta[i]["caption"]
               for i in r["exemplar_rows"])
    np.testing.assert_array_equal(images[r["exemplar_rows"]], s.images)
    queries = generation.list_queries(os.path.join(w, "sets", r["name"], "queries"))
    assert len(queries) == config.images_per_set
    infos = [generation.load_query(q).info for q in queries]
    assert all(i["set"] == r["name"] and "<new1>" in i["prompt"] for i in infos)
    assert len({i["seed"] for i in infos}) == len(infos)
    assert os.path.exists(os.path.join(w, "sets", r["name"], "delta", "delta.json"))

  # A rerun does nothing; an interrupted set (no record) and a lost query are redone, alone.
  before = _mtimes(w)
  build.run_customize(config, w, pipe, sets, res, log=lambda _: None)
  build.run_generate(config, w, pipe, sets, log=lambda _: None)
  assert _mtimes(w) == before
  first, second = records[0]["name"], records[1]["name"]
  os.remove(os.path.join(w, "sets", first, build.RECORD))
  lost = os.path.join(w, "sets", second, "queries", "q001")
  for f in os.listdir(lost):
    os.remove(os.path.join(lost, f))
  os.rmdir(lost)
  build.run_customize(config, w, pipe, sets, res, log=lambda _: None)
  build.run_generate(config, w, pipe, sets, log=lambda _: None)
  after = _mtimes(w)
  changed = {p for p in after if after[p] != before.get(p)}
  assert any(p.endswith(os.path.join(first, "delta", "delta.npz")) for p in changed)
  assert any(os.path.join(second, "queries", "q001") in p for p in changed)
  untouched = os.path.join(w, "sets", records[2]["name"])
  assert not any(p.startswith(untouched) for p in changed)

  summary = build.run_check(config, w, pipe, sets, log=lambda _: None)
  assert summary["overall"]["sets"] == len(sets)
  assert os.path.exists(os.path.join(w, "check", f"{first}.json"))


def test_detectors_validate_on_real_renders():
  sets = concepts.build_sets(abc_tiny.get_config().sets, resolution=32, num_prompts=2,
                             style_exemplars=3)
  picked = [s for s in sets if s.name in ("bowtie_orange", "heart_red", "style_sepia",
                                          "style_scanlines")]
  result = concepts.validate_detectors(picked, count=8)
  assert result["accuracy"] >= 0.95, result
  assert not set(concepts.CATEGORIES) & set(tw.ALL_SHAPES)


def test_full_config_meets_the_bar():
  c = abc_tiny.get_config()
  splits = [s["split"] for s in c.sets]
  assert len(splits) >= 20 and c.images_per_set >= 10
  assert {"tune", "test_seen", "test_unseen", "test_style"} == set(splits)
  tune_categories = {s["category"] for s in c.sets if s["split"] == "tune"}
  assert all(s["category"] in tune_categories for s in c.sets if s["split"] == "test_seen")
  assert not any(s["category"] in tune_categories for s in c.sets
                 if s["split"] == "test_unseen")
  sets = concepts.build_sets(c.sets, resolution=32, num_prompts=c.images_per_set,
                             style_exemplars=c.style_exemplars)
  # Prompts never name the category (a text method must not find the exemplars without the
  # token), and every image differs.
  for s in sets:
    assert all("<new1>" in p and s.category not in p for p in s.prompts)
  flat = np.concatenate([s.images for s in sets]).reshape(-1, 32 * 32 * 3)
  assert len(np.unique(flat, axis=0)) == len(flat)


def test_folder_sets_and_bad_input(base_workdir, tmp_path):
  folder = tmp_path / "cat"
  folder.mkdir()
  for k in range(2):
    Image.fromarray(np.full((40, 30, 3), 60 * k, np.uint8)).save(folder / f"{k}.png")
  entry = dict(dir=str(folder), split="tune", kind="object", category="cat",
               caption="a photo of a cat", prompts=["photo of a <new1> cat on a beach"])
  s = build.folder_set("cat", entry, resolution=16, num_prompts=3, seed=0)
  assert s.images.shape == (2, 16, 16, 3) and s.captions == ["a photo of a cat"] * 2
  assert s.token_captions == ["photo of a <new1> cat"] * 2 and len(set(s.seeds)) == 3

  with pytest.raises(ValueError, match="unknown split 'train'"):
    build.folder_set("cat", dict(entry, split="train"), resolution=16, num_prompts=1, seed=0)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match="holds no images"):
    build.folder_set("e", dict(entry, dir=str(empty)), resolution=16, num_prompts=1, seed=0)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    build.folder_set("e", dict(entry, dir=str(tmp_path / "nope")), resolution=16,
                     num_prompts=1, seed=0)
  with pytest.raises(ValueError, match="style set cannot be in split 'tune'|a style set"):
    concepts.check_split("s", "style", "tune")
  with pytest.raises(ValueError, match="unknown category|category 'blob'"):
    concepts.object_set("o", "tune", dict(category="blob", colour="red", size="large",
                                          position="left", background="gray"),
                        resolution=16, num_prompts=1, seed=0)
  bad = abc_tiny.get_config("smoke")
  bad.unlock()
  bad.base_workdir = str(tmp_path / "no_base")
  with pytest.raises(FileNotFoundError, match="no_base"):
    build.prepare_base(bad, str(tmp_path / "w"))
  sd = abc_sd.get_config()
  sd.unlock()
  sd.base_model_dir = str(tmp_path / "no_sd")
  with pytest.raises(FileNotFoundError, match="no_sd"):
    build.prepare_base(sd, str(tmp_path / "w"))
  # The SD config's folder path reads real folders through the same code.
  sd.exemplar_dirs = ml_collections.ConfigDict({"cat": entry})
  sets = build.sets_from_config(sd, 16)
  assert [x.name for x in sets] == ["cat"] and len(sets[0].prompts) == sd.images_per_set
