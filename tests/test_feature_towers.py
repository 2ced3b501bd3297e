"""The AbC feature towers against transformers: ViTModel (DINO layout), CLIP vision and text with
projection, and the image processors (tiny random models, float32)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from attrib_jax.models import clip_text
from attrib_jax.models import clip_vision
from attrib_jax.models import configuration
from attrib_jax.models import image_processing
from attrib_jax.models import vit
from attrib_jax.models import weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOWER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
             image_size=32, patch_size=8)


def _perturb(model):
  # Random init leaves LayerNorms at identity and embeddings tiny: perturb so they are tested.
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if any(s in name for s in ("norm", "layrnorm", "cls_token", "class_embedding",
                                 "position")):
        p.add_(0.1 * torch.randn_like(p))
  return model


def _vit(directory):
  torch.manual_seed(0)
  model = transformers.ViTModel(transformers.ViTConfig(**TOWER), add_pooling_layer=False)
  _perturb(model.eval()).save_pretrained(directory)
  return model


def _clip_vision(directory):
  torch.manual_seed(0)
  model = transformers.CLIPVisionModelWithProjection(
      transformers.CLIPVisionConfig(**TOWER, projection_dim=16))
  _perturb(model.eval()).save_pretrained(directory)
  return model


def _pixels(seed=0, n=3):
  return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def _nhwc(x):
  return jnp.asarray(x.transpose(0, 2, 3, 1))


def _rel(ours, theirs):
  theirs = np.asarray(theirs)
  return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


def test_vit_parity_and_round_trip(tmp_path):
  model = _vit(str(tmp_path / "torch"))
  module, params, config = vit.load_vit(str(tmp_path / "torch"))
  x = _pixels()
  with torch.no_grad():
    ref = model(torch.from_numpy(x)).last_hidden_state.numpy()
  out = module.apply({"params": params}, _nhwc(x))
  assert out.last_hidden_state.shape == (3, 17, 32)
  assert _rel(out.last_hidden_state, ref) < 1e-4
  assert _rel(out.cls_token, ref[:, 0]) < 1e-4
  assert _rel(out.patch_tokens, ref[:, 1:]) < 1e-4
  # Every key both ways: our export is the same file set, and transformers reads it back.
  vit.save_vit(str(tmp_path / "ours"), params, config)
  theirs = load_file(str(tmp_path / "torch" / "model.safetensors"))
  ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
  assert sorted(ours) == sorted(theirs)
  reloaded = transformers.ViTModel.from_pretrained(str(tmp_path / "ours"),
                                                   add_pooling_layer=False).eval()
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded(torch.from_numpy(x)).last_hidden_state.numpy(), ref)


def test_clip_vision_parity_and_round_trip(tmp_path):
  model = _clip_vision(str(tmp_path / "torch"))
  module, params, config = clip_vision.load_clip_vision(str(tmp_path / "torch"))
  x = _pixels(1)
  with torch.no_grad():
    ref = model(torch.from_numpy(x))
  out = module.apply({"params": params}, _nhwc(x))
  assert out.image_embeds.shape == (3, 16)
  assert _rel(out.image_embeds, ref.image_embeds) < 1e-4
  assert _rel(out.last_hidden_state, ref.last_hidden_state) < 1e-4
  clip_vision.save_clip_vision(str(tmp_path / "ours"), params, config)
  assert sorted(load_file(str(tmp_path / "ours" / "model.safetensors"))) == sorted(
      load_file(str(tmp_path / "torch" / "model.safetensors")))
  reloaded = transformers.CLIPVisionModelWithProjection.from_pretrained(
      str(tmp_path / "ours")).eval()
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded(torch.from_numpy(x)).image_embeds.numpy(),
                                  ref.image_embeds.numpy())


def test_clip_text_with_projection_parity(tmp_path):
  torch.manual_seed(0)
  vocab = 99
  model = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
      vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=16, bos_token_id=vocab - 2,
      eos_token_id=vocab - 1, pad_token_id=vocab - 1, projection_dim=16))
  _perturb(model.eval()).save_pretrained(str(tmp_path / "torch"))
  module, params, config = clip_text.load_clip_text_with_projection(str(tmp_path / "torch"))
  ids = np.full((2, 16), vocab - 1, np.int64)
  ids[:, 0] = vocab - 2
  ids[0, 1:6] = [3, 4, 5, 6, 7]
  ids[1, 1:3] = [9, 10]
  with torch.no_grad():
    ref = model(torch.from_numpy(ids))
  out = module.apply({"params": params}, jnp.asarray(ids, jnp.int32))
  assert _rel(out.text_embeds, ref.text_embeds) < 1e-4
  assert _rel(out.last_hidden_state, ref.last_hidden_state) < 1e-4
  clip_text.save_clip_text_with_projection(str(tmp_path / "ours"), params, config)
  reloaded = transformers.CLIPTextModelWithProjection.from_pretrained(
      str(tmp_path / "ours")).eval()
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded(torch.from_numpy(ids)).text_embeds.numpy(),
                                  ref.text_embeds.numpy())
  # The plain text tower refuses the projection it would not use, by name.
  with pytest.raises(weights.WeightMismatchError, match="text_projection.weight"):
    clip_text.load_clip_text(str(tmp_path / "torch"))


@pytest.mark.parametrize("make,load", [(_vit, vit.load_vit),
                                       (_clip_vision, clip_vision.load_clip_vision)])
def test_bad_weights_name_the_key(tmp_path, make, load):
  make(str(tmp_path))
  path = os.path.join(str(tmp_path), "model.safetensors")
  state = load_file(path)
  key = sorted(k for k in state if k.endswith("fc1.weight") or "intermediate.dense.weight" in k)[0]
  bad = dict(state)
  del bad[key]
  save_file(bad, path)
  with pytest.raises(weights.WeightMismatchError, match=f"missing.*{key}"):
    load(str(tmp_path))
  bad = dict(state)
  bad[key] = np.zeros((5, 7), np.float32)
  save_file(bad, path)
  with pytest.raises(weights.WeightMismatchError, match=f"shape mismatch.*{key}"):
    load(str(tmp_path))


@pytest.mark.parametrize("cls,key,value", [
    (vit.ViTConfig, "hidden_dropout_prob", 0.1), (vit.ViTConfig, "use_mask_token", True),
    (vit.ViTConfig, "hidden_act", "relu"), (vit.ViTConfig, "patch_size", 5),
    (clip_vision.CLIPVisionConfig, "attention_dropout", 0.2),
    (clip_vision.CLIPVisionConfig, "fancy_option", 1)])
def test_unsupported_config_option_is_named(cls, key, value):
  config = cls(**TOWER).to_transformers()
  cls.from_transformers(config)
  with pytest.raises(configuration.UnsupportedConfigError, match=key):
    cls.from_transformers({**config, key: value})


@pytest.mark.parametrize("config", [
    dict(image_processor_type="ViTImageProcessor", size={"height": 24, "width": 24}),
    dict(feature_extractor_type="ViTFeatureExtractor", size=26, resample=3,
         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
         do_center_crop=True, crop_size=20),
    dict(image_processor_type="CLIPImageProcessor", size={"shortest_edge": 28},
         crop_size={"height": 24, "width": 24}),
    dict(feature_extractor_type="CLIPFeatureExtractor", size=30, crop_size=24, resample=2)])
def test_image_processor_matches_transformers(config):
  cls = (transformers.CLIPImageProcessorPil if "CLIP" in json.dumps(config)
         else transformers.ViTImageProcessorPil)
  ref = cls(**{k: v for k, v in config.items() if not k.endswith("_type")})
  ours = image_processing.ImageProcessorConfig.from_transformers(config)
  rng = np.random.default_rng(0)
  for shape in ((40, 52, 3), (61, 37, 3), (32, 32, 3)):
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    theirs = ref(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(ours([image])[0], theirs, atol=1e-5, rtol=0)


def test_image_processor_refuses_what_it_does_not_do(tmp_path):
  with pytest.raises(configuration.UnsupportedConfigError, match="do_pad"):
    image_processing.ImageProcessorConfig.from_transformers(
        dict(image_processor_type="ViTImageProcessor", do_pad=True))
  with pytest.raises(configuration.UnsupportedConfigError, match="image_processor_type"):
    image_processing.ImageProcessorConfig.from_transformers(
        dict(image_processor_type="SiglipImageProcessor"))
  with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
    image_processing.read_image_processor(str(tmp_path))


PROCESSORS = {"dino": dict(image_processor_type="ViTImageProcessor",
                           size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406],
                           image_std=[0.229, 0.224, 0.225]),
              "clip": dict(image_processor_type="CLIPImageProcessor", size={"shortest_edge": 36},
                           crop_size={"height": 32, "width": 32})}


@pytest.mark.parametrize("name", ["dino", "clip"])
def test_tower_baselines_through_the_registry(tmp_path, name):
  import types  # pylint: disable=g-import-not-at-top
  from attrib_jax import baselines  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=f"{name!r} needs a weights directory"):
    baselines.make_method(name)
  directory = str(tmp_path / name)
  model = (_vit if name == "dino" else _clip_vision)(directory)
  image_processing.save_image_processor(directory, PROCESSORS[name])
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
  query = types.SimpleNamespace(image=images[2].copy())
  context = baselines.Context(arrays={"index": np.arange(6)}, images=images)
  method = baselines.make_method(name, weights=directory, flips=(0,))
  scores = method.score(query, context)
  # The reference: transformers' processor and model, cosine in numpy.
  processor = (transformers.ViTImageProcessorPil if name == "dino"
               else transformers.CLIPImageProcessorPil)(
                   **{k: v for k, v in PROCESSORS[name].items() if k != "image_processor_type"})
  pixels = torch.from_numpy(processor(list(images), return_tensors="np")["pixel_values"])
  with torch.no_grad():
    out = model(pixels)
  f = (out.last_hidden_state[:, 0] if name == "dino" else out.image_embeds).numpy()
  f = f / np.linalg.norm(f, axis=1, keepdims=True)
  np.testing.assert_allclose(scores, f @ f[2], atol=1e-5)
  assert np.argmax(scores) == 2
  if name == "clip":
    # ΔG's feature function: the configured clip method's tower, keyed by its weights.
    fn, key = baselines.towers.delta_g_features({}, {"clip": {"weights": directory}})
    assert key["tower"] and key["clip"] == os.path.abspath(directory)
    np.testing.assert_allclose(fn(images[:2]), out.image_embeds.numpy()[:2], atol=1e-5)
    _, key = baselines.towers.delta_g_features({"seed": 0, "grid": 2}, {})
    assert key == {"seed": 0, "grid": 2}
