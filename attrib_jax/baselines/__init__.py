"""Attribution baselines behind one interface (SPEC §3): pixel and feature cosine, DINO / CLIP
tower cosine (a user's weights directory), TRAK, D-TRAK, random scores, and the text-only
caption baselines.

  method = make_method("d-trak", proj_dim=512, flips=(0,))
  context = Context(arrays=arrays, images=images, apply_fn=apply_fn, params=params,
                    schedule=schedule, module=unet)
  scores = method.score(query, context)    # [N] float64, aligned with arrays["index"]

Another method joins with `@register` on a frozen dataclass subclassing `Method` with a class
attribute `name`.
"""
from attrib_jax.baselines import caption, features, interface, pixel, random, towers, trak
from attrib_jax.baselines.caption import CaptionCosine, CaptionWords
from attrib_jax.baselines.features import (EXTRACTORS, FeatureCosine, random_conv_features,
                                           unet_features)
from attrib_jax.baselines.interface import (Context, Method, available_methods, make_method,
                                            register)
from attrib_jax.baselines.pixel import PixelCosine
from attrib_jax.baselines.random import RandomScores
from attrib_jax.baselines.towers import ClipCosine, DinoCosine
from attrib_jax.baselines.trak import DTRAK, TRAK

__all__ = [
    "caption", "CaptionCosine", "CaptionWords",
    "features", "interface", "pixel", "random", "trak",
    "EXTRACTORS", "FeatureCosine", "random_conv_features", "unet_features",
    "Context", "Method", "available_methods", "make_method", "register",
    "PixelCosine", "RandomScores", "DTRAK", "TRAK", "towers", "ClipCosine", "DinoCosine",
]
