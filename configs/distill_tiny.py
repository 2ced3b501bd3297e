r"""FastGDA on the tiny world: AbU+ rankings distilled into an embedding and a ScaNN index.

  python -m launch.train    --config=configs/distill_tiny.py --workdir=runs/tiny
  python -m launch.generate --config=configs/distill_tiny.py --workdir=runs/tiny  # test queries
  python -m launch.distill  --config=configs/distill_tiny.py --workdir=runs/tiny
  python -m launch.serve    --config=configs/distill_tiny.py --workdir=runs/tiny
  # seconds-long variant (tests):
  python -m launch.distill --config=configs/distill_tiny.py:smoke --workdir=/tmp/smoke

Everything but `distill` is configs/tiny.py (same model, same AbU+ teacher). Input features:
no DINO / CLIP towers exist in this world yet, so the student reads the trained UNet's own
bottleneck features of the image (mid_block, flattened, 192-d) ⊕ the frozen text tower's
token-averaged states of the caption / prompt (64-d), each L2-normalised
(attrib_jax/distill/teacher.py). Candidates: a training query's C nearest items by the image
feature, C = 100 of 1,000 (the paper's 10,000 of 118,287 is 8.5 %; 10 % here). Training
queries are fresh scenes of their own seeds, never a test prompt.
"""
import ml_collections

try:
  from configs import tiny
except ModuleNotFoundError as error:
  if error.name != "configs":   # loaded by path from outside the repository root
    raise
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  _spec = importlib.util.spec_from_file_location(
      "configs_tiny", os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))
  tiny = importlib.util.module_from_spec(_spec)
  _spec.loader.exec_module(tiny)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  if variant not in ("default", "smoke"):
    raise ValueError(f"configs/distill_tiny.py: unknown variant {variant!r} (default, smoke)")
  smoke = variant == "smoke"
  # The demo recipe (500 items, 4,000 steps): the default's 13,000 steps leave too little of a
  # shared 2-core machine's hour for the teacher, whose cost grows with the world's size.
  c = tiny.get_config("smoke" if smoke else "demo")
  if not smoke:
    # Enough test queries for a meaningful standard error (the demo keeps one per concept).
    c.generate.queries_per_rare_concept = 2
    c.generate.num_common_queries = 10
  c.name = f"distill-tiny-{variant}"
  c.distill = ml_collections.ConfigDict(dict(
      stages=("queries", "teacher", "test", "train", "index", "eval"),
      num_train_queries=6 if smoke else 300,
      num_candidates=16 if smoke else 50,
      candidates_by="image",         # "image_text": nearest by image ⊕ text feature;
                                     # "caption-words": the top by the words baseline
      query_seed=19,                 # the training queries' scene stream and sampling seeds
      prompts=(),                    # other worlds: the training queries' prompts
      features=dict(layer="mid_block", timestep=100, pool="flatten"),
      student=dict(hidden=(16, 16) if smoke else (256, 256, 256),
                   out_dim=16 if smoke else 256, dropout=0.1, learning_rate=1e-3,
                   weight_decay=0.01, batch_size=32 if smoke else 1024,
                   num_epochs=2 if smoke else 60, outlier_prob=0.1, loss="rank", seed=0),
      regression_baseline=True,      # also train the score-regression student (eval only)
      index=dict(kind="scann", num_leaves=0, leaves_to_search=0, reorder=0,
                 k=16 if smoke else 100),
      paper_l=(500, 1000, 4000)))    # mAP(L) at these L scaled from 118,287 to this world
  return c
