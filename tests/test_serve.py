"""launch.serve's JSON API on a real ThreadingHTTPServer (port 0, in a thread), queried with
urllib, over a small synthetic service: random training images, a real (untrained) student,
an exact index. The workdir wiring (`service.from_workdir`) runs in the page check."""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from attrib_jax import generation
from attrib_jax.distill import index as index_lib
from attrib_jax.distill import service as service_lib
from attrib_jax.distill import student as student_lib
from launch import serve

N, SIDE = 40, 8


def _features(queries):
  """Mean colour and prompt length: enough to make different queries rank differently."""
  return np.stack([np.concatenate([q.image.reshape(-1, 3).mean(0) / 255.0,
                                   [len(q.info.get("prompt", "")) / 10.0]])
                   for q in queries]).astype(np.float32)


def _make_query(image, prompt):
  return generation.Query(np.asarray(image, np.float32) / 127.5 - 1, np.zeros((2, 4), np.float32),
                          np.asarray(image, np.uint8), {"prompt": prompt})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (N, SIDE, SIDE, 3), dtype=np.uint8)
  captions = [[f"item {i} caption"] for i in range(N)]
  item_queries = [_make_query(im, c[0]) for im, c in zip(images, captions)]
  settings = student_lib.StudentSettings(hidden=(8,), out_dim=6, dropout=0.0)
  params = student_lib.init_params(settings, 4)
  item_emb = student_lib.embed(settings, params, _features(item_queries))
  root = tmp_path_factory.mktemp("queries")
  named = {}
  for name, prompt in (("red_one", "a red thing"), ("blue_one", "a blue thing")):
    generation.save_query(str(root / name), _make_query(images[3 if name == "red_one" else 7],
                                                        prompt))
    named[name] = str(root / name)
  service = service_lib.Service(
      settings, params, index_lib.ExactIndex(item_emb), make_query=_make_query,
      query_features=_features, images=lambda rows: images[rows], captions=captions,
      dataset_index=np.arange(100, 100 + N), named_queries=named, image_size=(SIDE, SIDE))
  httpd = serve.make_server(service, port=0)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{httpd.server_address[1]}", service, images
  httpd.shutdown()
  httpd.server_close()


def _get(url):
  with urllib.request.urlopen(url, timeout=30) as r:
    return r.status, r.headers["Content-Type"], r.read()


def _post(url, body):
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=30) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def test_health_page_and_query_list(server):
  url, _, _ = server
  status, kind, body = _get(url + "/api/health")
  health = json.loads(body)
  assert status == 200 and kind == "application/json"
  assert health["ok"] and health["items"] == N and health["index"] == "exact"
  status, kind, body = _get(url + "/")
  assert status == 200 and kind.startswith("text/html") and b"/api/query" in body
  assert b"higher = more influential" in body and b"lower = more influential" not in body
  assert json.loads(_get(url + "/api/queries")[2]) == [
      {"name": "blue_one", "prompt": "a blue thing"}, {"name": "red_one", "prompt": "a red thing"}]


def test_query_by_name_matches_the_service_and_the_student(server):
  url, service, images = server
  status, result = _post(url + "/api/query", {"query": "red_one", "k": 5})
  assert status == 200 and result["k"] == 5 and result["query"] == "red_one"
  items = result["items"]
  assert [it["rank"] for it in items] == [1, 2, 3, 4, 5]
  # Served scores: higher = more influential, so they fall down the list.
  assert all(a["score"] >= b["score"] - 1e-6 for a, b in zip(items, items[1:]))
  # The same top-5 as the student's own full ranking (exact index), the score its logit negated.
  query = service.named_query("red_one")
  emb_q = student_lib.embed(service.student_settings, service.params, _features([query]))
  emb_z = service.index.db
  expected = student_lib.rank_items(service.params, emb_q, emb_z)[0][:5]
  assert [it["row"] for it in items] == expected.tolist()
  s = student_lib.scores(service.params, emb_q, emb_z)[0]
  np.testing.assert_allclose([it["score"] for it in items], -s[expected], rtol=1e-5)
  np.testing.assert_allclose([it["rank_fraction"] for it in items],
                             1 / (1 + np.exp(-s[expected])), rtol=1e-5)
  assert items[0]["index"] == 100 + items[0]["row"]
  assert items[0]["captions"] == [f"item {items[0]['row']} caption"]
  status, kind, png = _get(url + items[0]["thumbnail"])
  assert status == 200 and kind == "image/png"
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), images[items[0]["row"]])
  assert _get(url + "/query_image/red_one.png")[0] == 200


