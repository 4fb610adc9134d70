"""DP / DPA: streaming results equal the brute-force reference of the spec, and the §10 invariants hold."""

import filecmp
import os

import pytest
import torch

from dppa_stream.config import parse_config
from dppa_stream.pipeline import MergeOptions, merge

from .reference import load_model, prune_le
from .reference_dppa import dp_masks, dppa_merge
from .test_merge import _bitwise_equal


def _cfg(method, base, fts, params: dict, model_params=None):
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for i, f in enumerate(fts):
        lines.append(f"  - model: {f}")
        mp = (model_params or [{}] * len(fts))[i]
        if mp:
            lines.append(f"    parameters: {mp}")
    if params:
        lines.append(f"parameters: {params}")
    return parse_config("\n".join(lines).replace("'", "") + "\n")


@pytest.fixture(scope="module")
def drifted(ckpts):
    """A set whose deltas are large ("complex" fine-tunes) with heavy tails, zeros and bf16 ties."""
    return ckpts(torch.bfloat16, 2, True, drift=3e-3)


@pytest.mark.parametrize("semantics", ["reference", "exact"])
@pytest.mark.parametrize("unit_bytes", [None, 2500])
def test_dppa_matches_bruteforce(tmp_path, drifted, semantics, unit_bytes):
    base, ft1, ft2 = drifted
    alphas = [[1.2, 1.5], [2.0, 0.0]]  # increasing factors exercise max over k >= j
    cfg = _cfg("dppa", base, [ft1, ft2], {"semantics": semantics},
               [{"amplification": alphas[0], "weight": 0.6}, {"amplification": alphas[1], "weight": 0.4}])
    merge(cfg, str(tmp_path / "out"), MergeOptions(quiet=True, unit_bytes=unit_bytes))
    got = load_model(str(tmp_path / "out"))
    want = dppa_merge(load_model(base), [load_model(ft1), load_model(ft2)], [0.9, 0.8], alphas, [0.6, 0.4],
                      semantics=semantics)
    _bitwise_equal(got, want)


def test_dp_masks_equal_reference_and_report(tmp_path, drifted):
    """Masks identical in reference mode, realised sparsity above nominal (ties pruned), clamps reported."""
    base, ft1, _ = drifted
    cfg = _cfg("dp", base, [ft1], {"pruning_rate": 0.9})
    merge(cfg, str(tmp_path / "out"), MergeOptions(quiet=True))
    got = load_model(str(tmp_path / "out"))
    b, f = load_model(base), load_model(ft1)
    deltas, masks = dp_masks(b, f, [0.9])
    for name, m in masks.items():
        kept = (got[name].float() - b[name].float()) != 0
        assert torch.equal(kept, m[0] & (deltas[name] != 0)), name
    # the report's realised kept counts are the masks' counts (ties at the threshold pruned)
    from dppa_stream.stats_report import collect_stats

    rep = collect_stats(cfg, MergeOptions(quiet=True)).models[0]
    assert {tr.name: tr.kept[0] for tr in rep.tensors} == {name: int(m[0].sum()) for name, m in masks.items()}


def test_lambda_zero_is_uniform_magnitude_pruning(tmp_path, drifted):
    base, ft1, _ = drifted
    cfg = _cfg("dp", base, [ft1], {"pruning_rate": 0.8, "lamda": 0})
    merge(cfg, str(tmp_path / "out"), MergeOptions(quiet=True))
    got, b, f = load_model(str(tmp_path / "out")), load_model(base), load_model(ft1)
    for name in b:
        d = (f[name].float() - b[name].float()).to(torch.bfloat16).float()
        if ".layers." in name and b[name].dim() == 2:
            d = prune_le(d, 0.8)
        assert torch.equal(got[name], (b[name].float() + d).to(b[name].dtype)), name


def test_alpha_one_one_equals_dp_at_lowest_rate(tmp_path, drifted):
    base, ft1, ft2 = drifted
    a = _cfg("dppa", base, [ft1, ft2], {"pruning_rates": [0.9, 0.8], "amplification": [1, 1]})
    b = _cfg("dp", base, [ft1, ft2], {"pruning_rate": 0.8})
    merge(a, str(tmp_path / "a"), MergeOptions(quiet=True))
    merge(b, str(tmp_path / "b"), MergeOptions(quiet=True))
    for fn in os.listdir(tmp_path / "b"):
        if fn.endswith(".safetensors"):
            assert filecmp.cmp(tmp_path / "a" / fn, tmp_path / "b" / fn, shallow=False)


