import json

import pytest
import yaml

from prunelab.errors import PrunelabError
from prunelab.study import plan, plotted_rows, run_study


def write_grid(path, spec):
    path.write_text(yaml.safe_dump(spec))
    return path


def test_grid_expands_every_combination_plus_single_runs(tmp_path):
    grid = write_grid(tmp_path / "g.yaml", {
        "base": {"threads": 1, "reconstruct": {"lr": 0.001}},
        "grid": {"method": ["wanda", "magnitude"], "reconstruct.granularity": ["none", "attn-mlp", "blocks:2"]},
        "runs": [{"method": "wanda", "reconstruct.propagation": "dense"}],
    })
    runs = plan(grid)
    assert len(runs) == 7 and len({name for name, _ in runs}) == 7
    name, values = runs[2]
    assert name == "method-wanda_granularity-blocksof2"
    assert values["reconstruct"] == {"lr": 0.001, "granularity": "blocks:2"} and values["threads"] == 1
    assert runs[-1][1]["reconstruct"] == {"lr": 0.001, "propagation": "dense"}


def test_bad_grid_is_refused_before_any_run(tmp_path):
    grid = write_grid(tmp_path / "g.yaml", {"grid": {"reconstruct.granularity": ["attn-mlp", "rows"]}})
    with pytest.raises(PrunelabError, match="reconstruct.granularity must be one of"):
        plan(grid)
    with pytest.raises(PrunelabError, match="unknown study key"):
        plan(write_grid(tmp_path / "h.yaml", {"grids": {}}))
    with pytest.raises(PrunelabError, match="base and grid must be mappings"):
        plan(write_grid(tmp_path / "i.yaml", {"grid": [{"method": ["wanda"]}]}))
    with pytest.raises(PrunelabError, match="grid values must be non-empty lists .* method is not"):
        plan(write_grid(tmp_path / "j.yaml", {"grid": {"method": "wanda"}}))
    with pytest.raises(PrunelabError, match="runs must be a list of mappings"):
        plan(write_grid(tmp_path / "k.yaml", {"runs": {"method": "wanda"}}))
    with pytest.raises(PrunelabError, match=r"l.yaml, run method-3: method must be a string, got 3"):
        plan(write_grid(tmp_path / "l.yaml", {"grid": {"method": ["wanda", 3]}}))
    with pytest.raises(PrunelabError, match=r"m.yaml: runs 1 and 3 have the same overrides \(method-wanda\)"):
        plan(write_grid(tmp_path / "m.yaml", {"runs": [{"method": "wanda"}, {"method": "ria"}, {"method": "wanda"}]}))
    (tmp_path / "empty.yaml").write_text("")
    for empty in (tmp_path / "empty.yaml", write_grid(tmp_path / "n.yaml", {"base": {"method": "wanda"}})):
        with pytest.raises(PrunelabError, match=f"{empty.name} holds no runs: give a grid"):
            plan(empty)


def test_a_study_writes_only_into_a_new_folder_or_its_own(tmp_path):
    grid = write_grid(tmp_path / "g.yaml", {"grid": {"method": ["wanda"]}})
    (tmp_path / "file").write_text("x")
    with pytest.raises(PrunelabError, match="study folder .*file exists and is not a folder"):
        run_study(grid, tmp_path / "file")
    with pytest.raises(PrunelabError, match="holds files and is not a study's folder"):
        run_study(grid, tmp_path)  # the folder of the grid file and others: STUDY.md would land among them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "g.yaml"]


def test_a_study_without_evaluation_tables_its_runs(tmp_path, tiny_dir, texts, capfd):
    base = {"model": str(tiny_dir), "calib": str(texts[0]), "eval": "none", "samples": 4, "seqlen": 16,
            "threads": 1, "reconstruct": "none"}
    grid = write_grid(tmp_path / "g.yaml", {"base": base, "grid": {"method": ["magnitude", "wanda"]}})
    results = run_study(grid, tmp_path / "study")
    assert [r["perplexity"] for r in results] == [None, None]
    shown = capfd.readouterr().err  # each run's own bars, from its worker process, under the study's "[k/n]"
    assert shown.index("[1/2]") < shown.index("magnitude 50%") < shown.index("[2/2]") < shown.index("wanda 50%")
    assert "| magnitude | 50% | none | – | – | – | – |" in (tmp_path / "study" / "STUDY.md").read_text()


