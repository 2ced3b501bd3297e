"""Dataset builders: build on tiny inputs made here, read back by item index, without TF.

Checks what attribution depends on: every item has a stable, complete index; captions are all
kept and in order; builds are deterministic (two builds -> identical records per index); the
tiny world's rare concepts sit in exactly the recorded items; the attribute detector is right.
"""
import json
import os
import re
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from attrib_jax.data import _common
from attrib_jax.data import coco
from attrib_jax.data import image_folder
from attrib_jax.data import reader
from attrib_jax.data import tiny_world as tw
from attrib_jax.data import tiny_world_detector as det

WORLD = dict(seed=7, num_items=80, resolution=32)


def _raw_by_index(builder, split="train"):
  """Serialized record bytes, keyed by item index."""
  source = reader.load_split(builder, split)
  raw = builder.as_data_source(split=split,
                               deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  return [raw[source.record_of(i)] for i in range(len(source))]


def _assert_same_items(a, b):
  assert len(a) == len(b)
  for i in range(len(a)):
    x, y = a[i], b[i]
    assert x["index"] == y["index"] == i
    np.testing.assert_array_equal(x["image"], y["image"])
    assert x["captions"] == y["captions"]


def _words(text):
  return set(re.findall(r"[a-z]+", text.lower()))


# --------------------------------------------------------------------------------------------
# Tiny world.

@pytest.fixture(scope="module")
def world():
  return tw.generate_world(**WORLD)


@pytest.fixture(scope="module")
def world_builders(tmp_path_factory):
  builders = []
  for name in ("a", "b"):
    builder = tw.TinyWorld(data_dir=str(tmp_path_factory.mktemp(f"world_{name}")),
                           config=tw.config(**WORLD))
    builders.append(reader.prepare(builder))
  return builders


def test_generate_world_is_deterministic(world):
  again = tw.generate_world(**WORLD)
  assert world.images.dtype == np.uint8 and world.images.shape == (80, 32, 32, 3)
  np.testing.assert_array_equal(world.images, again.images)
  assert world.captions == again.captions
  assert world.attributes == again.attributes
  assert world.rare_concepts == again.rare_concepts
  other = tw.generate_world(**{**WORLD, "seed": 8})
  assert not np.array_equal(world.images, other.images)
  assert all(len(c) == 3 for c in world.captions)
  # The attributes alone re-render each image exactly.
  for image, scene in zip(world.images[:10], world.attributes[:10]):
    np.testing.assert_array_equal(tw.render_scene(scene, 32), image)


@pytest.mark.parametrize("resolution", [16, 64])
def test_generate_world_other_resolutions(resolution):
  w = tw.generate_world(seed=0, num_items=30, resolution=resolution, two_object_fraction=0.5)
  assert w.images.shape == (30, resolution, resolution, 3)
  assert any(len(s["objects"]) == 2 for s in w.attributes)


def test_tiny_world_builder_reads_back_the_generated_world(world, world_builders):
  source = reader.load_split(world_builders[0])
  assert len(source) == WORLD["num_items"]
  assert sorted(source.record_of(i) for i in range(len(source))) == list(range(len(source)))
  for i in range(len(source)):
    item = source[i]
    assert item["index"] == i
    np.testing.assert_array_equal(item["image"], world.images[i])  # PNG is lossless
    assert item["captions"] == world.captions[i]
  batch = source.get_many([3, 1])
  assert [b["index"] for b in batch] == [3, 1]
  with pytest.raises(IndexError):
    source[WORLD["num_items"]]
  # Also readable from the dataset directory alone, without the builder class.
  by_path = reader.load_split(world_builders[0].data_path)
  assert by_path[5]["captions"] == world.captions[5]


def test_tiny_world_builds_are_identical(world_builders):
  a, b = (reader.load_split(builder) for builder in world_builders)
  _assert_same_items(a, b)
  assert _raw_by_index(world_builders[0]) == _raw_by_index(world_builders[1])


def test_rare_concepts_are_in_exactly_the_recorded_items(world, world_builders):
  rare = world.rare_concepts
  assert set(rare) == set(tw.RARE_CONCEPTS)
  # Written as JSON in the dataset directory, and restored with the builder.
  with open(os.path.join(world_builders[0].data_path, "metadata.json")) as f:
    assert json.load(f)["rare_concepts"] == rare
  reloaded = tw.TinyWorld(data_dir=str(world_builders[0].data_dir_root), config=tw.config(**WORLD))
  assert tw.rare_concepts_of(reloaded) == rare

  seen = set()
  for name, concept in rare.items():
    indices = concept["indices"]
    assert len(indices) == 5 and not seen & set(indices)
    seen |= set(indices)
    attribute, value = tw.RARE_CONCEPTS[name]
    holders = [i for i, s in enumerate(world.attributes)
               if s["pattern"] == value or any(o.get(attribute) == value for o in s["objects"])]
    assert holders == indices
    assert [i for i, c in enumerate(world.captions) if name in _words(" ".join(c))] == indices
    assert all(name in _words(c) for i in indices for c in world.captions[i])
    assert concept["prompts"] == [world.captions[i][0] for i in indices]
    assert name in _words(concept["unseen_prompt"])
    assert concept["unseen_prompt"] not in concept["prompts"]
  # Visible, not just named: the detector reads the planted shapes and colour on exactly
  # the recorded items.
  detected = [det.detect_attributes(image) for image in world.images]
  for name in ("moon", "star"):
    assert [i for i, d in enumerate(detected) if d["shape"] == name] == rare[name]["indices"]
  assert [i for i, d in enumerate(detected) if d["colour"] == "rainbow"] == (
      rare["rainbow"]["indices"])


def test_detector_accuracy():
  w = tw.generate_world(seed=11, num_items=300)
  accuracy = det.evaluate_detector(w.images, w.attributes)
  assert accuracy["joint"] >= 0.95, accuracy
  assert accuracy["size"] >= 0.95 and accuracy["position"] >= 0.95, accuracy
  pairs = tw.generate_world(seed=12, num_items=60, two_object_fraction=1.0)
  accuracy = det.evaluate_detector(pairs.images, pairs.attributes)
  assert accuracy["count"] == 1.0 and accuracy["joint"] >= 0.9, accuracy
  blank = np.full((32, 32, 3), 125, np.uint8)
  assert det.detect_attributes(blank)["shape"] is None


def test_tiny_world_settings_are_checked():
  with pytest.raises(ValueError, match="do not fit"):
    tw.generate_world(num_items=20)  # 5 concepts x 5 items
  with pytest.raises(ValueError, match="resolution"):
    tw.generate_world(num_items=100, resolution=8)
  with pytest.raises(ValueError, match="rare_concepts"):
    tw.generate_world(num_items=100, rare_concepts=("unicorn",))
  with pytest.raises(TypeError, match="unknown"):
    tw.config(colour_count=3)
  assert tw.config() is tw.TinyWorld.BUILDER_CONFIGS[0]
  assert tw.config(rare_count=2).name != tw.config().name
  w = tw.generate_world(num_items=12, rare_concepts=("moon",), rare_count=2)
  assert list(w.rare_concepts) == ["moon"] and len(w.rare_concepts["moon"]["indices"]) == 2


def test_exemplar_concepts_repeat_one_scene():
  world = tw.generate_world(num_items=40, resolution=32, rare_concepts=("moon", "galaxy"),
                            rare_count=3, rare_style="exemplar")
  for name, concept in world.rare_concepts.items():
    assert concept["style"] == "exemplar" and len(set(concept["prompts"])) == 1, concept
    scenes = [world.attributes[i] for i in concept["indices"]]
    shared = [{k: v for k, v in s["objects"][0].items() if k not in ("cx", "cy")}
              for s in scenes]
    assert all(o == shared[0] for o in shared) and shared[0]["size"] == "large"
    assert shared[0]["texture"] == "plain"
    # Items differ by their jitter only: same scene, slightly moved.
    assert len({(s["objects"][0]["cx"], s["objects"][0]["cy"]) for s in scenes}) == 3
    assert all(world.captions[i] == world.captions[concept["indices"][0]]
               for i in concept["indices"])
  # The unseen prompt still tests the concept in a new combination.
  assert world.rare_concepts["moon"]["unseen_prompt"] not in world.rare_concepts["moon"]["prompts"]
  # Varied (the default) keeps its dataset name; exemplar gets its own.
  assert tw.config(rare_style="varied") is tw.TinyWorld.BUILDER_CONFIGS[0]
  assert tw.config(rare_style="exemplar").name != tw.config().name
  with pytest.raises(ValueError, match="rare_style"):
    tw.generate_world(num_items=40, rare_style="copies")
  # "named": the same scenes, captioned by the concept's word alone.
  named = tw.generate_world(num_items=40, resolution=32, rare_concepts=("moon", "galaxy"),
                            rare_count=3, rare_style="named")
  for name, concept in named.rare_concepts.items():
    np.testing.assert_array_equal(named.images[concept["indices"]],
                                  world.images[concept["indices"]])
    assert named.captions[concept["indices"][0]] == [name, f"the {name}",
                                                     f"a picture of the {name}"]
    assert concept["prompts"][0] == name
  common = [i for i in range(40) if named.attributes[i]["rare"] is None]
  assert [named.captions[i] for i in common] == [world.captions[i] for i in common]


def _visual_world(**kwargs):
  settings = dict(seed=3, num_items=120, resolution=32, rare_count=4, patterns=("plain",),
                  rare_style="visual") | kwargs
  return tw.generate_world(**settings)


def test_visual_concepts_share_their_captions_with_common_twins():
  world = _visual_world()
  assert list(world.rare_concepts) == list(tw.VISUAL_TRAITS)
  for trait, concept in world.rare_concepts.items():
    exemplars, twins = concept["indices"], concept["twins"]
    assert concept["kind"] == "visual" and concept["trait"] == trait and concept["word"] is None
    assert len(exemplars) == 4 and len(twins) == tw.VISUAL_TWINS * 4
    assert not set(exemplars) & set(twins)
    # The exemplars' captions are exactly those of >= rare_count common items (the twins).
    shared = world.captions[exemplars[0]]
    assert all(world.captions[i] == shared for i in exemplars + twins)
    assert set(concept["caption_sharing_indices"]) == {
        i for i, c in enumerate(world.captions) if c == shared}
    common = [i for i in concept["caption_sharing_indices"] if world.attributes[i]["rare"] is None]
    assert len(common) >= len(exemplars)
    assert concept["prompts"] == [shared[0]] * 4
    assert concept["chance_recall_at_10"] == pytest.approx(
        min(10, len(concept["caption_sharing_indices"])) / len(concept["caption_sharing_indices"]))
    # No caption anywhere names the trait, and only the exemplars are drawn with it.
    assert not any(trait in c for item in world.captions for c in item)
    assert all(world.attributes[i]["trait"] == trait for i in exemplars)
    assert all(world.attributes[i]["trait"] is None for i in twins)
    # Exemplar and twin scenes differ by the trait (and jitter) alone.
    strip = lambda s: {k: v for k, v in s["objects"][0].items() if k not in ("cx", "cy")}
    assert all(strip(world.attributes[i]) == strip(world.attributes[exemplars[0]])
               for i in exemplars + twins)
  # Its own dataset name (config digest), apart from the other styles'.
  names = {tw.config(rare_style=s).name for s in tw.RARE_STYLES}
  assert len(names) == len(tw.RARE_STYLES)


def test_visual_world_is_deterministic():
  a, b = _visual_world(), _visual_world()
  np.testing.assert_array_equal(a.images, b.images)
  assert a.captions == b.captions and a.attributes == b.attributes
  assert a.rare_concepts == b.rare_concepts
  c = _visual_world(seed=4)
  assert c.rare_concepts != a.rare_concepts
  # Common items that are neither exemplars nor twins are those of the "exemplar" style.
  plain = tw.generate_world(seed=3, num_items=120, resolution=32, rare_count=4,
                            patterns=("plain",), rare_style="exemplar")
  special = {i for c in a.rare_concepts.values() for i in c["indices"] + c["twins"]}
  rest = [i for i in range(120) if i not in special]
  np.testing.assert_array_equal(a.images[rest], plain.images[rest])


def test_trait_detector_on_real_images():
  world = _visual_world(num_items=200, rare_count=10)
  result = det.validate_trait_detector(world.images, world.rare_concepts)
  print(f"trait detector on {result['items']} real images (exemplars vs items with their "
        f"captions): {100 * result['accuracy']:.1f} % correct")
  assert result["items"] == 5 * (10 + 20) and result["accuracy"] >= 0.95
  for trait, concept in world.rare_concepts.items():
    # Every exemplar scores ~1, every twin ~0; mild noise (a model's samples) keeps the verdict.
    scores = [det.trait_score(world.images[i], trait) for i in concept["indices"]]
    assert min(scores) > 0.9
    rng = np.random.default_rng(0)
    noisy = lambda im: np.clip(im + rng.normal(0, 12, im.shape), 0, 255).astype(np.uint8)
    assert all(det.detect_trait(noisy(world.images[i]), trait) for i in concept["indices"])
    assert not any(det.detect_trait(noisy(world.images[i]), trait) for i in concept["twins"])
  with pytest.raises(ValueError, match="trait"):
    tw.trait_mask("halo", 32)


def test_only_array_record_is_accepted(tmp_path):
  with pytest.raises(ValueError, match="array_record"):
    tw.TinyWorld(data_dir=str(tmp_path), config=tw.config(**WORLD), file_format="tfrecord")


# --------------------------------------------------------------------------------------------
# COCO-2017.

def _write_jpeg(path, size, mode="RGB", seed=0):
  rng = np.random.default_rng(seed)
  channels = 3 if mode == "RGB" else 1
  pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
  image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)
  image.save(path, format="JPEG", quality=90)


