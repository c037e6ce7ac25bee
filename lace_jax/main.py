"""The lace_jax command line: one entry point for every mode.

  python -m lace_jax.main --config=experiments/<file>.py[:arg] --workdir=DIR [--config.a.b=v]

With no --config it runs the embedded quickstart (`lace_jax/toy/quickstart.py`). TPU pod
jobs run the same command on every host. What the mode returns is written to
WORKDIR/result.json. `--sweep=NAME[,NAME]` runs a sweep the experiment file declares
(`lace_jax.sweep`: --jobs, --retry_failed, --sweep_print, --sweep_index, --sweep_table). `--config.plan.target=tpu:v5p:2x2x2` (or cuda:h100x8,
local, ...) compiles the experiment's functions for that target instead of running them
(`lace_jax.plan`).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import json
import os
import re
import sys

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from lace_jax import distributed, grading, modes, runtime, sweep
from lace_jax import workdir as workdir_lock
from lace_jax.errors import ConfigError, RunError

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "toy", "quickstart.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Experiment file, optionally with `:arg` (e.g. :runlocal).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs, logs and checkpoints.")
_SWEEP = flags.DEFINE_list("sweep", [], "Sweeps of the experiment file to run (functions "
                           "sweep_<name>(); several names multiply). See lace_jax.sweep.")
_JOBS = flags.DEFINE_integer("jobs", 1, "Sweep points run at a time.")
_RETRY = flags.DEFINE_bool("retry_failed", False, "Rerun the sweep's failed points too.")
_PRINT = flags.DEFINE_bool("sweep_print", False, "Print one command per sweep point (for "
                           "array jobs, XManager, xpk) and exit.")
_INDEX = flags.DEFINE_integer("sweep_index", None, "Run only this sweep point.")
_TABLE = flags.DEFINE_bool("sweep_table", False, "Write the sweep's table from what has run; "
                           "run nothing.")


def _config_keys(cfg) -> list[str]:
  """Every dotted key of a ConfigDict (sections and leaves)."""
  out = []
  for k, v in cfg.items():
    out.append(k)
    if hasattr(v, "items") and hasattr(v, "get_type"):
      out += [f"{k}.{sub}" for sub in _config_keys(v)]
  return out


def _unknown_key(cfg, key: str) -> str | None:
  """The first component of dotted `key` that `cfg` lacks, as a dotted prefix; None if every
  component exists."""
  node, parts = cfg, key.split(".")
  for i, part in enumerate(parts):
    if not hasattr(node, "get_type") or part not in node:
      return ".".join(parts[:i + 1])
    node = node[part]
  return None


def _flag_error(argv: list[str], e: BaseException) -> str:
  """One line for a command line that does not parse: an unknown config key with the closest
  known keys, or the flag, its value and what is expected."""
  if isinstance(e, FileNotFoundError):
    return str(e)
  try:  # the experiment file without the overrides (the flag holds nothing after a failure)
    path, *arg = _config_argument(argv).split(":", 1)
    spec = importlib.util.spec_from_file_location("lace_jax_experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(*arg)
  except Exception:  # noqa: BLE001 (the file does not load: the message alone)
    cfg = None
  if hasattr(cfg, "get_type"):
    for arg in argv[1:]:
      m = re.match(r"^--config\.([^=\s]+)", arg)
      if not m:
        continue
      bad = _unknown_key(cfg, m.group(1))
      if bad is None:
        continue
      keys = _config_keys(cfg)
      depth = bad.count(".")
      peers = [k for k in keys if k.count(".") == depth]  # keys at the same depth first
      close = difflib.get_close_matches(bad, peers, n=3, cutoff=0.5) or \
          difflib.get_close_matches(bad, keys, n=3, cutoff=0.5)
      where = bad.rsplit(".", 1)[0] if "." in bad else None
      known = sorted(k.rsplit(".", 1)[-1] for k in peers
                     if (k.rsplit(".", 1)[0] if "." in k else None) == where)
      hint = (f"closest: {', '.join(close)}" if close else
              f"known keys{' of ' + where if where else ''}: {', '.join(known)}")
      return f"{arg}: no config key {bad!r} in {_config_argument(argv)}; {hint}"
  msg = str(e).strip().split("\n")[0]
  return msg if isinstance(e, flags.Error) else f"{type(e).__name__}: {msg}"


def _no_such_file(argv: list[str]) -> None:
  """FileNotFoundError naming --config's file if it does not exist."""
  path = _config_argument(argv).split(":", 1)[0]
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config={_config_argument(argv)}: no such experiment file "
                            f"({os.path.abspath(path)})")