def test_study_runs_each_point_once_and_writes_one_table(tmp_path, tiny_dir, texts):
    base = {"model": str(tiny_dir), "calib": str(texts[0]), "eval": str(texts[1]), "samples": 6, "seqlen": 16,
            "eval_windows": 2, "eval_seqlen": 16, "threads": 1, "reconstruct": {"lr": 0.01, "heldout": 2}}
    grid = write_grid(tmp_path / "g.yaml", {"base": base, "grid": {"reconstruct.granularity": ["none", "attn-mlp"]}})
    out = tmp_path / "study"
    results = run_study(grid, out, progress=False)
    assert [r["granularity"] for r in results] == ["none", "attn-mlp"]
    assert results[0]["dense_perplexity"] and results[1]["dense_perplexity"] is None  # dense evaluated once
    assert all(r["perplexity"] > 1 and r["seconds"] > 0 and r["peak_rss_gb"] > 0 for r in results)
    table = (out / "STUDY.md").read_text()
    assert table.count("| wanda | 50% |") == 2 and (out / "study.png").stat().st_size > 0
    first = (out / "runs" / "granularity-none.json").stat().st_mtime_ns
    again = run_study(grid, out, progress=False)  # resumes: nothing is run twice
    assert (out / "runs" / "granularity-none.json").stat().st_mtime_ns == first
    summary = json.loads((out / "study.json").read_text())
    assert summary[1]["perplexity"] == again[1]["perplexity"] and "report" not in summary[1] and "report" in again[1]
    assert again[1]["forward_pass_seconds"] > 0 and again[0]["forward_pass_seconds"] is None
    saved = out / "runs" / "granularity-attn-mlp.json"  # a run saved before the field existed gets it from its report
    saved.write_text(
        json.dumps({k: v for k, v in json.loads(saved.read_text()).items() if k != "forward_pass_seconds"})
    )
    assert run_study(grid, out, progress=False, run_missing=False)[1]["forward_pass_seconds"] > 0
    assert "in dense forward passes" in (out / "STUDY.md").read_text()
    (out / "runs" / "granularity-none.json").unlink()
    tabled = run_study(grid, out, progress=False, run_missing=False)  # tables what is there, runs nothing
    assert [r["granularity"] for r in tabled] == ["attn-mlp"] and not (out / "runs" / "granularity-none.json").exists()
    assert (out / "STUDY.md").read_text().count("| wanda | 50% |") == 1
    assert "| 50% | wanda | – | " in (out / "STUDY.md").read_text()  # the planned prune-only column stays, empty
    with pytest.raises(PrunelabError, match="no finished run"):
        run_study(grid, tmp_path / "elsewhere", progress=False, run_missing=False)
    assert not (tmp_path / "elsewhere").exists()


def test_a_failed_run_stops_the_study_with_the_table_of_the_runs_before_it(tmp_path, tiny_dir, texts):
    base = {
        "model": str(tiny_dir),
        "calib": str(texts[0]),
        "eval": str(texts[1]),
        "samples": 6,
        "seqlen": 16,
        "eval_windows": 2,
        "eval_seqlen": 16,
        "threads": 1,
        "reconstruct": {"granularity": "none"},
    }
    grid = write_grid(
        tmp_path / "g.yaml",
        {"base": base, "runs": [{"method": "magnitude"}, {"model": str(tmp_path / "no-such-model")}]},
    )
    out = tmp_path / "study"
    with pytest.raises(PrunelabError, match="study run model-.* failed"):
        run_study(grid, out, progress=False)
    table = (out / "STUDY.md").read_text()
    assert table.count("| magnitude | 50% | none |") == 1 and "wanda" not in table
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["method-magnitude.json"]


def test_a_failed_first_run_does_not_point_at_a_table_that_is_not_there(tmp_path, texts):
    base = {"model": str(tmp_path / "no-such-model"), "calib": str(texts[0]), "eval": str(texts[1]), "threads": 1}
    grid = write_grid(tmp_path / "g.yaml", {"base": base, "runs": [{"method": "magnitude"}]})
    out = tmp_path / "study"
    with pytest.raises(PrunelabError, match="no run of this study has finished yet"):
        run_study(grid, out, progress=False)
    assert not (out / "STUDY.md").exists() and not any((out / "runs").iterdir())