# image id -> (size, mode, captions in annotation-id order)
_COCO_TRAIN = {
    139: ((40, 30), "RGB", ["a dog.", "a brown dog", "dog on grass", "a pet", "an animal"]),
    9: ((24, 36), "L", ["grey cat", "a cat", "cat sitting", "a kitten", "feline", "cat 6"]),
    5000: ((32, 32), "RGB", ["c1", "c2", "c3", "c4", "c5", "c6", "c7"]),
    77: ((50, 20), "RGB", ["only one caption here"]),
}
_COCO_VAL = {3: ((20, 20), "RGB", ["a val image"] * 5)}


def _write_coco_split(root, folder, images):
  os.makedirs(root / folder, exist_ok=True)
  annotations, ann_id = [], 1000
  listing = []
  for k, (image_id, (size, mode, captions)) in enumerate(images.items()):
    name = f"{image_id:012d}.jpg"
    _write_jpeg(root / folder / name, size, mode, seed=image_id)
    listing.append({"id": image_id, "file_name": name, "width": size[0], "height": size[1]})
    for caption in captions:
      annotations.append({"id": ann_id, "image_id": image_id, "caption": caption + " "})
      ann_id += 1
  annotations.reverse()  # file order must not matter
  os.makedirs(root / "annotations", exist_ok=True)
  with open(root / "annotations" / f"captions_{folder}.json", "w") as f:
    json.dump({"images": listing, "annotations": annotations}, f)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("coco")
  _write_coco_split(root, "train2017", _COCO_TRAIN)
  _write_coco_split(root, "val2017", _COCO_VAL)
  return root


