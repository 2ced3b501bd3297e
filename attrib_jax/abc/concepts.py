"""AbC's exemplar sets on the tiny world: concepts the base world never shows, and their detectors.

Two kinds of concept, both drawn with the tiny world's own renderer (its backgrounds, geometry,
colours and 4x4 supersampled antialiasing), composed here rather than added to the world:

- object categories: a new shape with its own paint (solid, two-tone, bullseye, ...), e.g. a
  heart, a bowtie, an arrow, a house. None of them is a tiny-world shape (circle, square,
  triangle, diamond, cross, ring, moon, star). An *instance* fixes the category's colours and
  the scene (size, position, background); an object set is one instance, one exemplar.
- styles: a global re-rendering of ordinary tiny-world scenes (a magenta frame, scanlines,
  sepia, a dot grid over the whole image); a style set is 3-5 such scenes.

Captions. Plain captions describe the exemplar in the world's words plus the new noun ("a large
red heart on the left on a gray background"; a style: the scene's caption and the style's name).
Token captions follow Custom Diffusion's "photo of a <new1> cat", where the token modifies the
category noun; here the category is new to the base model, so the token takes the noun's place
for objects ("a large <new1> on the left on a gray background") and prefixes the scene caption
for styles ("<new1> a small blue square at the top on a white background"). Generation prompts
vary size, position and background around the token and never name the category or style, so
a text-only method cannot find the exemplars without the token.

Detectors (the "does the customized model draw its concept" check, validated on real renders
first by `validate_detectors`): objects, the distance between the largest object's normalised
crop and the nearest exemplar's (`object_distance`; shift and scale tolerant, background
neutralised); styles, one statistic per style (`style_score`).
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from attrib_jax.data import tiny_world as tw

SUPERSAMPLE = 4
KINDS = ("object", "style")
SPLITS = ("tune", "test_seen", "test_unseen", "test_style")


# ---------------------------------------------------------------------------------------------
# Object categories: a shape (boolean function of object coordinates (u, v) in the unit disc, y
# down, as tiny_world's shapes) and a paint (which of the instance's two colours each point
# takes).

def _heart(u, v):
  # Two lobes and a point: |u| folded, the classic implicit heart, fitted to the unit disc.
  x, y = np.abs(u) * 1.15, -(v * 1.15 - 0.2)
  return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0


def _arrow(u, v):
  shaft = (u >= -0.95) & (u <= 0.1) & (np.abs(v) <= 0.3)
  head = (u >= 0.05) & (u <= 0.95) & (np.abs(v) <= 0.85 * (0.95 - u))
  return shaft | head


def _house(u, v):
  body = (np.abs(u) <= 0.7) & (v >= -0.05) & (v <= 0.85)
  roof = (v <= 0.0) & (v >= -0.85) & (np.abs(u) <= 0.95 * (v + 0.85) / 0.85)
  return body | roof


def _hexagon(u, v):
  return (np.abs(v) <= 0.82) & (np.abs(u) * 0.866 + np.abs(v) * 0.5 <= 0.82)


SHAPE_FNS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "heart": _heart,
    "bowtie": lambda u, v: (np.abs(v) <= 0.9 * np.abs(u) + 0.08) & (np.abs(u) <= 0.92),
    "hourglass": lambda u, v: (np.abs(u) <= 0.9 * np.abs(v) + 0.08) & (np.abs(v) <= 0.92),
    "arrow": _arrow,
    "house": _house,
    "tee": lambda u, v: (((v >= -0.85) & (v <= -0.4) & (np.abs(u) <= 0.9))
                         | ((np.abs(u) <= 0.25) & (v >= -0.5) & (v <= 0.9))),
    "hexagon": _hexagon,
    "half_disc": lambda u, v: (u * u + v * v <= 1.0) & (v >= 0.1) | (
        (u * u + (v - 0.1) ** 2 <= 0.85) & (v >= 0.1)),
    "hollow_square": lambda u, v: ((np.maximum(np.abs(u), np.abs(v)) <= 0.82)
                                   & (np.maximum(np.abs(u), np.abs(v)) >= 0.45)),
    "chevron": lambda u, v: ((np.abs(u) <= 0.9) & (v >= 0.6 * np.abs(u) - 0.55)
                             & (v <= 0.6 * np.abs(u) - 0.05)),
    "disc": lambda u, v: u * u + v * v <= 0.95,
    "tall_bar": lambda u, v: (np.abs(u) <= 0.38) & (np.abs(v) <= 0.95),
    "pill": lambda u, v: (((np.abs(u) <= 0.5) & (np.abs(v) <= 0.45))
                          | ((np.abs(u) - 0.5) ** 2 + v * v <= 0.45 ** 2)),
}


def _paint_solid(u, v):
  return np.zeros(np.broadcast(u, v).shape, bool)


PAINTS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    # True where the second colour goes.
    "solid": _paint_solid,
    "two_tone": lambda u, v: np.broadcast_to(u > 0, np.broadcast(u, v).shape),
    "top_bottom": lambda u, v: np.broadcast_to(v > 0, np.broadcast(u, v).shape),
    "bullseye": lambda u, v: (np.floor(np.hypot(u, v) * 3.2).astype(int) % 2) == 1,
    "diagonal": lambda u, v: (np.floor((u + v + 4) * 2.2).astype(int) % 2) == 1,
    "quadrants": lambda u, v: (u > 0) != (v > 0),
}


@dataclasses.dataclass(frozen=True)
class Category:
  """An object category: its noun (caption word), shape and paint."""
  name: str
  shape: str
  paint: str

  def __post_init__(self):
    if self.shape not in SHAPE_FNS:
      raise ValueError(f"category {self.name!r}: unknown shape {self.shape!r} "
                       f"(known: {sorted(SHAPE_FNS)})")
    if self.paint not in PAINTS:
      raise ValueError(f"category {self.name!r}: unknown paint {self.paint!r} "
                       f"(known: {sorted(PAINTS)})")
    if self.name in tw.ALL_SHAPES or self.name in tw.RARE_CONCEPTS:
      raise ValueError(f"category {self.name!r} is a tiny-world shape or rare concept: the "
                       "base world shows it")


# The noun of each category is one word (the plain captions name it; prompts never do).
CATEGORIES: dict[str, Category] = {c.name: c for c in (
    Category("heart", "heart", "solid"),
    Category("bowtie", "bowtie", "two_tone"),
    Category("arrow", "arrow", "solid"),
    Category("house", "house", "top_bottom"),
    Category("tee", "tee", "solid"),
    Category("hexagon", "hexagon", "bullseye"),
    Category("hollowsquare", "hollow_square", "solid"),
    Category("chevron", "chevron", "two_tone"),
    Category("beachball", "disc", "quadrants"),
    Category("candy", "disc", "diagonal"),
    Category("hourglass", "hourglass", "top_bottom"),
    Category("halfdisc", "half_disc", "solid"),
    Category("capsule", "pill", "two_tone"),
    Category("totem", "tall_bar", "top_bottom"),
)}
STYLES: dict[str, str] = {
    "frame": "a 3-pixel magenta frame around the whole image",
    "scanlines": "every other row darkened, over the whole image",
    "sepia": "the whole image in brown sepia tones",
    "dotgrid": "a grid of white dots every 4 pixels over the whole image",
}
STYLE_WORDS = {"frame": "magenta frame", "scanlines": "scanlines", "sepia": "sepia",
               "dotgrid": "dot grid"}
_FRAME_RGB = np.array([255, 0, 255], np.float32)


# ---------------------------------------------------------------------------------------------
# Rendering (the tiny world's scene geometry and backgrounds, the new shapes and paints).

@dataclasses.dataclass(frozen=True)
class Instance:
  """One drawn object: category, colours and scene."""
  category: str
  colour: str
  colour2: str
  size: str
  position: str
  background: str
  jitter: tuple[float, float] = (0.0, 0.0)

  def check(self) -> None:
    problems = []
    if self.category not in CATEGORIES:
      problems.append(f"category {self.category!r} (known: {sorted(CATEGORIES)})")
    for name, value, known in (("colour", self.colour, tw.COLOURS),
                               ("colour2", self.colour2, tw.COLOURS),
                               ("size", self.size, tw.SIZES),
                               ("position", self.position, tw.POSITIONS),
                               ("background", self.background, tw.BACKGROUNDS)):
      if value not in known:
        problems.append(f"{name} {value!r} (known: {list(known)})")
    if problems:
      raise ValueError("object instance: unknown " + "; ".join(problems))


def _coverage_and_paint(instance: Instance, resolution: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-pixel coverage [H, W] and second-colour share [H, W] of an instance (supersampled)."""
  category = CATEGORIES[instance.category]
  dx, dy = tw._OFFSETS[instance.position]  # pylint: disable=protected-access
  offset = tw._SINGLE_OFFSET  # pylint: disable=protected-access
  cx = (0.5 + dx * offset + instance.jitter[0]) * resolution
  cy = (0.5 + dy * offset + instance.jitter[1]) * resolution
  radius = tw.OBJECT_RADIUS[instance.size] * resolution
  s = (np.arange(resolution * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
  u, v = (s[None, :] - cx) / radius, (s[:, None] - cy) / radius
  inside = SHAPE_FNS[category.shape](u, v)
  second = PAINTS[category.paint](u, v) & inside
  return tw.samples_to_coverage(inside), tw.samples_to_coverage(second)


def background_image(background: str, resolution: int) -> np.ndarray:
  """A plain tiny-world background, float32 [H, W, 3] (the world's own renderer, no object)."""
  scene = {"objects": [], "background": background, "pattern": "plain", "background_seed": 0}
  return tw.render_scene(scene, resolution).astype(np.float32)


def render_instance(instance: Instance, resolution: int) -> np.ndarray:
  """uint8 [H, W, 3]: the instance over its plain background, antialiased as the world's."""
  instance.check()
  coverage, second = _coverage_and_paint(instance, resolution)
  first = coverage - second
  image = background_image(instance.background, resolution)
  c1 = np.array(tw.COLOURS[instance.colour], np.float32)
  c2 = np.array(tw.COLOURS[instance.colour2], np.float32)
  image = image * (1 - coverage[..., None]) + first[..., None] * c1 + second[..., None] * c2
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def apply_style(image: np.ndarray, style: str) -> np.ndarray:
  """A style's global re-rendering of a uint8 [H, W, 3] image."""
  if style not in STYLES:
    raise ValueError(f"unknown style {style!r} (known: {sorted(STYLES)})")
  x = np.asarray(image, np.float32)
  r = x.shape[0]
  t = r / 32
  y, xx = np.mgrid[0:r, 0:r]
  if style == "frame":
    edge = np.minimum(np.minimum(xx, y), np.minimum(r - 1 - xx, r - 1 - y)) < round(3 * t)
    x = np.where(edge[..., None], _FRAME_RGB, x)
  elif style == "scanlines":
    x = np.where(((y // max(1, round(t))) % 2 == 1)[..., None], x * 0.35, x)
  elif style == "sepia":
    lum = x @ np.array([0.299, 0.587, 0.114], np.float32)
    x = np.stack([lum * 0.85 + 60, lum * 0.7 + 35, lum * 0.45 + 10], axis=-1)
  elif style == "dotgrid":
    period = max(2, round(4 * t))
    dots = (y % period == period // 2) & (xx % period == period // 2)
    x = np.where(dots[..., None], np.float32(255), x)
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def style_scene(rng: np.random.Generator) -> dict[str, Any]:
  """An ordinary single-object tiny-world scene on a plain background."""
  return tw.sample_scene(rng, patterns=("plain",))


# ---------------------------------------------------------------------------------------------
# Captions and prompts.

def _position_phrase(position: str) -> str:
  return tw._POSITION_PHRASES[position]  # pylint: disable=protected-access


def object_caption(instance: Instance) -> str:
  """'a large red heart on the left on a gray background' (two colours: 'red and blue')."""
  colours = (instance.colour if CATEGORIES[instance.category].paint == "solid"
             else f"{instance.colour} and {instance.colour2}")
  return (f"a {instance.size} {colours} {instance.category} {_position_phrase(instance.position)}"
          f" on a {instance.background} background")


def object_prompt(size: str, position: str, background: str, token: str = "<new1>") -> str:
  """The token in place of the noun: 'a large <new1> on the left on a gray background'."""
  return f"a {size} {token} {_position_phrase(position)} on a {background} background"


def style_caption(scene: dict[str, Any], style: str) -> str:
  return f"{tw.caption_scene(scene)[0]} in {STYLE_WORDS[style]}"


def style_prompt(scene: dict[str, Any], token: str = "<new1>") -> str:
  return f"{token} {tw.caption_scene(scene)[0]}"


# ---------------------------------------------------------------------------------------------
# Sets.

@dataclasses.dataclass
class ExemplarSet:
  """A built set: its exemplars with both captions and the prompts to generate from."""
  name: str
  kind: str
  category: str
  split: str
  images: np.ndarray              # uint8 [n, H, W, 3]
  captions: list[str]             # plain
  token_captions: list[str]       # with the token
  prompts: list[str]              # generation prompts, each holding the token
  seeds: list[int]
  instance: Instance | None = None   # objects: what the exemplar draws


def check_split(name: str, kind: str, split: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"set {name!r}: unknown kind {kind!r} (known: {KINDS})")
  if split not in SPLITS:
    raise ValueError(f"set {name!r}: unknown split {split!r} (known: {SPLITS})")
  if (kind == "style") != (split == "test_style"):
    raise ValueError(f"set {name!r}: a {kind} set cannot be in split {split!r} (styles are "
                     "test_style, objects tune / test_seen / test_unseen)")


def _prompt_rng(seed: int, name: str) -> np.random.Generator:
  return np.random.default_rng([seed, 18, *name.encode()])


def object_set(name: str, split: str, spec: dict[str, Any], *, resolution: int,
               num_prompts: int, seed: int, token: str = "<new1>") -> ExemplarSet:
  """One object set from its config entry: {category, colour, colour2, size, position,
  background}. Prompts: the token with other sizes, positions and backgrounds."""
  check_split(name, "object", split)
  fields = {k: spec[k] for k in ("category", "colour", "size", "position", "background")
            if k in spec}
  missing = [k for k in ("category", "colour", "size", "position", "background")
             if k not in fields]
  if missing:
    raise ValueError(f"object set {name!r}: missing {missing}")
  instance = Instance(colour2=spec.get("colour2", spec["colour"]), **fields)
  instance.check()
  rng = _prompt_rng(seed, name)
  prompts = []
  for k in range(num_prompts):
    # The first prompt is the exemplar's own scene; the rest vary it.
    if k == 0:
      prompts.append(object_prompt(instance.size, instance.position, instance.background, token))
      continue
    prompts.append(object_prompt(tw.SIZES[int(rng.integers(2))],
                                 tw.POSITIONS[int(rng.integers(len(tw.POSITIONS)))],
                                 list(tw.BACKGROUNDS)[int(rng.integers(3))], token))
  caption = object_caption(instance)
  token_caption = object_prompt(instance.size, instance.position, instance.background, token)
  return ExemplarSet(name, "object", instance.category, split,
                     render_instance(instance, resolution)[None], [caption], [token_caption],
                     prompts, [seed * 1000 + k for k in range(num_prompts)], instance)


def style_set(name: str, style: str, *, resolution: int, num_exemplars: int, num_prompts: int,
              seed: int, token: str = "<new1>") -> ExemplarSet:
  """One style set: `num_exemplars` ordinary scenes in the style; prompts: other scenes."""
  check_split(name, "style", "test_style")
  if style not in STYLES:
    raise ValueError(f"style set {name!r}: unknown style {style!r} (known: {sorted(STYLES)})")
  rng = _prompt_rng(seed, name)
  scenes = [style_scene(rng) for _ in range(num_exemplars)]
  images = np.stack([apply_style(tw.render_scene(s, resolution), style) for s in scenes])
  prompts = [style_prompt(style_scene(rng), token) for _ in range(num_prompts)]
  return ExemplarSet(name, "style", style, "test_style", images,
                     [style_caption(s, style) for s in scenes],
                     [style_prompt(s, token) for s in scenes], prompts,
                     [seed * 1000 + k for k in range(num_prompts)])


def set_seed_of(seed: int, name: str) -> int:
  """A set's own seed, from its name (not its place in the list: adding or removing a set
  leaves the others' exemplars, prompts and seeds as they were). Below 4e6, so the query seeds
  seed * 1000 + k fit the sampler's uint32."""
  digest = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:4], "little")
  return (seed * 1_000_003 + digest) % 4_000_000


def build_sets(sets_config: Sequence[dict[str, Any]], *, resolution: int, num_prompts: int,
               style_exemplars: int, seed: int = 0, token: str = "<new1>"
               ) -> list[ExemplarSet]:
  """Every set of a config's list: entries {name, kind, split, ...}; names unique."""
  out, seen = [], set()
  for k, entry in enumerate(sets_config):
    entry = dict(entry)
    name = entry.pop("name", None)
    if not name or name in seen:
      raise ValueError(f"sets[{k}]: a set needs a unique name, got {name!r}")
    seen.add(name)
    kind, split = entry.pop("kind", None), entry.pop("split", None)
    check_split(name, kind, split)
    set_seed = set_seed_of(seed, name)
    if kind == "object":
      out.append(object_set(name, split, entry, resolution=resolution,
                            num_prompts=num_prompts, seed=set_seed, token=token))
    else:
      out.append(style_set(name, entry.get("style", ""), resolution=resolution,
                           num_exemplars=int(entry.get("num_exemplars", style_exemplars)),
                           num_prompts=num_prompts, seed=set_seed, token=token))
  return out


# ---------------------------------------------------------------------------------------------
# Detectors.

CROP = 12           # side of the normalised object crop
OBJECT_CHROMA = 30.0
NEUTRAL = 128.0


def object_crop(image: np.ndarray) -> np.ndarray | None:
  """The largest object, background set to neutral grey, in a square box around it resized to
  CROP x CROP (float32 [CROP, CROP, 3]); None when no object is found. Position and size drop
  out (the crop is normalised), colours, aspect and the shape's layout stay.

  Objects are the chromatic pixels; a one-pixel closing first joins the parts of a many-coloured
  object, whose antialiased seams (e.g. blue beside yellow) mix to grey.
  """
  x = np.asarray(image, np.float32)
  chroma = x.max(-1) - x.min(-1)
  floor = float(np.median(chroma))
  mask = chroma > max(OBJECT_CHROMA, floor + 25)
  joined = ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool))
  labels, count = ndimage.label(joined, structure=np.ones((3, 3), bool))
  if count == 0:
    return None
  sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
  best = int(np.argmax(sizes)) + 1
  if sizes[best - 1] < max(4, 0.01 * mask.size):
    return None
  component = (labels == best) & mask
  rows, cols = np.nonzero(component)
  alpha = np.clip((chroma - floor) / max(np.percentile(chroma[component], 90) - floor, 1), 0, 1)
  alpha = np.where(labels == best, alpha, 0.0)[..., None]
  layer = alpha * x + (1 - alpha) * NEUTRAL
  # A square box (the longer side) centred on the object keeps its aspect ratio.
  side = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
  cy, cx = (rows.max() + rows.min()) / 2, (cols.max() + cols.min()) / 2
  y0, x0 = int(np.floor(cy - (side - 1) / 2)), int(np.floor(cx - (side - 1) / 2))
  pad = side + 1
  padded = np.pad(layer, ((pad, pad), (pad, pad), (0, 0)), constant_values=NEUTRAL)
  crop = padded[y0 + pad:y0 + pad + side, x0 + pad:x0 + pad + side]
  out = Image.fromarray(np.clip(np.round(crop), 0, 255).astype(np.uint8)).resize(
      (CROP, CROP), Image.BILINEAR)
  return np.asarray(out, np.float32)


def object_distance(images: np.ndarray, exemplars: np.ndarray) -> np.ndarray:
  """[n] mean |crop - nearest exemplar crop| (0..255); 255 when an image shows no object."""
  ex = [c for c in (object_crop(e) for e in exemplars) if c is not None]
  if not ex:
    raise ValueError("no object found in any exemplar")
  out = []
  for image in images:
    crop = object_crop(image)
    out.append(255.0 if crop is None else min(float(np.abs(crop - e).mean()) for e in ex))
  return np.array(out)


def style_score(images: np.ndarray, style: str) -> np.ndarray:
  """[n] a statistic of the style, about 1 when drawn and 0 when not."""
  x = np.asarray(images, np.float32)
  if x.ndim == 3:
    x = x[None]
  r = x.shape[1]
  t = r / 32
  y, xx = np.mgrid[0:r, 0:r]
  if style == "frame":
    edge = np.minimum(np.minimum(xx, y), np.minimum(r - 1 - xx, r - 1 - y)) < round(3 * t)
    dist = np.abs(x[:, edge] - _FRAME_RGB).mean(axis=(1, 2))
    return np.clip(1 - dist / 120, 0, 1)
  if style == "scanlines":
    lum = x.mean(-1)
    odd = (np.arange(r) // max(1, round(t))) % 2 == 1
    rows_even, rows_odd = lum[:, ~odd], lum[:, odd]
    n = min(rows_even.shape[1], rows_odd.shape[1])
    # Each dark row against the bright row above it: the style multiplies it by 0.35.
    ratio = (rows_odd[:, :n] + 5) / (rows_even[:, :n] + 5)
    return np.clip((1 - np.median(ratio, axis=(1, 2))) / 0.5, 0, 1)
  if style == "sepia":
    rg, gb = x[..., 0] - x[..., 1], x[..., 1] - x[..., 2]
    sep = (rg > 8) & (rg < 90) & (gb > 8) & (gb < 110)
    return np.clip(sep.mean(axis=(1, 2)) / 0.8, 0, 1)
  if style == "dotgrid":
    period = max(2, round(4 * t))
    dots = (y % period == period // 2) & (xx % period == period // 2)
    lum = x.mean(-1)
    near = ndimage.binary_dilation(dots) & ~dots
    contrast = lum[:, dots].mean(-1) - lum[:, near].mean(-1)
    return np.clip(contrast / 60, 0, 1)
  raise ValueError(f"unknown style {style!r} (known: {sorted(STYLES)})")


STYLE_THRESHOLD = 0.5


def concept_closeness(images: np.ndarray, exemplar_set: ExemplarSet) -> np.ndarray:
  """[n] the continuous measure behind the detector, lower is closer (objects: the crop
  distance to the nearest exemplar, 0..255; styles: 1 - style score, 0..1)."""
  if exemplar_set.kind == "object":
    return object_distance(images, exemplar_set.images)
  return 1 - style_score(images, exemplar_set.category)


def fit_threshold(exemplar_set: ExemplarSet, count: int, seed: int) -> float:
  """The detector's cut on `concept_closeness`, from real renders with and without the concept
  (a draw of its own, `seed`; `validate_detectors` then measures it on another draw).

  Objects: midway between the 95th percentile with the concept and the 5th without (a patterned
  object's crop varies more with size than a solid one's, so one cut for all would not do).
  Styles: 1 - STYLE_THRESHOLD.
  """
  if exemplar_set.kind == "style":
    return 1 - STYLE_THRESHOLD
  pos, neg = validation_renders(exemplar_set, count, seed)
  hi = float(np.percentile(concept_closeness(pos, exemplar_set), 95))
  lo = float(np.percentile(concept_closeness(neg, exemplar_set), 5))
  return 0.5 * (hi + lo)


def concept_present(images: np.ndarray, exemplar_set: ExemplarSet,
                    threshold: float) -> np.ndarray:
  """bool [n]: the detector's reading of whether each image shows the set's concept."""
  return concept_closeness(images, exemplar_set) < threshold


def validation_renders(exemplar_set: ExemplarSet, count: int, seed: int
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Real renders with and without the set's concept (uint8 [count, H, W, 3] each).

  With: objects, the set's category and colours at random sizes, positions and backgrounds
  (what the prompts ask); styles, fresh scenes in the style. Without: ordinary tiny-world
  scenes, half of them (objects) in the set's own colour, so colour alone cannot pass.
  """
  rng = np.random.default_rng([seed, 77, *exemplar_set.name.encode()])
  res = exemplar_set.images.shape[1]
  if exemplar_set.kind == "style":
    scenes = [style_scene(rng) for _ in range(count)]
    plain = np.stack([tw.render_scene(s, res) for s in scenes])
    styled = np.stack([apply_style(p, exemplar_set.category) for p in plain])
    others = np.stack([tw.render_scene(style_scene(rng), res) for _ in range(count)])
    return styled, others
  base = exemplar_set.instance
  if base is None:
    raise ValueError(f"object set {exemplar_set.name!r} has no instance to render (a folder "
                     "set: validate its detector on its own images)")
  colour = base.colour
  with_ = []
  for _ in range(count):
    inst = dataclasses.replace(
        base, size=tw.SIZES[int(rng.integers(2))], position=tw.POSITIONS[int(rng.integers(5))],
        background=list(tw.BACKGROUNDS)[int(rng.integers(3))],
        jitter=tuple(float(j) for j in rng.uniform(-0.03, 0.03, 2)))
    with_.append(render_instance(inst, res))
  without = []
  for k in range(count):
    scene = style_scene(rng)
    if k % 2 == 0:
      scene["objects"][0]["colour"] = colour
    without.append(tw.render_scene(scene, res))
  return np.stack(with_), np.stack(without)


def validate_detectors(sets: Sequence[ExemplarSet], count: int = 40, seed: int = 0
                       ) -> dict[str, Any]:
  """Each set's detector, its cut fitted on one draw of real renders (seed + 1), then read on a
  fresh draw with and without its concept (seed): per set and overall accuracy. The check must
  be trusted before it reads generated images."""
  per, right, total = {}, 0, 0
  for s in sets:
    threshold = fit_threshold(s, count, seed + 1)
    pos, neg = validation_renders(s, count, seed)
    tp = int(concept_present(pos, s, threshold).sum())
    tn = int((~concept_present(neg, s, threshold)).sum())
    per[s.name] = {"threshold": threshold, "with_detected": tp, "with": len(pos),
                   "without_rejected": tn, "without": len(neg)}
    right += tp + tn
    total += len(pos) + len(neg)
  return {"accuracy": right / max(total, 1), "images": total, "per_set": per}
