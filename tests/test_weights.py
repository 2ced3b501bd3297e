"""The shared PyTorch <-> Flax weight conversion: naming rule, layouts, strictness, files."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attrib_jax.models import configuration
from attrib_jax.models import weights


class _Block(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), name="conv1")(x)
    x = nn.GroupNorm(num_groups=2, name="norm")(x)
    return nn.Dense(5, name="to_out_0")(x)


class _Toy(nn.Module):
  """Has every naming case: list members, a real `linear_1`, an embedding, a norm."""

  @nn.compact
  def __call__(self, tokens, x):
    e = nn.Embed(7, 3, name="token_embedding")(tokens)
    x = _Block(name="down_blocks_0")(x)
    x = _Block(name="down_blocks_1")(nn.Dense(3, name="linear_1")(x))
    return x.sum() + e.sum()


def _abstract():
  return jax.eval_shape(_Toy().init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32),
                        jnp.zeros((1, 4, 4, 3)))["params"]


def _torch_state(rng=np.random.default_rng(0)):
  """What the equivalent torch module's state_dict would hold (torch layouts)."""
  state = {"token_embedding.weight": rng.normal(size=(7, 3)),
           "linear_1.weight": rng.normal(size=(3, 5)), "linear_1.bias": rng.normal(size=3)}
  for i, cin in ((0, 3), (1, 3)):
    p = f"down_blocks.{i}."
    state.update({p + "conv1.weight": rng.normal(size=(4, cin, 3, 3)),
                  p + "conv1.bias": rng.normal(size=4),
                  p + "norm.weight": rng.normal(size=4), p + "norm.bias": rng.normal(size=4),
                  p + "to_out.0.weight": rng.normal(size=(5, 4)),
                  p + "to_out.0.bias": rng.normal(size=5)})
  return {k: v.astype(np.float32) for k, v in state.items()}


def test_naming_rule():
  assert weights.torch_key(("down_blocks_0", "attentions_1", "transformer_blocks_0", "attn2",
                            "to_k", "kernel")) == \
      "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight"
  assert weights.torch_key(("time_embedding", "linear_1", "bias")) == "time_embedding.linear_1.bias"
  assert weights.torch_key(("ff", "net_0", "proj", "kernel")) == "ff.net.0.proj.weight"
  assert weights.torch_key(("norm1", "scale")) == "norm1.weight"
  assert weights.torch_key(("emb", "embedding")) == "emb.weight"


def test_layouts_and_round_trip():
  state = _torch_state()
  params = weights.from_torch_state_dict(state, _abstract())
  np.testing.assert_array_equal(params["down_blocks_0"]["conv1"]["kernel"],
                                state["down_blocks.0.conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["down_blocks_1"]["to_out_0"]["kernel"],
                                state["down_blocks.1.to_out.0.weight"].T)
  np.testing.assert_array_equal(params["token_embedding"]["embedding"],
                                state["token_embedding.weight"])
  back = weights.to_torch_state_dict(params)
  assert sorted(back) == sorted(state)
  for k in state:
    np.testing.assert_array_equal(back[k], state[k])


def test_conv_matches_torch_conv():
  torch = pytest.importorskip("torch")
  conv = torch.nn.Conv2d(3, 4, 3, padding=1)
  x = np.random.default_rng(1).normal(size=(2, 3, 5, 5)).astype(np.float32)
  want = conv(torch.from_numpy(x)).detach().numpy().transpose(0, 2, 3, 1)
  ours = nn.Conv(4, (3, 3), padding=1)
  kernel = weights.from_torch_state_dict(
      {"weight": conv.weight.detach().numpy(), "bias": conv.bias.detach().numpy()},
      {"kernel": jax.ShapeDtypeStruct((3, 3, 3, 4), jnp.float32),
       "bias": jax.ShapeDtypeStruct((4,), jnp.float32)})
  got = ours.apply({"params": kernel}, x.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("down_blocks.1.norm.bias"), "missing from the file: down_blocks.1.norm.bias"),
    (lambda s: s.update(extra=np.zeros(1)), "not in the model: extra"),
    (lambda s: s.update({"linear_1.bias": np.zeros(4, np.float32)}), "shape mismatch: linear_1.bias"),
])
def test_strict_errors_name_the_key(change, message):
  state = _torch_state()
  change(state)
  with pytest.raises(weights.WeightMismatchError, match=message.replace(".", r"\.")):
    weights.from_torch_state_dict(state, _abstract(), component="toy")


def test_buffers_are_ignored_not_errors():
  state = _torch_state()
  state["embeddings.position_ids"] = np.arange(3)
  weights.from_torch_state_dict(state, _abstract())


def test_save_and_load_component(tmp_path):
  params = weights.from_torch_state_dict(_torch_state(), _abstract())
  weights.save_component(tmp_path, params, {"hidden": 3})
  assert json.load(open(tmp_path / "config.json")) == {"hidden": 3}
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
  loaded = weights.from_torch_state_dict(weights.load_state_dict(tmp_path), _abstract())
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_missing_and_corrupt_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="No weights in"):
    weights.load_state_dict(tmp_path)
  (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(weights.WeightMismatchError, match="Cannot read"):
    weights.load_state_dict(tmp_path)
  with pytest.raises(FileNotFoundError, match="No such component directory"):
    weights.load_state_dict(tmp_path / "absent")


def test_check_config():
  config = {"a": 1, "b": None, "_class_name": "X"}
  configuration.check_config(config, component="X", used=["a"], pinned={"b": None})
  with pytest.raises(configuration.UnsupportedConfigError, match="b=2"):
    configuration.check_config({"b": 2}, component="X", used=[], pinned={"b": None})
  with pytest.raises(configuration.UnsupportedConfigError, match="unknown config option 'c'"):
    configuration.check_config({"c": 0}, component="X", used=[])
