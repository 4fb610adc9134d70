"""The `stats` report (table, JSON, plot) on ModelReports built directly, without a merge: aligned
table columns whatever the label lengths, stacks/blocks/tensors in the JSON, a PNG per stack with
one colour per kind and legends outside every axes, for two-stack and MoE reports."""

from __future__ import annotations

import json
import re

import pytest

from dppa_stream import stats_report
from dppa_stream.blocks import KINDS
from dppa_stream.methods.dppa import BlockReport, ModelReport, TensorReport
from dppa_stream.stats_report import KIND_COLOURS, StatsResult, figure, plot, table

LLAMA = [("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"), ("self_attn.v_proj", "v"),
         ("self_attn.o_proj", "o"), ("mlp.gate_proj", "gate"), ("mlp.up_proj", "up"), ("mlp.down_proj", "down")]
T5_ENC = [("layer.0.SelfAttention.q", "q"), ("layer.0.SelfAttention.k", "k"), ("layer.0.SelfAttention.v", "v"),
          ("layer.0.SelfAttention.o", "o"), ("layer.1.DenseReluDense.wi", "fc_in"),
          ("layer.1.DenseReluDense.wo", "fc_out")]
T5_DEC = T5_ENC[:4] + [(lbl.replace("layer.0.SelfAttention", "layer.1.EncDecAttention"), k) for lbl, k in T5_ENC[:4]] + \
    [("layer.2.DenseReluDense.wi", "fc_in"), ("layer.2.DenseReluDense.wo", "fc_out")]
LONG = "model.some_extraordinarily_long_adapter_module_name.with.many.levels.inside.it.q_proj"


def moe(experts: int) -> list:
    return (LLAMA[:4] + [(f"mlp.experts.gate_up_proj[{e}]", "expert_gate_up") for e in range(experts)]
            + [(f"mlp.experts.down_proj[{e}]", "expert_down") for e in range(experts)])


def report(model: int, stacks: list, numel: int = 1000) -> ModelReport:
    """A ModelReport as DPPA's plan makes it: stacks = [(name, blocks, [(label, kind), ...])]."""
    blocks, tensors = [], []
    for stack, nb, linears in stacks:
        for b in range(nb):
            blocks.append(BlockReport(b, numel * len(linears), 1e-3, 4 + b / nb, 2 * b / max(nb - 1, 1) - 1, stack))
            for j, (label, kind) in enumerate(linears):
                d = 0.1 + 0.1 * (b / nb - 0.5) + 0.01 * (j % 5) - (0.11 if (b + j) % 17 == 0 else 0)
                clamped = d < 1 / numel
                d = max(d, 1 / numel)
                kept = [0 if clamped else int(numel * d), int(numel * (d + 0.1))]
                m = re.search(r"\[(\d+)\]$", label)
                e = int(m.group(1)) if m else 0
                name = f"{stack}.{b}.{label[: m.start()] if m else label}.weight"
                tensors.append(TensorReport(name, b, numel, 1e-3 * (1 + b), 0.3 + b / nb + 0.01 * j, 0.1 * (j % 3),
                                            [d, d + 0.1], [clamped, False], [1e-3, 5e-4], kept, stack, label, kind,
                                            (e * numel, (e + 1) * numel)))
    return ModelReport(model, blocks, tensors)


PARAMS = {"pruning_rates": [0.9, 0.8], "lamda": 0.08, "outlier_multiple": 5.0, "layer_outlier_multiple": 3.0,
          "semantics": "reference"}


def result(stacks: list, models: int = 2) -> StatsResult:
    return StatsResult("dppa", [report(i, stacks) for i in range(models)],
                       [f"/data/runs/fine-tune-{i}" for i in range(models)], params=dict(PARAMS), base_model="/data/base")


def _rows(text: str) -> list[tuple[str, list[str]]]:
    """(header, rows) per stack section of the table."""
    sections, cur = [], None
    for line in text.splitlines():
        if line.startswith("## ") or not line:
            cur = None
        elif line.startswith("block "):
            cur = (line, [])
            sections.append(cur)
        elif cur is not None:
            cur[1].append(line)
    return sections


