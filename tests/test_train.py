"""Training: sharded == single device, grad accumulation, frozen backbone, the SFT loss mask,
thread shuffling, restore onto another mesh, bad records, NaN handling."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lace_jax as lj
from lace_jax import data, experiment, sharding
from lace_jax import bundled as toydata
from lace_jax.training import lm
from lace_jax.training import trainer as train
from lace_jax.training.checkpointer import Checkpointer

CFG = lj.ModelConfig.preset("tiny")
LAT = lj.LatticeConfig.default(CFG)
W, T = 4, 160


@pytest.fixture(scope="module")
def tokenizer():
  return lj.Tokenizer.from_file(toydata.TOY_TOKENIZER)


@pytest.fixture(scope="module")
def examples(tokenizer):
  ex, _ = data.load_examples(toydata.TOY_DATA, tokenizer, num_threads=W, max_len=T,
                             instruction=toydata.TOY_INSTRUCTION)
  return ex


def _batches(examples, tokenizer, n, batch_size=8, accum=1, seed=0, loss_on="generated"):
  it = iter(data.make_dataset(examples, batch_size=batch_size, max_len=T,
                              pad_id=tokenizer.pad_id, loss_on=loss_on, shuffle_threads=True,
                              seed=seed))
  out = []
  for _ in range(n):
    b = next(it)
    out.append({k: v.reshape(accum, batch_size // accum, *v.shape[1:]) for k, v in b.items()})
  return out


def _train(batches, mesh_spec, *, devices=None, trainable="all", lattice=LAT, accum=1):
  mesh = sharding.make_mesh(mesh_spec, devices)
  optim = experiment.optim_section(lr=3e-3, warmup_steps=1)
  tr = train.Trainer.create(CFG, lattice, optim, total_steps=10, trainable=trainable, mesh=mesh,
                            rules=sharding.DEFAULT_RULES)
  state = tr.init_state(seed=0)
  init = jax.device_get(state["params"])
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batches[0].items()}
  step, _ = tr.compile(shapes, lm.make_loss())
  losses = []
  for i, b in enumerate(batches):
    state, m = step(state, sharding.global_batch(b, mesh, leading=1), jax.random.key(i))
    losses.append(float(m["loss"]))
  return losses, state, init, tr


def test_sharded_step_equals_single_device(examples, tokenizer):
  assert jax.device_count() == 8
  batches = _batches(examples, tokenizer, 3)
  single, _, _, _ = _train(batches, {"data": 1, "fsdp": 1, "tensor": 1},
                           devices=jax.devices()[:1])
  sharded, state, _, _ = _train(batches, {"data": 2, "fsdp": 2, "tensor": 2})
  np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-5)
  assert single[2] < single[0]  # it trains
  q = state["params"]["layers_0"]["attn"]["q_proj"]  # [D, N, H] = (embed, heads, head_dim)
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (CFG.d_model // 2, CFG.num_heads // 2, CFG.head_dim)
  mu = state["opt_state"].inner_states["train"].inner_state[1][0].mu["layers_0"]["attn"]["q_proj"]
  assert mu.sharding.spec == q.sharding.spec  # optimizer state is sharded like its parameter


def test_grad_accumulation_equals_full_batch(examples, tokenizer):
  """Same loss and gradient norm per step. (Parameters are not compared: Adam's normalisation
  turns summation-order noise in near-zero gradients into visible update differences.)"""
  def run(accum):
    mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
    tr = train.Trainer.create(CFG, LAT, experiment.optim_section(lr=3e-3, warmup_steps=1),
                              total_steps=10, trainable="all", mesh=mesh,
                              rules=sharding.DEFAULT_RULES)
    batches = _batches(examples, tokenizer, 2, accum=accum)
    step, _ = tr.compile({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batches[0].items()},
                         lm.make_loss())
    state, out = tr.init_state(0), []
    for i, b in enumerate(batches):
      state, m = step(state, sharding.global_batch(b, mesh, leading=1), jax.random.key(i))
      out.append((float(m["loss"]), float(m["grad_norm"]), float(m["tokens"])))
    return np.array(out)

  full, acc = run(1), run(4)
  np.testing.assert_allclose(acc, full, rtol=1e-5)


def test_trainable_lattice_leaves_backbone_bit_identical(examples, tokenizer):
  _, state, init, _ = _train(_batches(examples, tokenizer, 3), {"fsdp": 2, "tensor": 2},
                             devices=jax.devices()[:4], trainable="lattice")
  final = jax.device_get(state["params"])
  changed = 0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(init), jax.tree.leaves(final)):
    if lj.model.is_lattice_param(path):
      changed += int(not np.array_equal(a, b))
    else:
      assert np.array_equal(a, b), jax.tree_util.keystr(path)
  assert changed > 0


def test_lattice_lr_multiplier_scales_only_lattice_updates():
  """optim.lattice_lr_multiplier = m: the first update of every lattice parameter is m x the
  plain AdamW's, every backbone parameter's is unchanged; at 1.0 the optimizer state has
  exactly the plain form (old checkpoints restore); a bad value is refused, named."""
  from lace_jax.model import Model
  params = Model(CFG, LAT).init(seed=0)
  params = jax.tree.map(lambda x: x + 0.1, params)  # W_up off zero: weight decay differs too
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
  labels = train.trainable_labels(params, "all")

  def first_update(multiplier):
    optim = experiment.optim_section(lr=1e-3, warmup_steps=2)
    optim.lattice_lr_multiplier = multiplier
    tx, _ = train.make_optimizer(optim, 10, labels)
    updates, state = tx.update(grads, tx.init(params), params)
    return updates, state

  plain, plain_state = first_update(1.0)
  fast, _ = first_update(7.0)
  n_lattice = 0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(plain), jax.tree.leaves(fast)):
    assert np.abs(np.asarray(a)).max() > 0, jax.tree_util.keystr(path)
    scale = 7.0 if lj.model.is_lattice_param(path) else 1.0
    n_lattice += scale == 7.0
    np.testing.assert_allclose(b, scale * np.asarray(a), rtol=1e-6, err_msg=jax.tree_util.keystr(path))
  assert n_lattice >= 8
  optim = experiment.optim_section(lr=1e-3, warmup_steps=2)
  del optim["lattice_lr_multiplier"]  # a config from before the option
  tx_old, _ = train.make_optimizer(optim, 10, labels)
  assert (jax.tree.structure(tx_old.init(params)) == jax.tree.structure(plain_state))
  for bad in (0.0, -1.0, float("nan")):
    with pytest.raises(ValueError, match="optim.lattice_lr_multiplier"):
      first_update(bad)


def test_sft_loss_ignores_prompt_tokens(examples, tokenizer):
  model, params = lj.build_model(CFG, LAT, seed=0)
  b = {k: jnp.asarray(v[0]) for k, v in _batches(examples, tokenizer, 1, batch_size=2)[0].items()}
  loss, n = lm.token_loss(model, params, b)
  prompt_pos = (~b["loss_mask"]) & b["valid"]
  changed = dict(b, targets=jnp.where(prompt_pos, (b["targets"] + 1) % 300, b["targets"]))
  assert float(lm.token_loss(model, params, changed)[0]) == float(loss)
  gen = dict(b, targets=jnp.where(b["loss_mask"], (b["targets"] + 1) % 300, b["targets"]))
  assert float(lm.token_loss(model, params, gen)[0]) != float(loss)
  # the mask covers exactly the generated tokens and the closing <|im_end|>
  ex = examples[0]
  assert int(n) == int(b["loss_mask"].sum())
  first = data.layout(ex, range(W), T, tokenizer.pad_id, "generated")
  assert first["loss_mask"].sum() == sum(len(c) for c in ex.completions)
  all_tokens = data.layout(ex, range(W), T, tokenizer.pad_id, "all")
  assert all_tokens["loss_mask"].sum() == first["valid"].sum() - W  # every next-token target


def test_generated_text_starts_at_one_column_for_every_thread(examples, tokenizer):
  ex = examples[3]
  grid = data.layout(ex, range(W), T, tokenizer.pad_id, "generated")
  p = max(len(x) for x in ex.prompts)
  for w in range(W):
    assert grid["tokens"][w, p] == ex.completions[w][0]
    assert not grid["valid"][w, :p - len(ex.prompts[w])].any()  # left padding


def _thread_orders(examples, tokenizer, it, n):
  """The permutation applied to each drawn example, read back from its first thread's text."""
  orders = []
  for _ in range(n):
    b = next(it)
    for i in range(b["tokens"].shape[0]):
      toks, mask = b["tokens"][i], b["loss_mask"][i]
      rows = []
      for w in range(W):
        start = int(np.argmax(np.concatenate([[False], mask[w][:-1]])))
        rows.append(tuple(toks[w, start:start + 8]))
      orders.append(tuple(rows))
  return orders


