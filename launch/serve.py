r"""FastGDA over HTTP: a JSON API and a web page on the standard library's server.

  python -m launch.serve --config=configs/distill_tiny.py --workdir=runs/tiny --port=8019

Needs launch.distill's student and index in workdir/distill. API:
  GET  /api/health                 {"ok": true, "items": N, "index": "scann", ...}
  GET  /api/queries                the generated queries one may pick: [{"name", "prompt"}]
  POST /api/query                  {"image": base64 PNG/JPEG, "prompt": str, "k": int} or
                                   {"query": name, "k": int} -> {"items": [{rank, row, index,
                                   score, rank_fraction, cosine, captions, thumbnail}],
                                   "ms": {...}}; score: higher = more influential
                                   (service.Service.search)
  GET  /thumb/<row>.png            a training image;  GET /query_image/<name>.png  a query's
  GET  /                           the page: upload an image and type its prompt, or pick a
                                   generated query; shows the top-k with scores (higher = more
                                   influential) and captions
                                   (/?query=<name>&k=<k> attributes that query on load)
Errors come back as JSON {"error": message} with status 400 (bad request) or 404 (unknown).
"""
from __future__ import annotations

import base64
import binascii
import json
import re
import threading
from http import server as http_server
from urllib.parse import unquote

from absl import app
from absl import flags
from ml_collections import config_flags

from attrib_jax.distill import service as service_lib

