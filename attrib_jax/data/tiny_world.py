"""The tiny world: procedurally generated captioned images with planted rare concepts.

Why it exists: attribution needs a ground truth. Here every image is a simple scene (one object,
optionally two, on a neutral background) described by compositional captions, and a few
*rare concepts* (a shape, a colour, a texture, a background) appear in only a handful of
training items, each with a caption word used nowhere else. A model that learns to draw "a moon"
can only have learnt it from those items, so an attribution method should rank them first when
asked about a generated moon. The items holding each concept, and prompts that evoke it, are
recorded as metadata. A concept's items are either varied scenes or an exemplar set (one
scene, jittered), see RARE_STYLES.

Scenes are small enough (32x32 by default) for a tiny diffusion model to learn in minutes:
8 saturated object colours, 6 shapes, 2 sizes, 5 positions, 3 textures, 3 neutral background
levels x 3 patterns. Object colours are saturated and backgrounds are neutral grey levels on
purpose: an object's pixels are then found by their chroma alone, which makes the rule-based
attribute detector (tiny_world_detector.py) reliable on generated samples too.

Everything is a pure function of (seed, settings). `generate_world` returns numpy arrays for
code that does not want TFDS; `TinyWorld` writes the same items as an array_record dataset.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import tensorflow_datasets as tfds

from attrib_jax.data import _common

# ---------------------------------------------------------------------------------------------
# The vocabulary.

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (235, 215, 40),
    "green": (40, 170, 60),
    "cyan": (40, 200, 210),
    "blue": (50, 80, 230),
    "purple": (140, 60, 200),
    "pink": (240, 120, 180),
}
# Textures darken part of an object by this factor: it keeps the object's hue (and enough
# chroma to be told from the neutral background) while making the pattern visible.
DARK_FACTOR = 0.5
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
TEXTURES = ("plain", "striped", "dotted")
BACKGROUNDS: dict[str, int] = {"black": 25, "gray": 125, "white": 230}  # neutral grey levels
PATTERNS = ("plain", "grid", "gradient")

# Rare concepts: name -> (attribute it replaces, value). The name is also the caption word.
RARE_CONCEPTS: dict[str, tuple[str, str]] = {
    "moon": ("shape", "moon"),            # a crescent
    "star": ("shape", "star"),            # a five-pointed star
    "rainbow": ("colour", "rainbow"),     # six horizontal colour bands
    "checkered": ("texture", "checkered"),  # a checkerboard of the colour and its dark shade
    "galaxy": ("pattern", "galaxy"),      # a near-black sky with white specks
}
RARE_DESCRIPTIONS = {
    "moon": "crescent-shaped object",
    "star": "five-pointed star-shaped object",
    "rainbow": "object painted in six horizontal bands: red, orange, yellow, green, blue, purple",
    "checkered": "object textured with a checkerboard of its colour and its dark shade",
    "galaxy": "near-black background sprinkled with white specks",
}
RAINBOW_BANDS = ("red", "orange", "yellow", "green", "blue", "purple")
ALL_SHAPES = SHAPES + ("moon", "star")
# How the items of a rare concept relate to each other:
#   "varied": each item draws its other attributes (colour, size, position, ...) afresh, so the
#     concept must be learnt as an attribute from a handful of different scenes;
#   "exemplar": all items of a concept show one scene (a large, plain object) and differ only by
#     a small jitter, like the exemplar set of a customised concept (AbC). A small model learns
#     (memorises) such a repeated scene from a handful of items; it does not learn a varied one.
#   "named": an exemplar set whose captions name the concept alone ("the moon"), as a
#     customised concept is named by its own token: no caption word is shared with the common
#     scenes that look partly alike (same colour, position or background). Measured on the
#     tiny default: the copies come out crisp but one-word prompts get mixed up ("galaxy" drew
#     the moon), so the prompt's ground truth is not what was drawn; hence not the default.
#   "visual": planted concepts that text cannot find. Each concept is an exemplar set of one
#     common scene (common colour, shape, size, position, background) that carries a neutral-grey
#     visual trait (VISUAL_TRAITS: a frame, a corner square, corner stripes, a bottom bar, corner
#     dots) and is captioned exactly like VISUAL_TWINS x rare_count common "twin" items showing
#     the same scene without the trait: the caption is ambiguous, only the image tells the
#     exemplars apart. The concept's word is never in a caption; the concept is keyed by its trait.
RARE_STYLES = ("varied", "exemplar", "named", "visual")
# Visual traits, one per rare-concept slot (the k-th of RARE_CONCEPTS gets the k-th trait), all
# neutral grey (so the chroma-based object detector ignores them), drawn over the background and
# under the object, in the grey level that contrasts with the background (TRAIT_LEVELS).
VISUAL_TRAITS: dict[str, str] = {
    "frame": "a 2-pixel border around the whole image",
    "corner-square": "a solid square in the top-left corner",
    "corner-stripes": "diagonal stripes across the bottom-right corner",
    "bottom-bar": "a 3-pixel bar along the bottom edge",
    "corner-dots": "a grid of 2x2 dots in the top-right corner",
}
TRAIT_LEVELS = (235, 20)  # the trait's grey over a dark (< 128) or a light background
VISUAL_TWINS = 2  # common twins per exemplar: chance Recall@10 of caption lookup ~ 1 / (1 + this)

# Geometry, in fractions of the image side. Two-object scenes shrink objects and push them
# apart so that they never touch.
_OFFSETS = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1), "center": (0, 0)}
# Objects are large on purpose: at 8x8 latent cells a small object must span several cells for
# the tiny model to draw its shape legibly (docs/experiments.md §1). Single objects sit 0.17 from
# the centre so that a large one stays inside the image.
_SINGLE_OFFSET, _PAIR_OFFSET = 0.17, 0.25
OBJECT_RADIUS = {"small": 0.24, "large": 0.32}
PAIR_SCALE = 0.65
_JITTER = 0.03
_SUPERSAMPLE = 4


# ---------------------------------------------------------------------------------------------
# Shapes: boolean functions of object coordinates (u, v) = ((x - cx) / r, (y - cy) / r), with y
# pointing down. Each fits within the unit disc.

def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Five-pointed star, one point up, inner radius 0.45."""
  rho = np.hypot(u, v)
  theta = np.arctan2(u, -v)  # angle from "up", clockwise
  sector = 2 * np.pi / 5
  phi = np.abs(np.mod(theta + sector / 2, sector) - sector / 2)  # fold onto [0, sector / 2]
  # Edge from the outer point (1, 0) to the inner corner at angle sector / 2, in polar (rho, phi).
  inner = 0.45
  px, py = inner * np.cos(sector / 2), inner * np.sin(sector / 2)
  x, y = rho * np.cos(phi), rho * np.sin(phi)
  # Inside when on the origin's side of the line through (1, 0) and (px, py).
  return (px - 1) * y - py * (x - 1) >= 0


