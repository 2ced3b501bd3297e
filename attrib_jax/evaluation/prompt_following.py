"""Does the tiny-world model draw what it is asked? A detector-scored check.

1. Validate the rule-based detector (data/tiny_world_detector.py) on *real* dataset images:
   if it cannot read the training images, its verdict on generations means nothing.
2. Generate images for prompts of fresh scenes (not training captions, from a separate seed)
   and score colour and shape jointly, and each attribute alone.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from attrib_jax import generation
from attrib_jax.data import tiny_world
from attrib_jax.data import tiny_world_detector
from attrib_jax.models import pipeline as pipeline_lib


def validate_detector(images: np.ndarray, scenes: list[dict[str, Any]]) -> dict[str, float]:
  return tiny_world_detector.evaluate_detector(images, scenes)


def fresh_scenes(seed: int, count: int,
                 patterns: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
  """Single-object scenes of common attributes from a seed no training item uses (backgrounds
  from `patterns`, the world's; None: all of them)."""
  rng = np.random.default_rng([seed, 99])
  return [tiny_world.sample_scene(rng, patterns=patterns or tiny_world.PATTERNS)
          for _ in range(count)]


def check(pipe: pipeline_lib.Pipeline, scenes: list[dict[str, Any]], *, seed: int,
          sampler: str, num_steps: int, guidance_scale: float,
          batch_size: int = 32) -> tuple[dict[str, float], list[generation.Query]]:
  """Generates one image per scene from its first caption; detector accuracy on them."""
  prompts = [tiny_world.caption_scene(s)[0] for s in scenes]
  queries = generation.generate(pipe, prompts, [seed + i for i in range(len(prompts))],
                                sampler=sampler, num_steps=num_steps,
                                guidance_scale=guidance_scale, batch_size=batch_size)
  images = np.stack([q.image for q in queries])
  return tiny_world_detector.evaluate_detector(images, scenes), queries