def test_alpha_b_zero_is_scaled_dp_at_highest_rate(tmp_path, drifted):
    base, ft1, _ = drifted
    cfg = _cfg("dppa", base, [ft1], {"pruning_rates": [0.9, 0.8], "amplification": [2.5, 0]})
    merge(cfg, str(tmp_path / "out"), MergeOptions(quiet=True))
    got, b, f = load_model(str(tmp_path / "out")), load_model(base), load_model(ft1)
    deltas, masks = dp_masks(b, f, [0.9])
    for name in b:
        d = deltas[name].float()
        d = d * masks[name][0] * 2.5 if name in masks else d * 2.5
        assert torch.equal(got[name], (b[name].float() + d).to(b[name].dtype)), name


def test_partitions_nested_and_density_shift(tmp_path, drifted):
    base, ft1, _ = drifted
    cfg = _cfg("dppa", base, [ft1], {"pruning_rates": [0.9, 0.8]})
    from dppa_stream.stats_report import collect_stats

    rep = collect_stats(cfg, MergeOptions(quiet=True)).models[0]
    assert rep.tensors
    for tr in rep.tensors:
        assert tr.densities[1] - tr.densities[0] == pytest.approx(0.1, abs=1e-9) or any(tr.clamped)
        assert tr.thresholds[0] >= tr.thresholds[1]
        assert tr.kept[0] <= tr.kept[1]
        # realised kept count is at most nominal: ties at the threshold are pruned
        assert tr.kept[0] <= tr.numel - int(tr.numel * (1 - tr.densities[0]))
    scores = [br.layer_score for br in rep.blocks]
    assert max(abs(s) for s in scores) == pytest.approx(1.0)


def test_degenerate_statistics_give_zero_adjustment(tmp_path):
    """All-equal deltas: zero spread at both levels -> density exactly 1 - s, not NaN."""
    from safetensors.torch import save_file

    b = {f"model.layers.{i}.mlp.up_proj.weight": torch.zeros(8, 16, dtype=torch.bfloat16) for i in range(2)}
    f = {k: torch.full_like(v, 0.5) for k, v in b.items()}
    for name, sd in (("base", b), ("ft", f)):
        os.makedirs(tmp_path / name)
        save_file(sd, str(tmp_path / name / "model.safetensors"), {"format": "pt"})
    cfg = _cfg("dp", tmp_path / "base", [tmp_path / "ft"], {"pruning_rate": 0.5})
    from dppa_stream.stats_report import collect_stats

    rep = collect_stats(cfg, MergeOptions(quiet=True)).models[0]
    assert all(tr.densities == [0.5] and tr.linear_score == 0 for tr in rep.tensors)
    assert all(br.layer_score == 0 for br in rep.blocks)


def test_negative_density_is_clamped_and_reported(tmp_path, drifted):
    base, ft1, _ = drifted
    cfg = _cfg("dp", base, [ft1], {"pruning_rate": 0.95, "lamda": 0.3})
    from dppa_stream.stats_report import collect_stats

    rep = collect_stats(cfg, MergeOptions(quiet=True)).models[0]
    clamped = [tr for tr in rep.tensors if tr.clamped[0]]
    assert clamped and all(tr.densities[0] == 1 / tr.numel for tr in clamped)
    merge(cfg, str(tmp_path / "out"), MergeOptions(quiet=True))  # the reference crashes here; we do not


def test_bad_dppa_params_are_one_line_errors():
    from dppa_stream.errors import UsageError

    for params, word in (({"pruning_rates": [0.8, 0.9]}, "decreasing"), ({"semantics": "fast"}, "reference"),
                         ({"combine": "avg"}, "sum"), ({"linear_filter": "("}, "regular expression")):
        with pytest.raises(UsageError, match=word):
            _cfg("dppa", "/b", ["/f"], params)