def test_table_columns_aligned_with_long_labels():
    linears = LLAMA[:2] + [(LONG, "q"), ("x", "other")]
    res = result([("model.layers", 3, linears), ("a.rather.long.prefix.of.the.vision_tower.encoder.layers", 2, LLAMA)])
    text = table(res)
    sections = _rows(text)
    assert len(sections) == 4  # 2 fine-tunes x 2 stacks
    headers = {h for h, _ in sections}
    assert len(headers) == 1, "every section has the same header, so the same column offsets"
    header = headers.pop()
    right = ["D_i %", "L_i", "mean|d|", "r_ij %", "T_ij", "d@0.9", "d@0.8", "kept%@0.9", "kept%@0.8"]
    ends = [header.index(h) + len(h) for h in right]
    starts = [header.index(h) for h in ("linear", "kind")]
    for _, rows in sections:
        for row in rows:
            for end in ends[2:]:  # right-aligned numbers end under their header
                assert row[end - 1] != " " and (end == len(row) or row[end] == " "), (row, end)
            for start in starts:  # left-aligned text starts under its header
                assert row[start] != " " and row[start - 1] == " ", (row, start)
    assert LONG not in text and stats_report.shorten(LONG) in text and "..." in stats_report.shorten(LONG)
    assert len(stats_report.shorten(LONG)) == stats_report.LABEL_MAX
    # one header per stack with its blocks and linears per block, one summary line per fine-tune
    assert "## model.layers: 3 blocks, 4 linears per block" in text
    assert "## a.rather.long.prefix.of.the.vision_tower.encoder.layers: 2 blocks, 7 linears per block" in text
    summaries = [ln for ln in text.splitlines() if ln.startswith("# ")]
    assert len(summaries) == 2 and all(re.search(r": 26 linears in 2 stacks, \d+ clamped, \d+ emptied$", s) for s in summaries)
    # attention before MLP in Llama order, block signal on a block's first row only
    rows = sections[1][1]
    assert [r[starts[0]:].split()[0] for r in rows[:7]] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert rows[0].split()[0] == "0" and rows[1].startswith(" " * 5)


def test_stack_with_blocks_of_different_sizes():
    rep = report(0, [("model.layers", 3, LLAMA)])
    rep.tensors = [tr for tr in rep.tensors if not (tr.block == 1 and tr.kind in ("gate", "up", "down"))]
    res = StatsResult("dp", [rep], ["/m"], params={"pruning_rate": 0.9, "lamda": 0.1})
    assert stats_report.stacks(rep)[0]["linears_per_block"] == [4, 7]
    assert "## model.layers: 3 blocks, 4-7 linears per block" in table(res)


def test_table_marks_clamped_and_emptied():
    res = result([("model.layers", 20, LLAMA)], 1)
    clamped = [tr for tr in res.models[0].tensors if any(tr.clamped)]
    assert clamped
    text = table(res)
    assert text.count("clamped, emptied") == len(clamped)
    assert f"{len(clamped)} clamped, {len(clamped)} emptied" in text.splitlines()[0]


def test_table_moe_summary_rows():
    res = result([("model.layers", 3, moe(16))], 1)
    auto = table(res)
    assert "mlp.experts.gate_up_proj[0-15]" in auto and "mlp.experts.down_proj[0-15]" in auto
    assert "gate_up_proj[3]" not in auto
    assert len(_rows(auto)[0][1]) == 3 * (4 + 2)
    assert "experts d@0.9 min-max" in auto
    each = table(res, "each")
    assert len(_rows(each)[0][1]) == 3 * (4 + 32) and "mlp.experts.down_proj[15]" in each
    few = result([("model.layers", 2, moe(4))], 1)
    assert "gate_up_proj[3]" in table(few) and "gate_up_proj[0-3]" in table(few, "summary")
    # numbered expert modules (Mixtral files) are summarised the same way
    files = [(f"block_sparse_moe.experts.{e}.w{w}", "expert_down" if w == 2 else "expert_gate_up")
             for e in range(8) for w in (1, 2, 3)]
    text = table(result([("model.layers", 2, LLAMA[:4] + files)], 1))
    assert "block_sparse_moe.experts.0-7.w1" in text and "block_sparse_moe.experts.0-7.w2" in text
    with pytest.raises(Exception, match="experts must be one of"):
        table(res, "some")


def test_json_has_stacks_blocks_and_tensors():
    res = result([("encoder.block", 2, T5_ENC), ("decoder.block", 3, T5_DEC)])
    data = json.loads(json.dumps(res.to_json()))
    assert data["base_model"] == "/data/base" and data["params"]["pruning_rates"] == [0.9, 0.8]
    for m in data["models"]:
        assert [(s["name"], s["blocks"], s["linears"], s["linears_per_block"]) for s in m["stacks"]] == [
            ("encoder.block", [0, 1], 12, 6), ("decoder.block", [0, 1, 2], 30, 10)]
        assert m["stacks"][1]["kinds"] == {"q": 6, "k": 6, "v": 6, "o": 6, "fc_in": 3, "fc_out": 3}
        assert len(m["blocks"]) == 5 and {b["stack"] for b in m["blocks"]} == {"encoder.block", "decoder.block"}
        assert set(m["blocks"][0]) >= {"block", "stack", "numel", "mean_abs", "outlier_ratio", "layer_score"}
        assert len(m["tensors"]) == 42
        for t in m["tensors"]:
            assert set(t) >= {"name", "stack", "label", "kind", "span", "block", "numel", "mean_abs", "outlier_ratio",
                              "linear_score", "densities", "clamped", "thresholds", "kept"}
        assert m["summary"]["linears"] == 42