def test_query_by_uploaded_image(server):
  url, service, images = server
  buffer = io.BytesIO()
  Image.fromarray(images[3]).save(buffer, format="PNG")
  body = {"image": base64.b64encode(buffer.getvalue()).decode(), "prompt": "a red thing",
          "k": 7}
  status, result = _post(url + "/api/query", body)
  assert status == 200 and len(result["items"]) == 7 and result["prompt"] == "a red thing"
  # Same image and prompt as the named query red_one: the same answer.
  _, named = _post(url + "/api/query", {"query": "red_one", "k": 7})
  assert [it["row"] for it in result["items"]] == [it["row"] for it in named["items"]]
  assert set(result["ms"]) == {"features", "embed", "search", "total"}
  # A larger upload is resized to the model's size rather than refused.
  big = io.BytesIO()
  Image.fromarray(images[3]).resize((32, 32)).save(big, format="PNG")
  status, _ = _post(url + "/api/query", {"image": base64.b64encode(big.getvalue()).decode(),
                                         "prompt": "a red thing"})
  assert status == 200


@pytest.mark.parametrize("body,status,message", [
    ({"query": "nope"}, 404, "no generated query named 'nope'"),
    ({"image": "***", "prompt": "x"}, 400, "not base64"),
    ({"image": base64.b64encode(b"not a png").decode(), "prompt": "x"}, 400,
     "could not be decoded"),
    ({"image": "", "prompt": ""}, 400, "could not be decoded"),
    ({}, 400, "send either"),
    ({"query": "red_one", "image": "x"}, 400, "send either"),
    ({"query": "red_one", "k": "5"}, 400, "k must be an integer"),
    ({"query": "red_one", "k": 0}, 400, "k must be positive"),
    (b"{not json", 400, "not JSON"),
])
def test_errors_are_json(server, body, status, message):
  url, _, _ = server
  got_status, got = _post(url + "/api/query", body)
  assert got_status == status and message in got["error"], got


def test_missing_prompt_and_unknown_paths(server):
  url, _, images = server
  buffer = io.BytesIO()
  Image.fromarray(images[0]).save(buffer, format="PNG")
  status, got = _post(url + "/api/query",
                      {"image": base64.b64encode(buffer.getvalue()).decode()})
  assert status == 400 and "needs its prompt" in got["error"]
  with pytest.raises(urllib.error.HTTPError) as e:
    _get(url + "/thumb/999.png")
  assert e.value.code == 404
  with pytest.raises(urllib.error.HTTPError) as e:
    _get(url + "/nothing")
  assert e.value.code == 404


@pytest.mark.parametrize("scale", [-3.0, 2.5])
def test_served_score_grows_with_influence_for_either_sign_of_the_scale(server, scale):
  """Whatever sign training gives the scale, the served list is the student's own ranking
  (ascending scale·cos + bias over every item), and its score rises with influence."""
  _, service, _ = server
  params = dict(service.params, scale=np.float32(scale), bias=np.float32(0.4))
  signed = dataclasses.replace(service, params=params)
  query = service.named_query("blue_one")
  result = signed.search(query, N)              # the whole list: every item, once
  rows = [it["row"] for it in result["items"]]
  emb_q = student_lib.embed(service.student_settings, params, _features([query]))
  logit = student_lib.scores(params, emb_q, service.index.db)[0]
  # Cosines between random untrained embeddings are distinct, so the order is unambiguous.
  assert rows == np.argsort(logit, kind="stable").tolist()
  served = np.array([it["score"] for it in result["items"]])
  assert np.all(np.diff(served) <= 1e-6) and served[0] > served[-1]
  np.testing.assert_allclose(served, -logit[rows], rtol=1e-5, atol=1e-6)
  # The most influential item has the largest cosine when the scale is negative, the smallest
  # when it is positive: the sign is folded into the query, not lost.
  cos = np.array([it["cosine"] for it in result["items"]])
  assert (cos[0] > cos[-1]) == (scale < 0)
