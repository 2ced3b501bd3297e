"""Pictures and a page: the query beside its most influential training images."""
from __future__ import annotations

import base64
import html
import io
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


def _png_uri(image: np.ndarray) -> str:
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# Shared by this page and the evaluation's: thumbnails scale with the window and strips wrap,
# so no page is wider than the window; small images are shown as pixels, not blurred.
PAGE_CSS = """
*{box-sizing:border-box}
body{font-family:sans-serif;margin:0 auto;padding:0 16px 24px;max-width:1200px;line-height:1.35}
img{max-width:100%;height:auto}
pre{white-space:pre-wrap;overflow-wrap:anywhere}
.wide{overflow-x:auto;max-width:100%}
.query{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start;border-top:1px solid #ddd;
  padding:10px 0}
.query h3{flex-basis:100%;margin:0;font-size:1em;overflow-wrap:anywhere}
.query>figure{margin:0;width:clamp(64px,10vw,112px)}
.query>figure img{width:100%;border:3px solid #2850e6;image-rendering:pixelated}
.methods{flex:1 1 420px;min-width:0;display:flex;flex-direction:column;gap:6px}
.method-name{font-size:.85em;color:#333;margin-bottom:2px}
.strip{display:flex;flex-wrap:wrap;gap:3px}
.strip figure{margin:0;width:clamp(36px,6vw,68px);font-size:10px;text-align:center;color:#555}
.strip img{width:100%;border:3px solid transparent;image-rendering:pixelated;display:block}
.strip img.truth{border-color:#14b43c}
.legend span{display:inline-block;width:.9em;height:.9em;vertical-align:middle;margin:0 4px}
"""

LEGEND = ("<p class='legend'><span style='border:3px solid #2850e6'></span>the query "
          "<span style='border:3px solid #14b43c'></span>a known influential training item "
          "(ground truth)</p>")


def topk_block(title: str, query_image: np.ndarray, topk: dict[str, Sequence[int]],
               images: dict[int, np.ndarray], truth: Sequence[int] = (),
               notes: dict[str, str] | None = None) -> str:
  """One query's HTML: its image, then each method's top-k as a wrapping strip, ground-truth
  items framed in green. `images` maps every shown dataset index to its uint8 image."""
  truth, notes = set(int(t) for t in truth), notes or {}
  rows = []
  for method, indices in topk.items():
    cells = "".join(
        f"<figure><img src='{_png_uri(images[int(i)])}' alt='#{int(i)}'"
        f"{' class=truth' if int(i) in truth else ''}><figcaption>#{int(i)}</figcaption></figure>"
        for i in indices)
    note = f" ({html.escape(notes[method])})" if method in notes else ""
    rows.append(f"<div><div class='method-name'><b>{html.escape(method)}</b>{note}</div>"
                f"<div class='strip'>{cells}</div></div>")
  return (f"<section class='query'><h3>{html.escape(title)}</h3>"
          f"<figure><img src='{_png_uri(query_image)}' alt='query'></figure>"
          f"<div class='methods'>{''.join(rows)}</div></section>")


def write_report(path: str, entries: Sequence[dict[str, Any]], summary: dict[str, Any],
                 get_images=None, query_images: dict[str, np.ndarray] | None = None) -> None:
  """One self-contained HTML page (pictures inlined), written atomically.

  With `get_images` (dataset indices -> uint8 images) and the queries' images, each query shows
  every method's top-k (entry["topk"]) side by side; otherwise its topk.png picture.
  """
  rows = []
  shown = sorted({int(i) for e in entries for top in e.get("topk", {}).values() for i in top})
  images = (dict(zip(shown, np.asarray(get_images(np.asarray(shown, np.int64)))))
            if get_images is not None and query_images and shown else {})
  for e in entries:
    title = f"{e['name']}: {e['prompt']}"
    if images and e["name"] in query_images and "topk" in e:
      notes = {m: f"Recall@10 {v:.2f}" for m, v in e.get("recall@10", {}).items()}
      rows.append(topk_block(title, query_images[e["name"]], e["topk"], images,
                             e.get("truth", ()), notes))
      continue
    recall = ", ".join(f"{m} {v:.2f}" for m, v in e.get("recall@10", {}).items())
    rows.append(f"<section class='query'><h3>{html.escape(title)}</h3>"
                f"<p>{'Recall@10: ' + recall if recall else ''}</p>"
                f"<img src='{_inline_png(e['picture'])}' style='image-rendering:pixelated'>"
                "</section>")
  means = ", ".join(f"{m} {v:.3f}" for m, v in summary["mean_recall@10"].items())
  page = ("<!doctype html><meta charset='utf-8'>"
          "<meta name='viewport' content='width=device-width, initial-scale=1'>"
          f"<title>attrib_jax report</title><style>{PAGE_CSS}</style>"
          "<h1>Attribution by Unlearning</h1>"
          f"<p>{summary['num_queries']} queries; mean Recall@10 over the "
          f"{summary['num_with_ground_truth']} with ground truth: {html.escape(means or 'n/a')}. "
          f"Mean time per query {summary['mean_seconds_per_query']:.1f}s. Each row: a method's "
          "most influential training items, most influential first.</p>" + LEGEND
          + "".join(rows))
  io_utils.atomic_write_text(path, page)