def test_thread_shuffling_changes_across_draws_and_resumes_identically(examples, tokenizer):
  make = lambda: iter(data.make_dataset(examples[:4], batch_size=4, max_len=T,
                                        pad_id=tokenizer.pad_id, loss_on="generated",
                                        shuffle_threads=True, seed=7, shuffle=False))
  it = make()
  epochs = [_thread_orders(examples, tokenizer, it, 1) for _ in range(3)]
  assert epochs[0] != epochs[1] != epochs[2]  # the same 4 examples, threads in new orders
  state = it.get_state()
  later = _thread_orders(examples, tokenizer, it, 2)
  resumed = make()
  resumed.set_state(state)
  assert _thread_orders(examples, tokenizer, resumed, 2) == later
  assert _thread_orders(examples, tokenizer, make(), 1) == epochs[0]  # same seed, same draws


def test_restore_onto_a_different_mesh(examples, tokenizer, tmp_path):
  batches = _batches(examples, tokenizer, 2)
  _, state, _, tr = _train(batches, {"fsdp": 8})
  ckpt = Checkpointer(str(tmp_path), keep=2)
  ckpt.save(2, state, None)
  ckpt.close()
  for spec, devices in (({"data": 4, "tensor": 2}, None), ({"fsdp": 1}, jax.devices()[:1])):
    mesh = sharding.make_mesh(spec, devices)
    other = train.Trainer.create(CFG, LAT, experiment.optim_section(lr=3e-3, warmup_steps=1),
                                 total_steps=10, trainable="all", mesh=mesh,
                                 rules=sharding.DEFAULT_RULES)
    restored = Checkpointer(str(tmp_path), keep=2).restore(2, other.abstract_state(), None)
    q = restored["params"]["layers_0"]["attn"]["q_proj"]
    assert q.sharding.mesh.shape == mesh.shape
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored["params"]),
                 jax.device_get(state["params"]))


