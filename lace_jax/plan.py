"""Plan mode: every jitted function a stage runs, compiled for the accelerators it is meant
for, from any machine, with no weights allocated (maxtext's train_compile, for every stage and
for GPUs too).

  python -m lace_jax.main --config=experiments/grpo_4b.py --config.plan.target=tpu:v5p:2x2x2 \\
      --workdir=/tmp/plan

Targets (`plan.target`, several comma-separated; `default` = the experiment's `plan.targets`):
  local               this machine's devices
  tpu:<topology>      compile-only TPU devices from libtpu (`pip install "lace_jax[tpu]"`), e.g.
                      tpu:v5p:2x2x2 (8 chips), tpu:v5e:4x4 (16 chips); chips v4, v5e, v5p, v6e
  cuda:<gpu>[x<n>]    compile-only NVIDIA GPUs, n on one host (`pip install "lace_jax[cuda]"`):
                      h100, h200, b200, rtx6000pro; e.g. cuda:h100x8, cuda:rtx6000pro

Functions: pretrain / sft: the train step. grpo: the rollout prefill and decode loop (one chunk
of `grpo.rollout_batch` rollouts), the log-prob pass (when `inner_updates > 1` or `kl_beta > 0`)
and the train step. eval: prefill and decode of one batch (`plan.prompt_len` prompt tokens).

Per function and device: memory split into params / optimizer state / batch / cache and XLA's
temporaries, the total against the device's memory; XLA's FLOPs and bytes; a predicted time
per call (roofline: max(FLOPs / peak, bytes / bandwidth) at the chip's dense bf16 peak) and
MFU = model FLOPs / (time x peak), model FLOPs = 2 N per token forward (N = matmul
parameters) plus attention, x3 for a training step. XLA's cost analysis counts a loop body
once: the counts of the decode loop and of the gradient-accumulation scan are multiplied by
their trip counts; inner loops (the chunked loss, flash attention) are not, so the prediction
takes the larger of XLA's and the model's FLOPs, and where XLA's are fewer the time is printed
as a lower bound (">=") and no MFU is given (it would be 100% by construction; `roofline`). Exits with status 1, naming the function and the shortfall, when
anything does not fit; the same report is written to WORKDIR/plan.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import topologies

from lace_jax import engine, kernels, sampling, sharding
from lace_jax.errors import ConfigError
from lace_jax.model import Model
from lace_jax.rl import stage as grpo_stage
from lace_jax.training import lm
from lace_jax.training.setup import model_configs
from lace_jax.training.trainer import Trainer

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator: memory per device (bytes), dense bf16 peak (FLOP/s), memory bandwidth
  (bytes/s); None where unknown (no time prediction)."""

  name: str
  platform: str  # cpu | gpu | tpu
  memory: float
  peak_flops: float | None
  bandwidth: float | None


# Public figures per chip (Google Cloud TPU system architecture pages)
TPU_CHIPS = {
    "v4": Chip("TPU v4", "tpu", 32 * GiB, 275e12, 1228e9),
    "v5e": Chip("TPU v5e", "tpu", 16 * GiB, 197e12, 819e9),
    "v5p": Chip("TPU v5p", "tpu", 95 * GiB, 459e12, 2765e9),
    "v6e": Chip("TPU v6e", "tpu", 32 * GiB, 918e12, 1640e9),
}

# NVIDIA GPUs: the device description XLA:GPU compiles against (the fields of XLA's
# GpuTargetConfigProto; values as in openxla/xla's xla/backends/gpu/target_config/specs), and the
# dense bf16 tensor-core peak (tensor units x ops per clock x clock; the RTX PRO 6000's from
# NVIDIA's datasheet).
_HOPPER = dict(description="NVIDIA H100 80GB HBM3", cc=(9, 0), accelerated=True, cores=132,
               clock_ghz=1.98, memory=84942979072, bandwidth=3352320000000, l2=52428800,
               smem_per_core=233472, smem_optin=232448, threads_per_core=2048,
               peak_flops=989.4e12)
