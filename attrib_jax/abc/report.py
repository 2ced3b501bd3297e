"""AbC's evaluation report: table.csv/.md, calibration.csv/.md, reliability.png, report.html.

The page puts the method × split table on top, then, per shown query: its image and prompt,
its set's exemplars, and each method's top-k candidates (true exemplars framed in green) with
the calibrated probability of each under its thumbnail, as AbC's demo shows soft attribution
(a bar and a percentage). Every file is written atomically; the text of a table depends only
on its numbers. The page's CSS and image inlining are the attribution report's.
"""
from __future__ import annotations

import csv
import html
import io
from typing import Any, Mapping, Sequence

import numpy as np

from attrib_jax import io_utils
from attrib_jax.attribution import report as report_lib
from attrib_jax.evaluation import report_page

METRICS = ("recall@5", "recall@10", "recall@K", "map")   # K: the table's k_big (~10 % of C)


def _metric_names(k_big: int) -> list[str]:
  del k_big
  return list(METRICS)


def _pm(mean: float, se: float) -> str:
  return report_page._pm(mean, se)   # pylint: disable=protected-access


def table_markdown(rows: Sequence[Mapping[str, Any]], k_big: int) -> str:
  names = _metric_names(k_big)
  head = ["method", "protocol", "split", "n"] + [n.replace("map", "mAP").replace(
      "recall", "Recall").replace("@K", f"@{k_big}") for n in names]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    lines.append("| " + " | ".join([r["method"], r["protocol"], r["split"], str(r["n"])] +
                                   [_pm(r[n], r[n + "_se"]) for n in names]) + " |")
  return "\n".join(lines) + "\n"