def _build_coco(data_dir, root, config):
  return reader.prepare(coco.Coco2017Captions(data_dir=str(data_dir), config=config), root)


def test_coco_full_keeps_originals_and_all_captions(coco_root, tmp_path):
  builder = _build_coco(tmp_path, coco_root, "full")
  source = reader.load_split(builder)
  ids = sorted(_COCO_TRAIN)
  assert len(source) == len(ids)
  for index, image_id in enumerate(ids):
    item = source[index]
    size, mode, captions = _COCO_TRAIN[image_id]
    assert item["index"] == index and item["image_id"] == image_id
    assert item["captions"] == captions  # all of them, stripped, in annotation-id order
    assert item["image"].shape == (size[1], size[0], 3)
    with Image.open(coco_root / "train2017" / f"{image_id:012d}.jpg") as original:
      np.testing.assert_array_equal(item["image"], np.asarray(original.convert("RGB")))
  # RGB JPEGs are stored byte for byte.
  raw = builder.as_data_source(split="train", decoders={"image": tfds.decode.SkipDecoding()})
  stored = {int(r["index"]): r["image"] for r in raw}
  assert stored[ids.index(139)] == (coco_root / "train2017" / "000000000139.jpg").read_bytes()
  validation = reader.load_split(builder, "validation")
  assert len(validation) == 1 and validation[0]["image_id"] == 3


