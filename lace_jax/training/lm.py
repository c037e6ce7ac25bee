"""Stages 1 and 2 (spec section 6): continued pre-training and SFT, next-token cross-entropy
on multi-thread examples, as a stage of the run loop (`lace_jax.training.loop`).

  python -m lace_jax.main --config=experiments/{pretrain,sft}_*.py --workdir=DIR

Batches come from the grain pipeline of `lace_jax.data` (threads shuffled on every draw for
SFT), [A, B/A, W, T] per array; the iterator is checkpointed with the train state, so a
resumed run sees exactly the batches the interrupted one would have.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lace_jax import losses
from lace_jax.model import Model, Params
from lace_jax import data as data_lib
from lace_jax.training import loop
from lace_jax.training.setup import Setup


def token_loss(model: Model, params: Params, batch: dict[str, jax.Array], *,
               chunk: int = losses.DEFAULT_CHUNK, over: str = "vocab"
               ) -> tuple[jax.Array, jax.Array]:
  """(sum of next-token cross-entropy over loss_mask, number of loss tokens) of [B, W, T].
  The vocabulary projection runs `chunk` rows of V (or positions of T, `over`) at a time
  (`lace_jax.losses`): the float32 [B, W, T, V] logits never exist (chunk <= 0: dense)."""
  hidden = model.hidden_states(params, batch["tokens"], valid=batch["valid"])  # [B, W, T, D]
  logp, _ = losses.token_logprobs(hidden, model.unembed(params), batch["targets"], chunk=chunk,
                                  over=over)
  mask = batch["loss_mask"].astype(jnp.float32)
  return -jnp.sum(logp * mask), jnp.sum(mask)


def make_loss(chunk: int = losses.DEFAULT_CHUNK, over: str = "vocab"):
  """The LossFn of pretrain / sft: (loss sum, normaliser, {} extra metric sums)."""

  def lm_loss(model: Model, params: Params, batch: dict[str, jax.Array]):
    total, count = token_loss(model, params, batch, chunk=chunk, over=over)
    return total, count, {}

  return lm_loss


@dataclasses.dataclass
class LanguageModelStage:
  """A `loop.Stage` over the multi-thread JSONL of `cfg.data`."""

  rows: int
  batch_shapes: dict[str, jax.ShapeDtypeStruct]
  iterator: Any
  grad_accum: int
  report: Any  # data.LoadReport
  loss: Any  # the LossFn
  rows_key = "train.batch_size"
  updates_per_batch = 1
  pipelined = True  # batches come from the iterator, independent of the state

  def next_batch(self, state: dict, step: int) -> tuple[dict[str, np.ndarray], dict]:
    del state, step  # the iterator's position is the step
    local = next(self.iterator)
    a = self.grad_accum
    return {k: v.reshape(a, v.shape[0] // a, *v.shape[1:]) for k, v in local.items()}, {}

  def summary(self) -> dict:
    return {"data": self.report.summary()}

  def close(self) -> None:
    pass


def make_stage(setup: Setup) -> LanguageModelStage:
  cfg, tokenizer = setup.cfg, setup.tokenizer
  d, tr = cfg.data, cfg.train
  examples, report = data_lib.load_examples(
      d.path, tokenizer, num_threads=d.num_threads, max_len=d.max_len, fmt=d.format,
      instruction=d.instruction, thinking=d.thinking, truncate=d.truncate,
      bad_records=d.bad_records)
  loop.log0(report.summary())
  iterator = iter(data_lib.make_dataset(
      examples, batch_size=tr.batch_size // jax.process_count(), max_len=d.max_len,
      pad_id=tokenizer.pad_id, loss_on=d.loss_on, shuffle_threads=d.shuffle_threads,
      seed=cfg.seed, process_index=jax.process_index(), process_count=jax.process_count()))
  return LanguageModelStage(rows=tr.batch_size, batch_shapes=batch_shapes(cfg),
                            iterator=iterator, grad_accum=tr.grad_accum, report=report,
                            loss=make_loss(tr.logits_chunk, tr.logits_chunk_over))


def batch_shapes(cfg: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch of one step, [A, B/A, W, T] per array (A = train.grad_accum)."""
  d, tr = cfg.data, cfg.train
  a = tr.grad_accum
  return {k: jax.ShapeDtypeStruct((a, tr.batch_size // a, d.num_threads, d.max_len),
                                  jnp.int32 if k in ("tokens", "targets") else jnp.bool_)
          for k in ("tokens", "valid", "targets", "loss_mask")}


def run(cfg: ml_collections.ConfigDict, workdir: str | None) -> dict:
  """Modes `pretrain` and `sft`."""
  loop.check_counts(cfg, {"train.batch_size": "examples per optimizer step",
                          "data.num_threads": "threads W of each example",
                          "data.max_len": "tokens T per thread"})
  return loop.run(cfg, workdir, make_stage)