@pytest.mark.parametrize("semantics", ["reference", "exact"])
def test_small_tensors_merge_in_batches_as_one_by_one(tmp_path, drifted, monkeypatch, semantics):
    """Pass 2 merges DPPA's whole small tensors in batches (`merge_planned_batch`, one kernel call
    for many tensors planned before pass 2), and pass 1 reads them in batches: the same bytes as
    reading and merging them one by one, with batches cut at a few tensors (inside work units)."""
    from dppa_stream import units
    from dppa_stream.methods.gta import DeltaMethod

    base, ft1, ft2 = drifted
    cfg = _cfg("dppa", base, [ft1, ft2], {"semantics": semantics},
               [{"amplification": [1.2, 1.5], "weight": 0.6}, {"amplification": [2.0, 0.0], "weight": 0.4}])
    batched = []
    merge_planned_batch = DeltaMethod.merge_planned_batch
    monkeypatch.setattr(DeltaMethod, "merge_planned_batch",
                        lambda self, batch, plans, *a: batched.append(len(plans)) or merge_planned_batch(
                            self, batch, plans, *a))
    read = []
    batch_rows = units.BatchRows
    monkeypatch.setattr(units, "BatchRows", lambda items, *a: read.append(len(items)) or batch_rows(items, *a))
    monkeypatch.setattr(units, "BATCH_MAX_ITEMS", 3)
    merge(cfg, str(tmp_path / "batched"), MergeOptions(quiet=True))
    assert max(batched) == 3 and max(read) == 3 and len(batched) > 3, (batched, read)
    monkeypatch.delattr(DeltaMethod, "merge_planned_batch")
    monkeypatch.setattr(units, "batch_key", lambda inp: None)  # pass 1 reads tensor by tensor
    merge(cfg, str(tmp_path / "one_by_one"), MergeOptions(quiet=True))
    names = sorted(f for f in os.listdir(tmp_path / "batched") if f.endswith(".safetensors"))
    assert names and all(filecmp.cmp(tmp_path / "batched" / f, tmp_path / "one_by_one" / f, shallow=False)
                         for f in names)


def test_batch_records_equal_each_tensors_kernel_records():
    """`DPUnitPlans.batch_records` (a batch's records built from the report's arrays at once) holds,
    row by row, the records `kernel_records` makes from each item's own `Segments`: dense tensors,
    thresholds that keep all or none, compared values with and without tracked ties (exact
    semantics, ties before unit 0), fine-tunes with fewer factors than rates."""
    import numpy as np

    from dppa_stream import kernels, summaries
    from dppa_stream.methods.base import TensorInfo
    from dppa_stream.methods.dppa import DPUnitPlans
    from dppa_stream.methods.gta import torch_order_sums
    from dppa_stream.methods.sparsify import kernel_records

    numel = 40
    infos = [TensorInfo(f"t{k}", "BF16", (numel,), {}, ({"weight": 0.6 + k / 8}, {"weight": 0.4})) for k in range(5)]
    at = np.array([0, 1, 1, 2, 3, 4])  # tensor 1 is not pruned by DP: dense
    v = int(np.float32(0.01).view(np.int32))
    bits = [np.array([[v, v - 5], [summaries.KEEP_ALL, v], [summaries.KEEP_NONE, summaries.KEEP_ALL], [v + 9, v]]),
            np.array([[v, v], [v + 1, v - 1], [v + 2, v - 2], [v + 3, v - 3]])]
    ties = [np.array([[2, 0], [0, 3], [0, 0], [1, 1]]), np.array([[0, 0], [5, 0], [0, 0], [0, 2]])]
    for exact in (False, True):
        starts = [[((0, (0, 0)),), ((0, (0, 0)), (1, (4, 1))), (), ((0, (0, 0)),)], [(), (), (), ((0, (0, 0)),)]] \
            if exact else [None, None]
        plans = DPUnitPlans(infos, np.ones(5, np.bool_), at, [(0, numel)] * 4, bits, ties, starts,
                            [(1.5, 1.5), (2.0,)], (1.5, 2.0), True, np.array([_weights(i) for i in infos]))
        assert plans.whole([numel] * 5).all()
        models, levels, combine = plans.batch_records(consensus=False)
        R = levels.shape[2]
        for k in range(5):
            seg = plans[k]
            mod, lev = kernel_records(seg.parts[0][1], np.array(seg.weights, np.float32), 0)
            assert models[k].tobytes() == mod.tobytes(), (exact, k)
            padded = kernels.records(kernels.LEVEL_FIELDS, (2, R))
            padded[:, :lev.shape[1]] = lev
            assert levels[k].tobytes() == padded.tobytes(), (exact, k, levels[k], padded)
        want = torch_order_sums(np.array([seg.weights for seg in plans], np.float32))
        assert combine["divisor"].tobytes() == want.tobytes() and combine["normalize"].all()
        assert set(levels["kind"][[0, 2, 3, 4]].ravel()) >= {kernels.TH_ALL, kernels.TH_NONE, kernels.TH_GT}
        assert (kernels.TH_VALUE in levels["kind"]) == exact