HELP = """usage: python -m lace_jax.main [--config=EXPERIMENT.py[:ARG]] [--workdir=DIR]
                             [--config.KEY=VALUE ...] [--sweep=NAME [--jobs=N]]

Runs one LACE job, chosen by the experiment file's `mode`. Without --config: the quickstart
(a few CPU minutes). --config.plan.target=TARGET (tpu:v5p:2x2x2, cuda:h100x8, default, ...)
compiles the experiment for that accelerator instead of running it. TPU pods: the same
command on every host. `--helpfull` lists every flag.

modes:
{modes}

experiment files ({where}):
{files}

flags:
  --config=FILE[:ARG]   experiment file; ARG picks a variant (runlocal: tiny model, CPU)
  --config.KEY=VALUE    override any field, e.g. --config.train.steps=100
  --workdir=DIR         outputs, checkpoints, logs; rerunning resumes
  --sweep=NAME[,NAME]   run the file's sweep_NAME() points (--jobs, --sweep_print, ...)
"""


def _experiment_files() -> tuple[str, list[tuple[str, str]]]:
  """(folder, [(file, first line of its docstring)]) of the experiments folder: ./experiments,
  else the one beside the lace_jax package (a source checkout)."""
  import ast  # noqa: PLC0415 (only for --help)
  import glob  # noqa: PLC0415
  here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
  folder = next((d for d in ("experiments", here) if os.path.isdir(d)), None)
  if folder is None:
    return "none found", []
  out = []
  for path in sorted(glob.glob(os.path.join(folder, "*.py"))):
    try:
      with open(path) as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    except (OSError, SyntaxError):
      doc = ""
    line = " ".join(doc.split("\n\n")[0].split()).split(". ")[0].rstrip(".:")  # 1st sentence
    out.append((os.path.join("experiments", os.path.basename(path)),
                line if len(line) <= 78 else line[:75].rsplit(" ", 1)[0] + " ..."))
  return folder, out


def usage() -> str:
  """The --help text: the command, every mode and every experiment file, one line each."""
  folder, files = _experiment_files()
  width = max((len(f) for f, _ in files), default=0)
  return HELP.format(
      modes="\n".join(f"  {name:<11} {line}" for name, line in modes.SUMMARY.items()),
      where=folder, files="\n".join(f"  {f:<{width}}  {line}" for f, line in files))


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with any error (an unknown flag or config key, a value of the wrong
  type) as one `error:` line and exit code 2; `--help` prints `usage()` and exits 0."""
  if any(a in ("-h", "-help", "--help", "--helpshort", "-?") for a in argv[1:]):
    print(usage(), end="")
    sys.exit(0)
  try:
    rest = flags.FLAGS(argv)
    _no_such_file(argv)  # a missing file fails only when the config is first read
    return rest
  except Exception as e:  # noqa: BLE001 (every parse failure is the user's input)
    if not isinstance(e, FileNotFoundError):
      try:
        _no_such_file(argv)
      except FileNotFoundError as missing:
        e = missing
    print(f"error: {_flag_error(argv, e)}", file=sys.stderr, flush=True)
    sys.exit(2)


def _config_argument(argv: list[str]) -> str:
  """The --config value as given (file[:arg]), for the sweep points' command lines."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return _DEFAULT_CONFIG


def run_sweep(workdir: str | None) -> None:
  if not workdir:
    raise app.UsageError("--sweep needs --workdir (the sweep's directory)")
  argv = sys.argv
  config_arg = _config_argument(argv)
  base = [a for a in argv[1:] if a.startswith("--config.")]
  if any(a.startswith("--config.") and "=" not in a for a in base):
    raise app.UsageError("with --sweep, write config overrides as --config.key=value")
  try:
    points = sweep.points_of(config_arg, _SWEEP.value, workdir)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if _PRINT.value:
    for p in points:
      print(sweep.index_command(p, argv))
    return
  if _INDEX.value is not None:
    if not 0 <= _INDEX.value < len(points):
      print(f"error: --sweep_index={_INDEX.value}: the sweep has {len(points)} points "
            f"(0..{len(points) - 1})", file=sys.stderr)
      sys.exit(2)
    points_to_run = [points[_INDEX.value]]
  else:
    points_to_run = points
  if not _TABLE.value:
    print(f"lace_jax: sweep {','.join(_SWEEP.value)} of {config_arg}, workdir {workdir}",
          flush=True)
    sweep.run(points_to_run, config_arg, base, jobs=_JOBS.value, retry_failed=_RETRY.value)
  sweep.write_table(points, workdir, plot_metrics=sweep.plot_metrics_of(config_arg))
  if _INDEX.value is not None and points_to_run[0].state["status"] == "failed":
    sys.exit(1)


# device files of accelerators JAX can use: NVIDIA, TPU v4 (accel), TPU v5+ (vfio groups), AMD
_ACCELERATORS = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*", "/dev/kfd")


def _cpu_without_accelerators() -> bool:
  """JAX on the CPU alone when this machine has no accelerator and JAX_PLATFORMS is unset:
  otherwise the CUDA and TPU plugins that the test extras install (`jax[cuda12]`, libtpu)
  each probe for their device at start and print a traceback (`cuInit(0) failed ... 303`) or
  libtpu errors before the run goes on on the CPU. True if it chose the CPU."""
  import glob  # noqa: PLC0415
  if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
    return False
  if any(glob.glob(pattern) for pattern in _ACCELERATORS):
    return False
  jax.config.update("jax_platforms", "cpu")  # before anything starts a backend
  return True


