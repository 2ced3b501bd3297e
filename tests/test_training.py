"""Training: sharded == unsharded, interrupted + resumed == uninterrupted, exclusions never read."""
import jax
import numpy as np
import pytest

from attrib_jax import parallel
from attrib_jax.diffusion import NoiseSchedule
from attrib_jax.diffusion import loss as loss_lib
from attrib_jax.models import unet as unet_lib
from attrib_jax.training import input_pipeline
from attrib_jax.training import loop
from attrib_jax.training import trainer

UNET = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
            block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4,
            cross_attention_dim=8, norm_num_groups=4)
SCHEDULE = NoiseSchedule.from_config({"_class_name": "DDPMScheduler", "num_train_timesteps": 100,
                                      "beta_schedule": "linear"})


def _arrays(n=24, rng=np.random.default_rng(0)):
  return {"latents": rng.normal(size=(n, 2, 8, 8, 3)).astype(np.float32),
          "text_states": rng.normal(size=(n, 2, 4, 8)).astype(np.float32),
          "num_captions": rng.integers(1, 3, size=n).astype(np.int32),
          "index": np.arange(100, 100 + n), "null_text_states": np.zeros((4, 8), np.float32)}


@pytest.fixture(scope="module")
def model():
  module, params = unet_lib.init_unet(UNET, jax.random.key(0))
  return (lambda p, x, t, c: module.apply({"params": p}, x, t, c)), params


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_sharded_step_equals_unsharded(model):
  apply_fn, params = model
  arrays = _arrays()
  batch = input_pipeline.gather({k: arrays[k] for k in ("latents", "text_states", "num_captions")},
                                np.arange(16))
  optimizer = trainer.make_optimizer(1e-2, 0, 0.01)
  results = []
  for mesh in (None, parallel.make_mesh(8)):
    state = trainer.init_state(params, optimizer, seed=3, use_ema=True)
    step = trainer.make_train_step(apply_fn, SCHEDULE, optimizer, ema_decay=0.9, mesh=mesh)
    data = batch if mesh is None else parallel.shard_batch(batch, mesh)
    for _ in range(2):
      state, metrics = step(state, data, arrays["null_text_states"])
    results.append(jax.device_get(state))
  assert _max_diff(results[0].params, params) > 1e-4  # the step did move the weights
  assert _max_diff(results[0].params, results[1].params) <= 1e-5
  assert _max_diff(results[0].ema_params, results[1].ema_params) <= 1e-5


def test_resume_equals_uninterrupted(model, tmp_path):
  apply_fn, params = model
  kwargs = dict(arrays=_arrays(), apply_fn=apply_fn, init_params=params, schedule=SCHEDULE,
                settings=loop.TrainSettings(num_steps=6, batch_size=8, learning_rate=1e-2,
                                            seed=1, checkpoint_every=2),
                log=lambda _: None, mesh=parallel.make_mesh(2))
  full = loop.train(workdir=str(tmp_path / "full"), **kwargs)
  loop.train(workdir=str(tmp_path / "cut"), stop_after=3, **kwargs)   # "interrupted" at 3
  resumed = loop.train(workdir=str(tmp_path / "cut"), **kwargs)
  assert int(resumed.step) == 6
  assert _max_diff(full.params, resumed.params) == 0.0
  assert _max_diff(full.opt_state, resumed.opt_state) == 0.0


def test_model_key_reuses_the_jitted_step_with_the_same_result(model, tmp_path):
  """Retraining with a model_key traces the step once; the parameters are those of fresh steps."""
  module_apply, params = model
  traces = []

  def apply_fn(p, x, t, c):
    traces.append(1)  # runs at trace time only
    return module_apply(p, x, t, c)

  kwargs = dict(arrays=_arrays(), apply_fn=apply_fn, init_params=params, schedule=SCHEDULE,
                settings=loop.TrainSettings(num_steps=3, batch_size=8, learning_rate=1e-2,
                                            seed=1, checkpoint_every=3),
                log=lambda _: None, mesh=parallel.make_mesh(2))
  key = "test-model-key"
  loop.train(workdir=str(tmp_path / "a"), model_key=key, **kwargs)
  traced_once = len(traces)
  reused = loop.train(workdir=str(tmp_path / "b"), model_key=key, excluded=[101, 105], **kwargs)
  assert traced_once > 0 and len(traces) == traced_once
  fresh = loop.train(workdir=str(tmp_path / "c"), excluded=[101, 105], **kwargs)
  assert len(traces) > traced_once
  assert _max_diff(reused.params, fresh.params) == 0.0


class _Spy:
  """An array that records which rows were read."""

  def __init__(self, array):
    self.array, self.rows = array, set()
    self.shape = array.shape

  def __getitem__(self, rows):
    self.rows.update(np.atleast_1d(np.arange(len(self.array))[rows]).tolist())
    return self.array[rows]

  def __len__(self):
    return len(self.array)


def test_excluded_items_are_never_read(model, tmp_path):
  apply_fn, params = model
  arrays = _arrays()
  spies = {k: _Spy(arrays[k]) for k in ("latents", "text_states", "num_captions")}
  excluded = [100, 105, 117, 123]          # dataset indices, i.e. rows 0, 5, 17, 23
  loop.train(arrays=dict(arrays, **spies), apply_fn=apply_fn, init_params=params,
             schedule=SCHEDULE, workdir=str(tmp_path),
             settings=loop.TrainSettings(num_steps=8, batch_size=8, learning_rate=1e-3),
             excluded=excluded, log=lambda _: None,
             mesh=parallel.make_mesh(1))
  for spy in spies.values():
    assert spy.rows == set(range(24)) - {0, 5, 17, 23}   # 8 steps x 8 = 64 > 20: all others read


