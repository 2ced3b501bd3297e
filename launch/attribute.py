r"""Attribution by Unlearning for generated queries (or any image + prompt).

  python -m launch.attribute --config=configs/tiny.py --workdir=runs/tiny
  python -m launch.attribute --config=configs/tiny.py --workdir=runs/tiny \
      --image=photo.png --prompt="a red circle"      # a query from an image
  python -m launch.attribute --config=configs/tiny.py --workdir=runs/tiny \
      --config.attribution.unlearn.num_draws=4000    # any setting, as an override
  python -m launch.attribute --config=configs/tiny.py --workdir=runs/tiny \
      --config.attribution.preconditioner=fisher     # AbU instead of the config's choice
  python -m launch.attribute --config=configs/tiny.py --workdir=runs/tiny \
      --region=0,0,16,32        # local attribution: the left half of each query only

Reads workdir/model, workdir/precomputed and workdir/queries; writes workdir/attribution/
(AbU, preconditioner "fisher") or workdir/attribution_plus/ (AbU+, "ekfac"): <query>/result.npz|
json, <query>/topk.png, report.html, summary.json. The preconditioner (fisher.npz, ekfac.npz)
and the pre losses (pre_losses.npz) are kept in workdir/attribution/ for both. Finished queries
are kept; an interrupted sweep resumes. With --region each query's result goes to
<query>.region-x0-y0-x1-y1/ and the report to report.region-x0-y0-x1-y1.html.
"""
import os

from absl import app
from absl import flags
import numpy as np
from ml_collections import config_flags
from PIL import Image

from attrib_jax import generation
from attrib_jax import parallel
from attrib_jax.attribution import region as region_lib
from attrib_jax.attribution import runner
from attrib_jax import baselines
from attrib_jax.data import precompute
from attrib_jax.training import recipe
from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_QUERIES = flags.DEFINE_multi_string("query", [], "Query directories (default: all of "
                                     "workdir/queries).")
_IMAGE = flags.DEFINE_string("image", None, "Attribute this image (with --prompt) instead.")
_PROMPT = flags.DEFINE_string("prompt", None, "The prompt of --image.")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 0, "Devices of the mesh (0: all).")
_REGION = flags.DEFINE_string(
    "region", None, "x0,y0,x1,y1: attribute only this pixel box [x0, x1) x [y0, y1) of each "
    "query image (local attribution: the unlearning loss covers the box's latent cells).")
flags.mark_flags_as_required(["config", "workdir"])


def parse_region(text: str | None, query_dirs) -> region_lib.Region | None:
  """--region's box, checked against every query image before any work starts."""
  if text is None:
    return None
  try:
    region = region_lib.Region.parse(text)
    for directory in query_dirs:
      region.check(generation.load_query(directory).image.shape[:2])
  except ValueError as e:
    raise ValueError(f"--region={text}: {e}") from None
  return region


def main(argv):
  del argv
  common.start()
  config, workdir = _CONFIG.value, _WORKDIR.value
  parse_region(_REGION.value, [])   # a malformed box fails before the model loads
  pipe = common.load_trained_pipeline(workdir, config)
  arrays = precompute.load(os.path.join(workdir, "precomputed"))
  source = recipe.open_dataset(config, os.path.join(workdir, "tfds"))
  settings = runner.AbUSettings.from_config(config.attribution)
  out_dir, cache_dir = runner.workdir_dirs(workdir, settings)

  query_dirs = list(_QUERIES.value)
  if _IMAGE.value:
    if not _PROMPT.value:
      raise ValueError("--image needs --prompt")
    image = np.asarray(Image.open(_IMAGE.value).convert("RGB"))
    name = os.path.splitext(os.path.basename(_IMAGE.value))[0]
    query_dirs = [os.path.join(workdir, "queries_from_images", name)]
    query = generation.query_from_image(pipe, image, _PROMPT.value)
    if parallel.is_main_process():
      generation.save_query(query_dirs[0], query)
    parallel.barrier("attribute: query saved")
  if not query_dirs:
    query_dirs = generation.list_queries(os.path.join(workdir, "queries"))
  if not query_dirs:
    raise FileNotFoundError(f"No queries in {workdir}/queries: run launch.generate first")
  region = parse_region(_REGION.value, query_dirs)

  abu = runner.AbU(pipe.apply_unet, pipe.unet_params, arrays, pipe.schedule, settings, out_dir,
                   cache_dir=cache_dir,
                   mesh=parallel.make_mesh(_NUM_DEVICES.value or None), log=common.log)
  images_of = lambda indices: source.get_items(np.asarray(indices))[0]
  # Reported beside AbU: pixel-space nearest neighbours (the papers' weakest real baseline) and
  # the two text-only baselines, which show how much of a benchmark caption lookup solves.
  _, captions, _ = source.get_items(np.asarray(abu.index))
  context = baselines.Context(arrays=arrays, images=images_of(abu.index), captions=captions)
  baselines_to_report = {
      name: (lambda q, method=baselines.make_method(name): method.score(q, context))
      for name in ("pixel", "caption", "caption-words")}
  summary = runner.attribute_queries(abu, query_dirs, images_of,
                                     top_k=config.attribution_top_k,
                                     baselines=baselines_to_report, region=region)
  recall = ", ".join(f"{m} {r:.2f}" for m, r in summary.get("mean_recall@10", {}).items())
  common.log(f"attribute: {summary['num_queries']} queries, "
             f"{summary.get('mean_seconds_per_query', 0):.1f} s each; mean Recall@10 over the "
             f"{summary.get('num_with_ground_truth', 0)} with ground truth: {recall or 'n/a'}")
  report_name = "report.html" if region is None else f"report.{region.key}.html"
  common.log(f"attribute: report at {os.path.join(out_dir, report_name)}")


if __name__ == "__main__":
  app.run(main)