def test_plot_draws_the_grid_at_its_own_propagation_not_the_extra_runs():
    def row(g, prop, loss, retrain="none", tokens=65536):
        return {"granularity": g, "propagation": prop, "loss": loss, "retrain": retrain,
                "recovery_tokens": tokens if prop != "–" else 0}
    results = [
        row("none", "–", "–"),
        row("attn-mlp", "mixed", "mse"),
        row("block", "mixed", "mse"),
        row("attn-mlp", "dense", "mse"),
        row("attn-mlp", "mixed", "cosine"),
        row("none", "–", "–", retrain="masklora"),  # not pruning alone: its own table
        row("attn-mlp", "mixed", "mse", tokens=16384),  # a point of the data-efficiency curve
    ]
    assert plotted_rows(results) == results[:3]


def test_a_grid_at_one_granularity_is_plotted_as_one_bar_per_run(tmp_path):
    from prunelab.study import write_table

    def row(prop, loss, ppl):
        return {
            "method": "wanda",
            "pattern": "50%",
            "granularity": "attn-mlp",
            "propagation": prop,
            "loss": loss,
            "lr": 3e-3,
            "perplexity": ppl,
            "dense_perplexity": None,
            "seconds": 60.0,
            "peak_rss_gb": 1.0,
        }
    results = [dict(row("dense", "mse", 31.4), dense_perplexity=19.25), row("mixed", "cosine", 30.4)]
    write_table(results, tmp_path)
    assert (tmp_path / "study.png").stat().st_size > 0
    assert "| wanda | 50% | attn-mlp | mixed | cosine | 0.003 | 30.40 |" in (tmp_path / "STUDY.md").read_text()


def test_a_grid_over_criteria_and_granularities_gets_the_papers_table(tmp_path):
    from prunelab.study import write_table

    def row(method, g, ppl):
        return {
            "method": method,
            "pattern": "50%",
            "granularity": g,
            "lr": None if g == "none" else 3e-3,
            "propagation": "–" if g == "none" else "sparse",
            "loss": "–" if g == "none" else "mse",
            "perplexity": ppl,
            "dense_perplexity": None,
            "seconds": 60.0,
            "peak_rss_gb": 1.5,
        }
    results = [
        row("wanda", "none", 41.18),
        row("magnitude", "none", 294.64),
        row("wanda", "attn-mlp", 31.67),
        dict(row("wanda", "block", 31.47), propagation="mixed"),
    ]  # an extra run, not in the grid's table
    write_table(results, tmp_path)
    table = (tmp_path / "STUDY.md").read_text()
    assert "| pattern | criterion | prune only | attn-mlp |\n" in table
    assert "| 50% | wanda | 41.18 (60 s, 1.50 GB) | 31.67 (60 s, 1.50 GB) |" in table
    assert "| 50% | magnitude | 294.64 (60 s, 1.50 GB) | – |" in table
    # a partial study shows the columns its grid still has to run
    write_table(results, tmp_path, ["none", "attn-mlp", "matrix", "blocks:2"])
    table = (tmp_path / "STUDY.md").read_text()
    assert "| pattern | criterion | prune only | attn-mlp | matrix | blocks:2 |\n" in table
    assert "| 50% | wanda | 41.18 (60 s, 1.50 GB) | 31.67 (60 s, 1.50 GB) | – | – |" in table


def test_the_papers_table_also_gives_time_in_dense_forward_passes(tmp_path):
    from prunelab.study import write_table

    def row(g, seconds, forward):
        return {
            "method": "wanda",
            "pattern": "50%",
            "granularity": g,
            "lr": None if g == "none" else 3e-3,
            "propagation": "–" if g == "none" else "sparse",
            "loss": "–" if g == "none" else "mse",
            "perplexity": 31.0,
            "dense_perplexity": None,
            "seconds": seconds,
            "peak_rss_gb": 1.5,
            "forward_pass_seconds": forward,
        }
    # the block run's machine was twice as slow: 2000 s there is 8 passes, less than attn-mlp's 9
    write_table([row("none", 176.0, None), row("attn-mlp", 1080.0, 120.0), row("block", 2000.0, 250.0)], tmp_path)
    table = (tmp_path / "STUDY.md").read_text()
    assert "| pattern | criterion | attn-mlp | block |\n|---|---|---|---|\n| 50% | wanda | 9.0 | 8.0 |" in table


