"""Tokenizer (a Hugging Face `tokenizer.json` through the `tokenizers` library) and the Qwen3
chat and multi-thread prompt formats of spec section 5, written out without jinja."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence

import tokenizers

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
TAGS = ("[[best]]", "[[success]]", "[[fail]]")

THREAD_INSTRUCTION = (
    "You are one of {num_threads} reasoning threads working on this problem at the same time; "
    "the threads can see each other's progress. Take an approach of your own and use what the "
    "other threads find. Put your final answer in \\boxed{{}}, then end with exactly one tag: "
    "[[best]] if your answer is the one to submit (exactly one thread should say so), "
    "[[success]] if your answer is correct but another thread's should be submitted, or "
    "[[fail]] if you could not solve the problem.")


def instruction_template(name: str) -> str:
  """A config's `instruction` value -> the template: "default" is THREAD_INSTRUCTION, anything
  else is used as given ("" for no format note)."""
  return THREAD_INSTRUCTION if name == "default" else name


class Tokenizer:
  """Text <-> ids. Special tokens written in the text (e.g. `<|im_end|>`) map to their ids."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, source: str = "<tokenizer>"):
    self._tok = tokenizer
    self.source = source
    self._plain: tokenizers.Tokenizer | None = None  # built by `encode_plain` when first needed
    self._plain_lock = threading.Lock()

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> Tokenizer:
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer file {path} does not exist")
    try:
      return cls(tokenizers.Tokenizer.from_file(path), source=path)
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
      raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from e

  @classmethod
  def from_dir(cls, checkpoint_dir: str | os.PathLike) -> Tokenizer:
    return cls.from_file(os.path.join(checkpoint_dir, "tokenizer.json"))

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def token_id(self, token: str) -> int:
    i = self._tok.token_to_id(token)
    if i is None:
      raise KeyError(f"token {token!r} is not in the vocabulary of {self.source}")
    return i

  @property
  def im_end_id(self) -> int:
    return self.token_id(IM_END)

  @property
  def pad_id(self) -> int:
    return self.token_id(ENDOFTEXT)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_plain(self, text: str) -> list[int]:
    """`encode`, but the strings of special tokens in `text` (e.g. a user writing
    `<|im_end|>`) are encoded as ordinary text, never as those tokens (Hugging Face's
    `split_special_tokens`; added tokens not marked special, like Qwen3's `<think>`, still
    match)."""
    with self._plain_lock:
      if self._plain is None:
        # a copy, not a flag toggled on the shared tokenizer: threads may encode at once
        plain = tokenizers.Tokenizer.from_str(self._tok.to_str())
        plain.encode_special_tokens = True
        self._plain = plain
    return self._plain.encode(text, add_special_tokens=False).ids

  def encode_chat(self, messages: Sequence[Mapping[str, str]], *,
                  thinking: bool = True) -> list[int]:
    """The ids of `render_messages(messages)`, with every message's role and content encoded
    by `encode_plain`: only the template itself writes `<|im_start|>` / `<|im_end|>`, so a
    message cannot open a turn of its own. Equals `encode(render_messages(messages))` when no
    content contains a special-token string."""
    start, end = self.token_id(IM_START), self.token_id(IM_END)
    newline = self.encode_plain("\n")
    ids: list[int] = []
    for m in messages:
      ids += [start, *self.encode_plain(f"{m['role']}\n{m['content']}"), end, *newline]
    ids += [start, *self.encode_plain("assistant\n")]
    if not thinking:
      ids += self.encode("<think>\n\n</think>\n\n")
    return ids

  @property
  def max_token_chars(self) -> int:
    """The longest vocabulary entry in characters: a text of c characters has at least
    c / max_token_chars tokens (byte-level entries spell one byte per character)."""
    if not hasattr(self, "_max_token_chars"):
      self._max_token_chars = max(1, max(map(len, self._tok.get_vocab(with_added_tokens=True))))
    return self._max_token_chars

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def save(self, path: str | os.PathLike) -> None:
    self._tok.save(os.fspath(path))


def render_messages(messages: Sequence[Mapping[str, str]], *, thinking: bool = True) -> str:
  """Qwen3's chat template for a conversation of {role, content} messages plus the assistant
  generation prompt: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message.

  Equals `apply_chat_template(messages, add_generation_prompt=True, enable_thinking=thinking)`
  for text turns ending with a user turn; with thinking off, the empty think block Qwen3
  expects is appended. Assistant turns are written verbatim (the jinja template would strip a
  `<think>` block from them): the server passes a client's history through as given.
  """
  text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
  text += f"{IM_START}assistant\n"
  if not thinking:
    text += "<think>\n\n</think>\n\n"
  return text


def chat_prompt(user: str, *, system: str | None = None, thinking: bool = True) -> str:
  """`render_messages` of one user turn, after a system message when `system` is not None."""
  messages = [{"role": "system", "content": system}] if system is not None else []
  return render_messages(messages + [{"role": "user", "content": user}], thinking=thinking)


def thread_prompts(problem: str | Sequence[str], num_threads: int, *, thinking: bool = True,
                   instruction: str = THREAD_INSTRUCTION) -> list[str]:
  """The W prompts of one multi-thread example (spec section 5).

  `problem` is one string (every thread gets the same user turn: default) or W strings (one
  per thread, for tasks that hand threads different material). `instruction` is a template
  with `{num_threads}`, appended after a blank line; "" appends nothing.
  """
  if num_threads <= 0:
    raise ValueError(f"num_threads={num_threads} must be positive")
  problems = [problem] * num_threads if isinstance(problem, str) else list(problem)
  if len(problems) != num_threads:
    raise ValueError(f"{num_threads=} threads but {len(problems)} per-thread problems")
  note = instruction.format(num_threads=num_threads) if instruction else ""
  return [chat_prompt(f"{p}\n\n{note}" if note else p, thinking=thinking) for p in problems]