GPU_CHIPS = {
    "h100": _HOPPER,
    "h200": dict(_HOPPER, description="NVIDIA H200 141GB HBM3e", memory=151397597184,
                 bandwidth=4800000000000),
    "b200": dict(_HOPPER, description="NVIDIA B200", cc=(10, 0), cores=148, clock_ghz=1.965,
                 memory=191514411008, bandwidth=7672320000000, l2=132644864,
                 peak_flops=2225e12),
    "rtx6000pro": dict(description="NVIDIA RTX PRO 6000 Blackwell", cc=(12, 0),
                       accelerated=False, cores=188, clock_ghz=2.6, memory=103079215104,
                       bandwidth=1792000000000, l2=134217728, smem_per_core=131072,
                       smem_optin=101376, threads_per_core=1536, peak_flops=503.8e12),
}


def gpu_target_config(gpu: str) -> str:
  """The text-format GpuTargetConfigProto of `gpu` (a GPU_CHIPS key), for
  `jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)`."""
  g = GPU_CHIPS[gpu]
  major, minor = g["cc"]
  ext = "ACCELERATED_FEATURES" if g["accelerated"] else "NONE"
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {g["smem_per_core"]}
  threads_per_core_limit: {g["threads_per_core"]}
  core_count: {g["cores"]}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {g["bandwidth"]}
  l2_cache_size: {g["l2"]}
  clock_rate_ghz: {g["clock_ghz"]}
  device_memory_size: {g["memory"]}
  shared_memory_per_block_optin: {g["smem_optin"]}
  cuda_compute_capability {{
    major: {major}
    minor: {minor}
    feature_extension: {ext}
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 8
}}
device_description_str: "{g["description"]}"
"""


@dataclasses.dataclass
class Target:
  spec: str
  chip: Chip
  devices: list

  def describe(self) -> str:
    return f"{len(self.devices)} x {self.chip.name}"


def resolve_target(spec: str) -> Target:
  """`local`, `tpu:<topology>` or `cuda:<gpu>[x<n>]` -> compile-only (or local) devices."""
  if spec == "local":
    devices = jax.devices()
    d = devices[0]
    if d.platform == "cpu":
      memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
      chip = Chip(f"CPU ({d.device_kind})", "cpu", memory, None, None)
    else:
      stats = d.memory_stats() or {}
      kind = d.device_kind.lower()
      known = next((c for k, c in TPU_CHIPS.items() if k in kind.replace(" ", "")), None)
      chip = Chip(d.device_kind, "gpu" if d.platform in ("gpu", "cuda") else d.platform,
                  stats.get("bytes_limit", known.memory if known else 0),
                  known.peak_flops if known else None, known.bandwidth if known else None)
    return Target(spec, chip, devices)
  kind, _, rest = spec.partition(":")
  if kind == "tpu":
    chip_name = rest.split(":")[0].replace("litepod", "e")
    if chip_name not in TPU_CHIPS or ":" not in rest:
      raise ConfigError(f"plan target {spec!r}: expected tpu:<chip>:<topology> with chip in "
                       f"{sorted(TPU_CHIPS)}, e.g. tpu:v5p:2x2x2")
    try:
      topo = topologies.get_topology_desc(topology_name=rest, platform="tpu")
    except Exception as e:  # libtpu missing, or an unknown topology
      raise RuntimeError(f"plan target {spec!r}: no compile-only TPU devices ({e}). They need "
                         f"libtpu: pip install 'jax[tpu]=={jax.__version__}' (or lace_jax[tpu])"
                         ) from e
    chip = TPU_CHIPS[chip_name]
    return Target(spec, dataclasses.replace(chip, memory=_tpu_memory(topo.devices[0], chip)),
                  list(topo.devices))
  if kind == "cuda":
    m = re.fullmatch(r"([a-z0-9]+?)(?:x(\d+))?", rest)
    if not m or m.group(1) not in GPU_CHIPS:
      raise ConfigError(f"plan target {spec!r}: expected cuda:<gpu>[x<n>] with gpu in "
                       f"{sorted(GPU_CHIPS)}, e.g. cuda:h100x8")
    gpu, n = m.group(1), int(m.group(2) or 1)
    try:
      topo = topologies.get_topology_desc(topology_name=gpu, platform="cuda",
                                          target_config=gpu_target_config(gpu),
                                          topology=f"1x1x{n}")
    except Exception as e:
      raise RuntimeError(f"plan target {spec!r}: no compile-only CUDA devices ({e}). They need "
                         f"the CUDA plugin (no GPU needed): pip install 'jax[cuda12]=="
                         f"{jax.__version__}' (or lace_jax[cuda])") from e
    g = GPU_CHIPS[gpu]
    chip = Chip(g["description"], "gpu", g["memory"], g["peak_flops"], g["bandwidth"])
    return Target(spec, chip, list(topo.devices))
  raise ConfigError(f"plan target {spec!r}: expected local, tpu:<chip>:<topology> or "
                   "cuda:<gpu>[x<n>]")


_OOM = re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _parse_oom(message: str) -> tuple[float, float] | None:
  """(temporaries, available) in bytes from XLA:TPU's out-of-memory compile error."""
  m = _OOM.search(message)
  if not m:
    return None
  return float(m.group(1)) * _UNITS[m.group(2)], float(m.group(3)) * _UNITS[m.group(4)]


