"""Grading functions for the Grader tests: `is_equivalent`, except on predictions that ask a
worker to hang or to die. Module level in an importable module, because the Grader's spawned
workers import the function by name."""

import os
import time

from lace_jax.grading import is_equivalent

SLEEP = "sleep:"  # "sleep:N" sleeps N seconds, then answers False
CRASH = "crash"  # the worker exits with code 3 in the middle of the call


def hang_or_crash(pred: str, gold: str) -> bool:
  if pred.startswith(SLEEP):
    time.sleep(float(pred[len(SLEEP):]))
    return False
  if pred == CRASH:
    # Die a little after taking the call: pebble attributes a death to a call once it has
    # read the worker's acknowledgement of it, which a death within a millisecond can outrun.
    time.sleep(0.2)
    os._exit(3)
  return is_equivalent(pred, gold)