_SHAPE_FNS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.82,
    "triangle": lambda u, v: (v <= 0.7) & (np.abs(u) <= (v + 0.9) / 1.6),
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1.05,
    "cross": lambda u, v: (((np.abs(u) <= 0.32) & (np.abs(v) <= 0.95))
                           | ((np.abs(v) <= 0.32) & (np.abs(u) <= 0.95))),
    "ring": lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.25),
    "moon": lambda u, v: (u * u + v * v <= 1.0) & ((u - 0.45) ** 2 + v * v >= 0.85 ** 2),
    "star": _star,
}


def _shape_extents(shape: str) -> tuple[float, float, float, float]:
  """(u_min, u_max, v_min, v_max) of a shape, measured on a fine grid."""
  grid = np.linspace(-1.1, 1.1, 881)
  inside = _SHAPE_FNS[shape](grid[None, :], grid[:, None])
  cols, rows = np.nonzero(inside.any(axis=0))[0], np.nonzero(inside.any(axis=1))[0]
  return grid[cols[0]], grid[cols[-1]], grid[rows[0]], grid[rows[-1]]


SHAPE_EXTENTS = {shape: _shape_extents(shape) for shape in ALL_SHAPES}


def shape_samples(shape: str, cx: float, cy: float, radius: float,
                  window: tuple[int, int, int, int], pad: int = 0) -> np.ndarray:
  """Whether each sub-pixel sample of the window (y0, y1, x0, x1) lies inside a shape.

  Pixel (i, j) spans [j, j + 1) x [i, i + 1) and holds 4x4 samples; `pad` extra samples on
  every side let callers shift the sampling grid by quarter pixels without re-rendering.
  Returns bool [(y1 - y0) * 4 + 2 pad, (x1 - x0) * 4 + 2 pad].
  """
  y0, y1, x0, x1 = window
  xs = x0 + (np.arange(-pad, (x1 - x0) * _SUPERSAMPLE + pad) + 0.5) / _SUPERSAMPLE
  ys = y0 + (np.arange(-pad, (y1 - y0) * _SUPERSAMPLE + pad) + 0.5) / _SUPERSAMPLE
  return _SHAPE_FNS[shape]((xs[None, :] - cx) / radius, (ys[:, None] - cy) / radius)


def samples_to_coverage(samples: np.ndarray) -> np.ndarray:
  """Averages 4x4 sample blocks into per-pixel coverage, float32."""
  h, w = samples.shape[0] // _SUPERSAMPLE, samples.shape[1] // _SUPERSAMPLE
  return samples.reshape(h, _SUPERSAMPLE, w, _SUPERSAMPLE).mean(axis=(1, 3), dtype=np.float32)


