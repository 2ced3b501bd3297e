"""A deterministic, rule-based attribute detector for tiny-world images.

Why: to check what a generated image shows (did the model draw "a red moon on the left"?)
without training a classifier, whose own errors would blur the evaluation. It reads back colour,
shape, size and position of each object:

1. Object pixels are the chromatic ones: objects are saturated, backgrounds are neutral greys.
2. Connected components of those pixels are the objects (tiny specks are ignored).
3. Colour: each interior pixel votes for the nearest palette colour (a base colour or its dark
   textured shade count for the same name); the majority wins, and a spread of many colours
   reads as "rainbow".
4. Shape: over a neutral background, chroma is proportional to how much of a pixel the object
   covers, which gives a soft coverage map. Every known shape is rendered into the component's
   bounding box (placed and scaled as its own extents dictate, then refined by a small search
   over quarter-pixel shifts and scales) and compared with the map by soft intersection over
   union; the best match wins.
5. Size and position follow from the winning shape's fitted radius and centre.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from attrib_jax.data import tiny_world as tw

CHROMA_THRESHOLD = 30.0  # max - min over RGB; neutral backgrounds are ~0, objects >= 60
_PALETTE_NAMES = list(tw.COLOURS) * 2
_PALETTE = np.array(list(tw.COLOURS.values())
                    + [np.array(c) * tw.DARK_FACTOR for c in tw.COLOURS.values()], np.float32)
# The box of chromatic pixels (edge pixels covered >= ~30%) overshoots the true extent of an
# object by ~0.2 px on each side.
_EDGE_INSET = 0.2
_SCALES = (0.92, 0.97, 1.02, 1.07)
_SHIFT = 1  # search sub-pixel shifts of -1..1 samples (quarter pixels) in x and y
_MIN_AREA_RATIO = 0.15  # the smallest of two objects has >= 1/4 of the other's area
_CENTER_TOLERANCE = 0.1  # fraction of the image side within which an object is "center"


def _colour(pixels: np.ndarray) -> str:
  """Majority palette colour of an object's pixels [K, 3], or "rainbow" for a wide spread."""
  distances = ((pixels[:, None, :] - _PALETTE[None, :, :]) ** 2).sum(-1)
  votes: dict[str, int] = {}
  for k in np.argmin(distances, axis=1):
    votes[_PALETTE_NAMES[k]] = votes.get(_PALETTE_NAMES[k], 0) + 1
  total = sum(votes.values())
  shares = sorted((v / total for v in votes.values()), reverse=True)
  if shares[0] < 0.5 and sum(s >= 0.08 for s in shares) >= 4:
    return "rainbow"
  return max(votes, key=votes.get)


