"""Datasets as TFDS array_record builders, read without TensorFlow by stable item index.

- tiny_world: procedurally generated captioned images with planted rare concepts (ground
  truth for attribution), plus a rule-based attribute detector (tiny_world_detector).
- coco: COCO-2017 captions from a local copy.
- image_folder: the user's own images and captions.
- reader: `load_split` (random access by item index) and `prepare`.
"""
from attrib_jax.data.coco import Coco2017Captions
from attrib_jax.data.coco import CocoConfig
from attrib_jax.data.image_folder import ImageFolderCaptions
from attrib_jax.data.image_folder import ImageFolderConfig
from attrib_jax.data.reader import IndexedSource
from attrib_jax.data.reader import load_split
from attrib_jax.data.reader import prepare
from attrib_jax.data.tiny_world import generate_world
from attrib_jax.data.tiny_world import render_scene
from attrib_jax.data.tiny_world import TinyWorld
from attrib_jax.data.tiny_world import TinyWorldConfig
from attrib_jax.data.tiny_world_detector import detect_attributes
from attrib_jax.data.tiny_world_detector import evaluate_detector

__all__ = [
    "Coco2017Captions", "CocoConfig", "ImageFolderCaptions", "ImageFolderConfig",
    "IndexedSource", "load_split", "prepare", "generate_world", "render_scene", "TinyWorld",
    "TinyWorldConfig", "detect_attributes", "evaluate_detector",
]
