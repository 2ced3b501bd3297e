"""Every config loads, its variants differ as documented, and its settings build."""
import importlib

import pytest

from attrib_jax.attribution import runner
from attrib_jax.diffusion import NoiseSchedule
from attrib_jax.models import unet


@pytest.mark.parametrize("name, variants", [("tiny", (None, "smoke")),
                                            ("mscoco", (None, "local"))])
def test_configs_build(name, variants):
  module = importlib.import_module(f"configs.{name}")
  for variant in variants:
    config = module.get_config(variant)
    unet.UNetConfig.from_diffusers(config.unet.to_dict())
    NoiseSchedule.from_config(config.scheduler.to_dict())
    runner.AbUSettings.from_config(config.attribution)
  with pytest.raises(ValueError, match="unknown variant"):
    module.get_config("nope")


def test_mscoco_unet_matches_the_paper():
  import jax  # pylint: disable=g-import-not-at-top
  from attrib_jax.attribution import selection  # pylint: disable=g-import-not-at-top
  config = importlib.import_module("configs.mscoco").get_config()
  module = unet.UNet2DConditionModel(unet.UNetConfig.from_diffusers(config.unet.to_dict()))
  params = unet.abstract_params(module)
  assert sum(x.size for x in jax.tree.leaves(params)) == 57_373_316  # SPEC: 57.4M
  assert selection.count(params, selection.select(params, "cross-attn-kv")) == 7_077_888


def test_unknown_attribution_key_is_an_error():
  config = importlib.import_module("configs.tiny").get_config("smoke")
  bad = config.attribution.to_dict()
  bad["unlearn"]["alpah"] = 0.1
  with pytest.raises(TypeError, match="alpah"):
    runner.AbUSettings.from_config(bad)