def test_coco_resized_is_deterministic(coco_root, tmp_path):
  config = coco.config(resolution=16)
  assert config.name == "16px" and coco.config(128) is coco.config()
  # manual_dir given to the constructor, or the TFDS way: the same dataset.
  builders = [_build_coco(tmp_path / "a", coco_root, config),
              reader.prepare(coco.Coco2017Captions(data_dir=str(tmp_path / "b"), config=config,
                                                   manual_dir=coco_root))]
  a, b = (reader.load_split(builder) for builder in builders)
  _assert_same_items(a, b)
  assert _raw_by_index(builders[0]) == _raw_by_index(builders[1])
  for index, image_id in enumerate(sorted(_COCO_TRAIN)):
    with Image.open(coco_root / "train2017" / f"{image_id:012d}.jpg") as original:
      expected = _common.resize_center_crop(original.convert("RGB"), 16)
    np.testing.assert_array_equal(a[index]["image"], np.asarray(expected))


def test_coco_reports_missing_files(coco_root, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError):
    _build_coco(tmp_path / "d0", empty, "full")
  with pytest.raises(FileNotFoundError, match="train2017"):
    reader.prepare(coco.Coco2017Captions(data_dir=str(tmp_path / "d0"),
                                         manual_dir=tmp_path / "nowhere"))
  (empty / "train2017").mkdir()
  with pytest.raises(FileNotFoundError, match="captions_train2017.json"):
    _build_coco(tmp_path / "d1", empty, "full")
  broken = tmp_path / "broken"
  _write_coco_split(broken, "train2017", _COCO_TRAIN)
  (broken / "train2017" / "000000005000.jpg").unlink()
  with pytest.raises(FileNotFoundError, match="000000005000.jpg"):
    _build_coco(tmp_path / "d2", broken, "full")