def _shifted_coverages(samples: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """Pixel coverages of padded 4x4-supersampled renderings, for every grid shift.

  Returns float32 [n, n, H, W] with n = 2 _SHIFT + 1: entry [sy, sx] averages the 4x4 sample
  blocks starting sy rows and sx columns into the padded array.
  """
  s = samples.astype(np.float32)
  along_x = s[:, :-3] + s[:, 1:-2] + s[:, 2:-1] + s[:, 3:]
  blocks = along_x[:-3] + along_x[1:-2] + along_x[2:-1] + along_x[3:]  # 4x4 sums by corner
  shifts = np.arange(2 * _SHIFT + 1)
  rows = shifts[:, None] + 4 * np.arange(shape[0])[None, :]
  cols = shifts[:, None] + 4 * np.arange(shape[1])[None, :]
  return blocks[rows[:, None, :, None], cols[None, :, None, :]] / 16.0


def _fit_shape(alpha: np.ndarray, bbox: tuple[int, int, int, int]
               ) -> tuple[str, float, float, float, float]:
  """Best-matching shape for an object's coverage map: (shape, score, cx, cy, radius) in px.

  `alpha` estimates how much of each pixel the object covers (0 outside it). Each shape is
  placed from the bounding box and its own extents, then nudged by a small search over
  sub-pixel shifts and scales; the score is the soft intersection over union.
  """
  height, width = alpha.shape
  y0, y1, x0, x1 = bbox  # inclusive pixel bounds
  left, right = x0 + _EDGE_INSET, x1 + 1 - _EDGE_INSET
  top, bottom = y0 + _EDGE_INSET, y1 + 1 - _EDGE_INSET
  window = (max(0, y0 - 2), min(height, y1 + 3), max(0, x0 - 2), min(width, x1 + 3))
  observed = alpha[window[0]:window[1], window[2]:window[3]]
  best = ("", -1.0, 0.0, 0.0, 0.0)
  for shape in tw.ALL_SHAPES:
    u_min, u_max, v_min, v_max = tw.SHAPE_EXTENTS[shape]
    radius0 = 0.5 * ((right - left) / (u_max - u_min) + (bottom - top) / (v_max - v_min))
    for scale in _SCALES:
      radius = radius0 * scale
      # Anchor the shape's extent at the middle of the box.
      cx0 = 0.5 * (left + right) - 0.5 * (u_min + u_max) * radius
      cy0 = 0.5 * (top + bottom) - 0.5 * (v_min + v_max) * radius
      # Sub-pixel shifts by whole samples (quarter pixels): slice one padded rendering.
      samples = tw.shape_samples(shape, cx0, cy0, radius, window, pad=_SHIFT)
      rendered = _shifted_coverages(samples, observed.shape)
      scores = (np.minimum(rendered, observed).sum(axis=(2, 3))
                / np.maximum(rendered, observed).sum(axis=(2, 3)))
      sy, sx = np.unravel_index(np.argmax(scores), scores.shape)
      if scores[sy, sx] > best[1]:
        # Sampling the grid `s` samples later sees the shape `s` samples earlier.
        cx, cy = cx0 + (_SHIFT - sx) / 4, cy0 + (_SHIFT - sy) / 4
        best = (shape, float(scores[sy, sx]), float(cx), float(cy), radius)
  return best


def _position(cx: float, cy: float, resolution: int) -> str:
  dx, dy = cx / resolution - 0.5, cy / resolution - 0.5
  if max(abs(dx), abs(dy)) < _CENTER_TOLERANCE:
    return "center"
  if abs(dx) >= abs(dy):
    return "left" if dx < 0 else "right"
  return "top" if dy < 0 else "bottom"


def detect_objects(image: np.ndarray) -> list[dict[str, Any]]:
  """Every object found in a uint8 [H, W, 3] image, largest first.

  Each object: colour, shape, size, position, plus the fit's evidence (iou, cx, cy, radius in
  fractions of the image side, area in pixels).
  """
  image = np.asarray(image, np.float32)
  if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] != image.shape[1]:
    raise ValueError(f"expected a square [H, W, 3] image, got shape {image.shape}")
  resolution = image.shape[0]
  chroma = image.max(-1) - image.min(-1)
  # Noise (e.g. in a model's samples) gives the neutral background some chroma: raise the
  # threshold above its spread, and measure coverage from its typical level.
  floor = float(np.median(chroma))
  spread = 1.4826 * float(np.median(np.abs(chroma - floor)))
  chromatic = chroma > max(CHROMA_THRESHOLD, floor + 4 * spread)
  labels, _ = ndimage.label(chromatic, structure=np.ones((3, 3), bool))
  components = []
  for label, bbox in enumerate(ndimage.find_objects(labels), start=1):
    component = labels == label
    components.append((int(component.sum()), component, bbox))
  components.sort(key=lambda c: -c[0])
  # Specks are not objects: too small in absolute terms or next to the largest object.
  min_area = max(3, round(0.004 * resolution * resolution),
                 _MIN_AREA_RATIO * components[0][0] if components else 0)
  components = [c for c in components if c[0] >= min_area]
  # Two-object scenes draw smaller objects; the size threshold follows (see tiny_world).
  pair = len(components) > 1
  radius_threshold = 0.5 * (tw.OBJECT_RADIUS["small"] + tw.OBJECT_RADIUS["large"]) * (
      tw.PAIR_SCALE if pair else 1.0)
  objects = []
  for area, component, (rows, cols) in components:
    bbox = (rows.start, rows.stop - 1, cols.start, cols.stop - 1)
    interior = ndimage.binary_erosion(component)
    pixels = image[interior] if interior.sum() >= 4 else image[component]
    # Chroma is linear in coverage over a neutral background: chroma = coverage x the
    # object's own chroma (taken as a high percentile inside the component).
    alpha = np.where(ndimage.binary_dilation(component, iterations=2), chroma - floor, 0.0)
    alpha = np.clip(alpha / (np.percentile(chroma[component], 90) - floor), 0.0, 1.0)
    shape, iou, cx, cy, radius = _fit_shape(alpha, bbox)
    objects.append({
        "colour": _colour(pixels),
        "shape": shape,
        "size": "large" if radius / resolution >= radius_threshold else "small",
        "position": _position(cx, cy, resolution),
        "iou": iou,
        "cx": cx / resolution,
        "cy": cy / resolution,
        "radius": radius / resolution,
        "area": area,
    })
  return objects


def detect_attributes(image: np.ndarray) -> dict[str, Any]:
  """Colour, shape, size and position of the largest object, and every object found.

  Returns {"colour", "shape", "size", "position", "objects": [...]}; the first four are None
  when no object is found.
  """
  objects = detect_objects(image)
  main = objects[0] if objects else {}
  return {key: main.get(key) for key in ("colour", "shape", "size", "position")} | {
      "objects": objects}


