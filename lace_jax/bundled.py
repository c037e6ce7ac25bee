"""Files shipped inside the package: the evaluation sets and the small multi-thread dataset
(with its word-level tokenizer) that `:runlocal` experiments and the tests train on.

The small dataset is written by `python -m lace_jax.toy.tasks --out lace_jax/assets`."""

import os

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
BENCHMARK_DIR = os.path.join(ASSETS, "data")  # aime24.jsonl, ..., gsm8k_train.jsonl
TOY_DATA = os.path.join(ASSETS, "toy_search.jsonl")
TOY_TOKENIZER = os.path.join(ASSETS, "toy_tokenizer.json")
# the format note of TOY_DATA's prompts (a `data.instruction` template)
TOY_INSTRUCTION = "You are one of {num_threads} threads. End with \\boxed{{x}} and one tag."
