"""The overhead report on the real 1.7B and 4B shapes (abstract arrays, nothing allocated)."""

import pytest

from lace_jax import overhead


@pytest.mark.parametrize("preset", ["qwen3-1.7b", "qwen3-4b"])
def test_lattice_overhead_within_paper_bounds(preset):
  r = overhead.measure(preset, num_threads=4, context=150)
  assert 0 < r.param_overhead < 0.01  # paper: parameters under 1%
  assert 0 < r.flop_overhead < 0.013  # paper: FLOPs under 1.3%
  # the base forward is ~2 * params * tokens FLOPs: the cost analysis sees the whole model
  assert r.base_flops == pytest.approx(2 * r.base_params * 4 * 150, rel=0.05)
  assert f"| {preset} | 4 | 150 |" in overhead.markdown_table([r])
