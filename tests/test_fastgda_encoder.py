"""service.QueryEncoder (the served fast path) against the reference path it replaces:
generation.query_from_image + teacher.Featurizer.queries + student.embed + retrieval_query, on a
tiny random pixel-space pipeline; the Service answers the same with and without it."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

import test_training as tt
from attrib_jax import generation
from attrib_jax.data import vocab
from attrib_jax.distill import index as index_lib
from attrib_jax.distill import service as service_lib
from attrib_jax.distill import student as student_lib
from attrib_jax.distill import teacher as teacher_lib
from attrib_jax.models import clip_text
from attrib_jax.models import pipeline as pipeline_lib
from attrib_jax.models import tokenizer as tokenizer_lib
from attrib_jax.models import unet as unet_lib

PROMPTS = ["a red circle", "a blue square on the left"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A random pixel-space pipeline (8x8 images through a 2x2 codec), its Featurizer and a
  random student over its 64 + 8 = 72-d features."""
  tok_dir = str(tmp_path_factory.mktemp("tokenizer"))
  vocab.write_tokenizer_files(tok_dir, PROMPTS, 8)
  tok = tokenizer_lib.load_tokenizer(tok_dir)
  text_config = {"vocab_size": max(tok.vocab.values()) + 1, "hidden_size": 8,
                 "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                 "max_position_embeddings": 8, "hidden_act": "quick_gelu",
                 "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                 "pad_token_id": tok.pad_token_id}
  text, text_params = clip_text.init_clip_text(text_config, jax.random.key(1))
  unet_config = dict(tt.UNET, sample_size=4, in_channels=12, out_channels=12)
  unet, unet_params = unet_lib.init_unet(unet_config, jax.random.key(2))
  pipe = pipeline_lib.Pipeline(unet, unet_params, text, text_params, tok, tt.SCHEDULE, None,
                               None, {"unet": unet_config, "text_encoder": text_config,
                                      "vae": None}, pixel_patch=2)
  null = np.asarray(pipeline_lib.make_text_encoder_fn(text, text_params, tok)([""])[0])
  feature_settings = teacher_lib.FeatureSettings(layer="mid_block", timestep=30, pool="flatten")
  featurizer = teacher_lib.Featurizer(pipe, {"null_text_states": null}, feature_settings)
  settings = student_lib.StudentSettings(hidden=(16,), out_dim=8, dropout=0.0)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
  queries = [generation.query_from_image(pipe, im, PROMPTS[i % 2]) for i, im in enumerate(images)]
  features = featurizer.queries(queries)
  params = student_lib.init_params(settings, features.shape[1])
  return pipe, null, feature_settings, featurizer, settings, params, images, queries, features


def test_encoder_matches_the_reference_features_and_vector(world):
  pipe, null, feature_settings, featurizer, settings, params, images, queries, features = world
  assert features.shape == (12, 2 * 2 * 16 + 8)   # mid_block 2x2x16 ⊕ text 8
  encoder = service_lib.QueryEncoder(pipe, null, feature_settings, settings, params)
  for i, (image, query) in enumerate(zip(images, queries)):
    got = np.asarray(encoder.features_of_image(image, PROMPTS[i % 2]))
    np.testing.assert_allclose(got[0], features[i], atol=2e-6)
    np.testing.assert_allclose(np.asarray(encoder.features_of_query(query))[0], features[i],
                               atol=2e-6)
  # The retrieval vector carries -sign(scale), for either sign of the learnt scale.
  for scale in (-5.0, 2.5):
    p = dict(params, scale=np.float32(scale))
    encoder = service_lib.QueryEncoder(pipe, null, feature_settings, settings, p)
    want = student_lib.retrieval_query(p, student_lib.embed(settings, p, features))
    np.testing.assert_allclose(encoder.vector(features), want, atol=2e-6)
    assert np.sign(encoder.vector(features)[0] @ want[0]) == 1


def test_service_answers_the_same_with_the_encoder(world):
  pipe, null, feature_settings, featurizer, settings, params, images, queries, features = world
  items = np.random.default_rng(1).normal(size=(30, features.shape[1])).astype(np.float32)
  index = index_lib.ExactIndex(student_lib.embed(settings, params, items))
  plain = service_lib.Service(
      settings, params, index,
      make_query=lambda image, prompt: generation.query_from_image(pipe, image, prompt),
      query_features=featurizer.queries, images=lambda rows: None,
      captions=[[f"item {i}"] for i in range(30)], dataset_index=np.arange(30),
      image_size=(8, 8))
  fast = dataclasses.replace(plain, encoder=service_lib.QueryEncoder(
      pipe, null, feature_settings, settings, params))
  for i in range(4):
    want = plain.search_image(images[i], PROMPTS[i % 2], 7)
    got = fast.search_image(images[i], PROMPTS[i % 2], 7)
    assert [x["row"] for x in got["items"]] == [x["row"] for x in want["items"]]
    np.testing.assert_allclose([x["score"] for x in got["items"]],
                               [x["score"] for x in want["items"]], atol=1e-5)
    assert set(got["ms"]) == {"features", "embed", "search", "total"}
    by_query = fast.search(queries[i], 7)
    assert [x["row"] for x in by_query["items"]] == [x["row"] for x in want["items"]]


def test_encoder_errors_name_the_size_and_the_prompt(world):
  pipe, null, feature_settings, _, settings, params, *_ = world
  encoder = service_lib.QueryEncoder(pipe, null, feature_settings, settings, params)
  with pytest.raises(ValueError, match="uint8 9x8x3.*takes uint8 8x8x3"):
    encoder.features_of_image(np.zeros((9, 8, 3), np.uint8), "a red circle")
  with pytest.raises(ValueError, match="is \\d+ tokens long"):
    encoder.features_of_image(np.zeros((8, 8, 3), np.uint8),
                              "a red circle a blue square on the left")