def test_a_study_with_retraining_gets_the_recovery_table(tmp_path, tiny_dir, texts):
    base = {"model": str(tiny_dir), "calib": str(texts[0]), "eval": str(texts[1]), "samples": 4, "seqlen": 16,
            "eval_windows": 2, "eval_seqlen": 16, "threads": 1, "reconstruct": "none",
            "retrain": {"tokens": 128, "batch_size": 2, "accumulate": 1, "heldout": 2, "lr": 1e-3}}
    grid = write_grid(tmp_path / "g.yaml", {"base": base, "grid": {"retrain.method": ["none", "masklora"]}})
    results = run_study(grid, tmp_path / "study", progress=False)
    assert [r["retrain"] for r in results] == ["none", "masklora"]
    assert results[0]["recovery_tokens"] == 0 and results[1]["recovery_tokens"] == 128
    assert results[1]["retrain_seconds"] > 0 and results[0]["retrain_seconds"] is None
    table = (tmp_path / "study" / "STUDY.md").read_text()
    assert "## Recovery: reconstruction and retraining" in table and "| masklora | 128 |" in table


def test_acc_norm_mean_covers_the_tasks_that_define_it():
    """boolq-like tasks have acc only: acc_norm's mean is over the others and says so, instead of a dash."""
    from prunelab.evaluate.zeroshot import means
    from prunelab.report import zeroshot_means

    tasks = {"boolq": {"acc": 0.6, "acc_norm": None}, "hellaswag": {"acc": 0.3, "acc_norm": 0.4},
             "arc_easy": {"acc": 0.5, "acc_norm": 0.2}}
    summary = means(tasks)
    assert summary["mean_acc"] == pytest.approx(1.4 / 3)
    assert summary["mean_acc_norm"] == pytest.approx(0.3) and summary["acc_norm_tasks"] == 2
    assert zeroshot_means({"tasks": tasks}) == "0.4667 / 0.3000 (2 of 3 tasks)"
    both = {name: t for name, t in tasks.items() if t["acc_norm"] is not None}
    assert zeroshot_means({"tasks": both}) == "0.4000 / 0.3000"
    assert zeroshot_means({"tasks": {"boolq": tasks["boolq"]}}) == "0.6000 / –"


def test_recovery_tokens_separate_text_from_epochs():
    """Two epochs over 64 windows train on twice the tokens of the same text; retraining's windows begin with
    the reconstruction's, so the text of both together is the larger of the two."""
    from prunelab.study import recovery_summary

    def report(epochs, retrained):
        return {"config": {"samples": 64, "seqlen": 8, "reconstruct": {"epochs": epochs}},
                "reconstruction": {"lr": {}}, "stages": {}, "metrics": {},
                "retraining": {"method": "masklora", "tokens_seen": retrained} if retrained else None}
    two_epochs = recovery_summary(report(2, 0))
    assert (two_epochs["recovery_tokens"], two_epochs["recovery_data_tokens"]) == (1024, 512)
    both = recovery_summary(report(1, 2048))
    assert (both["recovery_tokens"], both["recovery_data_tokens"]) == (2560, 2048)
    assert both["zeroshot_tasks"] == {}


def test_a_study_row_keeps_the_zero_shot_score_of_each_task():
    from prunelab.study import recovery_summary

    tasks = {"boolq": {"acc": 0.6, "acc_norm": None, "examples": 100, "version": 2.0},
             "piqa": {"acc": 0.5, "acc_norm": 0.55, "examples": 100, "version": 1.0}}
    row = recovery_summary({"config": {"samples": 4, "seqlen": 8, "reconstruct": {"epochs": 1}}, "stages": {},
                            "metrics": {"zeroshot": {"tasks": tasks, "mean_acc": 0.55}}, "retraining": None})
    assert row["zeroshot_tasks"] == {"boolq": {"acc": 0.6, "acc_norm": None, "examples": 100},
                                     "piqa": {"acc": 0.5, "acc_norm": 0.55, "examples": 100}}