def _drawn(fig):
    fig.canvas.draw()
    data_axes = [ax for ax in fig.axes if ax.axison]
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    return data_axes, legends


def _check_legends_outside(fig, stacks: int, models: int):
    data_axes, legends = _drawn(fig)
    assert len(data_axes) == 3 * stacks * models
    assert len(legends) == 2 * stacks  # block signal, kinds (right of the last column)
    for leg in legends:
        box = leg.get_window_extent()
        assert box.width > 0 and box.height > 0
        for ax in data_axes:
            assert not box.overlaps(ax.get_window_extent()), "a legend covers a panel"
        assert box.x1 <= fig.bbox.x1 + 1, "a legend is cut off"
    return [t.get_text() for leg in legends for t in leg.get_texts()]


def _line_colours(fig) -> set:
    import matplotlib.colors as mc

    out = set()
    for ax in fig.axes:
        for line in ax.get_lines():
            out.add(mc.to_hex(line.get_color()))
    return out


def test_plot_two_stacks(tmp_path):
    from matplotlib.image import imread

    res = result([("encoder.block", 6, T5_ENC), ("decoder.block", 8, T5_DEC)])
    fig = figure(res)
    labels = _check_legends_outside(fig, 2, 2)
    assert _line_colours(fig) <= set(KIND_COLOURS.values()) | {"#000000"}
    assert {"q", "k", "v", "o", "fc_in", "fc_out", "layer.0.SelfAttention", "layer.1.EncDecAttention"} <= set(labels)
    path = tmp_path / "t5.png"
    plot(result([("encoder.block", 6, T5_ENC), ("decoder.block", 8, T5_DEC)], 1), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(str(path))
    assert img.shape[0] > 800 and img.shape[1] > 600


def test_plot_moe_and_many_blocks(tmp_path):
    res = result([("model.layers", 48, moe(32))], 1)
    fig = figure(res)
    labels = _check_legends_outside(fig, 1, 1)
    assert "expert_gate_up (median of ×32)" in labels and "expert_down (median of ×32)" in labels
    a_r = fig.axes[1]
    assert len(a_r.collections) == 2, "one min-max band per expert kind, not one line per expert"
    assert len(a_r.get_lines()) == 4 + 2 * 3  # q k v o; per expert kind a median and two band edges
    ticks = [t for t in fig.axes[2].get_xticks() if 0 <= t <= 47]
    assert all(float(t).is_integer() for t in ticks) and 5 <= len(ticks) <= 13
    plot(res, str(tmp_path / "moe.png"))
    assert (tmp_path / "moe.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("models", [1, 3])
def test_plot_layouts(models):
    fig = figure(result([("model.layers", 80, LLAMA)], models))
    _check_legends_outside(fig, 1, models)
    w, h = fig.get_size_inches()
    assert 8 < w <= 27 and 5 < h < 8


def test_kind_colours_fixed_and_distinct():
    assert set(KIND_COLOURS) == set(KINDS)
    assert len(set(KIND_COLOURS.values())) == len(KINDS)


def test_cli_table_json_and_plot(tmp_path, monkeypatch):
    """`dppa-stream stats` prints the table (with --experts), writes the JSON and the PNG."""
    from click.testing import CliRunner

    import dppa_stream.config
    from dppa_stream.cli.main import main

    res = result([("model.layers", 2, moe(8))], 1)
    from types import SimpleNamespace

    monkeypatch.setattr(dppa_stream.config, "load_config", lambda path: SimpleNamespace(base_model=None, models=[]))
    monkeypatch.setattr(stats_report, "collect_stats", lambda cfg, opts: res)
    out = CliRunner().invoke(main, ["stats", "c.yml", "--experts", "each", "--json", str(tmp_path / "s.json")])
    assert out.exit_code == 0, out.output
    assert "mlp.experts.down_proj[7]" in out.output and "[0-7]" not in out.output
    assert json.loads((tmp_path / "s.json").read_text())["models"][0]["stacks"][0]["name"] == "model.layers"
    out = CliRunner().invoke(main, ["stats", "c.yml", "--experts", "nope"])
    assert out.exit_code == 2


def test_matplotlib_imported_only_by_plot():
    import subprocess
    import sys

    code = "import sys, dppa_stream.stats_report; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