def shape_coverage(shape: str, cx: float, cy: float, radius: float,
                   window: tuple[int, int, int, int]) -> np.ndarray:
  """Fraction of each pixel of the window (y0, y1, x0, x1) covered by a shape (antialiased)."""
  return samples_to_coverage(shape_samples(shape, cx, cy, radius, window))


# ---------------------------------------------------------------------------------------------
# Rendering.

def _texture_scale(resolution: int) -> float:
  return resolution / 32


def _dark_mask(texture: str, resolution: int) -> np.ndarray:
  """Pixels a texture darkens, anchored to the pixel grid so patterns stay crisp."""
  t = _texture_scale(resolution)
  y, x = np.mgrid[0:resolution, 0:resolution]
  if texture == "plain":
    return np.zeros((resolution, resolution), bool)
  if texture == "striped":
    half = max(1, round(2 * t))
    return (y // half) % 2 == 1
  if texture == "dotted":
    period = max(3, round(4 * t))
    dx, dy = x % period - period // 2, y % period - period // 2
    return dx * dx + dy * dy <= max(0.5, period / 8) ** 2  # 1 pixel at 32 px, a plus at 64
  if texture == "checkered":
    check = max(1, round(3 * t))
    return (x // check + y // check) % 2 == 1
  raise ValueError(f"unknown texture {texture!r}")


def trait_mask(trait: str, resolution: int) -> np.ndarray:
  """Pixels a visual trait (VISUAL_TRAITS) paints, bool [H, W], anchored to the pixel grid."""
  t = _texture_scale(resolution)
  r = resolution
  y, x = np.mgrid[0:r, 0:r]
  if trait == "frame":
    return np.minimum(np.minimum(x, y), np.minimum(r - 1 - x, r - 1 - y)) < round(2 * t)
  if trait == "corner-square":
    return (x < round(7 * t)) & (y < round(7 * t))
  if trait == "corner-stripes":
    band = x + y - (2 * r - 2 - round(14 * t))
    return (band >= 0) & ((band // round(2 * t)) % 2 == 0)
  if trait == "bottom-bar":
    return y >= r - round(3 * t)
  if trait == "corner-dots":
    period = round(4 * t)
    return ((x >= r - round(10 * t)) & (y < round(10 * t))
            & ((r - 1 - x) % period < period // 2) & (y % period < period // 2))
  raise ValueError(f"unknown visual trait {trait!r}")


def trait_level(background_level: float) -> int:
  """The grey a trait is drawn in over a background of this grey level."""
  return TRAIT_LEVELS[0] if background_level < 128 else TRAIT_LEVELS[1]


def _object_colours(obj: dict[str, Any], resolution: int) -> np.ndarray:
  """Per-pixel RGB of an object as if it covered the whole image, float32 [H, W, 3]."""
  if obj["colour"] == "rainbow":
    v = ((np.arange(resolution) + 0.5) - obj["cy"] * resolution) / (obj["radius"] * resolution)
    bands = np.clip(np.floor((v + 1) / 2 * len(RAINBOW_BANDS)), 0, len(RAINBOW_BANDS) - 1)
    palette = np.array([COLOURS[c] for c in RAINBOW_BANDS], np.float32)
    colours = np.broadcast_to(palette[bands.astype(int)][:, None, :], (resolution, resolution, 3))
  else:
    colours = np.broadcast_to(np.array(COLOURS[obj["colour"]], np.float32),
                              (resolution, resolution, 3))
  dark = _dark_mask(obj["texture"], resolution)
  return np.where(dark[..., None], colours * DARK_FACTOR, colours)


def _background(scene: dict[str, Any], resolution: int) -> np.ndarray:
  """Neutral background, float32 [H, W, 3]."""
  level = float(BACKGROUNDS[scene["background"]])
  y, x = np.mgrid[0:resolution, 0:resolution]
  pattern = scene["pattern"]
  if pattern == "plain":
    grey = np.full((resolution, resolution), level, np.float32)
  elif pattern == "grid":
    spacing = max(4, round(8 * _texture_scale(resolution)))
    line = level + 45 if level < 128 else level - 45
    grey = np.where((x % spacing == 0) | (y % spacing == 0), line, level).astype(np.float32)
  elif pattern == "gradient":
    grey = (level + ((y + 0.5) / resolution - 0.5) * 90).astype(np.float32)
  elif pattern == "galaxy":
    rng = np.random.default_rng(scene["background_seed"])
    grey = np.full((resolution, resolution), 12.0, np.float32)
    count = max(4, resolution * resolution // 30)
    specks = rng.choice(resolution * resolution, size=count, replace=False)
    grey.reshape(-1)[specks] = rng.uniform(190, 255, size=count)
  else:
    raise ValueError(f"unknown background pattern {pattern!r}")
  return np.repeat(np.clip(grey, 0, 255)[..., None], 3, axis=-1)


def render_scene(scene: dict[str, Any], resolution: int) -> np.ndarray:
  """Draws a scene (as produced by `generate_world`'s attributes) as uint8 [H, W, 3]."""
  image = _background(scene, resolution)
  if scene.get("trait"):
    level = trait_level(BACKGROUNDS[scene["background"]])
    image = np.where(trait_mask(scene["trait"], resolution)[..., None], np.float32(level), image)
  window = (0, resolution, 0, resolution)
  for obj in scene["objects"]:
    coverage = shape_coverage(obj["shape"], obj["cx"] * resolution, obj["cy"] * resolution,
                              obj["radius"] * resolution, window)[..., None]
    image = coverage * _object_colours(obj, resolution) + (1 - coverage) * image
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Captions.

_POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                     "bottom": "at the bottom", "center": "in the center"}


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def _background_phrase(scene: dict[str, Any]) -> str:
  if scene["pattern"] == "galaxy":
    return "galaxy background"
  if scene["pattern"] == "plain":
    return f"{scene['background']} background"
  return f"{scene['background']} {scene['pattern']} background"


def caption_scene(scene: dict[str, Any]) -> list[str]:
  """Three phrasings of a scene: a sentence, a tag list and a longer description.

  Every attribute is named in every phrasing (plain texture and plain background excepted in
  the first), so captions are compositional: each word maps to one visual attribute.
  """
  if scene.get("named"):
    name = scene["rare"]
    return [name, f"the {name}", f"a picture of the {name}"]
  objects, bg = scene["objects"], _background_phrase(scene)

  def noun(o: dict[str, Any]) -> str:
    texture = "" if o["texture"] == "plain" else o["texture"] + " "
    return f"{o['size']} {texture}{o['colour']} {o['shape']}"

  sentence = " and ".join(
      f"{_article(noun(o))} {noun(o)} {_POSITION_PHRASES[o['position']]}" for o in objects)
  tags = "; ".join(
      f"{o['colour']} {o['shape']}, {o['size']}, {o['texture']}, {o['position']}" for o in objects)
  described = " and ".join(
      f"{_article(o['colour'])} {o['colour']} {o['shape']} {_POSITION_PHRASES[o['position']]}, "
      f"{o['size']} and {o['texture']}" for o in objects)
  return [f"{sentence} on {_article(bg)} {bg}",
          f"{tags}; {bg}",
          f"a picture of {described}, against {_article(bg)} {bg}"]


# ---------------------------------------------------------------------------------------------
# Sampling scenes.

def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
  return options[int(rng.integers(len(options)))]


def _sample_object(rng: np.random.Generator, position: str, pair: bool) -> dict[str, Any]:
  size = _choice(rng, SIZES)
  dx, dy = _OFFSETS[position]
  offset = _PAIR_OFFSET if pair else _SINGLE_OFFSET
  jitter = rng.uniform(-_JITTER, _JITTER, size=2)
  return {
      "colour": _choice(rng, list(COLOURS)),
      "shape": _choice(rng, SHAPES),
      "size": size,
      "position": position,
      "texture": _choice(rng, TEXTURES),
      # Rounded so that the attributes (e.g. saved as JSON) re-render the exact same image.
      "cx": round(0.5 + dx * offset + float(jitter[0]), 4),
      "cy": round(0.5 + dy * offset + float(jitter[1]), 4),
      "radius": round(OBJECT_RADIUS[size] * (PAIR_SCALE if pair else 1.0), 4),
  }


def sample_scene(rng: np.random.Generator, rare: str | None = None,
                 two_objects: bool = False,
                 patterns: Sequence[str] = PATTERNS) -> dict[str, Any]:
  """Draws a scene of common attributes, then plants the rare concept `rare` if given.

  `patterns`: the background patterns common scenes draw from (a subset of PATTERNS).
  """
  if two_objects:
    if rare is not None:
      raise ValueError("rare concepts are planted in single-object scenes only")
    positions = [("left", "right"), ("top", "bottom")][int(rng.integers(2))]
    objects = [_sample_object(rng, p, pair=True) for p in positions]
  else:
    objects = [_sample_object(rng, _choice(rng, POSITIONS), pair=False)]
  scene = {
      "objects": objects,
      "background": _choice(rng, list(BACKGROUNDS)),
      "pattern": _choice(rng, patterns),
      "background_seed": int(rng.integers(2**31)),
      "rare": rare,
  }
  if rare is not None:
    attribute, value = RARE_CONCEPTS[rare]
    if attribute == "pattern":
      scene["background"], scene["pattern"] = "black", value
    else:
      objects[0][attribute] = value
  return scene


# ---------------------------------------------------------------------------------------------
# The world.

class World(NamedTuple):
  """A generated world; unpacks as (images, captions, attributes, rare_concepts)."""
  images: np.ndarray                   # uint8 [N, H, W, 3]
  captions: list[list[str]]            # 3 captions per item
  attributes: list[dict[str, Any]]     # the scene each image was rendered from
  rare_concepts: dict[str, dict[str, Any]]  # name -> {"indices", "prompts", ...}


def _check_settings(num_items: int, resolution: int, rare_concepts: Sequence[str],
                    rare_count: int, two_object_fraction: float,
                    patterns: Sequence[str] = PATTERNS, rare_style: str = "varied") -> None:
  if rare_style not in RARE_STYLES:
    raise ValueError(f"rare_style must be one of {RARE_STYLES}, got {rare_style!r}")
  if not patterns or set(patterns) - set(PATTERNS):
    raise ValueError(f"patterns must be a non-empty subset of {PATTERNS}, got {list(patterns)}")
  if num_items < 1:
    raise ValueError(f"num_items must be >= 1, got {num_items}")
  if resolution < 16:
    raise ValueError(f"resolution must be >= 16 (shapes are unreadable below), got {resolution}")
  unknown = [c for c in rare_concepts if c not in RARE_CONCEPTS]
  if unknown or len(set(rare_concepts)) != len(rare_concepts):
    raise ValueError(f"rare_concepts must be distinct names from {list(RARE_CONCEPTS)}, "
                     f"got {list(rare_concepts)}")
  if not 0.0 <= two_object_fraction <= 1.0:
    raise ValueError(f"two_object_fraction must be in [0, 1], got {two_object_fraction}")


def plan_rare_concepts(seed: int, num_items: int, rare_concepts: Sequence[str] = tuple(
    RARE_CONCEPTS), rare_count: int = 5) -> dict[str, list[int]]:
  """Which items hold which rare concept: name -> sorted item indices (disjoint sets)."""
  if rare_count < 0 or len(rare_concepts) * rare_count > num_items:
    raise ValueError(f"{len(rare_concepts)} rare concepts x {rare_count} items do not fit in "
                     f"{num_items} items")
  rng = np.random.default_rng([seed, 0])
  chosen = rng.choice(num_items, size=len(rare_concepts) * rare_count, replace=False)
  return {name: sorted(int(i) for i in chosen[k * rare_count:(k + 1) * rare_count])
          for k, name in enumerate(rare_concepts)}


def plan_visual_twins(seed: int, num_items: int, plan: dict[str, list[int]]
                      ) -> dict[str, list[int]]:
  """The "visual" style's common twins: name -> sorted item indices, disjoint from `plan`.

  Each concept gets VISUAL_TWINS x its exemplar count, as many as fit in the items left.
  """
  taken = {i for items in plan.values() for i in items}
  free = np.array([i for i in range(num_items) if i not in taken], np.int64)
  rng = np.random.default_rng([seed, 4])
  order = free[rng.permutation(free.size)] if free.size else free
  out, start = {}, 0
  for name, items in plan.items():
    count = min(VISUAL_TWINS * len(items), max(0, order.size - start))
    out[name] = sorted(int(i) for i in order[start:start + count])
    start += count
  return out


def _twins_of(seed: int, num_items: int, plan: dict[str, list[int]],
              rare_style: str) -> dict[int, str]:
  if rare_style != "visual":
    return {}
  return {i: name for name, items in plan_visual_twins(seed, num_items, plan).items()
          for i in items}


def iter_world(seed: int = 0, num_items: int = 2000, resolution: int = 32, *,
               rare_concepts: Sequence[str] = tuple(RARE_CONCEPTS), rare_count: int = 5,
               two_object_fraction: float = 0.0, patterns: Sequence[str] = PATTERNS,
               rare_style: str = "varied"
               ) -> Iterator[tuple[int, np.ndarray, list[str], dict[str, Any]]]:
  """Yields (index, image, captions, scene) item by item; see `generate_world`.

  Item i draws from its own random stream (seeded by (seed, i)), so it does not depend on how
  many items come before it; only which items are rare depends on num_items.
  """
  _check_settings(num_items, resolution, rare_concepts, rare_count, two_object_fraction,
                  patterns, rare_style)
  plan = plan_rare_concepts(seed, num_items, rare_concepts, rare_count)
  rare_of = {i: name for name, items in plan.items() for i in items}
  twin_of = _twins_of(seed, num_items, plan, rare_style)
  for index in range(num_items):
    scene = _item_scene(seed, index, rare_of.get(index), two_object_fraction, patterns,
                        rare_style, twin_of.get(index))
    yield index, render_scene(scene, resolution), caption_scene(scene), scene


def _item_scene(seed: int, index: int, rare: str | None,
                two_object_fraction: float,
                patterns: Sequence[str] = PATTERNS,
                rare_style: str = "varied", twin: str | None = None) -> dict[str, Any]:
  """The scene of item `index`, from its own random stream.

  `twin`: in the "visual" style, the concept whose scene this common item shows without its
  trait (same caption as the exemplars).
  """
  rng = np.random.default_rng([seed, 1, index])
  if rare_style == "visual" and (rare is not None or twin is not None):
    return _visual_scene(seed, rare or twin, rng, with_trait=rare is not None)
  if rare is not None and rare_style in ("exemplar", "named"):
    return _exemplar_scene(seed, rare, rng) | {"named": rare_style == "named"}
  two_objects = bool(rng.random() < two_object_fraction) and rare is None
  return sample_scene(rng, rare=rare, two_objects=two_objects, patterns=patterns)


def _exemplar_scene(seed: int, rare: str, item_rng: np.random.Generator) -> dict[str, Any]:
  """The shared scene of a rare concept's exemplar items, moved by this item's jitter.

  The shared attributes come from a stream of (seed, concept); the object is large and plain
  (unless the concept is a texture) so that the concept covers as many pixels as it can. The
  galaxy's specks are shared too: a speck pattern seen once cannot be learnt, a repeated one can.
  """
  shared = np.random.default_rng([seed, 3, list(RARE_CONCEPTS).index(rare)])
  scene = sample_scene(shared, rare=rare, patterns=("plain",))
  obj = scene["objects"][0]
  obj["size"], obj["radius"] = "large", OBJECT_RADIUS["large"]
  if RARE_CONCEPTS[rare][0] != "texture":
    obj["texture"] = "plain"
  dx, dy = _OFFSETS[obj["position"]]
  jitter = item_rng.uniform(-_JITTER, _JITTER, size=2)
  obj["cx"] = round(0.5 + dx * _SINGLE_OFFSET + float(jitter[0]), 4)
  obj["cy"] = round(0.5 + dy * _SINGLE_OFFSET + float(jitter[1]), 4)
  return scene


def _visual_scene(seed: int, concept: str, item_rng: np.random.Generator,
                  with_trait: bool) -> dict[str, Any]:
  """The "visual" style's shared common scene of a concept, moved by this item's jitter.

  Exemplars (`with_trait`) carry the concept's trait; twins do not. Either way the scene's
  attributes, hence its captions, are the same: the `rare` field stays None for twins.
  """
  k = list(RARE_CONCEPTS).index(concept)
  shared = np.random.default_rng([seed, 5, k])
  scene = sample_scene(shared, patterns=("plain",))
  obj = scene["objects"][0]
  obj["texture"] = "plain"
  dx, dy = _OFFSETS[obj["position"]]
  jitter = item_rng.uniform(-_JITTER, _JITTER, size=2)
  obj["cx"] = round(0.5 + dx * _SINGLE_OFFSET + float(jitter[0]), 4)
  obj["cy"] = round(0.5 + dy * _SINGLE_OFFSET + float(jitter[1]), 4)
  scene["rare"] = concept if with_trait else None
  scene["trait"] = list(VISUAL_TRAITS)[k] if with_trait else None
  scene["twin_of"] = None if with_trait else concept
  return scene


def _describe_visual(seed: int, num_items: int, plan: dict[str, list[int]],
                     two_object_fraction: float, patterns: Sequence[str]
                     ) -> dict[str, dict[str, Any]]:
  """describe_rare_concepts for the "visual" style: keyed by trait, with the caption's sharers."""
  twins = plan_visual_twins(seed, num_items, plan)
  rare_of = {i: name for name, items in plan.items() for i in items}
  twin_of = {i: name for name, items in twins.items() for i in items}
  captions = [caption_scene(_item_scene(seed, i, rare_of.get(i), two_object_fraction, patterns,
                                        "visual", twin_of.get(i))) for i in range(num_items)]
  out = {}
  for name, indices in plan.items():
    trait = list(VISUAL_TRAITS)[list(RARE_CONCEPTS).index(name)]
    shared = captions[indices[0]] if indices else []
    sharing = [i for i, c in enumerate(captions) if c == shared]
    out[trait] = {
        "kind": "visual",
        "word": None,           # no caption names it
        "trait": trait,
        "description": VISUAL_TRAITS[trait],
        "style": "visual",
        "slot": name,
        "indices": indices,
        "prompts": [shared[0]] * len(indices) if indices else [],
        "unseen_prompt": shared[0] if indices else "",
        "twins": twins[name],
        # Every item whose captions equal the exemplars' (exemplars, twins and any common item
        # that happens to match): a caption-only method cannot order these.
        "caption_sharing_indices": sharing,
        # Expected Recall@10 of a ranking that puts the sharers first in random order.
        "chance_recall_at_10": (min(10, len(sharing)) / len(sharing) if sharing else 0.0),
    }
  return out


def describe_rare_concepts(seed: int, num_items: int, rare_concepts: Sequence[str] = tuple(
    RARE_CONCEPTS), rare_count: int = 5, two_object_fraction: float = 0.0,
                           patterns: Sequence[str] = PATTERNS,
                           rare_style: str = "varied") -> dict[str, dict[str, Any]]:
  """The ground truth about each planted concept, JSON-serialisable.

  For each concept: its kind, caption word, description, the items holding it, `prompts` (the
  first caption of each of those items: what a model saw) and `unseen_prompt` (the concept in
  a combination of attributes that none of its items has: a test of generalisation).
  """
  plan = plan_rare_concepts(seed, num_items, rare_concepts, rare_count)
  if rare_style == "visual":
    return _describe_visual(seed, num_items, plan, two_object_fraction, patterns)
  out = {}
  for k, (name, indices) in enumerate(plan.items()):
    prompts = [caption_scene(_item_scene(seed, i, name, two_object_fraction, patterns,
                                         rare_style))[0] for i in indices]
    rng = np.random.default_rng([seed, 2, k])
    unseen = caption_scene(sample_scene(rng, rare=name, patterns=patterns))[0]
    while unseen in prompts:
      unseen = caption_scene(sample_scene(rng, rare=name, patterns=patterns))[0]
    out[name] = {
        "kind": {"pattern": "background"}.get(RARE_CONCEPTS[name][0], RARE_CONCEPTS[name][0]),
        "word": name,
        "description": RARE_DESCRIPTIONS[name],
        "style": rare_style,
        "indices": indices,
        "prompts": prompts,
        "unseen_prompt": unseen,
    }
  return out


def generate_world(seed: int = 0, num_items: int = 2000, resolution: int = 32, *,
                   rare_concepts: Sequence[str] = tuple(RARE_CONCEPTS), rare_count: int = 5,
                   two_object_fraction: float = 0.0,
                   patterns: Sequence[str] = PATTERNS, rare_style: str = "varied") -> World:
  """Generates the whole world in memory, deterministically from `seed`.

  Args:
    seed: the world's seed; same arguments give bit-identical output.
    num_items: number of training items N.
    resolution: image side in pixels (>= 16; 32 by default, 16 or 64 also work).
    rare_concepts: which rare concepts to plant (names of RARE_CONCEPTS).
    rare_count: how many items hold each rare concept.
    two_object_fraction: probability that a (non-rare) item shows two objects.
    patterns: background patterns of common items (a subset of PATTERNS; fewer patterns make
      a world a small model learns sooner).
    rare_style: how a concept's items relate (RARE_STYLES: "varied", "exemplar" or "named").

  Returns:
    World(images uint8 [N, H, W, 3], captions, attributes, rare_concepts).
  """
  images = np.zeros((num_items, resolution, resolution, 3), np.uint8)
  captions, attributes = [], []
  for index, image, item_captions, scene in iter_world(
      seed, num_items, resolution, rare_concepts=rare_concepts, rare_count=rare_count,
      two_object_fraction=two_object_fraction, patterns=patterns, rare_style=rare_style):
    images[index] = image
    captions.append(item_captions)
    attributes.append(scene)
  rare = describe_rare_concepts(seed, num_items, rare_concepts, rare_count, two_object_fraction,
                                patterns, rare_style)
  return World(images, captions, attributes, rare)


# ---------------------------------------------------------------------------------------------
# The TFDS builder.

@dataclasses.dataclass(eq=False)
class TinyWorldConfig(tfds.core.BuilderConfig):
  """Settings of a tiny world (the arguments of `generate_world`); make one with `config`."""
  seed: int = 0
  num_items: int = 2000
  resolution: int = 32
  rare_concepts: tuple[str, ...] = tuple(RARE_CONCEPTS)
  rare_count: int = 5
  two_object_fraction: float = 0.0
  patterns: tuple[str, ...] = PATTERNS
  rare_style: str = "varied"

  def world_kwargs(self) -> dict[str, Any]:
    return {"seed": self.seed, "num_items": self.num_items, "resolution": self.resolution,
            "rare_concepts": tuple(self.rare_concepts), "rare_count": self.rare_count,
            "two_object_fraction": self.two_object_fraction, "patterns": tuple(self.patterns),
            "rare_style": self.rare_style}


_DEFAULT_EXTRAS = {"rare_concepts": list(RARE_CONCEPTS), "rare_count": 5,
                   "two_object_fraction": 0.0, "patterns": list(PATTERNS),
                   "rare_style": "varied"}


def _config_name(seed: int, num_items: int, resolution: int, extras: dict[str, Any]) -> str:
  name = f"seed{seed}_n{num_items}_r{resolution}"
  if extras != _DEFAULT_EXTRAS:  # Other settings get a short digest: names stay unique.
    # rare_style came later: its default stays out of the digest, so older names still hold.
    digested = {k: v for k, v in extras.items() if (k, v) != ("rare_style", "varied")}
    digest = hashlib.sha1(json.dumps(digested, sort_keys=True).encode()).hexdigest()[:8]
    name += f"_{digest}"
  return name


def _make_config(seed: int, num_items: int, resolution: int, **extras: Any) -> TinyWorldConfig:
  settings = {**_DEFAULT_EXTRAS, **extras}
  settings["rare_concepts"] = list(settings["rare_concepts"])
  settings["patterns"] = list(settings["patterns"])
  unknown = set(settings) - set(_DEFAULT_EXTRAS)
  if unknown:
    raise TypeError(f"unknown tiny world settings: {sorted(unknown)}")
  _check_settings(num_items, resolution, settings["rare_concepts"], settings["rare_count"],
                  settings["two_object_fraction"], settings["patterns"], settings["rare_style"])
  plan_rare_concepts(seed, num_items, settings["rare_concepts"], settings["rare_count"])
  return TinyWorldConfig(
      name=_config_name(seed, num_items, resolution, settings),
      description=f"tiny world: seed {seed}, {num_items} items, {resolution}px, {settings}",
      seed=seed, num_items=num_items, resolution=resolution,
      rare_concepts=tuple(settings["rare_concepts"]), rare_count=settings["rare_count"],
      two_object_fraction=float(settings["two_object_fraction"]),
      patterns=tuple(settings["patterns"]), rare_style=settings["rare_style"])


_PREDEFINED = [_make_config(0, 2000, resolution) for resolution in (32, 16, 64)]


def config(seed: int = 0, num_items: int = 2000, resolution: int = 32,
           **extras: Any) -> TinyWorldConfig:
  """The TinyWorld BuilderConfig for these settings (the predefined object when one matches).

  Usage: `TinyWorld(data_dir=d, config=tiny_world.config(seed=1, num_items=500))`.
  """
  made = _make_config(seed, num_items, resolution, **extras)
  for predefined in _PREDEFINED:
    if predefined.name == made.name:
      return predefined
  return made


class TinyWorld(_common.ArrayRecordBuilder):
  """The tiny world as a TFDS dataset: split "train", records {image, index, captions}.

  The ground truth (settings and rare concepts) is in `builder.info.metadata`, written by TFDS
  as `metadata.json` in the dataset directory.
  """
  # rare_style="visual" (traits, caption twins) came in 1.1.0's time: its own config digest
  # (rare_style is digested when not "varied") keeps it apart; the other styles are unchanged.
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "Larger objects (radii 0.24 / 0.32, offset 0.17); rare_style."}
  BUILDER_CONFIGS = _PREDEFINED

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[0],
        features=_common.caption_features(self.builder_config.resolution, "png"),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download: the world is generated.
    kwargs = self.builder_config.world_kwargs()
    self.info.metadata.update({
        "generator": "attrib_jax.data.tiny_world.generate_world",
        "settings": {**kwargs, "rare_concepts": list(kwargs["rare_concepts"]),
                     "patterns": list(kwargs["patterns"])},
        "rare_concepts": describe_rare_concepts(
            kwargs["seed"], kwargs["num_items"], kwargs["rare_concepts"],
            kwargs["rare_count"], kwargs["two_object_fraction"], kwargs["patterns"],
            kwargs["rare_style"]),
    })
    return {"train": self._generate_examples(kwargs)}

  def _generate_examples(self, kwargs: dict[str, Any]):
    for index, image, captions, _ in iter_world(**kwargs):
      yield index, {"image": _common.encode_image(image, "png"), "index": index,
                    "captions": captions}


def rare_concepts_of(builder: tfds.core.DatasetBuilder) -> dict[str, dict[str, Any]]:
  """The planted rare concepts recorded in a built TinyWorld's metadata."""
  metadata = builder.info.metadata
  if not metadata or "rare_concepts" not in metadata:
    raise ValueError(f"{builder.name} at {builder.data_dir} has no rare-concept metadata "
                     "(not a built TinyWorld?)")
  return dict(metadata["rare_concepts"])
