"""Kill points found by reading, each killed here at exactly that point and rerun (the random
SIGKILL trials of all three launchers are benchmarks/kill_resume.py: too slow for CI)."""
from __future__ import annotations

import importlib
import os
import shutil

import pytest

from attrib_jax.models import pipeline as pipeline_lib
from attrib_jax.training import recipe


class Killed(Exception):
  """Stands for a SIGKILL at one point of a run."""


def test_prepare_killed_after_the_text_tower_keeps_the_pixel_codec(tmp_path, monkeypatch):
  """text_encoder/config.json marks the text side done; the pixel codec file was written after
  it, so a run killed between the two resumed with no codec and read the model as unpatched
  pixels (patch 1: 16x16x3 latents for a UNet built for 8x8x12)."""
  config = importlib.import_module("configs.tiny").get_config("smoke")
  workdir = str(tmp_path / "run")
  real = recipe._random_text_encoder

  def killed_after(*args, **kwargs):
    real(*args, **kwargs)
    raise Killed
  monkeypatch.setattr(recipe, "_random_text_encoder", killed_after)
  with pytest.raises(Killed):
    recipe.prepare(config, workdir, log=lambda _: None)
  monkeypatch.undo()
  _, arrays, model_dir = recipe.prepare(config, workdir, log=lambda _: None)   # the rerun
  assert pipeline_lib.read_pixel_patch(model_dir) == config.pixel_patch == 2
  assert arrays["latents"].shape[2:] == (8, 8, 12)


@pytest.mark.parametrize("killed_at", ["vae", "tokenizer", "text_encoder"])
def test_copying_pretrained_components_killed_midway_is_redone(tmp_path, monkeypatch, killed_at):
  """The user's text encoder, tokenizer and VAE are copied in; a kill while copying must not
  leave the marker (text_encoder/config.json) beside a missing or half-copied component."""
  src = tmp_path / "pretrained"
  for name in ("text_encoder", "tokenizer", "vae"):
    (src / name).mkdir(parents=True)
    for f in ("config.json", "weights.safetensors"):
      (src / name / f).write_text(f"{name}/{f}")
  config = {"pretrained_dir": str(src)}
  model_dir = str(tmp_path / "model")
  real = shutil.copytree

  def copytree(source, dest, **kwargs):
    if os.path.basename(source) == killed_at:
      # Killed after the first file of the component is in place.
      os.makedirs(dest, exist_ok=True)
      shutil.copy(os.path.join(source, "config.json"), dest)
      raise Killed
    return real(source, dest, **kwargs)
  monkeypatch.setattr(recipe.shutil, "copytree", copytree)
  with pytest.raises(Killed):
    recipe._copy_pretrained(config, model_dir)
  assert not os.path.exists(os.path.join(model_dir, "text_encoder", "config.json"))
  assert not os.path.exists(os.path.join(model_dir, killed_at))   # no half component
  monkeypatch.undo()
  recipe._copy_pretrained(config, model_dir)
  for name in ("text_encoder", "tokenizer", "vae"):
    assert sorted(os.listdir(os.path.join(model_dir, name))) == ["config.json",
                                                                  "weights.safetensors"]
