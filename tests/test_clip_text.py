"""The Flax CLIP text tower against transformers' CLIPTextModel (tiny random models)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from attrib_jax.models import clip_text
from attrib_jax.models import configuration
from attrib_jax.models import weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 99
EOS = VOCAB - 1


def _torch_model(directory, **overrides):
  torch.manual_seed(0)
  kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=16, bos_token_id=VOCAB - 2,
                eos_token_id=EOS, pad_token_id=EOS)
  kwargs.update(overrides)
  model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**kwargs)).eval()
  # Random init leaves LayerNorms at identity: perturb them so they are tested too.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(directory)
  return model


def _ids(batch=3, length=16, seed=0):
  """Prompts laid out like the tokenizer's: bos, words, eos, eos padding."""
  rng = np.random.default_rng(seed)
  ids = np.full((batch, length), EOS, np.int64)
  for row in range(batch):
    n = rng.integers(1, length - 2)
    ids[row, 0] = VOCAB - 2
    ids[row, 1:n + 1] = rng.integers(0, VOCAB - 2, n)
  return ids


def _max_rel_err(ours, theirs):
  theirs = np.asarray(theirs)
  return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


@pytest.mark.parametrize("act,width,heads,eos", [
    ("quick_gelu", 32, 4, EOS),
    ("gelu", 64, 2, EOS),
    ("gelu", 48, 3, 2),  # legacy eos_token_id=2: pooled at the largest id
])
def test_parity_with_transformers(tmp_path, act, width, heads, eos):
  model = _torch_model(str(tmp_path), hidden_act=act, hidden_size=width,
                       num_attention_heads=heads, eos_token_id=eos)
  module, params, _ = clip_text.load_clip_text(str(tmp_path))
  ids = _ids()
  with torch.no_grad():
    ref = model(torch.from_numpy(ids), output_hidden_states=True)
  out = module.apply({"params": params}, jnp.asarray(ids, jnp.int32), output_hidden_states=True)
  assert _max_rel_err(out.last_hidden_state, ref.last_hidden_state) < 1e-4
  assert _max_rel_err(out.pooled_output, ref.pooler_output) < 1e-4
  assert len(out.hidden_states) == len(ref.hidden_states) == 4
  for ours, theirs in zip(out.hidden_states, ref.hidden_states):
    assert _max_rel_err(ours, theirs) < 1e-4
  # Clip skip: the penultimate state through the final norm.
  with torch.no_grad():
    skip = model.final_layer_norm(ref.hidden_states[-2])
  ours_skip = module.apply({"params": params}, out.hidden_states[-2],
                           method=clip_text.CLIPTextModel.final_norm)
  assert _max_rel_err(ours_skip, skip) < 1e-4


def test_attention_mask_and_position_ids(tmp_path):
  model = _torch_model(str(tmp_path))
  module, params, _ = clip_text.load_clip_text(str(tmp_path))
  ids = _ids(seed=1)
  mask = np.ones_like(ids)
  mask[0, 9:] = 0
  mask[1, 5:] = 0
  positions = np.arange(16)[::-1].copy()[None]
  with torch.no_grad():
    ref = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(positions))
  out = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                     jnp.asarray(positions))
  assert _max_rel_err(out.last_hidden_state, ref.last_hidden_state) < 1e-4
  assert _max_rel_err(out.pooled_output, ref.pooler_output) < 1e-4


def test_bfloat16_compute_is_close(tmp_path):
  _torch_model(str(tmp_path))
  module, params, _ = clip_text.load_clip_text(str(tmp_path))
  module16, params16, _ = clip_text.load_clip_text(str(tmp_path), dtype=jnp.bfloat16)
  ids = jnp.asarray(_ids())
  ref = module.apply({"params": params}, ids).last_hidden_state
  out = module16.apply({"params": params16}, ids).last_hidden_state
  assert out.dtype == jnp.float32
  assert _max_rel_err(out, ref) < 5e-2


def test_bad_config_raises(tmp_path):
  config = dict(clip_text.CLIPTextConfig(vocab_size=10, hidden_size=8,
                                         num_attention_heads=2).to_transformers())
  for key, value, match in (("hidden_act", "relu", "hidden_act"),
                            ("attention_dropout", 0.1, "attention_dropout"),
                            ("use_fancy_rope", True, "use_fancy_rope"),
                            ("eos_token_id", [1, 2], "eos_token_id")):
    with pytest.raises(configuration.UnsupportedConfigError, match=match):
      clip_text.CLIPTextConfig.from_transformers({**config, key: value})


def test_missing_weight_names_the_key(tmp_path):
  _torch_model(str(tmp_path))
  path = os.path.join(str(tmp_path), "model.safetensors")
  state = load_file(path)
  key = "encoder.layers.1.self_attn.k_proj.weight"
  del state[key]
  save_file(state, path)
  with pytest.raises(weights.WeightMismatchError, match=rf"text_model\.{key}"):
    clip_text.load_clip_text(str(tmp_path))


def test_export_import_identity(tmp_path):
  model = _torch_model(str(tmp_path / "torch"))
  module, params, config = clip_text.load_clip_text(str(tmp_path / "torch"))
  clip_text.save_clip_text(str(tmp_path / "ours"), params, config)
  saved = load_file(str(tmp_path / "ours" / "model.safetensors"))
  assert all(k.startswith("text_model.") for k in saved)
  _, params2, config2 = clip_text.load_clip_text(str(tmp_path / "ours"))
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params, params2)
  # transformers reads our export as the same network.
  reloaded = transformers.CLIPTextModel.from_pretrained(str(tmp_path / "ours")).eval()
  ids = torch.from_numpy(_ids())
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded(ids).last_hidden_state.numpy(),
                                  model(ids).last_hidden_state.numpy())


def test_init_matches_loaded_tree(tmp_path):
  _torch_model(str(tmp_path))
  with open(os.path.join(str(tmp_path), "config.json")) as f:
    config = json.load(f)
  module, params = clip_text.init_clip_text(config, jax.random.key(0))
  abstract = clip_text.abstract_params(module)
  assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda a: a.shape, abstract)
  assert params["text_model"]["embeddings"]["token_embedding"]["embedding"].shape == (VOCAB, 32)
  assert "q_proj" in params["text_model"]["encoder"]["layers_0"]["self_attn"]
