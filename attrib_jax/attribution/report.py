"""Pictures and a page: the query beside its most influential training images."""
from __future__ import annotations

import base64
import html
import io
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from attrib_jax import io_utils
from attrib_jax import visualize


def topk_picture(query_image: np.ndarray, images: np.ndarray, indices: Sequence[int],
                 scores: Sequence[float], truth: Sequence[int] | None = None,
                 scale: int = 4) -> Image.Image:
  """Query (left, blue frame) | top-k, each labelled `#index` and its score; ground-truth
  influential items (when known) framed in green."""
  tiles = np.concatenate([query_image[None], images])
  labels = ["query"] + [f"#{i} {s:.2e}" for i, s in zip(indices, scores)]
  grid = visualize.image_grid(tiles, labels, columns=len(tiles), scale=scale, label_height=12)
  draw = ImageDraw.Draw(grid)
  w, h = query_image.shape[1] * scale, query_image.shape[0] * scale
  draw.rectangle([0, 0, w - 1, h - 1], outline=(40, 80, 230), width=2)
  truth = set(int(t) for t in truth or ())
  for k, i in enumerate(indices, start=1):
    if int(i) in truth:
      draw.rectangle([k * w, 0, (k + 1) * w - 1, h - 1], outline=(20, 180, 60), width=2)
  return grid


def save_topk_picture(path: str, query, images, indices, scores, truth=None) -> None:
  visualize.save_png(path, topk_picture(query.image, np.asarray(images), indices, scores, truth))


def summarise(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Mean Recall@10 per method over the queries that have ground truth."""
  with_truth = [e for e in entries if "recall@10" in e]
  methods = sorted({m for e in with_truth for m in e["recall@10"]})
  return {"num_queries": len(entries), "num_with_ground_truth": len(with_truth),
          "mean_recall@10": {m: float(np.mean([e["recall@10"][m] for e in with_truth]))
                             for m in methods},
          "mean_seconds_per_query": float(np.mean(
              [sum(e["seconds"].values()) for e in entries])) if entries else 0.0}


def _inline_png(path: str) -> str:
  with open(path, "rb") as f:
    return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def write_report(path: str, entries: Sequence[dict[str, Any]], summary: dict[str, Any]) -> None:
  """One self-contained HTML page (pictures inlined), written atomically."""
  rows = []
  for e in entries:
    recall = ", ".join(f"{m} {v:.2f}" for m, v in e.get("recall@10", {}).items())
    rows.append(f"<h3>{html.escape(e['name'])}: {html.escape(str(e['prompt']))}</h3>"
                f"<p>{'Recall@10: ' + recall if recall else ''}</p>"
                f"<img src='{_inline_png(e['picture'])}'>")
  means = ", ".join(f"{m} {v:.3f}" for m, v in summary["mean_recall@10"].items())
  page = ("<!doctype html><meta charset='utf-8'><title>attrib_jax report</title>"
          "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
          "img{image-rendering:pixelated}</style>"
          "<h1>Attribution by Unlearning</h1>"
          f"<p>{summary['num_queries']} queries; mean Recall@10 over the "
          f"{summary['num_with_ground_truth']} with ground truth: {html.escape(means)}. "
          f"Mean time per query {summary['mean_seconds_per_query']:.1f}s. Blue frame: the "
          "query; green frames: its known influential training images.</p>" + "".join(rows))
  io_utils.atomic_write_text(path, page)
