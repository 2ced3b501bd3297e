"""The Flax VAE against diffusers' AutoencoderKL (tiny random models, NCHW <-> NHWC)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from attrib_jax.models import configuration
from attrib_jax.models import vae
from attrib_jax.models import weights

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
            latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)


def _torch_vae(directory, **overrides):
  torch.manual_seed(0)
  model = diffusers.AutoencoderKL(**{**TINY, **overrides}).eval()
  # Fresh GroupNorms are identities: perturb them (and every bias) so they are tested too.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(directory)
  return model


def _nhwc(t):
  return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def _jitted(module):
  """encode, decode and reconstruct as jitted functions of (params, input)."""
  encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method=module.encode))
  decode = jax.jit(lambda p, z: module.apply({"params": p}, z, method=module.decode))
  reconstruct = jax.jit(lambda p, x: module.apply({"params": p}, x))
  return encode, decode, reconstruct


def _max_rel_err(ours, theirs):
  return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


@pytest.mark.parametrize("overrides", [
    {},
    dict(block_out_channels=(8, 16, 16), layers_per_block=2, act_fn="silu",
         scaling_factor=0.13025, mid_block_add_attention=False, latent_channels=3,
         use_quant_conv=False, use_post_quant_conv=False,
         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3),
])
def test_parity_with_diffusers(tmp_path, overrides):
  model = _torch_vae(str(tmp_path), **overrides)
  module, params, _ = vae.load_vae(str(tmp_path))
  assert module.config.scaling_factor == model.config.scaling_factor
  assert module.config.shift_factor is None
  rng = np.random.default_rng(0)
  # An odd size exercises the asymmetric downsampling pad.
  x = rng.uniform(-1, 1, (2, 3, 20, 18)).astype(np.float32)
  with torch.no_grad():
    posterior = model.encode(torch.from_numpy(x)).latent_dist
    z = posterior.mean
    decoded = model.decode(z).sample
  encode, decode, _ = _jitted(module)
  x_nhwc = jnp.asarray(_nhwc(torch.from_numpy(x)))
  ours = encode(params, x_nhwc)
  assert _max_rel_err(ours.mean, _nhwc(posterior.mean)) < 1e-4
  assert _max_rel_err(ours.logvar, _nhwc(posterior.logvar)) < 1e-4
  ours_x = decode(params, jnp.asarray(_nhwc(z)))
  assert ours_x.shape == _nhwc(decoded).shape
  assert _max_rel_err(ours_x, _nhwc(decoded)) < 1e-4
  print(f"max rel err: mean {_max_rel_err(ours.mean, _nhwc(posterior.mean)):.2e}, logvar "
        f"{_max_rel_err(ours.logvar, _nhwc(posterior.logvar)):.2e}, decode "
        f"{_max_rel_err(ours_x, _nhwc(decoded)):.2e}")


def test_sample_is_mean_plus_std_noise(tmp_path):
  _torch_vae(str(tmp_path))
  module, params, _ = vae.load_vae(str(tmp_path))
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
  posterior = _jitted(module)[0](params, x)
  key = jax.random.key(7)
  expected = posterior.mean + jnp.exp(0.5 * posterior.logvar) * jax.random.normal(
      key, posterior.mean.shape)
  np.testing.assert_allclose(posterior.sample(key), expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(posterior.mode(), posterior.mean)
  z = posterior.mean
  np.testing.assert_allclose(module.config.scale_latents(z), z * 0.18215, rtol=1e-6)
  np.testing.assert_allclose(module.config.unscale_latents(module.config.scale_latents(z)), z,
                             rtol=1e-5, atol=1e-6)
  shifted = vae.VAEConfig(scaling_factor=2.0, shift_factor=0.5)
  np.testing.assert_allclose(shifted.scale_latents(z), (z - 0.5) * 2.0, rtol=1e-6)
  assert posterior.mean.shape == (2, 8, 8, 4)
  assert posterior.kl().shape == (2,)
  assert not np.allclose(posterior.sample(key), posterior.sample(jax.random.key(8)))


def test_reconstruction_and_bfloat16(tmp_path):
  model = _torch_vae(str(tmp_path))
  module, params, _ = vae.load_vae(str(tmp_path))
  module16, params16, _ = vae.load_vae(str(tmp_path), dtype=jnp.bfloat16)
  x = jax.random.uniform(jax.random.key(1), (1, 16, 16, 3), minval=-1, maxval=1)
  ref = _jitted(module)[2](params, x)
  out = _jitted(module16)[2](params16, x)
  assert out.dtype == jnp.float32
  with torch.no_grad():  # the reconstruction (__call__) is diffusers' forward
    recon = model(torch.from_numpy(np.transpose(np.array(x), (0, 3, 1, 2)).copy())).sample
  assert _max_rel_err(ref, _nhwc(recon)) < 1e-4
  assert _max_rel_err(out, np.asarray(ref)) < 5e-2


def test_bad_config_raises():
  config = vae.VAEConfig(block_out_channels=(8, 16), norm_num_groups=4).to_diffusers()
  vae.VAEConfig.from_diffusers(config)
  for key, value in (("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
                     ("act_fn", "gelu_tanh_fancy"), ("latents_mean", [0.1, 0.2, 0.3, 0.4]),
                     ("norm_num_groups", 3), ("some_new_option", 1)):
    with pytest.raises(configuration.UnsupportedConfigError, match=key):
      vae.VAEConfig.from_diffusers({**config, key: value})


def test_missing_weight_names_the_key(tmp_path):
  _torch_vae(str(tmp_path))
  path = os.path.join(str(tmp_path), "diffusion_pytorch_model.safetensors")
  state = load_file(path)
  key = "decoder.up_blocks.0.upsamplers.0.conv.weight"
  del state[key]
  save_file(state, path)
  with pytest.raises(weights.WeightMismatchError, match=key):
    vae.load_vae(str(tmp_path))


def test_export_import_identity(tmp_path):
  model = _torch_vae(str(tmp_path / "torch"))
  module, params, config = vae.load_vae(str(tmp_path / "torch"))
  vae.save_vae(str(tmp_path / "ours"), params, config)
  _, params2, config2 = vae.load_vae(str(tmp_path / "ours"))
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params, params2)
  reloaded = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "ours")).eval()
  x = torch.rand(1, 3, 16, 16) * 2 - 1
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded(x).sample.numpy(), model(x).sample.numpy())


def test_param_paths_follow_diffusers():
  config = vae.VAEConfig(block_out_channels=(8, 16), norm_num_groups=4).to_diffusers()
  # eval_shape traces init_vae (no compilation): the tree diffusers' keys map onto.
  params = jax.eval_shape(lambda: vae.init_vae(config, jax.random.key(0))[1])
  enc = params["encoder"]
  assert set(enc["down_blocks_0"]) == {"resnets_0", "downsamplers_0"}
  assert "downsamplers_0" not in enc["down_blocks_1"]
  assert set(enc["mid_block"]) == {"resnets_0", "attentions_0", "resnets_1"}
  assert set(enc["mid_block"]["attentions_0"]) == {"group_norm", "to_q", "to_k", "to_v",
                                                   "to_out_0"}
  assert set(params["decoder"]["up_blocks_0"]) == {"resnets_0", "resnets_1", "upsamplers_0"}
  assert params["quant_conv"]["kernel"].shape == (1, 1, 8, 8)
  assert params["post_quant_conv"]["kernel"].shape == (1, 1, 4, 4)
  assert params["encoder"]["conv_in"]["kernel"].dtype == jnp.float32