# modes that load a model's weights: a real preset cannot start from random ones
_WEIGHTS = ("pretrain", "sft", "grpo", "eval")


def _preflight(cfg, config_arg: str) -> None:
  """ConfigError naming every input a real-size recipe lacks (its weights, its data file),
  with the override that sets it, before anything starts."""
  model = cfg.get("model")
  if cfg.get("mode") not in _WEIGHTS or model is None or model.get("preset") == "tiny":
    return
  need = []
  if not model.get("checkpoint"):
    need.append("--config.model.checkpoint=DIR (a Hugging Face Qwen3 directory: config.json, "
                "*.safetensors, tokenizer.json)")
  path = cfg.get("data", {}).get("path") if "data" in cfg else None
  if path and path not in grading.BENCHMARKS and not any(c in path for c in "*?[") and \
      not os.path.exists(path):
    need.append(f"--config.data.path=FILE.jsonl (data.path={path!r} does not exist)")
  if need:
    file = config_arg.split(":", 1)[0]
    raise ConfigError(f"--config={config_arg} is a {model.get('preset')} recipe and needs "
                      + " and ".join(need) + f"; for a CPU smoke test: --config={file}:runlocal")


def _log0(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


# modes that take the workdir lock per part of the workdir (lace_jax.toy.comparison)
SUBDIR_LOCKS = ("relay", "toy_search")


def _write_result(workdir: str | None, result) -> None:
  """WORKDIR/result.json: what the mode returned (numbers, strings, nested dicts and lists)."""
  if not workdir or jax.process_index() != 0 or not isinstance(result, dict):
    return

  def plain(x):
    if isinstance(x, dict):
      return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [plain(v) for v in x]
    if isinstance(x, (bool, int, float, str)) or x is None:
      return x
    if isinstance(x, (np.generic, np.ndarray)) or hasattr(x, "__array__"):
      a = np.asarray(x)
      return a.item() if a.ndim == 0 else a.tolist()
    return str(x)

  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, f"result.json.{os.getpid()}.tmp")
  with open(tmp, "w") as f:
    json.dump(plain(result), f, indent=2)
  os.replace(tmp, os.path.join(workdir, "result.json"))


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # library INFO chatter would break the progress bar
  workdir = _WORKDIR.value
  if _SWEEP.value:
    run_sweep(workdir)
    return
  cfg = _CONFIG.value
  try:
    run = modes.get_mode(cfg.mode)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if "runtime" in cfg:  # before anything starts a JAX backend
    runtime.apply_libtpu_args(cfg.runtime.libtpu_init_args)
  if "plan" in cfg and cfg.plan.target:
    # lazy, as the modes' imports (lace_jax.modes): the plan mode's stack (every stage's
    # module, the compile-only targets) loads only when planning
    from lace_jax import plan  # noqa: PLC0415
    print(f"lace_jax: plan of mode {cfg.mode} for {cfg.plan.target}, workdir {workdir}",
          flush=True)
    try:
      with workdir_lock.lock(workdir) if workdir else contextlib.nullcontext():
        plan.run(cfg, workdir, name=os.path.basename(config_flags.get_config_filename(
            flags.FLAGS["config"])).split(":")[0])
    except (ConfigError, RunError) as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(2 if isinstance(e, ConfigError) else 1)
    return
  try:
    _preflight(cfg, _config_argument(sys.argv))
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  _cpu_without_accelerators()  # after planning: plans compile for the plugins' targets
  if "distributed" in cfg:
    try:
      distributed.maybe_initialize(cfg.distributed)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  print(f"lace_jax: mode {cfg.mode}, workdir {workdir}", flush=True)
  logging.info("config:\n%s", cfg)
  try:
    # one run per workdir, on every process (lace_jax.workdir); the toy comparisons lock each
    # seed and system's directory instead, so that they can run as parallel processes
    with (workdir_lock.lock(workdir, jax.process_index(), log=_log0)
          if workdir and cfg.mode not in SUBDIR_LOCKS else contextlib.nullcontext()):
      result = run(cfg, workdir)
  except Exception as e:
    distributed.report_lost_peer()  # a lost process, if one is, is the error to report
    if not isinstance(e, (RunError, ConfigError)):
      raise
    print(f"\nerror: {e}", file=sys.stderr, flush=True)  # its message says it all: no traceback
    # a normal exit (flushes, atexit): a failed checkpoint operation leaves nothing running
    # behind it (lace_jax.training.checkpointer drains orbax's reads and writes)
    sys.exit(2 if isinstance(e, ConfigError) else 1)
  _write_result(workdir, result)
  distributed.finished()


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
