r"""launch.serve's page in headless Chromium: a picked generated query and an uploaded image.

  python benchmarks/serve_screenshot.py --workdir=/tmp/fgda_run --make --out=/tmp/serve_shots

--make first runs the smoke FastGDA pipeline (configs/distill_tiny.py:smoke: train, generate,
distill), a few minutes on 2 cores; without it the workdir must hold launch.distill's outputs.
The real service (`service.from_workdir`) is served in this process by launch.serve's handler,
with one extra route, /shot?mode=..., that returns the page plus a short script driving it the
way a person would: `query` picks the first generated query in the drop-down and presses its
button; `upload` fetches a generated query's image (enlarged, so the server's resize runs),
puts it in the file input (a DataTransfer, the only way a script may fill one), types the
prompt and submits the form. So the page's own upload path (FileReader, base64, POST, render)
runs in the browser. For each mode and window width (1280, 800 px) it saves
<out>/<mode>_<width>.png and checks, from the rendered DOM (--dump-dom), that the results
arrived (k items with scores) and the page is no wider than the window. Exits 1 on a failed
check, 2 when chromium is missing (Debian's package: apt-get install -y chromium).
"""
import argparse
import io
import json
import os
import re
import subprocess
import sys
import threading

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import report_screenshot  # noqa: E402  (its chromium lookup and offline flags)

CONFIG = "configs/distill_tiny.py:smoke"

# Appended to the page on /shot: drive it once init() has filled the drop-down, then write
# what was rendered (and the page's width) into the DOM for --dump-dom to read.
DRIVER = """<script>
window.addEventListener('load', async () => {
  const mode = new URLSearchParams(location.search).get('mode');
  const wait = async (test) => { for (let i = 0; i < 400 && !test(); i++)
                                   await new Promise(r => setTimeout(r, 25)); };
  await wait(() => $('named').options.length > 0);
  if (mode === 'query') {
    $('pick').click();
  } else {
    const blob = await (await fetch('/shot_upload.png')).blob();
    const dt = new DataTransfer();
    dt.items.add(new File([blob], 'upload.png', {type: 'image/png'}));
    $('file').files = dt.files;
    $('prompt').value = %(prompt)s;
    $('upload').requestSubmit();
  }
  await wait(() => document.querySelectorAll('.item').length > 0 || $('status').textContent
                   && $('status').textContent !== 'attributing...');
  await new Promise(r => setTimeout(r, 300));   // thumbnails
  const d = document.documentElement;
  const pre = document.createElement('pre');   // built, not written as markup: the dumped
  pre.id = 'measure'; pre.style.display = 'none';  // DOM then holds the tag only once
  pre.textContent = JSON.stringify({
    scrollWidth: d.scrollWidth, innerWidth: window.innerWidth,
    items: document.querySelectorAll('.item').length,
    scores: [...document.querySelectorAll('.score')].map(e => e.textContent),
    status: $('status').textContent,
    images_loaded: [...document.images].every(i => i.complete && i.naturalWidth > 0)});
  document.body.appendChild(pre);
});
</script>"""


def make_run(workdir: str) -> None:
  env = dict(os.environ, XLA_FLAGS="")
  for module in ("launch.train", "launch.generate", "launch.distill"):
    print(f"running {module}", flush=True)
    subprocess.run([sys.executable, "-m", module, f"--config={CONFIG}", f"--workdir={workdir}"],
                   cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)


def start_server(config, workdir: str, upload_name: str, upload_side: int):
  """launch.serve's handler over the workdir's service, plus /shot and /shot_upload.png."""
  from attrib_jax.distill import service as service_lib
  from launch import serve
  service = service_lib.from_workdir(config, workdir, log=lambda m: print(m, flush=True))
  query = service.named_query(upload_name)
  big = Image.fromarray(np.asarray(query.image, np.uint8)).resize((upload_side, upload_side),
                                                                  Image.NEAREST)
  buffer = io.BytesIO()
  big.save(buffer, format="PNG")
  upload_png, prompt = buffer.getvalue(), query.info.get("prompt", "")
  # Compile the query path before the browser's timed calls (the page shows their ms).
  service.search(query, 10)
  service.search_image(np.asarray(big), prompt, 10)
  base = serve.make_handler(service)

  class Handler(base):
    def do_GET(self):
      path = self.path.split("?", 1)[0]
      if path == "/shot":
        page = serve.PAGE.replace("</body>", DRIVER % {"prompt": json.dumps(prompt)}
                                  + "</body>")
        self._send(200, page.encode(), "text/html; charset=utf-8")
      elif path == "/shot_upload.png":
        self._send(200, upload_png, "image/png")
      else:
        super().do_GET()

  from http import server as http_server
  httpd = http_server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  threading.Thread(target=httpd.serve_forever, daemon=True).start()
  return httpd, prompt


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", default="/tmp/serve_shots")
  parser.add_argument("--make", action="store_true", help="run the smoke pipeline first")
  parser.add_argument("--widths", default="1280,800")
  parser.add_argument("--height", type=int, default=1000)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--upload_query", default="rare_star_0",
                      help="the generated query whose image is uploaded (with its prompt)")
  parser.add_argument("--upload_side", type=int, default=64)
  args = parser.parse_args()
  browser = report_screenshot.chromium()
  if browser is None:
    print("serve_screenshot: CHROMIUM IS NOT INSTALLED (apt-get install -y chromium); "
          "nothing was checked", file=sys.stderr)
    return 2
  if args.make:
    make_run(args.workdir)
  from configs import distill_tiny  # pylint: disable=g-import-not-at-top
  config = distill_tiny.get_config(CONFIG.split(":")[1])
  httpd, prompt = start_server(config, args.workdir, args.upload_query, args.upload_side)
  url = f"http://127.0.0.1:{httpd.server_address[1]}"
  os.makedirs(args.out, exist_ok=True)
  failures, results = [], {}
  for mode in ("query", "upload"):
    for width in (int(w) for w in args.widths.split(",")):
      page = f"{url}/shot?mode={mode}&k={args.k}"
      flags = report_screenshot._flags(width, args.height)  # pylint: disable=protected-access
      dom = subprocess.run([browser, *flags, "--dump-dom", page], capture_output=True,
                           text=True, timeout=180)
      found = re.search(r'<pre id="measure"[^>]*>(.*?)</pre>', dom.stdout, re.S)
      if not found:
        failures.append(f"{mode} at {width}px: the page never finished ({dom.stderr[-500:]})")
        continue
      m = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
      results[f"{mode}_{width}"] = m
      checks = {"fits": m["scrollWidth"] <= m["innerWidth"] <= width,
                f"{args.k} items": m["items"] == args.k,
                "no error": not m["status"], "images loaded": m["images_loaded"]}
      print(f"{mode} at {width}px: {m['items']} items, first scores {m['scores'][:3]}, "
            f"scrollWidth {m['scrollWidth']} / {m['innerWidth']}; "
            + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in checks.items()))
      failures += [f"{mode} at {width}px: {k} failed ({m})" for k, v in checks.items() if not v]
      shot = os.path.join(args.out, f"{mode}_{width}.png")
      subprocess.run([browser, *flags, f"--screenshot={shot}", page], capture_output=True,
                     timeout=180, check=True)
      print(f"  screenshot {shot}")
  httpd.shutdown()
  print(f"uploaded: {args.upload_query}'s image at {args.upload_side}px with its prompt "
        f"{prompt!r}")
  for failure in failures:
    print("FAIL:", failure, file=sys.stderr)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
