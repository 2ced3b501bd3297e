"""The evaluation's report files: the method × K table (`build_table`, from the leave-K-out and
LDS summaries) as markdown, CSV and one HTML page, and its plots.

Contract: `build_table` gives one row per (method, K) in the configured method order, every
column present (NaN where not measured, the LDS repeated across K); `format_markdown`,
`write_csv`, `plot_lines`, `plot_bars` and `write_html` render those rows, and `topk_section`
shows each ranked method's top K per query beside the query (ground truth marked).

Invariants: every file is written atomically (`io_utils`), so a killed run never leaves a torn
report; the text of the table depends only on its numbers (same numbers, same text); plots are
drawn with matplotlib's file-only Agg backend, so no display is needed.
"""
from __future__ import annotations

import csv
import html
import io
import json
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from attrib_jax import io_utils
from attrib_jax.attribution import report as report_lib
from attrib_jax.generation import Query


# ----------------------------------------------------------------------------- table ---

def build_table(cf_summary: Sequence[dict], lds_summary: Mapping[str, Mapping[str, float]],
                methods: Sequence[str], ks: Sequence[int], num_items: int) -> list[dict]:
  """Rows (method, K) in the configured method order, the LDS columns repeated across K."""
  nan = float("nan")
  by_key = {(e["method"], e["k"]): e for e in cf_summary}
  table = []
  for m in methods:
    for k in ks:
      e = dict(by_key.get((m, k), {"method": m, "k": k, "n": 0}))
      e["k_percent"] = 100.0 * k / num_items
      lds = lds_summary.get(m, {})
      e["lds"], e["lds_se"] = lds.get("lds", nan), lds.get("lds_se", nan)
      for field in ("dl", "dl_se", "vs_random", "vs_random_se", "mse", "mse_se", "cos",
                    "cos_se"):
        e.setdefault(field, nan)
      e["beats_random_2se"] = bool(e["vs_random"] > 2 * e["vs_random_se"]) if all(
          math.isfinite(e[f]) for f in ("vs_random", "vs_random_se")) else None
      table.append(e)
  return table


def _pm(mean: float, se: float, scale: float = 1.0, digits: int = 3) -> str:
  if not math.isfinite(mean):
    return "n/a"
  text = f"{mean * scale:.{digits}f}"
  return text + (f" ± {se * scale:.{digits}f}" if math.isfinite(se) else "")


COLUMNS = ("method", "K", "K %", "n", "ΔL ×1e-3", "ΔL − random ×1e-3", "> 2 s.e.",
           "ΔG MSE ×1e-3", "ΔG feature cos", "LDS")


def table_cells(e: Mapping[str, Any]) -> list[str]:
  beats = {True: "yes", False: "no", None: "–"}[e["beats_random_2se"]]
  return [e["method"], str(e["k"]), f"{e['k_percent']:.1f}", str(e["n"]),
          _pm(e["dl"], e["dl_se"], 1e3), _pm(e["vs_random"], e["vs_random_se"], 1e3), beats,
          _pm(e["mse"], e["mse_se"], 1e3), _pm(e["cos"], e["cos_se"], 1.0, 4),
          _pm(e["lds"], e["lds_se"])]


def format_markdown(table: Sequence[Mapping[str, Any]]) -> str:
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(table_cells(e)) + " |" for e in table]
  return "\n".join(lines) + "\n"


def write_csv(path: str, table: Sequence[Mapping[str, Any]]) -> None:
  fields = ("method", "k", "k_percent", "n", "dl", "dl_se", "vs_random", "vs_random_se",
            "beats_random_2se", "mse", "mse_se", "cos", "cos_se", "lds", "lds_se")
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(fields)
  for e in table:
    writer.writerow([f"{e[f]:.9g}" if isinstance(e[f], float) else e[f] for f in fields])
  _write_text(path, buffer.getvalue())


# Atomic (io_utils): a killed run never leaves a torn report.
_write_bytes = io_utils.atomic_write_bytes
_write_text = io_utils.atomic_write_text


def _write_jsonl(path: str, rows: Sequence[dict]) -> None:
  rows = sorted((r for r in rows if r is not None), key=lambda r: r["cell"])
  _write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


# ----------------------------------------------------------------------------- plots ---

def _save_figure(path: str, fig) -> None:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  _write_bytes(path, buffer.getvalue())