MAX_BODY = 16 << 20   # bytes: a request body larger than this is refused before it is read

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>attrib_jax FastGDA</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
 h1 { font-size: 20px; margin: 0 0 4px; } .sub { color: #666; margin-bottom: 16px; }
 form, .pick { display: flex; gap: 8px; align-items: center; flex-wrap: wrap; margin: 8px 0; }
 input[type=text] { width: 360px; max-width: 100%; padding: 4px; }
 select { max-width: min(640px, 100%); }
 #query img, .item img { image-rendering: pixelated; width: 96px; height: 96px;
   border: 1px solid #ccc; }
 #results { display: grid; grid-template-columns: repeat(auto-fill, 180px); gap: 12px; }
 .item { font-size: 12px; } .score { font-weight: 600; } #status { color: #a33; }
 .cap + .cap { color: #666; margin-top: 2px; }
 #query { display: flex; gap: 12px; align-items: center; margin: 12px 0; }
</style></head><body>
<h1>Which training images made this image?</h1>
<div class="sub">FastGDA: AbU+ attribution distilled into an embedding, served from an index.
 <span id="health"></span></div>
<form id="upload"><input type="file" id="file" accept="image/*">
 <input type="text" id="prompt" placeholder="the image's prompt">
 <label>k <input type="number" id="k" value="10" min="1" max="100" style="width:50px"></label>
 <button type="submit">Attribute upload</button></form>
<div class="pick"><select id="named"></select><button id="pick">Attribute generated query</button>
</div>
<div id="status"></div><div id="query"></div><div id="results"></div>
<script>
const $ = (id) => document.getElementById(id);
function esc(s) { return String(s).replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c])); }
async function call(url, body) {
  const r = await fetch(url, body ? {method: 'POST', headers: {'Content-Type': 'application/json'},
                                     body: JSON.stringify(body)} : {});
  const j = await r.json(); if (!r.ok) throw new Error(j.error || r.statusText); return j;
}
function show(res, src) {
  $('status').textContent = '';
  $('query').innerHTML = (src ? `<img src="${src}">` : '') +
    `<div><b>${esc(res.prompt)}</b> <span class="sub">(${res.query ? 'generated query ' +
      esc(res.query) : 'your upload'})</span><br>top ${res.k} of the training set in ` +
    `${res.ms.total.toFixed(1)} ms (features ${res.ms.features.toFixed(1)}, ` +
    `MLP ${res.ms.embed.toFixed(1)}, search ${res.ms.search.toFixed(2)})<br>` +
    `score: higher = more influential (the student's logit negated, −(scale·cos + bias))` +
    `</div>`;
  // Every caption of an item is shown (a training image may carry several); the hover text
  // gives the predicted teacher rank fraction and the raw cosine.
  $('results').innerHTML = res.items.map(it => `<div class="item" title="predicted rank ` +
    `fraction ${it.rank_fraction.toFixed(3)} (0 = most influential), cos ${it.cosine.toFixed(3)}">` +
    `<img src="${it.thumbnail}"><div><span class="score">#${it.rank} score ` +
    `${it.score.toFixed(3)}</span> (item ${it.index})</div>` +
    it.captions.map(c => `<div class="cap">${esc(c)}</div>`).join('') + `</div>`).join('');
}
async function init() {
  try {
    const h = await call('/api/health');
    $('health').textContent = `${h.items} training items, ${h.index} index`;
    const qs = await call('/api/queries');
    $('named').innerHTML = qs.map(q => `<option value="${esc(q.name)}">${esc(q.name)}: ` +
                                       `${esc(q.prompt)}</option>`).join('');
  } catch (e) { $('status').textContent = e.message; return; }
  // /?query=<name>&k=<k> attributes that generated query at once (a link one can share).
  const params = new URLSearchParams(location.search);
  if (params.get('k')) $('k').value = params.get('k');
  if (params.get('query')) { $('named').value = params.get('query'); $('pick').onclick(); }
}
$('pick').onclick = async () => {
  const name = $('named').value; $('status').textContent = 'attributing...';
  try { show(await call('/api/query', {query: name, k: +$('k').value}),
             `/query_image/${encodeURIComponent(name)}.png`); }
  catch (e) { $('status').textContent = e.message; }
};
$('upload').onsubmit = (ev) => {
  ev.preventDefault(); const f = $('file').files[0];
  if (!f) { $('status').textContent = 'choose an image first'; return; }
  const reader = new FileReader();
  reader.onload = async () => {
    const data = reader.result.split(',')[1]; $('status').textContent = 'attributing...';
    try { show(await call('/api/query', {image: data, prompt: $('prompt').value, k: +$('k').value}),
               reader.result); }
    catch (e) { $('status').textContent = e.message; }
  };
  reader.readAsDataURL(f);
};
init();
</script></body></html>
"""


class _BadRequest(ValueError):
  pass


def make_handler(service: service_lib.Service):
  """A request handler class bound to one Service (one lock: JAX calls are serialised)."""
  lock = threading.Lock()

  class Handler(http_server.BaseHTTPRequestHandler):
    server_version = "attrib_jax-fastgda"

    def log_message(self, fmt, *args):   # quiet: the API is polled by tests and pages
      pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
      self.send_response(status)
      self.send_header("Content-Type", content_type)
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
      self._send(status, json.dumps(obj).encode(), "application/json")

    def _guard(self, fn):
      try:
        fn()
      except _BadRequest as e:
        self._json(400, {"error": str(e)})
      except KeyError as e:
        self._json(404, {"error": str(e.args[0]) if e.args else "not found"})
      except ValueError as e:
        self._json(400, {"error": str(e)})
      except Exception as e:  # pylint: disable=broad-except
        self._json(500, {"error": f"{type(e).__name__}: {e}"})

    def do_GET(self):
      path = self.path.split("?", 1)[0]

      def handle():
        if path in ("/", "/index.html"):
          self._send(200, PAGE.encode(), "text/html; charset=utf-8")
        elif path == "/api/health":
          self._json(200, service.health())
        elif path == "/api/queries":
          self._json(200, service.list_queries())
        elif m := re.fullmatch(r"/thumb/(\d+)\.png", path):
          self._send(200, service.thumbnail_png(int(m.group(1))), "image/png")
        elif m := re.fullmatch(r"/query_image/([^/]+)\.png", path):
          self._send(200, service.query_image_png(unquote(m.group(1))), "image/png")
        else:
          raise KeyError(f"no such page: {path}")
      self._guard(handle)

    def do_POST(self):
      def handle():
        if self.path != "/api/query":
          raise KeyError(f"no such endpoint: POST {self.path}")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
          raise _BadRequest(f"request body of {length} bytes exceeds {MAX_BODY}")
        try:
          body = json.loads(self.rfile.read(length) or b"null")
        except json.JSONDecodeError as e:
          raise _BadRequest(f"the body is not JSON ({e})") from e
        if not isinstance(body, dict):
          raise _BadRequest("the body must be a JSON object")
        k = body.get("k", 10)
        if not isinstance(k, int) or isinstance(k, bool):
          raise _BadRequest(f"k must be an integer, got {k!r}")
        if ("query" in body) == ("image" in body):
          raise _BadRequest("send either 'query' (a generated query's name) or 'image' "
                            "(base64 PNG/JPEG) with 'prompt'")
        with lock:
          if "query" in body:
            result = service.search(service.named_query(str(body["query"])), k)
            result["query"] = body["query"]
          else:
            try:
              data = base64.b64decode(body["image"], validate=True)
            except (binascii.Error, TypeError) as e:
              raise _BadRequest(f"'image' is not base64 ({e})") from e
            result = service.search_image(service_lib.decode_image(data),
                                          str(body.get("prompt", "")), k)
        self._json(200, result)
      self._guard(handle)

  return Handler


def make_server(service: service_lib.Service, host: str = "127.0.0.1",
                port: int = 0) -> http_server.ThreadingHTTPServer:
  """A ThreadingHTTPServer for `service` (port 0: any free port; see .server_address)."""
  return http_server.ThreadingHTTPServer((host, port), make_handler(service))


_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
_PORT = flags.DEFINE_integer("port", 8019, "Port (0: any free port).")


def main(argv):
  del argv
  from launch import common  # pylint: disable=g-import-not-at-top
  common.start()
  service = service_lib.from_workdir(_CONFIG.value, _WORKDIR.value, log=common.log)
  httpd = make_server(service, _HOST.value, _PORT.value)
  host, port = httpd.server_address[:2]
  common.log(f"serve: http://{host}:{port}/")
  httpd.serve_forever()


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