def test_recovery_series_group_by_way_of_recovering():
    """The data-efficiency plot's lines: reconstruction in one epoch over 16 k and 64 k tokens of text, the same
    64 k over 4 epochs on its own, MaskLoRA on its own; pruning alone is no point on any."""
    from prunelab.study import recovery_series

    def row(granularity, tokens, ppl, epochs=1, retrain="none"):
        return {"granularity": granularity, "recovery_data_tokens": tokens, "perplexity": ppl,
                "epochs": epochs if granularity != "none" else 0, "retrain": retrain}
    rows = [row("attn-mlp", 65536, 35.9), row("attn-mlp", 16384, 40.7), row("attn-mlp", 65536, 32.9, epochs=4),
            row("none", 262144, 32.4, retrain="masklora"), row("none", 0, 52.9),
            row("attn-mlp", 65536, 30.0, retrain="masklora")]
    assert recovery_series(rows) == {"attn-mlp": [(16384, 40.7), (65536, 35.9)], "attn-mlp + 4 epochs": [(65536, 32.9)],
                                     "masklora": [(262144, 32.4)], "attn-mlp + masklora": [(65536, 30.0)]}


def test_recovery_plot_has_a_panel_per_method_and_pattern(tmp_path):
    """A study of two pruning methods at one pattern draws both: a panel each, 6 inches at 100 dpi (less the
    margins the tight crop takes off; one panel is 590 pixels wide)."""
    from PIL import Image

    from prunelab.study import _plot_recovery

    def row(method, tokens, ppl):
        return {"method": method, "pattern": "50%", "granularity": "attn-mlp" if tokens else "none", "epochs": 1,
                "retrain": "none", "recovery_data_tokens": tokens, "perplexity": ppl}
    rows = [row("wanda", 0, 52.9), row("wanda", 65536, 35.9), row("magnitude", 0, 90.0), row("magnitude", 65536, 40.0)]
    _plot_recovery(rows, tmp_path / "recovery.png", dense=24.2)
    width, _ = Image.open(tmp_path / "recovery.png").size
    assert 2 * 6 * 100 * 0.9 < width <= 2 * 6 * 100


def test_a_series_has_one_colour_in_every_panel(tmp_path, monkeypatch):
    """matplotlib's colour cycle restarts in each panel: a series missing from one panel would shift the
    colours of the rest there. Each label keeps its colour across panels."""
    import matplotlib.figure

    from prunelab.study import _plot_recovery

    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figures.append(self))

    def row(method, granularity, retrain, tokens, ppl):
        return {"method": method, "pattern": "50%", "granularity": granularity, "epochs": 1, "retrain": retrain,
                "recovery_data_tokens": tokens, "perplexity": ppl}
    rows = [row("wanda", "attn-mlp", "none", 65536, 35.9), row("wanda", "none", "masklora", 65536, 33.0),
            row("magnitude", "none", "masklora", 65536, 41.0)]  # no attn-mlp series in magnitude's panel
    _plot_recovery(rows, tmp_path / "recovery.png", dense=24.2)
    colours = [{line.get_label(): line.get_color() for line in ax.get_lines() if not line.get_label().startswith("_")}
               for ax in figures[0].axes]
    assert colours[0]["masklora"] == colours[1]["masklora"] != colours[0]["attn-mlp"]


def test_owl_runs_are_told_apart_from_uniform_ones_in_the_tables():
    from prunelab.study import summarise

    def report(**config):
        cfg = {"method": "wanda", "pattern": None, "sparsity": 0.7, "samples": 8, "seqlen": 32,
               "reconstruct": {"granularity": "none", "propagation": "mixed", "loss": "mse", "epochs": 1}, **config}
        return {"config": cfg, "stages": {"prune": {"seconds": 1.0, "peak_rss_gb": 1.0}}, "metrics": {},
                "sparsity": None}

    assert summarise(report(layerwise="owl"))["pattern"] == "70% owl"
    assert summarise(report(layerwise="uniform"))["pattern"] == "70%"
    assert summarise(report())["pattern"] == "70%"  # a report from before OWL
    skipping = report(skip=["*.down_proj", "model.layers.0.*"])
    assert summarise(skipping)["pattern"] == "70% skip *.down_proj,model.layers.0.*"


def test_a_grid_over_skip_lists_names_its_runs_without_glob_characters(tmp_path):
    grid = write_grid(tmp_path / "g.yaml", {"grid": {"skip": [[], ["*.mlp.down_proj", "model.layers.0.*"]]}})
    assert [name for name, _ in plan(grid)] == ["skip-", "skip-.mlp.down_proj+model.layers.0."]
