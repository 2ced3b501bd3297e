"""bf16 matmuls with float32 accumulation for any network: the sweep's `compute_dtype` opt-in.

`bf16_matmuls(fn)` runs `fn` with every matrix product and convolution (`dot_general`,
`conv_general_dilated`) taking its float32 operands rounded to bfloat16 and accumulating and
returning float32 (`preferred_element_type`), the tensor-core mode of GPUs and TPUs. Everything
else (normalisations, softmax, residual sums, the loss) stays float32. It works on the network's
jaxpr, so it needs nothing from the network's code (the UNet's own `dtype` would also store the
activations between layers in bf16); it differentiates (`jax.jvp`, `jax.grad`) like any JAX
function.

Why not `jax.default_matmul_precision`: XLA:CPU ignores it (float32 products stay exact), so
what it does could not be tested on a CPU, and on GPUs "default" means TF32, not bf16. The
rounding here is explicit, so the CPU computes the very numbers an accelerator does, up to the
order of the float32 sums.

Which sweep methods may use it is sweep.py's business (only "jvp": see its module doc).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

COMPUTE_DTYPES = ("float32", "bfloat16")
_MATMULS = ("dot_general", "conv_general_dilated")
# Call-like primitives whose one sub-jaxpr takes exactly the equation's operands: inlined (with
# the rewrite) when they contain a matmul. Custom derivative rules inside them are dropped then;
# JAX differentiates the inlined computation instead (only calls holding matmuls are affected,
# e.g. not softmax or GELU).
_INLINE = ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
           "custom_vjp_call_jaxpr", "remat", "checkpoint")


def check_compute_dtype(name: str, value: str) -> None:
  if value not in COMPUTE_DTYPES:
    raise ValueError(f"{name}: compute_dtype must be one of {COMPUTE_DTYPES}, got {value!r}")


def _sub_jaxprs(params: dict) -> list:
  found = []
  for value in params.values():
    for sub in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(sub, (jcore.ClosedJaxpr, jcore.Jaxpr)):
        found.append(sub)
  return found


def _open(sub) -> tuple[Any, Sequence[Any]]:
  return (sub.jaxpr, sub.consts) if isinstance(sub, jcore.ClosedJaxpr) else (sub, ())


def _has_matmul(jaxpr) -> bool:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in _MATMULS:
      return True
    if any(_has_matmul(_open(sub)[0]) for sub in _sub_jaxprs(eqn.params)):
      return True
  return False


def _matmul(eqn, operands: list) -> jax.Array:
  out_dtype = eqn.outvars[0].aval.dtype
  if not all(np.dtype(x.dtype) == np.float32 for x in operands):
    # float64 references and integer products are left exactly as they are.
    return eqn.primitive.bind(*operands, **eqn.params)
  params = dict(eqn.params, preferred_element_type=np.dtype(np.float32))
  out = eqn.primitive.bind(*(x.astype(jnp.bfloat16) for x in operands), **params)
  return out.astype(out_dtype)


def _scan(eqn, invals: list) -> list:
  p = eqn.params
  body, body_consts = _open(p["jaxpr"])
  num_consts, num_carry = p["num_consts"], p["num_carry"]
  consts = invals[:num_consts]
  init, xs = invals[num_consts:num_consts + num_carry], invals[num_consts + num_carry:]

  def step(carry, x):
    out = _eval(body, body_consts, [*consts, *carry, *x])
    return out[:num_carry], out[num_carry:]
  carry, ys = jax.lax.scan(step, list(init), list(xs), length=p["length"],
                           reverse=p["reverse"], unroll=p["unroll"])
  return [*carry, *ys]


def _call(eqn, invals: list) -> list:
  (sub,) = _sub_jaxprs(eqn.params)
  jaxpr, consts = _open(sub)
  run = lambda *args: _eval(jaxpr, consts, list(args))
  if eqn.primitive.name in ("remat", "checkpoint"):
    # Keep the rematerialisation (its memory saving is why the network asked for it).
    run = jax.checkpoint(run, prevent_cse=eqn.params.get("prevent_cse", True),
                         policy=eqn.params.get("policy"))
  return run(*invals)


def _eval(jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list:
  env = {}
  read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
  for var, value in zip(jaxpr.constvars, consts):
    env[var] = value
  for var, value in zip(jaxpr.invars, args):
    env[var] = value
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    subs = _sub_jaxprs(eqn.params)
    if name in _MATMULS:
      outs = [_matmul(eqn, invals)]
    elif not subs or not any(_has_matmul(_open(s)[0]) for s in subs):
      with eqn.ctx.manager:
        outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
      outs = outs if eqn.primitive.multiple_results else [outs]
    elif name == "scan":
      outs = _scan(eqn, invals)
    elif name in _INLINE and len(subs) == 1 and len(_open(subs[0])[0].invars) == len(invals):
      outs = _call(eqn, invals)
    else:
      raise NotImplementedError(
          f"compute_dtype='bfloat16' cannot rewrite the matmuls inside the network's "
          f"{name!r} primitive; use compute_dtype='float32'")
    for var, value in zip(eqn.outvars, outs):
      env[var] = value
  return [read(v) for v in jaxpr.outvars]


def bf16_matmuls(fn: Callable) -> Callable:
  """`fn` with bf16-operand, float32-accumulating matmuls and convolutions (module doc)."""
  def wrapped(*args):
    closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
    out = _eval(closed.jaxpr, closed.consts, jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(shapes), out)
  return wrapped


def with_compute_dtype(fn: Callable, compute_dtype: str) -> Callable:
  """`fn` itself for "float32" (the default path is untouched), else `bf16_matmuls(fn)`."""
  check_compute_dtype("with_compute_dtype", compute_dtype)
  return fn if compute_dtype == "float32" else bf16_matmuls(fn)