def _figure(title: str, xlabel: str, ylabel: str):
  # Agg: a file-only backend, no display needed (launchers run on headless machines).
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  fig = figure.Figure(figsize=(6.4, 4.2), layout="constrained")
  ax = fig.add_subplot()
  ax.set_title(title)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(True, color="#e6e6e6")
  ax.axhline(0.0, color="#969696", linewidth=0.8)
  return fig, ax


def plot_lines(path: str, series: Mapping[str, Sequence[tuple[float, float, float]]], *,
               title: str, xlabel: str, ylabel: str) -> None:
  """One line per method through (x, mean) with ±s.e. bars."""
  fig, ax = _figure(title, xlabel, ylabel)
  xs = sorted({p[0] for s in series.values() for p in s})
  for name, s in series.items():
    pts = [(x, m, e if math.isfinite(e) else 0.0) for x, m, e in s if math.isfinite(m)]
    if pts:
      x, m, e = zip(*pts)
      ax.errorbar(x, m, yerr=e, marker="o", markersize=4, capsize=3, label=name)
  ax.set_xticks(xs)
  if series:
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
  _save_figure(path, fig)


def plot_bars(path: str, values: Mapping[str, tuple[float, float]], *, title: str,
              ylabel: str) -> None:
  """One bar per method (mean) with a ±s.e. bar."""
  fig, ax = _figure(title, "method", ylabel)
  names = list(values)
  means = [m if math.isfinite(m) else 0.0 for m, _ in values.values()]
  errors = [e if math.isfinite(e) else 0.0 for _, e in values.values()]
  colors = [f"C{i}" for i in range(len(names))]
  ax.bar(range(len(names)), means, yerr=errors, color=colors, capsize=3)
  ax.set_xticks(range(len(names)), names)
  _save_figure(path, fig)