def test_bad_records_are_counted_or_fail(tmp_path, tokenizer):
  good = json.loads(open(toydata.TOY_DATA).readline())
  lines = [json.dumps(good), "{not json", json.dumps({k: v for k, v in good.items() if k != "threads"}),
           json.dumps(dict(good, threads=good["threads"][:3])),
           json.dumps(dict(good, threads=[t * 20 for t in good["threads"]])), json.dumps(good)]
  path = tmp_path / "d.jsonl"
  path.write_text("\n".join(lines) + "\n")
  kw = dict(num_threads=W, max_len=T, instruction=toydata.TOY_INSTRUCTION)
  ex, report = data.load_examples(str(path), tokenizer, **kw)
  assert len(ex) == 2 and report.total == 6 and report.kept == 2
  assert dict(report.bad) == {"invalid JSON": 1, "missing field(s) ['threads']": 1,
                              "wrong thread count": 1, "over length": 1}
  assert f"{path}:4: wrong thread count: 3 threads, expected 4" in report.summary()
  with pytest.raises(data.BadRecord, match=f"{path}:2: invalid JSON"):
    data.load_examples(str(path), tokenizer, bad_records="fail", **kw)
  _, truncated = data.load_examples(str(path), tokenizer, truncate=True, **kw)
  assert truncated.kept == 3 and truncated.truncated == 1