def _weights(info):
    return [m["weight"] for m in info.models]


def test_part_records_equal_each_linears_kernel_records():
    """A tensor of several linears (a fused expert tensor) merged in one kernel call
    (`DPUnitPlans.part_records`, `DPPA.merge_unit`): per unit, the segments are its linears
    clipped to the unit, with the records `kernel_records` makes for each linear's `Sparse` and
    that unit (ties seen before it, exact semantics); a unit the linears do not tile gets None."""
    from collections import namedtuple

    import numpy as np

    from dppa_stream import kernels, summaries
    from dppa_stream.methods.base import TensorInfo
    from dppa_stream.methods.dppa import DPUnitPlans
    from dppa_stream.methods.sparsify import kernel_records

    Unit = namedtuple("Unit", "flat_start numel index")
    info = TensorInfo("experts", "BF16", (4, 10), {}, ({"weight": 0.7}, {"weight": 0.4}))
    v = int(np.float32(0.02).view(np.int32))
    bits = [np.array([[v, v - 3], [summaries.KEEP_ALL, v], [v + 1, summaries.KEEP_NONE], [v, v]]),
            np.array([[v + 2, v], [v, v - 1], [v, v], [v - 4, v - 9]])]
    ties = [np.array([[1, 2], [0, 4], [3, 0], [0, 1]]), np.array([[2, 0], [0, 0], [1, 1], [0, 3]])]
    spans = [(0, 10), (10, 20), (20, 30), (30, 40)]
    # per linear and fine-tune, the ties before each unit it meets (linears 1 and 2 cross a unit boundary)
    starts = [[((0, (0, 0)),), ((0, (0, 0)), (1, (3, 1))), ((1, (0, 0)), (2, (2, 2))), ((2, (0, 0)),)],
              [((0, (0, 0)),), ((0, (0, 0)), (1, (1, 2))), ((1, (0, 0)), (2, (4, 0))), ((2, (0, 0)),)]]
    units = [Unit(0, 15, 0), Unit(15, 10, 1), Unit(25, 15, 2), Unit(0, 40, 0)]
    for exact in (False, True):
        plans = DPUnitPlans([info], np.ones(1, np.bool_), np.array([0, 4]), spans, bits, ties,
                            starts if exact else [None, None], [(1.5, 1.5), (2.0, 1.0)], (1.5, 2.0), False,
                            np.array([[0.7, 0.4]]))
        seg = plans.segments(0)
        weights = np.array(seg.weights, np.float32)
        for unit in units:
            bounds, models, levels, combine = plans.part_records(unit, consensus=True)
            want = [(max(a - unit.flat_start, 0), min(b - unit.flat_start, unit.numel), sparse)
                    for (a, b), sparse in seg.parts if a - unit.flat_start < unit.numel and b > unit.flat_start]
            assert bounds.tolist() == [lo for lo, _, _ in want] + [unit.numel], (exact, unit)
            for i, (_, _, sparse) in enumerate(want):
                mod, lev = kernel_records(sparse, weights, unit.index)
                assert models[i].tobytes() == mod.tobytes(), (exact, unit, i)
                assert levels[i].tobytes() == lev.tobytes(), (exact, unit, i)
            assert combine["consensus"].all() and not combine["normalize"].any()
        gap = DPUnitPlans([info], np.ones(1, np.bool_), np.array([0, 2]), [(0, 10), (20, 30)], bits, ties,
                          [None, None], [(1.5, 1.5), (2.0, 1.0)], (1.5, 2.0), False, np.array([[0.7, 0.4]]))
        assert gap.part_records(Unit(0, 30, 0), False) is None
