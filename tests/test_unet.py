"""Parity of the Flax UNet2DConditionModel (and its layers) with diffusers' PyTorch modules.

Each topology is a tiny random diffusers UNet saved with `save_pretrained` and read back through
`load_unet`, so the test covers the config reader, the weight conversion and the forward pass.
Tolerance: max |ours - torch| <= 1e-4 * max |torch| in float32.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.models.attention_processor import Attention as TorchAttention
from diffusers.models.resnet import ResnetBlock2D as TorchResnet
from flax import traverse_util

from attrib_jax.models import configuration
from attrib_jax.models import layers
from attrib_jax.models import unet
from attrib_jax.models import weights

RTOL = 1e-4
# Tests compile with LLVM at -O0: half the compile time, which dominates this file. It changes
# only the code generated for XLA's elementwise fusions, not what is computed (the benchmark
# checks the optimised build against PyTorch at full size).
FAST_COMPILE = {"xla_backend_optimization_level": 0}

# The MSCOCO layout of SPEC §1 (3 x CrossAttnDown + Down, Up + 3 x CrossAttnUp, 8 heads per
# block), narrowed; its 2x2 bottom exercises the small-input convolution path.
MSCOCO_TINY = dict(
    sample_size=16, block_out_channels=[32, 64, 64, 64], layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    attention_head_dim=8, cross_attention_dim=32, norm_num_groups=8)
# SD 1.x: 1x1-conv proj_in/out, one head count for every block.
SD1_TINY = dict(
    sample_size=8, block_out_channels=[32, 64], layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    attention_head_dim=4, cross_attention_dim=48, norm_num_groups=8)
# SD 2.x: linear projections, per-block head counts (SD2 has [5, 10, 20, 20]), upcast
# attention, per-block transformer depth; cross-attention down to the bottom, so the mid block
# and every up block attend.
SD2_TINY = dict(
    sample_size=8, block_out_channels=[32, 64], layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D"] * 2, up_block_types=["CrossAttnUpBlock2D"] * 2,
    attention_head_dim=[2, 8], use_linear_projection=True, upcast_attention=True,
    transformer_layers_per_block=[1, 2], cross_attention_dim=48, norm_num_groups=8)
# Non-default options that change the network, on one small model.
OPTIONS_TINY = dict(
    sample_size=8, in_channels=3, out_channels=5, block_out_channels=[16, 32],
    layers_per_block=[1, 2], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[2, 4],
    cross_attention_dim=[32, 32], norm_num_groups=4, norm_eps=1e-6, center_input_sample=True,
    flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, mid_block_scale_factor=2.0,
    time_embedding_dim=40, time_embedding_act_fn="mish", timestep_post_act="silu",
    conv_in_kernel=5, conv_out_kernel=1, act_fn="swish")
# The prompt pooled into the time embedding (the tiny default's conditioning path).
TEXT_TIME_TINY = dict(SD1_TINY, addition_embed_type="text", addition_embed_type_num_heads=4)
SCALE_SHIFT_TINY = dict(TEXT_TIME_TINY, resnet_time_scale_shift="scale_shift")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
  """Tiny models gain nothing from threads, and PyTorch's spinning OpenMP threads slow down
  10x on a CPU shared with other jobs."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def _save_torch_unet(directory, config, seed=0):
  torch.manual_seed(seed)
  model = TorchUNet(**config).eval()
  # Norms start at scale 1 and bias 0, which would hide a swapped or dropped norm parameter:
  # perturb every tensor.
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(directory)
  return model


def _inputs(config, batch=2, size=None, seq=5, seed=1):
  rng = np.random.default_rng(seed)
  size = size or config["sample_size"]
  x = rng.standard_normal((batch, config.get("in_channels", 4), size, size), np.float32)
  t = rng.integers(0, 1000, batch)
  cross = config["cross_attention_dim"]
  cross = cross[0] if isinstance(cross, list) else cross
  context = rng.standard_normal((batch, seq, cross), np.float32)
  return x, t, context


def _torch_forward(model, x, t, context):
  with torch.no_grad():
    out = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context)).sample
  return out.numpy().transpose(0, 2, 3, 1)


def _ours(module, params, x, t, context):
  # jit: one compilation is much cheaper than eager dispatch of a first call.
  apply = jax.jit(module.apply, compiler_options=FAST_COMPILE)
  return np.asarray(apply({"params": params}, x.transpose(0, 2, 3, 1), t, context))


def _assert_close(ours, ref):
  assert ours.shape == ref.shape
  err = np.abs(ours - ref).max()
  assert err <= RTOL * np.abs(ref).max(), (err, np.abs(ref).max())


