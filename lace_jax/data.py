"""Training data: multi-thread JSONL records -> [W, T] token grids, through a grain pipeline.

Record schema (one JSON object per line; `lace_jax.datagen.pipeline` writes it):
  id       str                      unique id
  problem  str | [str] * W          the user turn, shared by all threads or one per thread
  threads  [str] * W                each thread's generated text (ending in \\boxed{} and a tag)
  answer   str                      gold answer (optional for training)
  tags     [str] * W                each thread's tag (optional; metadata)
A single-thread source (`data.format = "text"`) reads `{"text": str}` lines (W = 1, loss on
every token).

Layout of one example, as lockstep decoding sees it: each thread's prompt is left-padded to the
longest prompt of the example, so every thread's generated text starts at the same grid column;
generated text is followed by <|im_end|> and right padding up to T. Loss targets are the next
token; `loss_on = "generated"` masks prompts out (SFT), `"all"` keeps every thread token (CPT).
The order of an example's threads is permuted on every draw when `shuffle_threads` is set, from
a seed that depends only on the pipeline seed and the draw's position: deterministic on resume.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence

import grain
import numpy as np

from lace_jax.errors import ConfigError
from lace_jax.tokenizer import Tokenizer, instruction_template, thread_prompts

log = logging.getLogger(__name__)

REQUIRED = ("id", "problem", "threads")


@dataclasses.dataclass(frozen=True)
class Example:
  """One tokenised example: per thread, prompt ids and generated ids (with <|im_end|>)."""

  id: str
  prompts: tuple[tuple[int, ...], ...]
  completions: tuple[tuple[int, ...], ...]


@dataclasses.dataclass
class DataReport:
  """What happened to every line of the source: kept, or why not."""

  path: str
  total: int = 0
  kept: int = 0
  truncated: int = 0
  bad: Counter = dataclasses.field(default_factory=Counter)
  first_bad: dict = dataclasses.field(default_factory=dict)  # reason -> "file:line: detail"

  def add_bad(self, reason: str, where: str) -> None:
    self.bad[reason] += 1
    self.first_bad.setdefault(reason, where)

  def summary(self) -> str:
    s = f"{self.path}: {self.kept}/{self.total} records kept"
    if self.truncated:
      s += f", {self.truncated} truncated"
    for reason, n in sorted(self.bad.items()):
      s += f"; {n} skipped for {reason} (first: {self.first_bad[reason]})"
    return s


class BadRecord(ValueError):
  pass


def _check_record(rec, num_threads: int) -> str | None:
  if not isinstance(rec, dict):
    return f"not a JSON object ({type(rec).__name__})"
  missing = [k for k in REQUIRED if k not in rec]
  if missing:
    return f"missing field(s) {missing}"
  threads = rec["threads"]
  if not isinstance(threads, list) or not all(isinstance(t, str) for t in threads):
    return "field 'threads' must be a list of strings"
  if len(threads) != num_threads:
    return f"wrong thread count: {len(threads)} threads, expected {num_threads}"
  problem = rec["problem"]
  if isinstance(problem, list):
    if len(problem) != num_threads or not all(isinstance(p, str) for p in problem):
      return f"field 'problem' is a list of {len(problem)}; expected one string or {num_threads}"
  elif not isinstance(problem, str):
    return "field 'problem' must be a string or a list of strings"
  tags = rec.get("tags")
  if tags is not None and (not isinstance(tags, list) or len(tags) != num_threads):
    return f"field 'tags' must be a list of {num_threads} tags"
  return None


def _parse_line(raw: bytes) -> tuple[object, str | None]:
  """(the JSON value of one line of bytes, None) or (None, why it is not a record)."""
  try:
    line = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    return None, f"not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)"
  try:
    return json.loads(line), None
  except json.JSONDecodeError as e:
    return None, f"invalid JSON ({e.msg})"


def _reason_key(reason: str) -> str:
  return reason.split(":")[0].split(" (")[0]


def load_examples(path: str, tokenizer: Tokenizer, *, num_threads: int, max_len: int,
                  fmt: str = "threads", instruction: str = "default", thinking: bool = True,
                  truncate: bool = False, bad_records: str = "skip") -> tuple[list[Example],
                                                                              DataReport]:
  """Reads, validates and tokenises a JSONL file. Bad records are counted per reason and
  skipped (`bad_records="skip"`) or raise at the first one (`"fail"`); never silently."""
  if bad_records not in ("skip", "fail"):
    raise ConfigError(f"data.bad_records={bad_records!r}; expected 'skip' or 'fail'")
  if fmt not in ("threads", "text"):
    raise ConfigError(f"data.format={fmt!r}; expected 'threads' or 'text'")
  if os.path.isdir(path):
    record = '{"text": ...} object' if fmt == "text" else "multi-thread record"
    raise IsADirectoryError(f"data.path={path} is a directory; expected a JSONL file (one "
                            f"{record} per line)")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data file {path} does not exist")
  if fmt == "text" and num_threads != 1:
    raise ConfigError(f"data.format='text' is single-thread: num_threads must be 1, got "
                     f"{num_threads}")
  template = instruction_template(instruction)
  report = DataReport(path)
  examples = []
  end = tokenizer.im_end_id
  with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is one bad record, not a crash
    for line_no, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      report.total += 1
      where = f"{path}:{line_no}"
      rec, reason = _parse_line(raw)
      if reason is None:
        if fmt == "text":
          reason = None if isinstance(rec, dict) and isinstance(rec.get("text"), str) else \
              "missing field(s) ['text']"
        else:
          reason = _check_record(rec, num_threads)
      if reason is None:
        if fmt == "text":
          prompts = [[]]
          completions = [tokenizer.encode(rec["text"]) + [end]]
        else:
          texts = thread_prompts(rec["problem"], num_threads, thinking=thinking,
                                 instruction=template)
          prompts = tokenizer.encode_batch(texts)
          completions = [c + [end] for c in tokenizer.encode_batch(rec["threads"])]
        length = max(map(len, prompts)) + max(map(len, completions))
        if length > max_len:
          if truncate or fmt == "text":
            room = max_len - max(map(len, prompts))
            if room <= 0:
              reason = f"over length: prompt alone has {max(map(len, prompts))} tokens > {max_len}"
            else:
              completions = [c[:room] for c in completions]
              report.truncated += 1
          else:
            reason = f"over length: {length} tokens > max_len {max_len}"
      if reason is not None:
        if bad_records == "fail":
          raise BadRecord(f"{where}: {reason} (set data.bad_records=skip to skip such records)")
        report.add_bad(_reason_key(reason), f"{where}: {reason}")
        continue
      examples.append(Example(str(rec.get("id", line_no)), tuple(map(tuple, prompts)),
                              tuple(map(tuple, completions))))
      report.kept += 1
  if not examples:
    raise ConfigError(f"no usable records in {path}: {report.summary()}")
  if report.bad:
    log.warning("%s", report.summary())
  return examples, report


def layout(ex: Example, perm: Sequence[int], max_len: int, pad_id: int,
           loss_on: str) -> dict[str, np.ndarray]:
  """One example as [W, T] arrays: tokens, valid, targets (next token), loss_mask."""
  w = len(ex.prompts)
  p = max(len(x) for x in ex.prompts)
  tokens = np.full((w, max_len), pad_id, np.int32)
  valid = np.zeros((w, max_len), bool)
  generated = np.zeros((w, max_len), bool)
  for row, src in enumerate(perm):
    prompt, completion = ex.prompts[src], ex.completions[src]
    start = p - len(prompt)
    tokens[row, start:p] = prompt
    tokens[row, p:p + len(completion)] = completion
    valid[row, start:p + len(completion)] = True
    generated[row, p:p + len(completion)] = True
  targets = np.concatenate([tokens[:, 1:], np.full((w, 1), pad_id, np.int32)], axis=1)
  # a target exists where this token and the next are both real (not from padding to text)
  target_valid = valid & np.concatenate([valid[:, 1:], np.zeros((w, 1), bool)], axis=1)
  if loss_on == "generated":
    target_valid &= np.concatenate([generated[:, 1:], np.zeros((w, 1), bool)], axis=1)
  elif loss_on != "all":
    raise ConfigError(f"data.loss_on={loss_on!r}; expected 'generated' or 'all'")
  return {"tokens": tokens, "valid": valid, "targets": targets, "loss_mask": target_valid}


class _Layout(grain.transforms.RandomMap):

  def __init__(self, max_len: int, pad_id: int, loss_on: str, shuffle_threads: bool):
    self.max_len, self.pad_id, self.loss_on = max_len, pad_id, loss_on
    self.shuffle_threads = shuffle_threads

  def random_map(self, ex: Example, rng: np.random.Generator) -> dict[str, np.ndarray]:
    w = len(ex.prompts)
    perm = rng.permutation(w) if self.shuffle_threads else np.arange(w)
    return layout(ex, perm, self.max_len, self.pad_id, self.loss_on)


def make_dataset(examples: Sequence[Example], *, batch_size: int, max_len: int, pad_id: int,
                 loss_on: str, shuffle_threads: bool, seed: int, process_index: int = 0,
                 process_count: int = 1, shuffle: bool = True) -> grain.IterDataset:
  """Infinite, deterministic stream of per-process batches [batch_size, W, T].

  Shuffling and thread permutations are global (identical on every process) and the stream is
  sharded by process afterwards, so the union over processes is the single-process stream.
  """
  ds = grain.MapDataset.source(list(examples)).seed(seed)
  if shuffle:
    ds = ds.shuffle()
  ds = ds.repeat(None).random_map(_Layout(max_len, pad_id, loss_on, shuffle_threads))
  ds = ds[process_index::process_count].batch(batch_size, drop_remainder=True)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
