"""Every config loads, its variants differ as documented, and its settings build."""
import importlib

import pytest

from attrib_jax.attribution import runner
from attrib_jax.diffusion import NoiseSchedule
from attrib_jax.models import unet


@pytest.mark.parametrize("name, variants", [("tiny", (None, "demo", "smoke", "visual",
                                                      "two_objects")),
                                            ("tiny_eval", (None, "full", "smoke")),
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
  bad = config.attribution.to_dict()
  bad["preconditoner"] = "ekfac"
  with pytest.raises(ValueError, match="preconditoner"):
    runner.AbUSettings.from_config(bad)
  bad = config.attribution.to_dict()
  bad["preconditioner"] = "kfac"
  with pytest.raises(ValueError, match="'kfac' is not one of"):
    runner.AbUSettings.from_config(bad)
  bad = config.attribution.to_dict()
  bad["ekfac"] = {"damping": 0.1}
  with pytest.raises(TypeError, match="damping"):
    runner.AbUSettings.from_config(bad)


def test_abu_plus_settings_follow_the_unlearning_block():
  config = importlib.import_module("configs.tiny").get_config()
  c = config.attribution.to_dict()
  c["preconditioner"], c["ekfac"] = "ekfac", {"damping_scale": 0.02, "num_epochs": 3}
  settings = runner.AbUSettings.from_config(c)
  assert settings.method == "abu+" and runner.out_dir_name(settings) == "attribution_plus"
  step = settings.ekfac_unlearn_settings()
  assert (step.alpha, step.num_steps, step.num_draws, step.damping_scale, step.selection) == (
      c["unlearn"]["alpha"], c["unlearn"]["num_steps"], c["unlearn"]["num_draws"], 0.02,
      c["unlearn"]["selection"])
  assert settings.ekfac_settings().num_epochs == 3
  assert settings.ekfac_settings().selection == c["unlearn"]["selection"]
  fisher = settings.with_preconditioner("fisher")
  assert fisher.method == "abu" and runner.out_dir_name(fisher) == "attribution"


@pytest.mark.parametrize("variant", [None, "smoke"])
def test_tiny_eval_meets_the_evaluation_bar(variant):
  """The counterfactual evaluation's bar on configs/tiny_eval.py: every method, >= 2 K in 0.5-5 % of N, a random
  floor of several draws, LDS, >= 10 queries (the default variant)."""
  from attrib_jax.evaluation import eval_report  # pylint: disable=g-import-not-at-top
  config = importlib.import_module("configs.tiny_eval").get_config(variant)
  settings = eval_report.EvalSettings.from_config(config.evaluation)
  n = config.world.num_items
  ks = settings.resolve_ks(n)
  assert set(settings.methods) == set(eval_report.DEFAULT_METHODS)
  assert len(ks) >= 2 and all(0.005 * n <= k <= 0.05 * n for k in ks), (ks, n)
  assert settings.random_draws >= 3 and settings.lds is not None
  if variant is None:
    num_rare = 5    # the tiny world plants every rare concept unless told otherwise
    g = config.generate
    assert num_rare * g.queries_per_rare_concept + g.num_common_queries >= 10


def test_tiny_eval_loads_by_path_from_anywhere(tmp_path, monkeypatch):
  """config_flags loads a config file by path; its `from configs import tiny` must work even
  when the repository root is not on sys.path (a run started from another directory)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(sys, "path", [p for p in sys.path
                                    if os.path.abspath(p or ".") != root])
  for name in [m for m in sys.modules if m == "configs" or m.startswith("configs.")]:
    monkeypatch.delitem(sys.modules, name)
  spec = importlib.util.spec_from_file_location(
      "tiny_eval_by_path", os.path.join(root, "configs", "tiny_eval.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.get_config().world.num_items < 1000


def test_tiny_eval_full_meets_the_issue_scale():
  """configs/tiny_eval.py:full is the decisive evaluation's scale: 60+ queries, three K in
  0.5-5 % of N, a random floor of 5 draws, 32 LDS subsets, the text and pixel floors, and AbU /
  AbU+ at SPEC's settings and at the demo's."""
  from attrib_jax.evaluation import eval_report  # pylint: disable=g-import-not-at-top
  config = importlib.import_module("configs.tiny_eval").get_config("full")
  settings = eval_report.EvalSettings.from_config(config.evaluation)
  n, g = config.world.num_items, config.generate
  ks = settings.resolve_ks(n)
  assert len(ks) == 3 and all(0.005 * n <= k <= 0.05 * n for k in ks), (ks, n)
  assert settings.random_draws >= 5 and settings.lds.num_subsets >= 32
  assert 5 * g.queries_per_rare_concept + g.num_common_queries >= 60
  assert {"pixel", "caption", "caption-words", "random"} <= set(settings.methods)
  demo = importlib.import_module("configs.tiny").get_config().attribution
  for name, preconditioner in (("abu@demo", "fisher"), ("abu+@demo", "ekfac")):
    got = runner.variant_settings(config.attribution, name, settings.method_configs[name])
    assert got == runner.AbUSettings.from_config(demo).with_preconditioner(preconditioner)
    plain = runner.variant_settings(config.attribution, name.split("@")[0], {})
    assert plain.sweep.method == "cached" and plain.sweep.min_snr_gamma is None
    assert got != plain


def test_abu_variant_settings_name_what_is_wrong():
  config = importlib.import_module("configs.tiny").get_config("smoke")
  got = runner.variant_settings(config.attribution, "abu+@jvp", {"sweep": {"method": "jvp"}})
  assert got.preconditioner == "ekfac" and got.sweep.method == "jvp"
  assert got.unlearn == runner.AbUSettings.from_config(config.attribution).unlearn
  with pytest.raises(ValueError, match="methd"):
    runner.variant_settings(config.attribution, "abu@x", {"sweep": {"methd": "jvp"}})
  with pytest.raises(ValueError, match="'swep' is not a block"):
    runner.variant_settings(config.attribution, "abu@x", {"swep": {"method": "jvp"}})
  with pytest.raises(ValueError, match="name a variant"):
    runner.variant_settings(config.attribution, "abu+", {"sweep": {"method": "jvp"}})
  with pytest.raises(ValueError, match="abu@LABEL"):
    runner.variant_settings(config.attribution, "abu@", {})
  assert runner.workdir_dirs("/w", got, label="jvp") == ("/w/attribution_plus@jvp",
                                                         "/w/attribution")