@pytest.mark.parametrize("config,size", [
    (MSCOCO_TINY, None),
    (SD1_TINY, None),
    (SD2_TINY, 9),  # odd: the upsampler is told its target size
    (OPTIONS_TINY, None),
    (TEXT_TIME_TINY, None),
    (SCALE_SHIFT_TINY, None),
], ids=["mscoco", "sd1", "sd2", "options", "text-time", "scale-shift"])
def test_parity_with_diffusers(tmp_path, config, size):
  model = _save_torch_unet(tmp_path, config)
  module, params, config_dict = unet.load_unet(tmp_path)
  assert config_dict["block_out_channels"] == list(config["block_out_channels"])
  x, t, context = _inputs(config, size=size)
  _assert_close(_ours(module, params, x, t, context), _torch_forward(model, x, t, context))


def test_mscoco_params_map_one_to_one_and_export_round_trips(tmp_path):
  model = _save_torch_unet(tmp_path / "torch", MSCOCO_TINY)
  module, params, config_dict = unet.load_unet(tmp_path / "torch")
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  ours = traverse_util.flatten_dict(params)
  # Every torch tensor has exactly one Flax parameter and vice versa.
  keys = [weights.torch_key(path) for path in ours]
  assert len(keys) == len(set(keys)) == len(state)
  assert set(keys) == set(state)
  assert sum(v.size for v in ours.values()) == sum(p.numel() for p in model.parameters())
  # Export -> import is the identity; the export loads strictly into diffusers.
  exported = weights.to_torch_state_dict(params)
  for key, value in state.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  reimported = weights.from_torch_state_dict(exported, unet.abstract_params(module))
  jax.tree.map(np.testing.assert_array_equal, reimported, jax.tree.map(np.asarray, params))
  weights.save_component(tmp_path / "ours", params, config_dict)
  fresh = TorchUNet.from_config(TorchUNet.load_config(tmp_path / "ours")).eval()
  fresh.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in exported.items()},
                        strict=True)
  x, t, context = _inputs(MSCOCO_TINY)
  np.testing.assert_array_equal(_torch_forward(fresh, x, t, context),
                                _torch_forward(model, x, t, context))
  reloaded = TorchUNet.from_pretrained(tmp_path / "ours").eval()
  np.testing.assert_array_equal(_torch_forward(reloaded, x, t, context),
                                _torch_forward(model, x, t, context))


def test_bf16_computation_stays_close(tmp_path):
  """bfloat16 computation (float32 params, statistics and softmax) on a one-level UNet (the
  cost of compiling bf16 on CPU grows fast with depth)."""
  config = dict(SD1_TINY, block_out_channels=[32], down_block_types=["CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D"])
  model = _save_torch_unet(tmp_path, config)
  module, params, _ = unet.load_unet(tmp_path, dtype=jnp.bfloat16)
  assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  x, t, context = _inputs(config)
  out = _ours(module, params, x, t, context)
  ref = _torch_forward(model, x, t, context)
  assert out.dtype == np.float32
  assert np.abs(out - ref).max() <= 3e-2 * np.abs(ref).max()