def _tpu_memory(device, chip: Chip) -> float:
  """The HBM XLA:TPU lets a program use on this chip: read from its own out-of-memory message
  for a deliberately oversized program (the table's figure if that fails)."""
  sd = jax.ShapeDtypeStruct((2**40,), jnp.uint8,
                            sharding=jax.sharding.SingleDeviceSharding(device))
  try:
    jax.jit(lambda x: x + 1).trace(sd).lower().compile()
  except Exception as e:  # the expected out-of-memory
    parsed = _parse_oom(str(e))
    if parsed:
      return parsed[1]
  return chip.memory


# ------------------------------------------------------------------------ the functions

@dataclasses.dataclass
class Call:
  """One jitted function of a stage with abstract arguments."""

  name: str
  jitted: Any
  args: tuple
  kwargs: dict
  groups: dict[str, Any]  # params / optimizer / batch / cache -> the abstract arguments
  trips: int = 1  # iterations of the function's loop (XLA's cost analysis counts one)
  calls: int = 1  # calls per stage step
  model_flops: float = 0.0  # per call, all devices


def matmul_params(model: Model) -> int:
  """Parameters that enter a matmul per token: every matrix, less the input embedding when it
  is only gathered (untied output head)."""
  shapes = model.abstract_params()
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes) if len(x.shape) >= 2)
  if not model.config.tie_embeddings:
    n -= model.config.vocab_size * model.config.d_model
  return n


def forward_flops(model: Model, tokens: int, context: float, num_threads: int) -> float:
  """Model FLOPs of a forward over `tokens` query tokens that each attend to `context` keys of
  their thread (and W x context lattice keys in the lattice layers)."""
  cfg, lat = model.config, model.lattice
  per_token = 2 * matmul_params(model) + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context
  if lat is not None:
    per_token += 4 * len(lat.layers) * lat.width * num_threads * context
  return per_token * tokens


def _train_call(cfg, model: Model, mesh, batch_shapes: dict, loss, *, name: str = "train_step",
                calls: int = 1) -> Call:
  tr = cfg.train
  trainer = Trainer.create(model.config, model.lattice, cfg.optim, total_steps=tr.steps,
                           trainable=tr.trainable, mesh=mesh,
                           rules=sharding.rules_with_overrides(cfg.sharding.rules))
  jitted, (state, batch, rng) = trainer.jit_step(batch_shapes, loss)
  a, b, w, t = batch_shapes["tokens"].shape
  flops = 3 * forward_flops(model, a * b * w * t, t / 2, w)
  return Call(name, jitted, (state, batch, rng), {},
              {"params": state["params"], "optimizer": state["opt_state"], "batch": batch},
              trips=a, calls=calls, model_flops=flops)


