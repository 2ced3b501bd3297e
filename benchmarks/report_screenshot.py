r"""Renders a smoke run's report pages in headless Chromium: screenshots and the page width.

  python benchmarks/report_screenshot.py --workdir=/tmp/report_run --make --out=/tmp/report_shots

--make first runs the smoke main job (configs/tiny_eval.py:smoke: train, generate, attribute,
and a reduced evaluate), a few minutes on 2 cores; without it the workdir must hold a finished run.
For each page (workdir/attribution_plus/ or attribution/report.html, workdir/evaluation/report.html) and each
window width (1280 and 800 px) it saves <out>/<page>_<width>.png (the window) and
<out>/<page>_<width>_full.png (the whole page), and checks the page is no wider than the
window: a copy of the page with a two-line script that writes document scrollWidth into the
DOM is loaded with --dump-dom. Exits 1 when a page overflows, 2 when chromium is missing
(Debian's package: apt-get install -y chromium).
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/tiny_eval.py:smoke"   # the tiny world with an `evaluation` block
PAGES = {"attribution": ("attribution_plus/report.html", "attribution/report.html"),
         "evaluation": ("evaluation/report.html",)}
MEASURE = ("<script>window.addEventListener('load',()=>{const d=document.documentElement;"
           "document.body.insertAdjacentHTML('beforeend',`<pre id=measure>${JSON.stringify("
           "{scrollWidth:d.scrollWidth,clientWidth:d.clientWidth,scrollHeight:d.scrollHeight,"
           "innerWidth:window.innerWidth})}</pre>`)})</script>")


def chromium() -> str | None:
  return shutil.which("chromium") or shutil.which("chromium-browser")


def _flags(width: int, height: int) -> list[str]:
  # Offline and quiet: no network, sync, component updates or first-run work; a fresh profile.
  return ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--hide-scrollbars", f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}",
          f"--window-size={width},{height}", "--virtual-time-budget=5000",
          "--run-all-compositor-stages-before-draw"]


def measure(browser: str, page: str, width: int, height: int = 900) -> dict:
  """The page's scrollWidth (etc.) at a window width, from a measuring copy of the page."""
  with open(page, encoding="utf-8") as f:
    text = f.read()
  copy = os.path.join(os.path.dirname(page), f".measure_{width}.html")  # beside it: relative
  with open(copy, "w", encoding="utf-8") as f:                         # images still resolve
    f.write(text + MEASURE)
  try:
    out = subprocess.run([browser, *_flags(width, height), "--dump-dom",
                          "file://" + os.path.abspath(copy)],
                         capture_output=True, text=True, timeout=120)
  finally:
    os.remove(copy)
  found = re.search(r'<pre id="measure">(.*?)</pre>', out.stdout)
  if not found:
    raise RuntimeError(f"no measurement from chromium for {page}: {out.stderr[-2000:]}")
  return json.loads(found.group(1).replace("&quot;", '"'))


def screenshot(browser: str, page: str, path: str, width: int, height: int) -> None:
  subprocess.run([browser, *_flags(width, height), f"--screenshot={path}",
                  "file://" + os.path.abspath(page)], capture_output=True, timeout=120,
                 check=True)


def make_run(workdir: str) -> None:
  env = dict(os.environ, XLA_FLAGS="")
  stages = [("launch.train",), ("launch.generate",), ("launch.attribute",),
            ("launch.evaluate", "--config.evaluation.queries=('rare_moon_0', 'rare_star_0')",
             "--config.evaluation.lds.num_subsets=0", "--config.evaluation.random_draws=1",
             "--config.evaluation.methods=('abu+', 'pixel', 'random')",
             "--config.evaluation.ks=(2, 4)", "--config.evaluation.regenerate=False")]
  for module, *extra in stages:
    print(f"running {module}", flush=True)
    subprocess.run([sys.executable, "-m", module, f"--config={CONFIG}", f"--workdir={workdir}",
                    *extra], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", default="/tmp/report_shots")
  parser.add_argument("--make", action="store_true", help="run the smoke main job first")
  parser.add_argument("--widths", default="1280,800")
  args = parser.parse_args()
  browser = chromium()
  if browser is None:
    print("report_screenshot: CHROMIUM IS NOT INSTALLED (apt-get install -y chromium); "
          "nothing was checked", file=sys.stderr)
    return 2
  if args.make:
    make_run(args.workdir)
  os.makedirs(args.out, exist_ok=True)
  failures, results = [], {}
  for name, candidates in PAGES.items():
    found = [os.path.join(args.workdir, c) for c in candidates
             if os.path.exists(os.path.join(args.workdir, c))]
    if not found:
      failures.append(f"no {' or '.join(candidates)} in {args.workdir} (run with --make)")
      continue
    page = found[0]
    for width in (int(w) for w in args.widths.split(",")):
      m = measure(browser, page, width)
      results[f"{name}_{width}"] = m
      ok = m["scrollWidth"] <= m["innerWidth"] <= width
      print(f"{name} at {width}px: scrollWidth {m['scrollWidth']} / window {m['innerWidth']}"
            f" (page height {m['scrollHeight']}) {'fits' if ok else 'OVERFLOWS'}")
      if not ok:
        failures.append(f"{page} is {m['scrollWidth']} px wide in a {width} px window")
      screenshot(browser, page, os.path.join(args.out, f"{name}_{width}.png"), width, 900)
      screenshot(browser, page, os.path.join(args.out, f"{name}_{width}_full.png"), width,
                 min(m["scrollHeight"], 6000))
  with open(os.path.join(args.out, "measurements.json"), "w") as f:
    json.dump(results, f, indent=2)
  for failure in failures:
    print("FAIL:", failure, file=sys.stderr)
  print(f"screenshots in {args.out}")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