def test_cpu_attention_matches_xla_attention():
  """The CPU path (heads-major, looped over batch groups) against jax.nn.dot_product_attention
  (the path on other backends)."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((6, 300, 64), np.float32)) for _ in range(3))
  # 4 heads x 300 x 300 float32 scores = 1.4 MB per item: the loop takes two items at a time.
  looped = layers.dot_product_attention(q, k, v, 4, impl="cpu")
  fused = layers.dot_product_attention(q, k, v, 4, impl="xla")
  np.testing.assert_allclose(looped, fused, atol=1e-5)
  with pytest.raises(ValueError, match="impl"):
    layers.dot_product_attention(q, k, v, 4, impl="flash")


def test_cpu_loops_differentiate_like_xla(monkeypatch):
  """The CPU path's batch loops (a scan with broadcast params over groups of samples, a map
  over attention groups inside it; at batch 32 and 16x16 latents both run) give the values and
  the gradients of the loop-free path, which the parity tests compare with diffusers.
  Attribution differentiates through the UNet, so the gradients matter as much."""
  monkeypatch.setattr(layers, "_CPU_TRANSFORMER_BYTES", 1 << 17)
  monkeypatch.setattr(layers, "_CPU_SCORE_BYTES", 1 << 14)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4, 8, 8, 32), np.float32))
  context = jnp.asarray(rng.standard_normal((4, 5, 24), np.float32))
  make = lambda impl: layers.Transformer2DModel(2, 16, cross_attention_dim=24, norm_num_groups=8,
                                                attention_impl=impl)
  abstract = jax.eval_shape(make("xla").init, jax.random.key(0), x, context)["params"]
  params = jax.tree.map(lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), a.dtype),
                        abstract)

  def loss(impl, params):
    out = make(impl).apply({"params": params}, x, context)
    return jnp.sum(out * jnp.sin(out))
  grad = lambda impl: jax.jit(jax.value_and_grad(lambda p: loss(impl, p)),
                              compiler_options=FAST_COMPILE)(params)
  (cpu_loss, cpu_grads), (xla_loss, xla_grads) = grad("cpu"), grad("xla")
  np.testing.assert_allclose(cpu_loss, xla_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               cpu_grads, xla_grads)


def test_vae_style_layers_match_diffusers():
  """The pieces the VAE port reuses: spatial attention with group norm and residual, and a
  ResnetBlock2D without time embedding whose channel count changes."""
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 32, 4, 4), np.float32)
  attn = TorchAttention(32, heads=2, dim_head=16, bias=True, norm_num_groups=8,
                        residual_connection=True, rescale_output_factor=2.0, eps=1e-6,
                        _from_deprecated_attn_block=True).eval()
  resnet = TorchResnet(in_channels=32, out_channels=16, temb_channels=None, groups=8,
                       groups_out=4, eps=1e-6, output_scale_factor=2.0).eval()
  ours_attn = layers.Attention(2, 16, bias=True, norm_num_groups=8, norm_eps=1e-6,
                               residual_connection=True, rescale_output_factor=2.0)
  ours_resnet = layers.ResnetBlock2D(16, groups=8, groups_out=4, eps=1e-6,
                                     use_time_emb=False, output_scale_factor=2.0)
  xh = jnp.asarray(x.transpose(0, 2, 3, 1))
  for theirs, ours in ((attn, ours_attn), (resnet, ours_resnet)):
    with torch.no_grad():
      for p in theirs.parameters():
        p.add_(0.05 * torch.randn_like(p))
      ref = theirs(torch.from_numpy(x), None).numpy().transpose(0, 2, 3, 1)
    state = {k: v.numpy() for k, v in theirs.state_dict().items()}
    abstract = jax.eval_shape(ours.init, jax.random.key(0), xh)["params"]
    params = weights.from_torch_state_dict(state, abstract)
    _assert_close(np.asarray(ours.apply({"params": params}, xh)), ref)


@pytest.mark.parametrize("change,key", [
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"only_cross_attention": True}, "only_cross_attention"),
    ({"num_attention_heads": 8}, "num_attention_heads"),
    ({"mid_block_type": "UNetMidBlock2D"}, "mid_block_type"),
    ({"resnet_time_scale_shift": "spatial"}, "resnet_time_scale_shift"),
    ({"mystery_option": 3}, "mystery_option"),
    ({"down_block_types": ["AttnDownBlock2D", "DownBlock2D"]}, "down_block_types"),
    ({"attention_head_dim": [4, 4, 4]}, "attention_head_dim"),
    ({"cross_attention_dim": [32, 48]}, "cross_attention_dim"),
    ({"act_fn": "tanh"}, "act_fn"),
    ({"addition_embed_type": "text_time"}, "addition_embed_type"),
    ({"addition_embed_type": "text", "addition_embed_type_num_heads": 5},
     "addition_embed_type_num_heads"),
])
def test_bad_config_option_is_named(change, key):
  config = {**SD1_TINY, **change}
  with pytest.raises(configuration.UnsupportedConfigError, match=key):
    unet.UNetConfig.from_diffusers(config)


def test_full_diffusers_config_is_accepted(tmp_path):
  """Every key diffusers 0.42 writes is used, pinned or ignored (none is unknown)."""
  TorchUNet(**SD1_TINY).save_pretrained(tmp_path)
  config = configuration.read_config(tmp_path)
  assert len(config) > 45
  assert unet.UNetConfig.from_diffusers(config).num_attention_heads == (4, 4)


@pytest.mark.parametrize("damage", ["missing", "misshaped", "unexpected"])
def test_weight_problems_name_the_key(tmp_path, damage):
  _save_torch_unet(tmp_path, SD1_TINY)
  path = os.path.join(tmp_path, "diffusion_pytorch_model.safetensors")
  state = safetensors.numpy.load_file(path)
  key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
  if damage == "missing":
    del state[key]
  elif damage == "misshaped":
    state[key] = state[key][:, :-1]
  else:
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.extra.weight"
    state[key] = np.zeros(3, np.float32)
  safetensors.numpy.save_file(state, path)
  with pytest.raises(weights.WeightMismatchError, match=key.replace(".", r"\.")):
    unet.load_unet(tmp_path)


def test_init_unet_gives_the_model_tree_with_torch_init():
  module, params = unet.init_unet(SD1_TINY, jax.random.key(0))
  shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
  assert shapes(params) == shapes(unet.abstract_params(module))
  # PyTorch's default init: kernels uniform within 1/sqrt(fan_in); norms 1, biases 0.
  for path, value in traverse_util.flatten_dict(params).items():
    if path[-1] == "kernel":
      bound = 1 / np.sqrt(np.prod(value.shape[:-1]))
      assert 0.5 * bound < np.abs(value).max() <= bound, path
    else:
      assert np.all(value == (1.0 if path[-1] == "scale" else 0.0)), path