def test_non_utf8_lines_are_bad_records_with_file_and_line(tmp_path, tokenizer):
  good = open(toydata.TOY_DATA, "rb").readline().rstrip(b"\n")
  latin1 = json.dumps({"text": "caf\u00e9"}, ensure_ascii=False).encode("latin-1")  # b"\xe9"
  path = tmp_path / "d.jsonl"
  path.write_bytes(b"\n".join([good, latin1, b"\xff\xfe" + good, good]) + b"\n")
  kw = dict(num_threads=W, max_len=T, instruction=toydata.TOY_INSTRUCTION)
  ex, report = data.load_examples(str(path), tokenizer, **kw)
  assert len(ex) == 2 and report.total == 4 and dict(report.bad) == {"not UTF-8": 2}
  assert f"{path}:2: not UTF-8 (byte 0xe9 at byte" in report.summary()
  with pytest.raises(data.BadRecord, match=f"{path}:2: not UTF-8"):
    data.load_examples(str(path), tokenizer, bad_records="fail", **kw)


def test_single_thread_text_source(tmp_path, tokenizer):
  path = tmp_path / "t.jsonl"
  path.write_text("\n".join(json.dumps({"text": f"x={i}: {i * 7 % 11}."}) for i in range(5)))
  ex, report = data.load_examples(str(path), tokenizer, num_threads=1, max_len=32, fmt="text")
  assert report.kept == 5 and len(ex[0].prompts) == 1
  grid = data.layout(ex[0], [0], 32, tokenizer.pad_id, "all")
  assert grid["tokens"].shape == (1, 32) and grid["loss_mask"].sum() == grid["valid"].sum() - 1


def test_data_path_that_is_a_directory_is_reported_as_one(tmp_path, tokenizer):
  with pytest.raises(IsADirectoryError, match=rf"data.path={tmp_path} is a directory; expected a "
                                              r"JSONL file \(one multi-thread record per line\)"):
    data.load_examples(str(tmp_path), tokenizer, num_threads=W, max_len=T)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.load_examples(str(tmp_path / "nope.jsonl"), tokenizer, num_threads=W, max_len=T)


def test_indivisible_sharding_names_the_parameter():
  mesh = sharding.make_mesh({"data": 2, "tensor": 4})
  with pytest.raises(ValueError, match=r"parameter \['layers_0'\]\['attn'\]\['k_proj'\] of shape "
                                       r"\(128, 2, 32\): dimension 1 \(2\) cannot be split 4 ways"):
    train.Trainer.create(CFG, LAT, experiment.optim_section(lr=1e-3, warmup_steps=1),
                         total_steps=2, trainable="all", mesh=mesh, rules=sharding.DEFAULT_RULES)