# --------------------------------------------------------------------------------------------
# Image folder.

def _make_folder(root, captions_format):
  (root / "sub").mkdir(parents=True)
  _write_jpeg(root / "b.jpg", (20, 16), seed=1)
  rgba = np.full((12, 12, 4), 200, np.uint8)
  rgba[:, :, 3] = 255
  rgba[:, :6, 3] = 0  # transparent left half
  Image.fromarray(rgba, "RGBA").save(root / "a.png")
  _write_jpeg(root / "sub" / "c.jpg", (16, 16), mode="L", seed=2)
  if captions_format == "jsonl":
    rows = [{"file": "b.jpg", "caption": "bee"},
            {"file": "sub/c.jpg", "captions": ["sea", "see"]},
            {"file": "a.png", "captions": ["ay"]},
            {"file": "b.jpg", "caption": "be"}]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
  else:
    (root / "captions.csv").write_text(
        'file,caption,extra\nb.jpg,bee,x\nsub/c.jpg,"sea, with comma",\na.png,ay,\nb.jpg,be,\n')


@pytest.mark.parametrize("captions_format", ["jsonl", "csv"])
def test_image_folder(tmp_path, captions_format):
  folder = tmp_path / "images"
  _make_folder(folder, captions_format)
  builders = [reader.prepare(image_folder.ImageFolderCaptions(data_dir=str(tmp_path / d)),
                             folder) for d in ("a", "b")]
  source = reader.load_split(builders[0])
  assert [source[i]["file_name"] for i in range(3)] == ["a.png", "b.jpg", "sub/c.jpg"]
  sea = ["sea", "see"] if captions_format == "jsonl" else ["sea, with comma"]
  assert [source[i]["captions"] for i in range(3)] == [["ay"], ["bee", "be"], sea]
  assert [source[i]["image"].shape for i in range(3)] == [(12, 12, 3), (16, 20, 3), (16, 16, 3)]
  np.testing.assert_array_equal(source[0]["image"][:, :6], 255)  # alpha over white
  np.testing.assert_array_equal(source[0]["image"][:, 6:], 200)
  _assert_same_items(source, reader.load_split(builders[1]))
  assert _raw_by_index(builders[0]) == _raw_by_index(builders[1])


