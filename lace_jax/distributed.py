"""Multi-process start-up. The same command runs on every host; this module decides whether
and how to call `jax.distributed.initialize` before any other JAX work.

config `distributed`:
  initialize         "auto" | "yes" | "no". auto: initialise when a coordinator is configured
                     (here or in JAX_COORDINATOR_ADDRESS) or on a multi-host Cloud TPU slice.
  coordinator_address, num_processes, process_id   explicit settings ("" / -1: auto-detect)
  cpu_collectives    e.g. "gloo" for multi-process CPU runs
"""

from __future__ import annotations

import logging
import os

import jax
import ml_collections

log = logging.getLogger(__name__)


def _multihost_tpu() -> bool:
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def maybe_initialize(cfg: ml_collections.ConfigDict | None) -> None:
  if cfg is None:
    return
  if cfg.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
  mode = cfg.initialize
  if mode not in ("auto", "yes", "no"):
    raise ValueError(f"distributed.initialize={mode!r}; expected auto, yes or no")
  address = cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  if mode == "no" or (mode == "auto" and not address and not _multihost_tpu()):
    return
  kwargs = {}
  if address:
    kwargs["coordinator_address"] = address
  if cfg.num_processes > 0:
    kwargs["num_processes"] = cfg.num_processes
  if cfg.process_id >= 0:
    kwargs["process_id"] = cfg.process_id
  jax.distributed.initialize(**kwargs)
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