def test_mesh_and_rule_errors():
  assert sharding.mesh_shape({"data": 2, "fsdp": -1}, 8) == {"data": 2, "fsdp": 4, "tensor": 1}
  with pytest.raises(ValueError, match="8 devices are not divisible by 3"):
    sharding.mesh_shape({"data": 3, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match="has 4 devices but 8 are available"):
    sharding.mesh_shape({"data": 2, "fsdp": 2}, 8)
  with pytest.raises(ValueError, match="unknown logical axis 'mlpp'"):
    sharding.rules_with_overrides((("mlpp", None),))
  rules = dict(sharding.rules_with_overrides((("mlp", None), ("vocab", ["tensor", "fsdp"]))))
  assert rules["mlp"] is None and rules["vocab"] == ("tensor", "fsdp")


def test_constrain_maps_logical_axes_through_the_rules():
  x = jnp.arange(8 * 6 * 5, dtype=jnp.float32).reshape(8, 6, 5)
  assert sharding.constrain(x, ("batch", None, None)) is x  # no mesh set: unchanged
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  f = jax.jit(lambda x: sharding.constrain(x, ("batch", "act_mlp", "act_embed")))
  with jax.set_mesh(mesh):
    y = f(x)
    spec = lambda a: tuple(a.sharding.spec) + (None,) * (a.ndim - len(a.sharding.spec))
    assert spec(y) == (("data", "fsdp"), "tensor", None)
    with sharding.logical_rules(sharding.rules_with_overrides((("act_embed", "tensor"),
                                                               ("act_mlp", None)))):
      z = jax.jit(lambda x: sharding.constrain(x, ("batch", "act_mlp", "act_embed")))(x)
    # a dimension the mesh axes do not divide (5 over tensor=2) stays replicated
    assert spec(z) == (("data", "fsdp"), None, None)
    with pytest.raises(ValueError, match=r"2 logical axes \('batch', None\) for an array of "
                                         r"shape \(8, 6, 5\)"):
      sharding.constrain(x, ("batch", None))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


def test_train_step_activations_are_split_over_the_batch():
  """Every device computes its own examples' activations: the compiled step on 4 devices
  (fsdp) holds the MLP hidden [B/4, W, T, F] and never the whole batch's [B, W, T, F] (without
  the layer-boundary constraints XLA:TPU replicated the batch: issue 12)."""
  mesh = sharding.make_mesh({"fsdp": 4}, jax.devices()[:4])
  tr = train.Trainer.create(CFG, LAT, experiment.optim_section(lr=1e-3, warmup_steps=1),
                            total_steps=2, trainable="all", mesh=mesh, rules=sharding.DEFAULT_RULES)
  b, t = 8, 32
  shapes = {k: jax.ShapeDtypeStruct((1, b, W, t), jnp.int32 if k in ("tokens", "targets")
                                    else jnp.bool_) for k in ("tokens", "valid", "targets",
                                                              "loss_mask")}
  compiled, _ = tr.compile(shapes, lm.make_loss(chunk=8))
  hlo = compiled.as_text()
  per_device = f"[{b // 4},{W},{t},{CFG.mlp_dim}]"
  assert per_device in hlo
  assert f"[{b},{W},{t},{CFG.mlp_dim}]" not in hlo


def test_an_override_of_the_batch_rule_moves_every_batch_placement(monkeypatch):
  """`batch` -> data only: the train step's input sharding, the batch check, the sampler's
  prompts and the Pallas kernels' shard_map all follow the rule table, none keeps data x fsdp."""
  rules = sharding.rules_with_overrides((("batch", "data"),))
  assert sharding.batch_axes() == ("data", "fsdp")  # DEFAULT_RULES outside any context
  assert sharding.batch_axes(rules) == ("data",)
  with sharding.logical_rules(rules):
    assert sharding.batch_axes() == ("data",)  # the enclosing rules, as the model reads them
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  assert sharding.batch_ways(mesh, rules) == 2 and sharding.batch_ways(mesh) == 8
  assert tuple(sharding.batch_sharding(mesh, 4, leading=1, rules=rules).spec) == (
      None, "data", None, None)
  train.check_batch(6, 1, mesh, rules=rules)  # 6 rows split 2 ways (not 8)
  with pytest.raises(ValueError, match=r"4 ways of the batch axes \('data', 'fsdp'\)"):
    train.check_batch(6, 1, sharding.make_mesh({"data": 1, "fsdp": 4}, jax.devices()[:4]))

  tr = train.Trainer.create(CFG, LAT, experiment.optim_section(lr=1e-3, warmup_steps=1),
                            total_steps=2, trainable="all", mesh=mesh, rules=rules)
  shapes = {k: jax.ShapeDtypeStruct((1, 2, W, 8), jnp.int32) for k in ("tokens", "targets")}
  _, (_, batch, _) = tr.jit_step(shapes, lm.make_loss())
  assert tuple(batch["tokens"].sharding.spec)[:2] == (None, "data")

  seen = []
  real = lj.kernels.batch_parallel

  def record(fn, *arrays, batch_axes):
    seen.append(tuple(batch_axes))
    return real(fn, *arrays, batch_axes=batch_axes)

  monkeypatch.setattr(lj.kernels, "batch_parallel", record)
  lat = lj.LatticeConfig.default(CFG, implementation="pallas_interpret")
  model = lj.Model(CFG, lat)
  params = model.init(0)  # outside any rules or mesh: the default axes, nothing split
  seen.clear()
  prompts = [[[1, 2, 3]] * 2] * 2  # B = 2 prompts of W = 2 threads
  out = lj.sample(model, params, prompts, num_threads=2, max_new_tokens=2, mesh=mesh,
                  rules=rules)
  assert out.tokens.shape == (2, 2, 2)
  assert seen and set(seen) == {("data",)}, seen