def plot_paired(path: str, pairs: Sequence[Mapping[str, Any]], references: Sequence[str],
                methods: Sequence[str], ks: Sequence[int]) -> None:
  """One panel per reference baseline: each method's paired ΔL difference from it against K,
  mean ± s.e. over queries (above the dashed 0 line = removes more of the query's loss)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  panels = max(len(references), 1)
  fig = figure.Figure(figsize=(3.4 * panels + 1.6, 3.6), layout="constrained")
  axes = fig.subplots(1, panels, squeeze=False)[0]
  by = {(e["k"], e["a"], e["b"]): e for e in pairs}
  for ax, ref in zip(axes, references):
    ax.set_title(f"method − {ref}")
    ax.set_xlabel("K")
    ax.grid(True, color="#e6e6e6")
    ax.axhline(0.0, color="#969696", linewidth=0.8, linestyle="--")
    for i, m in enumerate(methods):
      pts = []
      for k in ks:
        e, sign = by.get((k, m, ref)), 1.0
        if e is None:
          e, sign = by.get((k, ref, m)), -1.0
        if e is not None and math.isfinite(e["mean"]):
          pts.append((k, sign * e["mean"] * 1e3,
                      e["se"] * 1e3 if math.isfinite(e["se"]) else 0.0))
      if pts:
        x, y, err = zip(*pts)
        ax.errorbar(x, y, yerr=err, marker="o", markersize=3, capsize=2, color=f"C{i}",
                    label=m)
    ax.set_xticks(list(ks))
  axes[0].set_ylabel("paired ΔL difference ×1e-3 (± s.e.)")
  if methods:
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
  _save_figure(path, fig)


# ------------------------------------------------------------------------------ html ---

def topk_section(queries: Mapping[str, Query], rankings: Mapping[str, Mapping[str, np.ndarray]],
                 k: int, get_images: Callable[[np.ndarray], np.ndarray]) -> str:
  """Every query's image beside each ranked method's top k (what leave-K-out removes)."""
  shown = sorted({int(i) for by_query in rankings.values() for r in by_query.values()
                  for i in r[:k]})
  images = dict(zip(shown, np.asarray(get_images(np.asarray(shown, np.int64)))))
  blocks = [report_lib.topk_block(f"{name}: {queries[name].info.get('prompt', '')}",
                                  queries[name].image,
                                  {m: by_query[name][:k] for m, by_query in rankings.items()},
                                  images, queries[name].info.get("influential_indices") or ())
            for name in sorted(queries)]
  return (f"<h2>Each method's top {k}</h2>" + report_lib.LEGEND + "".join(blocks))


def _pairwise_section(pairwise_markdown: str, summary: Mapping[str, Any]) -> str:
  if not pairwise_markdown:
    return ""
  lines = [l for l in pairwise_markdown.strip().splitlines() if l.startswith("| ")]
  cells = [[c.strip() for c in l.strip("|").split("|")] for l in lines]
  head = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
  body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                 for row in cells[1:])
  bar = "".join(
      f"<li>K = {b['k']}: {html.escape(b['method'])}, smallest z {b['min_z']:.2f} "
      f"({'above' if b['beats_all'] else 'not above'} 2 against every reference)</li>"
      for b in summary.get("best_against_references", []))
  return (f"<h2>Paired differences</h2><p>Per query, A's ΔL minus B's (random: the mean over "
          f"its draws), then mean ± s.e. over the queries both have; a 95 % bootstrap "
          f"percentile interval of that mean (10,000 resamples of the queries, seeded); z = "
          f"mean / s.e.; A &gt; B counts the queries where A's removal raised the loss more; "
          f"the sign test's two-sided exact p-value (ties dropped).</p><ul>{bar}</ul>"
          f'<div class="wide"><table><tr>{head}</tr>{body}</table></div>')


def write_html(path: str, summary: Mapping[str, Any], markdown: str,
               plots: Sequence[str], topk_html: str = "", pairwise_markdown: str = "") -> None:
  """One page: the table, the plots, each method's top-K per query (when given), the
  definitions and the run's settings."""
  table = summary["table"]
  plot_tags = "".join(f'<img src="{html.escape(p)}" alt="{html.escape(p)}">' for p in plots)
  rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in table_cells(e))
                 + "</tr>" for e in table)
  head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
  drift = summary.get("theta0_regeneration")
  drift_text = (f"Regenerating each query under θ0 itself gives pixel MSE {drift['mean_mse']:.2e}"
                f" on average (max {drift['max_mse']:.2e}): ΔG's floor from the sampler's own "
                "numerics." if drift else "ΔG was not measured.")
  lds = summary.get("lds")
  lds_text = (f"LDS: {lds['settings']['num_subsets']} random subsets of "
              f"{lds['settings']['fraction']:g} of the training set (subset seed "
              f"{lds['settings']['subset_seed']}); Spearman per query between Σ of a method's "
              "scores over a subset's items and minus the query loss of the model trained on it;"
              " mean ± s.e. over queries." if lds else "LDS was not run.")
  page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Counterfactual
evaluation</title><meta name="viewport" content="width=device-width, initial-scale=1">
<style>{report_lib.PAGE_CSS}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
.plots{{display:flex;flex-wrap:wrap;gap:8px}}
.plots img{{flex:1 1 420px;max-width:640px;min-width:0}}
</style></head><body>
<h1>Counterfactual evaluation</h1>
<p>{summary['num_items']} training items, {len(summary['queries'])} queries, K =
{', '.join(map(str, summary['ks']))}; {summary['models_trained_this_run']} models trained in
this run, which took {summary['seconds_this_run']:.0f} s.</p>
<div class="wide"><table><tr>{head}</tr>{rows}</table></div>
<p>ΔL = L(query, θ without the method's top-K) − L(query, θ0), the query's denoising loss
averaged over timesteps 0, {summary['settings']['loss']['timestep_stride']}, … with keyed noise
shared by both models; higher = the removed items mattered more. ΔL − random: the paired
difference from random removal (random K-subsets, {summary['settings']['random_draws']} draws,
averaged), per query, then mean ± s.e. over queries; "&gt; 2 s.e." says whether it exceeds two
standard errors. ΔG: the query regenerated with the same prompt and seed under the retrained
model, against the original image: pixel MSE (pixels in [0, 1]; higher = more influence) and
cosine similarity of model-free random-conv features (lower = more influence). {drift_text}</p>
<p>{lds_text}</p>
<div class="plots">{plot_tags}</div>
{_pairwise_section(pairwise_markdown, summary)}
{topk_html}
<h2>Markdown</h2><pre>{html.escape(markdown)}</pre>
<h2>Settings</h2><pre>{html.escape(json.dumps(summary['settings'], indent=2, sort_keys=True))}</pre>
</body></html>
"""
  _write_text(path, page)