def test_batches_are_a_function_of_the_step():
  rows = input_pipeline.allowed_rows(np.arange(10), excluded=[3])
  stream = np.concatenate([input_pipeline.batch_rows(rows, 0, s, 4) for s in range(9)])
  for epoch in range(3):  # 36 draws = 4 full epochs of 9: each a permutation of the allowed rows
    assert sorted(stream[epoch * 9:(epoch + 1) * 9]) == sorted(rows)
  np.testing.assert_array_equal(input_pipeline.batch_rows(rows, 0, 5, 4), stream[20:24])
  with pytest.raises(ValueError, match="not in the dataset: \\[42\\]"):
    input_pipeline.allowed_rows(np.arange(10), excluded=[42])
  with pytest.raises(ValueError, match="Every training item is excluded"):
    input_pipeline.allowed_rows(np.arange(2), excluded=[0, 1])


def test_excluded_file(tmp_path):
  path = tmp_path / "excluded.txt"
  path.write_text("# top-10 of query 3\n5\n\n7  # why\n")
  np.testing.assert_array_equal(input_pipeline.read_excluded_file(str(path)), [5, 7])
  path.write_text("5\nfive\n")
  with pytest.raises(ValueError, match="excluded.txt:2: not an integer"):
    input_pipeline.read_excluded_file(str(path))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_give_every_target_the_same_x0_weight(prediction_type):
  """Per unit of x0 error every target ends up weighted min(SNR, γ) (float64 reference)."""
  schedule = NoiseSchedule.from_config({"num_train_timesteps": 1000,
                                        "beta_schedule": "squaredcos_cap_v2",
                                        "prediction_type": prediction_type})
  t = np.array([0, 10, 200, 500, 800, 999])
  weights = np.asarray(loss_lib.min_snr_weights(schedule, t, 5.0), np.float64)
  a = np.asarray(schedule.alphas_cumprod, np.float64)[t]
  snr = a / (1 - a)
  # The x0 error's weight inside each loss: ε loss = SNR · x0 loss, v loss = (SNR + 1) · x0 loss.
  per_x0 = {"epsilon": snr, "v_prediction": snr + 1, "sample": np.ones_like(snr)}
  np.testing.assert_allclose(weights * per_x0[prediction_type], np.minimum(snr, 5.0), rtol=1e-4)


def test_cosine_learning_rate_warms_up_then_decays_to_zero():
  optimizer = trainer.make_optimizer(1e-2, warmup_steps=10, weight_decay=0.0,
                                     grad_clip_norm=None, lr_schedule="cosine", num_steps=110)
  params = {"w": np.zeros(3, np.float32)}
  state = optimizer.init(params)
  grads = {"w": np.ones(3, np.float32)}
  steps = []
  for _ in range(110):
    updates, state = optimizer.update(grads, state, params)
    steps.append(float(abs(updates["w"][0])))
  # Adam's first steps move by ~lr: the rate ramps up, peaks after the warm-up, ends near 0.
  assert steps[0] < steps[5] < steps[9] and max(steps) == pytest.approx(1e-2, rel=0.05)
  assert steps[-1] < 1e-4 and steps[60] < steps[20]
  with pytest.raises(ValueError, match="lr_schedule"):
    trainer.make_optimizer(1e-3, 10, 0.0, lr_schedule="exponential")
  with pytest.raises(ValueError, match="num_steps"):
    trainer.make_optimizer(1e-3, 10, 0.0, lr_schedule="cosine", num_steps=5)


def test_leave_k_out_batches_are_the_full_runs_with_the_excluded_rows_dropped():
  """Common random numbers for retraining: the same stream, minus the excluded rows."""
  full = input_pipeline.allowed_rows(np.arange(12))
  kept = input_pipeline.allowed_rows(np.arange(12), excluded=[2, 7])
  stream = lambda rows, steps: np.concatenate(
      [input_pipeline.batch_rows(rows, 3, s, 5, num_rows=12) for s in range(steps)])
  full_stream, kept_stream = stream(full, 12), stream(kept, 10)   # 5 epochs of each
  # Without exclusions the stream is the plain per-epoch permutation.
  np.testing.assert_array_equal(
      full_stream, np.concatenate([input_pipeline.batch_rows(full, 3, s, 5) for s in range(12)]))
  for epoch in range(5):
    whole = full_stream[epoch * 12:(epoch + 1) * 12]
    np.testing.assert_array_equal(kept_stream[epoch * 10:(epoch + 1) * 10],
                                  whole[~np.isin(whole, [2, 7])])


def test_dataset_kind_names_its_builder_or_is_an_error():
  import importlib  # pylint: disable=g-import-not-at-top
  from attrib_jax.data import tiny_world  # pylint: disable=g-import-not-at-top
  from attrib_jax.training import recipe  # pylint: disable=g-import-not-at-top
  config = importlib.import_module("configs.tiny").get_config("smoke")
  assert recipe.dataset_version(config) == str(tiny_world.TinyWorld.VERSION)
  config.world.kind = "tiny_wrold"
  with pytest.raises(ValueError, match="unknown dataset 'tiny_wrold'"):
    recipe.dataset_version(config)
  with pytest.raises(ValueError, match="unknown dataset 'tiny_wrold'"):
    recipe.open_dataset(config, "/nonexistent")