def _match(truth: Sequence[dict[str, Any]], found: Sequence[dict[str, Any]]
           ) -> list[dict[str, Any] | None]:
  """For each true object, the detected object whose centre is nearest (None if none)."""
  matched = []
  for obj in truth:
    if not found:
      matched.append(None)
      continue
    nearest = min(found, key=lambda f: (f["cx"] - obj["cx"]) ** 2 + (f["cy"] - obj["cy"]) ** 2)
    matched.append(nearest)
  return matched


def evaluate_detector(images: np.ndarray, attributes: Sequence[dict[str, Any]]
                      ) -> dict[str, float]:
  """Detector accuracy against the scenes images were rendered from.

  An item counts as correct for an attribute when every object in it is; "joint" requires
  colour and shape both right, "all" all four attributes; "count" the number of objects.
  """
  keys = ("colour", "shape", "size", "position")
  correct = {key: 0 for key in keys + ("joint", "all", "count")}
  for image, scene in zip(images, attributes):
    found = detect_objects(image)
    matched = _match(scene["objects"], found)
    right = {key: all(m is not None and m[key] == o[key] for o, m in zip(scene["objects"],
                                                                          matched))
             for key in keys}
    for key in keys:
      correct[key] += right[key]
    correct["joint"] += right["colour"] and right["shape"]
    correct["all"] += all(right.values())
    correct["count"] += len(found) == len(scene["objects"])
  return {key: value / len(attributes) for key, value in correct.items()}


# ---------------------------------------------------------------------------------------------
# Visual traits (tiny_world.VISUAL_TRAITS, the "visual" rare style): neutral-grey marks that no
# caption names. A trait is seen when the pixels it paints are near the contrasting grey it is
# drawn in and the pixels around them are not.

TRAIT_THRESHOLD = 0.5  # score midway between no trait (0) and the trait as rendered (1)


def trait_score(image: np.ndarray, trait: str) -> float:
  """How strongly a uint8 [H, W, 3] image shows a visual trait: ~1 when drawn, ~0 when absent.

  The background grey is the median of the neutral pixels away from the trait; each neutral
  pixel's grey g is read as t = (g - background) / (trait grey - background), and the score is
  the mean t over the trait's pixels minus the mean t over the pixels around them (a blur or a
  uniformly lighter image does not count). Chromatic (object) pixels are left out.
  """
  image = np.asarray(image, np.float32)
  if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] != image.shape[1]:
    raise ValueError(f"expected a square [H, W, 3] image, got shape {image.shape}")
  resolution = image.shape[0]
  on = tw.trait_mask(trait, resolution)
  near = ndimage.binary_dilation(on, iterations=max(2, round(2 * resolution / 32)))
  off = near & ~on
  neutral = image.max(-1) - image.min(-1) <= CHROMA_THRESHOLD
  grey = image.mean(-1)
  rest = neutral & ~near
  background = float(np.median(grey[rest])) if rest.any() else float(np.median(grey))
  level = tw.trait_level(background)
  t = np.clip((grey - background) / (level - background), -0.5, 1.5)
  on_pixels, off_pixels = t[on & neutral], t[off & neutral]
  if on_pixels.size == 0:
    return 0.0
  return float(on_pixels.mean() - (off_pixels.mean() if off_pixels.size else 0.0))


def detect_trait(image: np.ndarray, trait: str) -> bool:
  """Whether an image shows a visual trait (trait_score above TRAIT_THRESHOLD)."""
  return trait_score(image, trait) > TRAIT_THRESHOLD


def validate_trait_detector(images: np.ndarray, rare_concepts: dict[str, dict[str, Any]]
                            ) -> dict[str, Any]:
  """The trait detector on real dataset images of a "visual"-style world.

  For each concept: its exemplars (the trait must be seen) against every other item sharing
  their captions (it must not be). Returns per-trait and overall accuracy and the counts.
  """
  per_trait, right, total = {}, 0, 0
  for name, concept in rare_concepts.items():
    trait = concept["trait"]
    exemplars = [int(i) for i in concept["indices"]]
    others = [int(i) for i in concept["caption_sharing_indices"] if int(i) not in exemplars]
    hits = sum(detect_trait(images[i], trait) for i in exemplars)
    false = sum(detect_trait(images[i], trait) for i in others)
    ok = hits + len(others) - false
    per_trait[name] = {"exemplars_seen": hits, "exemplars": len(exemplars),
                       "others_seen": false, "others": len(others),
                       "accuracy": ok / max(1, len(exemplars) + len(others))}
    right += ok
    total += len(exemplars) + len(others)
  return {"accuracy": right / max(1, total), "items": total, "per_trait": per_trait}