def _sampler_calls(model: Model, mesh, rules, params, *, batch: int, num_threads: int,
                   prompt_len: int, max_new_tokens: int, calls: int, prefix: str) -> list[Call]:
  out = []
  b, w, p, n = batch, num_threads, prompt_len, max_new_tokens
  for name, jitted, args, kwargs, groups in sampling.abstract_calls(
      model, params, batch=b, num_threads=w, prompt_len=p, max_new_tokens=n, mesh=mesh,
      rules=rules):
    if name == "prefill":
      call = Call(f"{prefix}prefill", jitted, args, kwargs, groups, calls=calls,
                  model_flops=forward_flops(model, b * w * p, p / 2, w))
    else:
      steps = max(n - 1, 1)  # the decode loop's tokens per thread; one call runs them all
      call = Call(f"{prefix}decode", jitted, args, kwargs, groups, trips=steps, calls=calls,
                  model_flops=steps * forward_flops(model, b * w, p + n / 2, w))
    out.append(call)
  return out


def _engine_calls(model: Model, mesh, rules, params, *, slots: int, num_threads: int,
                  prompt_len: int, max_new_tokens: int, decode_chunk: int, lattices: int,
                  prompt_store: int | None, prefix: str) -> list[Call]:
  """The engine's calls (`engine.abstract_calls`) generating `lattices` lattices per stage step
  in `slots` slots: at worst every slot's prompt prefilled and admitted ceil(lattices / slots)
  times, and every lattice's max_new_tokens columns decoded in calls of decode_chunk."""
  s, w, n = slots, num_threads, max_new_tokens
  p = engine.abstract_calls(model, params, slots=s, num_threads=w, prompt_len=prompt_len,
                            max_new_tokens=n, mesh=mesh, rules=rules, prompt_store=prompt_store)
  grids = s if prompt_store is None else min(s, prompt_store)  # prefilled per admission
  waves = -(-lattices // s)
  chunk = min(decode_chunk, n)
  width = sampling.bucket(prompt_len, 16)  # the store's (and a slot's prompt) width
  out = []
  for name, jitted, args, kwargs, groups in p:
    if name == "prefill":
      call = Call(f"{prefix}prefill", jitted, args, kwargs, groups, calls=waves,
                  model_flops=forward_flops(model, grids * w * width, width / 2, w))
    elif name == "admit":
      call = Call(f"{prefix}admit", jitted, args, kwargs, groups, calls=waves)
    else:
      call = Call(f"{prefix}decode", jitted, args, kwargs, groups, trips=chunk,
                  calls=waves * -(-n // chunk),
                  model_flops=chunk * forward_flops(model, s * w, width + n / 2, w))
    out.append(call)
  return out


def _abstract_params(model: Model, mesh, rules) -> Any:
  shardings = sharding.logical_to_sharding(model.logical_axes(), mesh, rules)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      model.abstract_params(), shardings)


def check_batch_split(rows: int, field: str, mesh, rules) -> None:
  """Raises a ValueError naming `field` when `rows` examples do not split evenly over the
  mesh's batch axes (by `rules`)."""
  n = sharding.batch_ways(mesh, rules)
  if rows % n:
    raise ConfigError(
        f"{field} gives {rows} rows per call, which do not split over the {n} devices of the "
        f"batch axes (mesh {sharding.describe(mesh)}): use a multiple of {n}, or move devices "
        "off the batch axes (e.g. --config.sharding.mesh.fsdp=8 --config.sharding.mesh.tensor=2)")


def stage_calls(cfg: ml_collections.ConfigDict, mesh) -> list[Call]:
  """The jitted functions `cfg.mode` runs, with abstract arguments on `mesh`."""
  model_cfg, lattice = model_configs(cfg)
  model = Model(model_cfg, lattice)
  rules = sharding.rules_with_overrides(cfg.sharding.rules)
  if cfg.mode in ("pretrain", "sft"):
    check_batch_split(cfg.train.batch_size // cfg.train.grad_accum,
                      "train.batch_size / train.grad_accum", mesh, rules)
    return [_train_call(cfg, model, mesh, lm.batch_shapes(cfg),
                        lm.make_loss(cfg.train.logits_chunk,
                                     cfg.train.logits_chunk_over))]
  if cfg.mode == "grpo":
    g, d = cfg.grpo, cfg.data
    rows = g.questions_per_step * g.rollouts_per_question
    chunk = g.rollout_batch or rows
    check_batch_split(chunk, "grpo.rollout_batch (0: questions_per_step x "
                      "rollouts_per_question)", mesh, rules)
    check_batch_split(rows // cfg.train.grad_accum,
                      "grpo.questions_per_step x rollouts_per_question / train.grad_accum", mesh,
                      rules)
    params = _abstract_params(model, mesh, rules)
    calls = _engine_calls(model, mesh, rules, params, slots=chunk, num_threads=d.num_threads,
                          prompt_len=d.prompt_len, max_new_tokens=g.max_new_tokens,
                          decode_chunk=g.decode_chunk, lattices=rows,
                          prompt_store=g.questions_per_step, prefix="rollout_")
    passes = grpo_stage.logprob_passes(cfg)
    if passes:
      jitted, args, groups, micro = grpo_stage.abstract_logprob_call(cfg, model, mesh, rules,
                                                                     params)
      t = d.prompt_len + g.max_new_tokens
      calls.append(Call("logprobs", jitted, args, {}, groups, trips=micro, calls=passes,
                        model_flops=forward_flops(model, rows * d.num_threads * t, t / 2,
                                                  d.num_threads)))
    calls.append(_train_call(cfg, model, mesh, grpo_stage.batch_shapes(cfg),
                             grpo_stage.make_loss(cfg), calls=g.inner_updates))
    return calls
  if cfg.mode == "eval":
    e = cfg.eval
    check_batch_split(e.batch_size, "eval.batch_size", mesh, rules)
    params = _abstract_params(model, mesh, rules)
    return _sampler_calls(model, mesh, rules, params, batch=e.batch_size,
                          num_threads=e.num_threads, prompt_len=cfg.plan.prompt_len,
                          max_new_tokens=e.max_new_tokens, calls=1, prefix="")
  raise ConfigError(f"plan mode: mode {cfg.mode!r} runs no jitted model function to plan; "
                   "plannable modes: pretrain, sft, grpo, eval")


# ------------------------------------------------------------------------ compile and report

def device_bytes(tree: Any) -> int:
  """Bytes of one device's shard of every array in `tree` (ShapeDtypeStructs with shardings)."""
  total = 0
  for x in jax.tree.leaves(tree):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      continue
    shape = x.shape
    sh = getattr(x, "sharding", None)
    if sh is not None:
      shape = sh.shard_shape(shape)
    itemsize = 16 if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else jnp.dtype(x.dtype).itemsize
    total += math.prod(shape) * itemsize
  return total


def _cost(compiled) -> tuple[float, float]:
  try:
    ca = compiled.cost_analysis()
  except Exception:  # some backends have none
    return 0.0, 0.0
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  ca = ca or {}
  return float(ca.get("flops", 0.0)), float(ca.get("bytes accessed", 0.0))


def plan_call(call: Call, target: Target, mesh) -> dict:
  """Compiles one call for the target; its row of the report."""
  t0 = time.perf_counter()
  groups = {k: device_bytes(v) for k, v in call.groups.items()}
  row: dict[str, Any] = {"function": call.name, "calls_per_step": call.calls,
                         "loop_trips": call.trips, **{f"{k}_bytes": v for k, v in groups.items()}}
  try:
    with kernels.target_platform(target.chip.platform), jax.set_mesh(mesh):
      compiled = call.jitted.trace(*call.args, **call.kwargs).lower().compile()
  except Exception as e:  # XLA:TPU refuses to compile a program that cannot fit
    parsed = _parse_oom(str(e))
    if parsed is None:
      raise RuntimeError(f"plan: compiling {call.name} for {target.spec} failed: "
                         f"{str(e).splitlines()[0]}") from e
    temp, available = parsed
    row.update(temp_bytes=temp, total_bytes=sum(groups.values()) + temp,
               capacity=min(available, target.chip.memory),
               compile_error="out of memory (XLA)", flops=None, bytes_accessed=None)
  else:
    mem = compiled.memory_analysis()
    args = int(getattr(mem, "argument_size_in_bytes", 0)) if mem else sum(groups.values())
    out = int(getattr(mem, "output_size_in_bytes", 0)) if mem else 0
    alias = int(getattr(mem, "alias_size_in_bytes", 0)) if mem else 0
    temp = int(getattr(mem, "temp_size_in_bytes", 0)) if mem else 0
    flops, nbytes = _cost(compiled)
    row["custom_calls"] = custom_calls(compiled)
    row.update(argument_bytes=args, output_bytes=out, alias_bytes=alias, temp_bytes=temp,
               total_bytes=args + max(out - alias, 0) + temp, capacity=target.chip.memory,
               flops=flops * call.trips, bytes_accessed=nbytes * call.trips)
  row["compile_seconds"] = time.perf_counter() - t0
  row["headroom"] = 1.0 - row["total_bytes"] / row["capacity"] if row["capacity"] else None
  row["fits"] = bool(row["capacity"]) and row["total_bytes"] <= row["capacity"]
  n = len(target.devices)
  row["model_flops_per_device"] = call.model_flops / n
  chip = target.chip
  if chip.peak_flops and chip.bandwidth and row.get("flops") is not None:
    row["predicted_seconds"], row["mfu"], row["time_is_lower_bound"] = roofline(
        row["flops"], row["bytes_accessed"], row["model_flops_per_device"], chip)
  return row


def custom_calls(compiled) -> dict[str, int]:
  """{custom-call target: count} of a compiled program: which kernels it runs (Pallas Triton
  `__gpu$xla.gpu.triton`, Mosaic `tpu_custom_call`, cuDNN `__cudnn$...`)."""
  try:
    text = compiled.as_text()
  except Exception:  # noqa: BLE001 -- some backends print no text
    return {}
  found: dict[str, int] = {}
  for name in re.findall(r'custom_call_target="([^"]+)"', text or ""):
    found[name] = found.get(name, 0) + 1
  return found


def roofline(flops: float, nbytes: float, model_flops: float, chip
             ) -> tuple[float, float | None, bool]:
  """(predicted seconds per call, MFU or None, whether the time is only a lower bound) from
  XLA's per-device FLOPs and bytes and the model's FLOPs per device.

  time = max(FLOPs / peak, bytes / bandwidth) with FLOPs = max(XLA's, the model's). XLA's
  cost analysis counts a loop body once (the chunked loss, flash attention's key blocks) and
  a compile-only XLA:GPU analysis can be empty; where XLA counts fewer FLOPs than the model
  has, the time rests on the model's FLOPs alone, so it is a lower bound and an MFU from it
  would be 100% by construction: MFU is None then."""
  seconds = max(max(flops, model_flops) / chip.peak_flops, nbytes / chip.bandwidth)
  complete = flops >= model_flops > 0
  mfu = model_flops / (seconds * chip.peak_flops) if seconds and complete else None
  return seconds, mfu, not complete


def _gb(x) -> str:
  return "-" if x is None else f"{x / 1e9:.2f}"


def format_table(report: dict) -> str:
  """The report as a markdown table (sizes in GB = 1e9 bytes, per device)."""
  lines = [f"plan of {report['config']} ({report['mode']}) for {report['target']} = "
           f"{report['devices']}, mesh {report['mesh']}",
           "| function | params | optimizer | batch | cache | temp | total | of | headroom | "
           "fits | TFLOP | GB moved | time/call | calls/step | MFU |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in report["functions"]:
    head = "-" if r["headroom"] is None else f"{100 * r['headroom']:.0f}%"
    tf = "-" if r.get("flops") is None else f"{r['flops'] / 1e12:.1f}"
    moved = "-" if r.get("bytes_accessed") is None else f"{r['bytes_accessed'] / 1e9:.1f}"
    t = "-" if r.get("predicted_seconds") is None else (
        (">= " if r.get("time_is_lower_bound") else "") + f"{r['predicted_seconds']:.3g} s")
    mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.0f}%"
    lines.append(
        f"| {r['function']} | {_gb(r.get('params_bytes'))} | {_gb(r.get('optimizer_bytes'))} | "
        f"{_gb(r.get('batch_bytes'))} | {_gb(r.get('cache_bytes'))} | {_gb(r['temp_bytes'])} | "
        f"{_gb(r['total_bytes'])} | {_gb(r['capacity'])} | {head} | "
        f"{'yes' if r['fits'] else 'NO'} | {tf} | {moved} | {t} | {r['calls_per_step']} | {mfu} |")
  if "hosts" in report:
    lines.append(f"hosts: {report['hosts']['summary']}")
  return "\n".join(lines)


def plan_target(cfg: ml_collections.ConfigDict, spec: str, *, name: str = "", log=print) -> dict:
  """Plans every function of cfg's stage on one target; returns the report dict."""
  target = resolve_target(spec)
  if cfg.plan.device_memory:
    target.chip = dataclasses.replace(target.chip, memory=float(cfg.plan.device_memory))
  mesh = sharding.make_mesh(dict(cfg.sharding.mesh), target.devices)
  log(f"plan: {cfg.mode} on {spec} ({target.describe()}, {target.chip.memory / 1e9:.1f} GB "
      f"each), mesh {sharding.describe(mesh)}")
  with kernels.target_platform(target.chip.platform):
    calls = stage_calls(cfg, mesh)
  wanted = [f for f in str(cfg.plan.get("functions", "") or "").split(",") if f]
  unknown = [f for f in wanted if f not in [c.name for c in calls]]
  if unknown:
    raise ConfigError(f"plan.functions names {unknown}; the {cfg.mode} stage's functions are "
                      f"{[c.name for c in calls]}")
  if wanted:
    calls = [c for c in calls if c.name in wanted]
  rows = []
  for i, call in enumerate(calls, 1):
    log(f"  [{i}/{len(calls)}] compiling {call.name} ...")
    t0 = time.perf_counter()
    rows.append(plan_call(call, target, mesh))
    r = rows[-1]
    log(f"  [{i}/{len(calls)}] {call.name}: {_gb(r['total_bytes'])} of "
        f"{_gb(r['capacity'])} GB per device ({'fits' if r['fits'] else 'DOES NOT FIT'}), "
        f"compiled in {time.perf_counter() - t0:.0f}s")
  hosts = host_split(cfg, mesh)
  log(f"  hosts: {hosts['summary']}")
  return {"config": name or cfg.mode, "mode": cfg.mode, "target": spec,
          "devices": target.describe(), "chip": dataclasses.asdict(target.chip),
          "mesh": sharding.describe(mesh), "functions": rows, "hosts": hosts,
          "fits": all(r["fits"] for r in rows)}


def host_split(cfg: ml_collections.ConfigDict, mesh) -> dict:
  """How the run splits over the target's processes (hosts): their count, devices each and the
  rows each process generates per sampler call (its block, `sharding.process_share`), with a
  one-line summary. GRPO also names the questions and rollouts each host takes per step."""
  rules = sharding.rules_with_overrides(cfg.sharding.rules)
  processes = sorted({d.process_index for d in mesh.devices.flat})
  share = sharding.process_share(mesh, rules, process=processes[0])
  out = {"processes": len(processes), "devices_per_process": mesh.devices.size // len(processes),
         "blocks": share.blocks}
  text = (f"{len(processes)} process(es) x {out['devices_per_process']} devices, the batch in "
          f"{share.blocks} block(s)")
  if cfg.mode == "grpo":
    g = cfg.grpo
    rows = g.questions_per_step * g.rollouts_per_question
    chunk = g.rollout_batch or rows
    out.update(questions_per_process=g.questions_per_step // share.blocks,
               rollouts_per_process=rows // share.blocks,
               sampler_rows_per_process=chunk // share.blocks, sampler_rows=chunk)
    text += (f"; each host generates {out['questions_per_process']} of {g.questions_per_step} "
             f"questions x {g.rollouts_per_question} rollouts = {out['rollouts_per_process']} of "
             f"{rows} rollouts per step, {out['sampler_rows_per_process']} of {chunk} rows per "
             "sampler call")
  elif cfg.mode == "eval":
    out.update(sampler_rows_per_process=cfg.eval.batch_size // share.blocks,
               sampler_rows=cfg.eval.batch_size)
    text += (f"; each host generates {out['sampler_rows_per_process']} of "
             f"{cfg.eval.batch_size} problems per batch")
  out["summary"] = text
  return out


def targets_of(cfg: ml_collections.ConfigDict) -> list[str]:
  spec = cfg.plan.target
  names = list(cfg.plan.targets) if spec == "default" else [s for s in spec.split(",") if s]
  if not names:
    raise ConfigError("plan.target=default but the experiment names no plan.targets")
  return names


def run(cfg: ml_collections.ConfigDict, workdir: str | None, *, name: str = "") -> dict:
  """The plan mode: every target of `plan.target`; exits 1 when anything does not fit.
  `name`: the experiment's name for the report (e.g. its file)."""
  specs = targets_of(cfg)
  if any(s.startswith("cuda:") for s in specs):
    # compile-only GPUs on a machine without one: the CUDA plugin's start-up check would
    # otherwise fail on cuInit and leave the plugin unregistered (set before JAX starts)
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  if any(s.startswith("tpu:") for s in specs):
    # compile-only TPUs need no exclusive hold on libtpu: plan beside other jobs that load it
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  reports = []
  for spec in specs:
    try:
      report = plan_target(cfg, spec, name=name)
    except ValueError as e:  # a config that cannot be laid out on the target: say which field
      print(f"error: plan for {spec}: {e}", file=sys.stderr, flush=True)
      raise SystemExit(2) from None
    print(format_table(report), flush=True)
    reports.append(report)
  result = {"plans": reports, "fits": all(r["fits"] for r in reports),
            # the XLA:TPU options the compiles ran under (lace_jax.runtime)
            "libtpu_init_args": os.environ.get("LIBTPU_INIT_ARGS", "")}
  if workdir and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "plan.json"), "w") as f:
      json.dump(result, f, indent=2, default=_jsonable)
    print(f"wrote {os.path.join(workdir, 'plan.json')}", flush=True)
  misses = [(rep["target"], r) for rep in reports for r in rep["functions"] if not r["fits"]]
  for spec, r in misses:
    print(f"does not fit: {cfg.mode}.{r['function']} on {spec} needs "
          f"{r['total_bytes'] / 1e9:.2f} GB per device, {(r['total_bytes'] - r['capacity']) / 1e9:.2f}"
          f" GB more than the {r['capacity'] / 1e9:.2f} GB available", file=sys.stderr, flush=True)
  if misses:
    raise SystemExit(1)
  return result


def _jsonable(x):
  if isinstance(x, (np.integer, np.floating)):
    return x.item()
  return str(x)