def _csv(rows: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> str:
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(fields)
  for r in rows:
    writer.writerow([f"{r[f]:.9g}" if isinstance(r[f], float) else r[f] for f in fields])
  return buffer.getvalue()


CAL_FIELDS = ("method", "split", "n", "inv_tau", "bias", "nll", "nll_se", "nll_softmax",
              "calibrated_lower_nll", "true_mass", "true_mass_softmax", "top1_confidence", "top1_confidence_softmax", "ece",
              "ece_softmax")


def calibration_markdown(cal_rows: Sequence[Mapping[str, Any]]) -> str:
  head = ["method", "split", "n", "1/τ", "b", "NLL calibrated", "NLL softmax", "lower",
          "true mass cal.", "true mass softmax", "top-1 p cal.", "top-1 p softmax",
          "top-1 ECE cal.", "top-1 ECE softmax"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in cal_rows:
    lines.append("| " + " | ".join([
        r["method"], r["split"], str(r["n"]), f"{r['inv_tau']:.3g}", f"{r['bias']:.3g}",
        _pm(r["nll"], r["nll_se"]), f"{r['nll_softmax']:.3f}",
        "yes" if r["calibrated_lower_nll"] else "no", f"{r['true_mass']:.3f}",
        f"{r['true_mass_softmax']:.3f}", f"{r['top1_confidence']:.3f}",
        f"{r['top1_confidence_softmax']:.3f}", f"{r['ece']:.3f}",
        f"{r['ece_softmax']:.3f}"]) + " |")
  return "\n".join(lines) + "\n"


def write_tables(out_dir: str, rows: Sequence[Mapping[str, Any]], k_big: int,
                 cal_rows: Sequence[Mapping[str, Any]]) -> None:
  names = _metric_names(k_big)
  fields = ["method", "protocol", "split", "n"] + [f for n in names for f in (n, n + "_se")]
  io_utils.atomic_write_text(f"{out_dir}/table.csv", _csv(rows, fields))
  io_utils.atomic_write_text(f"{out_dir}/table.md", table_markdown(rows, k_big))
  io_utils.atomic_write_text(f"{out_dir}/calibration.csv", _csv(cal_rows, CAL_FIELDS))
  io_utils.atomic_write_text(f"{out_dir}/calibration.md", calibration_markdown(cal_rows))


def plot_reliability(path: str, curves: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> None:
  """One reliability diagram of each query's top candidate (`calibration.top1_reliability`):
  per method, calibrated (solid) and softmax (dashed) top-1 correctness against its predicted
  probability over the test splits, ECE in the legend; the diagonal is perfect."""
  fig, ax = report_page._figure(   # pylint: disable=protected-access
      "Top-1 reliability on the test splits", "top candidate's probability (bin mean)",
      "top candidate is a true exemplar (1/m for m exemplars)")
  ax.plot([0, 1], [0, 1], color="#969696", linewidth=0.8)
  for name, c in curves.items():
    for kind, style in (("calibrated", "-"), ("softmax", "--")):
      rel = c[kind]
      count = np.asarray(rel["count"])
      keep = count > 0
      line, = ax.plot(np.asarray(rel["confidence"])[keep], np.asarray(rel["accuracy"])[keep],
                      style, marker="o", markersize=3,
                      label=f"{name} {kind} (ECE {float(rel['ece']):.3f})")
      if kind == "calibrated":
        color = line.get_color()
      else:
        line.set_color(color)
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  if curves:
    ax.legend(fontsize=7)
  report_page._save_figure(path, fig)   # pylint: disable=protected-access


def _thumb(image: np.ndarray, caption: str, truth: bool, prob: float | None = None) -> str:
  bar = ""
  if prob is not None:
    width = max(0.0, min(1.0, prob)) * 100
    bar = (f"<div class='bar'><div style='width:{width:.1f}%'></div></div>"
           f"<div>{100 * prob:.1f}%</div>")
  return (f"<figure><img src='{report_lib._png_uri(image)}'"   # pylint: disable=protected-access
          f"{' class=truth' if truth else ''} alt='{html.escape(caption)}'>"
          f"<figcaption>{html.escape(caption)}</figcaption>{bar}</figure>")


EXTRA_CSS = """
.bar{height:4px;background:#eee;margin:1px 0}.bar div{height:4px;background:#d2691e}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:2px 6px}
"""


def write_html(path: str, bench: Any, scores: Mapping[str, Mapping[tuple[str, str], np.ndarray]],
               cals: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], k_big: int,
               cal_rows: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> None:
  """The page (module doc): the table, then `report.queries_per_set` queries of every set."""
  from attrib_jax.abc import calibration  # pylint: disable=g-import-not-at-top
  top_k = int(settings["report"]["top_k"])
  per_set = int(settings["report"]["queries_per_set"])
  sections = []
  for s in bench.sets:
    rows_of_set = s["exemplar_rows"]
    for q, query in bench.queries[s["name"]][:per_set]:
      truth = set(int(r) for r in rows_of_set)
      exemplars = "".join(_thumb(bench.exemplar_images[r], f"exemplar {r}", True)
                          for r in rows_of_set)
      strips = []
      for label, by_query in scores.items():
        if (s["name"], q) not in by_query:
          continue
        sc = by_query[(s["name"], q)]
        order = np.argsort(-sc, kind="stable")[:top_k]
        probs = (np.asarray(calibration.probabilities(cals[label], sc[None]))[0]
                 if label in cals else None)
        images = bench.candidate_images(order)
        cells = "".join(_thumb(images[i], f"#{int(c)}", int(c) in truth,
                               None if probs is None else float(probs[c]))
                        for i, c in enumerate(order))
        mass = (f" (calibrated mass on its exemplars {100 * float(probs[list(truth)].sum()):.1f}%)"
                if probs is not None else "")
        strips.append(f"<div><div class='method-name'><b>{html.escape(label)}</b>{mass}</div>"
                      f"<div class='strip'>{cells}</div></div>")
      prompt = query.info.get("prompt", "")
      sections.append(
          f"<section class='query'><h3>{html.escape(s['name'])} ({html.escape(s['split'])}) / "
          f"{html.escape(q)}: {html.escape(str(prompt))}</h3>"
          f"<figure><img src='{report_lib._png_uri(query.image)}' alt='query'></figure>"  # pylint: disable=protected-access
          f"<div class='methods'><div><div class='method-name'>its exemplars</div>"
          f"<div class='strip'>{exemplars}</div></div>{''.join(strips)}</div></section>")
  page = (
      "<!doctype html><html><head><meta charset='utf-8'><title>AbC evaluation</title>"
      f"<style>{report_lib.PAGE_CSS}{EXTRA_CSS}</style></head><body>"
      "<h1>AbC evaluation</h1>"
      f"<p>{len(bench.sets)} sets, {sum(len(v) for v in bench.queries.values())} queries, "
      f"{bench.num_candidates} candidates ({bench.num_exemplars} exemplars + "
      f"{bench.num_candidates - bench.num_exemplars} base training items). Recall@K and AP "
      "over the full ranking, mean ± s.e. over queries; ties ranked pessimistically. AbU / AbU+ "
      f"on {settings['abu']['queries_per_set']} queries per set (n in the table). "
      "Probabilities under thumbnails: the method's calibrator fitted on the tune split.</p>"
      f"<div class='wide'>{_markdown_table_html(table_markdown(rows, k_big))}</div>"
      "<h2>Calibration (test splits)</h2>"
      f"<div class='wide'>{_markdown_table_html(calibration_markdown(cal_rows))}</div>"
      f"{report_lib.LEGEND}<h2>Queries</h2>{''.join(sections)}</body></html>")
  io_utils.atomic_write_text(path, page)


def _markdown_table_html(text: str) -> str:
  """A pipe table (our own, no escapes inside cells) as an HTML table."""
  lines = [l for l in text.strip().splitlines() if l.startswith("|")]
  if not lines:
    return ""
  cells = lambda l: [c.strip() for c in l.strip().strip("|").split("|")]
  head = "".join(f"<th>{html.escape(c)}</th>" for c in cells(lines[0]))
  body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells(l)) + "</tr>"
                 for l in lines[2:])
  return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

