"""Forward throughput of our Flax UNet vs diffusers' PyTorch UNet on this machine's CPU.

Both models hold the same weights: a seeded random diffusers UNet is saved as a diffusers
directory and read back by `attrib_jax.models.unet.load_unet`. Each side gets its natural layout
(PyTorch NCHW, ours NHWC) and the same batch; inputs are made once, outside the timed region.
Ours is `jax.jit`-compiled (compile time excluded, reported separately); PyTorch runs under
`torch.inference_mode()` with as many intra-op threads as the machine has cores.

The two sides alternate single forwards after a warm-up; reported are the median and the best
forward of each (samples/s) and the ratios ours / PyTorch. On a CPU shared with other jobs the
best-of-N is the better estimate of each side's own speed (load only ever adds time), and the
median shows the typical case.
No XLA flags are set: this is how a user runs it. The machine's load average (other processes)
is printed beside the figures: on a shared CPU PyTorch's OpenMP threads slow down far more than
XLA's, so only figures taken at a low load compare the two implementations themselves.

--bf16 runs ours with bfloat16 computation (float32 parameters; norm statistics and softmax in
float32). On x86 CPUs XLA upcasts bfloat16 matmuls and convolutions to float32, so expect no
speed-up there; the option is for accelerators and for checking the bf16 path.
--torch_bf16 casts the PyTorch model and inputs to bfloat16 as well.

  python benchmarks/unet_forward.py                 # MSCOCO config at batch 32 + a tiny one
  python benchmarks/unet_forward.py --quick         # 1 warm-up, 3 repeats
  python benchmarks/unet_forward.py --config mscoco --bf16
  taskset -c 0 python benchmarks/unet_forward.py --threads 1   # one core each
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from attrib_jax.models import unet

# SPEC §1: the latent-diffusion UNet the attribution papers train on MSCOCO (57.4M params).
MSCOCO = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[128, 256, 256, 256],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    attention_head_dim=8, cross_attention_dim=1024)
# A small model of the same family (16x16 latents), for the per-op overhead regime.
TINY = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=[32, 64, 64], norm_num_groups=8,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    attention_head_dim=4, cross_attention_dim=64)
CONFIGS = {"mscoco": (MSCOCO, 32, 77), "tiny": (TINY, 32, 77)}


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def _load() -> str:
  try:
    return "load average %.2f %.2f %.2f" % os.getloadavg()
  except OSError:
    return "load average unknown"


def run(name: str, batch: int, args: argparse.Namespace) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DConditionModel as TorchUNet  # pylint: disable=g-import-not-at-top
  config, default_batch, seq = CONFIGS[name]
  batch = batch or default_batch
  torch.manual_seed(0)
  torch_model = TorchUNet(**config).eval()
  n_params = sum(p.numel() for p in torch_model.parameters())
  with tempfile.TemporaryDirectory() as directory:
    torch_model.save_pretrained(directory)
    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    module, params, _ = unet.load_unet(directory, dtype=dtype)
  if args.torch_bf16:
    torch_model = torch_model.to(torch.bfloat16)
  torch_dtype = torch.bfloat16 if args.torch_bf16 else torch.float32

  rng = np.random.default_rng(0)
  side = config["sample_size"]
  x = rng.standard_normal((batch, config["in_channels"], side, side), np.float32)
  t = rng.integers(0, 1000, (batch,))
  context = rng.standard_normal((batch, seq, config["cross_attention_dim"]), np.float32)

  torch.set_num_threads(args.threads or os.cpu_count())
  tx, tt, tc = (torch.from_numpy(x).to(torch_dtype), torch.from_numpy(t),
                torch.from_numpy(context).to(torch_dtype))

  def torch_forward():
    with torch.inference_mode():
      return torch_model(tx, tt, tc).sample

  forward = jax.jit(module.apply)
  jx = jax.device_put(x.transpose(0, 2, 3, 1))
  jt, jc = jax.device_put(t.astype(np.int32)), jax.device_put(context)
  ours_forward = lambda: forward({"params": params}, jx, jt, jc).block_until_ready()

  start = time.perf_counter()
  ours_forward()
  compile_s = time.perf_counter() - start
  for _ in range(args.warmup):
    ours_forward()
    torch_forward()
  # Alternate single forwards, so that load from other processes hits both sides alike.
  ours_t, torch_t = [], []
  for _ in range(args.repeats):
    ours_t.append(_timed(ours_forward))
    torch_t.append(_timed(torch_forward))
  ours_s, torch_s = statistics.median(ours_t), statistics.median(torch_t)
  ours_best, torch_best = min(ours_t), min(torch_t)

  ours_out = np.asarray(forward({"params": params}, jx, jt, jc))
  ref = torch_forward().float().numpy().transpose(0, 2, 3, 1)
  err = np.abs(ours_out - ref).max() / np.abs(ref).max()

  print(f"== {name}: {n_params / 1e6:.1f}M params, batch {batch}, "
        f"{side}x{side}x{config['in_channels']} latents, context {seq}x"
        f"{config['cross_attention_dim']}; {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}; {_load()}")
  print(f"   ours  ({'bf16' if args.bf16 else 'fp32'}, jit): median {ours_s * 1e3:8.1f} ms "
        f"= {batch / ours_s:7.1f} samples/s; best {batch / ours_best:7.1f} samples/s "
        f"(compile {compile_s:.1f} s)")
  print(f"   torch ({'bf16' if args.torch_bf16 else 'fp32'}, inference_mode): median "
        f"{torch_s * 1e3:8.1f} ms = {batch / torch_s:7.1f} samples/s; best "
        f"{batch / torch_best:7.1f} samples/s")
  print(f"   ratio ours/torch: {torch_s / ours_s:.2f}x median, {torch_best / ours_best:.2f}x "
        f"best   (max |diff| / max |torch| = {err:.1e}; {len(ours_t)} alternating repeats)")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", choices=["all", *CONFIGS], default="all")
  parser.add_argument("--batch", type=int, default=0, help="0: 32")
  parser.add_argument("--bf16", action="store_true", help="ours computes in bfloat16")
  parser.add_argument("--torch_bf16", action="store_true", help="PyTorch in bfloat16 too")
  parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
  parser.add_argument("--quick", action="store_true", help="1 warm-up, 3 repeats")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=10, help="timed forwards per side")
  args = parser.parse_args()
  if args.quick:
    args.warmup, args.repeats = 1, 3
  for name in (CONFIGS if args.config == "all" else [args.config]):
    run(name, args.batch, args)


if __name__ == "__main__":
  main()