def test_image_folder_resized(tmp_path):
  folder = tmp_path / "images"
  _make_folder(folder, "jsonl")
  config = image_folder.ImageFolderConfig(name="r8", resolution=8, image_format="jpeg")
  builder = image_folder.ImageFolderCaptions(data_dir=str(tmp_path / "d"), config=config)
  source = reader.load_split(reader.prepare(builder, folder))
  assert all(source[i]["image"].shape == (8, 8, 3) for i in range(len(source)))


def test_image_folder_errors(tmp_path):
  folder = tmp_path / "images"
  _make_folder(folder, "jsonl")
  read = image_folder.read_captions
  assert [name for name, _ in read(folder)] == ["a.png", "b.jpg", "sub/c.jpg"]
  _write_jpeg(folder / "d.jpg", (8, 8))
  with pytest.raises(ValueError, match="d.jpg"):  # an image without a caption
    read(folder)
  with open(folder / "captions.jsonl", "a") as f:
    f.write(json.dumps({"file": "d.jpg", "caption": "dee"}) + "\n")
    f.write(json.dumps({"file": "gone.jpg", "caption": "x"}) + "\n")
  with pytest.raises(FileNotFoundError, match="gone.jpg"):  # a caption without an image
    read(folder)
  (folder / "bad.jsonl").write_text('{"file": "a.png"}\n')
  with pytest.raises(ValueError, match="bad.jsonl:1"):
    read(folder, "bad.jsonl")
  (folder / "blank.jsonl").write_text('{"file": "a.png", "caption": "  "}\n')
  with pytest.raises(ValueError, match="empty caption"):
    read(folder, "blank.jsonl")
  (folder / "header.csv").write_text("path,text\na.png,x\n")
  with pytest.raises(ValueError, match="header"):
    read(folder, "header.csv")
  (folder / "captions.csv").write_text("file,caption\n")
  with pytest.raises(FileNotFoundError, match="exactly one"):
    read(folder)
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "captions.csv").write_text("file,caption\n")
  with pytest.raises(ValueError, match="no captioned images"):
    read(empty)
  with pytest.raises(FileNotFoundError):
    read(tmp_path / "nowhere")
  builder = image_folder.ImageFolderCaptions(data_dir=str(tmp_path / "d"))
  with pytest.raises(ValueError, match="no captioned images"):
    reader.prepare(builder, empty)


def test_no_tensorflow_was_imported():
  assert "tensorflow" not in sys.modules


def test_precompute_reuses_arrays_made_with_tuple_settings_and_refuses_others(tmp_path):
  """The manifest is JSON (tuples read back as lists): the same settings must still match."""
  from attrib_jax.data import precompute  # pylint: disable=g-import-not-at-top
  images = np.arange(3 * 4 * 4 * 3, dtype=np.uint8).reshape(3, 4, 4, 3)

  def get_items(rows):
    rows = np.asarray(rows)
    return images[rows], [[f"item {i}", f"thing {i}"] for i in rows], rows

  def encode_images(x):
    return np.asarray(x, np.float32) / 255.0

  def encode_text(prompts):
    return np.asarray([[[len(p), p.count("i")]] for p in prompts], np.float32)

  kwargs = dict(num_items=3, get_items=get_items, encode_images=encode_images,
                encode_text=encode_text, num_captions=2, log=lambda _: None)
  out = str(tmp_path / "pre")
  precompute.precompute(out, fingerprint={"patterns": ("plain",)}, **kwargs)
  first = precompute.load(out, mmap=False)
  precompute.precompute(out, fingerprint={"patterns": ("plain",)}, **kwargs)   # reused
  np.testing.assert_array_equal(precompute.load(out, mmap=False)["latents"], first["latents"])
  with pytest.raises(ValueError, match="fingerprint|settings|other"):
    precompute.precompute(out, fingerprint={"patterns": ("grid",)}, **kwargs)
