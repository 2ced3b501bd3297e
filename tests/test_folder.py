"""A user's own image folder through the launchers: train -> generate -> attribute, and the
errors a user meets first (empty folder, missing or unreadable image, no captions file)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from attrib_jax.training import recipe
from configs import folder as folder_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220),
           "yellow": (230, 220, 30)}


def _write_folder(root, num_images=20):
  """Images of different sizes and formats (JPEG, PNG, greyscale, a subfolder), captioned."""
  os.makedirs(os.path.join(root, "sub"), exist_ok=True)
  rng = np.random.default_rng(0)
  lines = []
  for i in range(num_images):
    name, colour = list(COLOURS.items())[i % len(COLOURS)]
    w, h = int(rng.integers(20, 90)), int(rng.integers(20, 90))
    image = np.full((h, w, 3), 128, np.uint8)
    image[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = colour
    file = (f"sub/img{i:02d}.png" if i % 5 == 0 else
            f"img{i:02d}.jpg" if i % 2 else f"img{i:02d}.png")
    pil = Image.fromarray(image)
    pil = pil.convert("L") if i == 3 else pil
    pil.save(os.path.join(root, file))
    lines.append(json.dumps({"file": file, "caption": f"a {name} square on gray"}))
  with open(os.path.join(root, "captions.jsonl"), "w") as f:
    f.write("\n".join(lines) + "\n")


def _run(module, workdir, folder, *extra):
  env = dict(os.environ, XLA_FLAGS="")  # one CPU device, as a user's run
  out = subprocess.run([sys.executable, "-m", module, "--config=configs/folder.py:smoke",
                        f"--workdir={workdir}", f"--config.world.manual_dir={folder}", *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout


def test_own_folder_train_generate_attribute(tmp_path):
  folder, workdir = str(tmp_path / "images"), str(tmp_path / "run")
  _write_folder(folder)
  log = _run("launch.train", workdir, folder)
  assert "train: 20 items" in log and "train: step 4/4" in log, log
  _run("launch.generate", workdir, folder)
  names = sorted(os.listdir(os.path.join(workdir, "queries")))
  # Two queries from training captions, spread over the folder (first and last item).
  assert names == ["caption_00000", "caption_00019", "overview.png"], names
  info = json.load(open(os.path.join(workdir, "queries", "caption_00019", "query.json")))
  assert info["prompt"] == "a yellow square on gray" and info["caption_of"] == 19, info
  image = np.asarray(Image.open(os.path.join(workdir, "queries", "caption_00000", "image.png")))
  assert image.shape == (16, 16, 3)       # world.resolution, whatever the folder's sizes
  _run("launch.attribute", workdir, folder)
  out = os.path.join(workdir, "attribution_plus")
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert summary["summary"]["num_queries"] == 2
  for entry in summary["queries"]:
    assert sorted(entry["top"]) == sorted(set(entry["top"])) and len(entry["top"]) == 10
    assert all(0 <= i < 20 for i in entry["top"])
  assert os.path.exists(os.path.join(out, "report.html"))
  # A changed folder is a changed dataset: the finished model is not silently reused.
  Image.new("RGB", (30, 40), (0, 0, 0)).save(os.path.join(folder, "img01.jpg"))
  config = folder_config.get_config("smoke")
  config.world.manual_dir = folder
  with pytest.raises(ValueError, match="trained with other settings"):
    recipe.run(config, workdir)


def _open(folder, tmp_path):
  config = folder_config.get_config("smoke")
  config.world.manual_dir = str(folder)
  return recipe.open_dataset(config, str(tmp_path / "tfds"))


def test_folder_errors_name_the_problem(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match=r"must hold exactly one of .*captions.jsonl"):
    _open(empty, tmp_path)
  (empty / "captions.jsonl").write_text("")
  with pytest.raises(ValueError, match="no captioned images"):
    _open(empty, tmp_path)

  folder = tmp_path / "images"
  _write_folder(str(folder), num_images=4)
  with open(folder / "captions.jsonl", "a") as f:
    f.write(json.dumps({"file": "gone.png", "caption": "a lost image"}) + "\n")
  with pytest.raises(FileNotFoundError, match=r"do not exist .*gone\.png"):
    _open(folder, tmp_path)

  lines = (folder / "captions.jsonl").read_text().splitlines()[:-1]
  (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
  (folder / "img01.jpg").write_bytes(b"not an image at all")
  with pytest.raises(ValueError, match=r"img01\.jpg.*cannot be read as an image"):
    _open(folder, tmp_path)

  (folder / "captions.jsonl").unlink()
  with pytest.raises(FileNotFoundError, match="must hold exactly one of"):
    _open(folder, tmp_path)

  config = folder_config.get_config("smoke")    # no folder given at all
  with pytest.raises(ValueError, match="config.world.manual_dir"):
    recipe.open_dataset(config, str(tmp_path / "tfds"))
