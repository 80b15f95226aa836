"""The report stage: paper tables from evaluate metrics files with known numbers."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from mlflow_server import copy_store, mlflow_db_template  # noqa: E402,F401  (fixture)

from simprop import paper  # noqa: E402
from simprop.layout import RunLayout  # noqa: E402
from simprop.params import Params, dump_yaml  # noqa: E402
from simprop.report.build import build_report  # noqa: E402
from simprop.report.figures import class_iou_by_variant  # noqa: E402
from simprop.report.markdown import analysis_sections  # noqa: E402
from simprop.report.results import MissingInputError, StaleInputError, load_results  # noqa: E402
from simprop.report.tables import CSV_COLUMNS  # noqa: E402
from simprop.voc import class_name, fold_classes  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SEED_OFFSETS = (-1.0, 0.0, 1.0)  # per-test-set offsets: mean 0, sample std exactly 1
TRAIN_OFFSETS = {0: -2.0, 1: 0.0, 2: 2.0}  # per-training-seed offsets: mean 0, sample std exactly 2


def make_params(variants=("canet", "simpropnet"), folds=(0, 1, 2, 3), shots=(1, 5), seeds=(0, 1, 2)) -> Params:
    p = Params()
    return dataclasses.replace(
        p,
        train=dataclasses.replace(p.train, variants=tuple(variants), folds=tuple(folds), seeds=tuple(seeds),
                                  seed=seeds[0]),  # fmt: skip
        evaluate=dataclasses.replace(p.evaluate, shots=tuple(shots)),
    )


def planned_miou(variant: str, fold: int, shots: int) -> float:
    """Known fold mean: the paper's number + 0.1 * fold (+ 1.0 for 5-shot without a paper row)."""
    ref = paper.TABLE3.get((variant, shots)) or paper.TABLE4.get(variant)
    return ref.split(fold) + 0.1 * fold


def fake_evaluate_record(params: Params, variant: str, fold: int, train_seed: int = 0) -> dict:
    shift = TRAIN_OFFSETS[train_seed]
    record = {
        "variant": variant, "fold": fold, "train_seed": train_seed, "protocol": params.splits.protocol,
        "episodes": params.episodes.num_episodes, "seeds": list(params.episodes.test_seeds),
        "resolution": params.evaluate.resolution, "image_size": params.evaluate.image_size,
    }  # fmt: skip
    for shots in params.evaluate.shots:
        mean = planned_miou(variant, fold, shots) + shift
        entry = {}
        seeds = []
        for seed, off in zip(params.episodes.test_seeds, SEED_OFFSETS):
            # per-class IoUs: class k of the fold gets 10*k + fold (very different values)
            class_iou = {class_name(c): 10.0 * (i + 1) + fold + off + shift for i, c in enumerate(fold_classes(fold))}
            entry[f"seed{seed}"] = {"miou": mean + off, "fbiou": 60.0 + off, "class_iou": class_iou}
            seeds.append(mean + off)
        entry.update(
            miou_mean=float(np.mean(seeds)), miou_std=float(np.std(seeds, ddof=1)), fbiou_mean=60.0, fbiou_std=1.0
        )
        record[f"shot{shots}"] = entry
    ident = (paper.TABLE5.get(variant) or paper.TABLE4[variant]).split(fold) - 2.0 + shift
    record["identical"] = {"miou": ident, "fbiou": 70.0}
    record["reference"] = {"all_foreground_miou": 20.0 + fold, "untrained_miou": 5.0}
    return record


def write_run(root: Path, params: Params, variant: str, fold: int, curves: bool = True) -> None:
    """The metrics (and curves) of every training seed of ``params`` of (variant, fold)."""
    for seed in params.train.seeds:
        layout = RunLayout(root, variant, fold, seed)
        layout.evaluate_metrics.parent.mkdir(parents=True, exist_ok=True)
        layout.evaluate_metrics.write_text(json.dumps(fake_evaluate_record(params, variant, fold, seed)))
        layout.train_metrics.parent.mkdir(parents=True, exist_ok=True)
        layout.train_metrics.write_text(json.dumps({
            "variant": variant, "fold": fold, "train_seed": seed, "epochs": 3, "best_val_miou": 40.0 + fold,
            "best_epoch": 2, "final_loss": 0.3, "first_loss": 0.7, "wall_time_s": 12.5}))  # fmt: skip
        if not curves:
            continue
        for p in (layout.loss_curve, layout.val_curve):
            p.parent.mkdir(parents=True, exist_ok=True)
        steps = np.arange(120)
        pd.DataFrame({"step": steps, "loss": 0.7 * np.exp(-steps / 60) + 0.05}).to_csv(layout.loss_curve, index=False)
        pd.DataFrame({"epoch": [0, 1, 2], "val_miou": [30.0, 38.0, 40.0 + fold + seed]}).to_csv(layout.val_curve, index=False)


def write_panel(root: Path, variant: str, fold: int, colour) -> None:
    path = RunLayout(root, variant, fold, 0).qualitative
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (400, 120), colour).save(path)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One report over fake runs (canet and simpropnet, all folds), shared by read-only tests."""
    tmp_path = tmp_path_factory.mktemp("report")
    params = make_params()
    for variant in params.train.variants:
        for fold in params.train.folds:
            write_run(tmp_path, params, variant, fold)
    write_panel(tmp_path, "canet", 0, "red")
    write_panel(tmp_path, "simpropnet", 0, "blue")
    return tmp_path, params, build_report(params, tmp_path)


def _md_rows(text: str, section: str) -> list[list[str]]:
    """Cells of the markdown table under the heading starting with ``section``."""
    block = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in block.splitlines() if line.startswith("|")]


def test_table3_cells_against_paper(built):
    root, params, out = built
    md = out.tables_md.read_text()
    rows = _md_rows(md, "Table 3")
    assert rows[0] == ["method", "shots", "", "split-1", "split-2", "split-3", "split-4", "mean"]
    i = next(i for i, r in enumerate(rows) if r[0].startswith("SimPropNet") and r[1] == "1")
    ours, ref, delta = rows[i], rows[i + 1], rows[i + 2]
    # mean ± std over the training seeds (2.00), then the std over the test sets (1.00)
    assert ours[2:] == ["ours", "54.86 ± 2.00 (1.00)", "67.43 ± 2.00 (1.00)", "54.72 ± 2.00 (1.00)",
                        "52.32 ± 2.00 (1.00)", "57.33 ± 2.00 (1.00)"]  # fmt: skip
    assert ref[2:] == ["paper", "54.86", "67.33", "54.52", "52.02", "57.19"]
    # mean: per-seed fold means -> mean(paper splits) + 0.15, vs the paper's printed 57.19
    mean_diff = np.mean(paper.TABLE3[("simpropnet", 1)].splits) + 0.15 - 57.19
    assert delta[2:] == ["Δ", "+0.00", "+0.10", "+0.20", "+0.30", f"{mean_diff:+.2f}"]
    j = next(i for i, r in enumerate(rows) if r[0].startswith("CANet") and r[1] == "5")
    assert rows[j + 1][2:] == ["paper", "52.27", "65.29", "47.15", "50.50", "53.81"]
    assert rows[j][3] == "52.27 ± 2.00 (1.00)"
    assert "Note:" in md and "synthetic" in md  # default data source is flagged
    for fact in ("`oslsm`", "1000 per fold", "1, 2, 3", "`original` label size", "0, 1, 2 (3 trainings per variant"):
        assert fact in md


def test_table4_shows_dash_for_variants_not_run(built):
    _, _, out = built
    rows = _md_rows(out.tables_md.read_text(), "Table 4")
    dpr = next(i for i, r in enumerate(rows) if r[0] == "DPr")
    assert rows[dpr][1:] == ["ours", "—", "—", "—", "—", "—"]
    assert rows[dpr + 1][1:] == ["paper", "52.69", "66.57", "53.10", "51.23", "55.89"]
    assert rows[dpr + 2][1:] == ["Δ", "—", "—", "—", "—", "—"]
    canet = next(i for i, r in enumerate(rows) if r[0].startswith("CANet"))
    assert rows[canet][2] == "50.41 ± 2.00 (1.00)"


def test_table5_identical_input_and_gain(built):
    _, _, out = built
    rows = _md_rows(out.tables_md.read_text(), "Table 5")
    sp = next(i for i, r in enumerate(rows) if r[0].startswith("SimPropNet ("))
    # paper - 2, std over the training seeds, no test sets
    assert rows[sp][1:6] == ["ours", "69.24 ± 2.00", "80.09 ± 2.00", "72.97 ± 2.00", "75.15 ± 2.00"]
    assert rows[sp + 2][1:6] == ["Δ", "-2.00", "-2.00", "-2.00", "-2.00"]
    gain = next(i for i, r in enumerate(rows) if r[0] == "SimPropNet − CANet")
    assert rows[gain + 1][1:] == ["paper", "16.73", "18.11", "26.77", "24.39", "21.50"]
    assert rows[gain][2] == f"{71.24 - 54.51:.2f} ± 0.00"  # paired by training seed: the offsets cancel


def test_csvs_are_tidy(built):
    _, _, out = built
    t3 = pd.read_csv(out.csvs["table3"])
    assert list(t3.columns) == CSV_COLUMNS
    assert len(t3) == 4 * 5  # (simpropnet, canet) x (1, 5) shots x (4 splits + mean)
    row = t3[(t3.method == "simpropnet") & (t3.shots == 1) & (t3.split == "split-3")].iloc[0]
    assert row.ours_mean == pytest.approx(54.72) and row.ours_std == pytest.approx(2.0)
    assert row.test_std == pytest.approx(1.0) and row.train_seeds == 3
    assert row.paper == pytest.approx(54.52) and row["diff"] == pytest.approx(0.2)
    t4 = pd.read_csv(out.csvs["table4"])
    assert set(t4.method) == set(paper.TABLE4)
    assert t4[t4.method == "fbaf"].ours_mean.isna().all()
    assert t4[t4.method == "fbaf"].paper.notna().all()
    t5 = pd.read_csv(out.csvs["table5"])
    assert {"simpropnet", "canet", "simpropnet-canet"} <= set(t5.method)


def test_figures_and_summary(built):
    root, _, out = built
    for name in ("per_class_iou", "training_curves", "qualitative"):
        path = root / "reports" / "figures" / f"{name}.png"
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        with Image.open(path) as im:
            im.verify()
    with Image.open(root / "reports" / "figures" / "qualitative.png") as im:
        assert im.width == 400 and im.height == 2 * (120 + 24)  # one panel per variant, captioned
    summary = json.loads((root / "metrics" / "report.json").read_text())
    expected = np.mean(paper.TABLE3[("simpropnet", 1)].splits) + 0.15
    assert summary["simpropnet"]["shot1_miou"] == pytest.approx(expected, abs=1e-4)
    assert summary["simpropnet"]["shot1_miou_std"] == pytest.approx(2.0)
    assert summary["simpropnet"]["shot1_miou_test_std"] == pytest.approx(1.0)
    assert summary["num_train_seeds"] == 3
    # the paper's claims: SimPropNet - CANet is the paper's per-fold difference for every seed
    lists = summary["claims_lists"]
    assert {"simpropnet_vs_canet_1shot", "simpropnet_vs_canet_5shot", "simpropnet_vs_canet_identical"} <= set(lists["supported"])
    assert "dpr_vs_canet" in lists["not run"] and not lists["contradicted"]
    claim = summary["claims"]["simpropnet_vs_canet_1shot"]
    assert claim["verdict"] == 1 and claim["mean"] == pytest.approx(57.19 - 51.75 + 0.0, abs=0.05)
    md = out.tables_md.read_text()
    assert "## The paper's claims" in md and "Component ordering" not in md
    supported = md.split("**Supported**", 1)[1].split("**Contradicted**", 1)[0]
    assert "- SimPropNet beats CANet, 1-shot (Table 3)" in supported
    assert summary["canet"]["identical_miou"] == pytest.approx(np.mean(paper.TABLE5["canet"].splits) - 2, abs=1e-4)
    assert "dpr" not in summary


def test_per_class_iou_keeps_class_names(built):
    _, params, _ = built
    root = built[0]
    data = class_iou_by_variant(params, load_results(params, root))
    # class k (1-based position in its fold) has 10k + fold, mean over test sets and training seeds
    assert data["simpropnet"]["aeroplane"] == pytest.approx(10.0)
    assert data["simpropnet"]["bottle"] == pytest.approx(50.0)
    assert data["simpropnet"]["bus"] == pytest.approx(11.0)
    assert data["canet"]["tvmonitor"] == pytest.approx(53.0)
    assert len(data["canet"]) == 20


def test_partial_folds_compare_to_the_same_splits(tmp_path):
    params = make_params(variants=("simpropnet",), folds=(0, 2), shots=(1,))
    for fold in params.train.folds:
        write_run(tmp_path, params, "simpropnet", fold, curves=False)
    out = build_report(params, tmp_path)
    t3 = pd.read_csv(out.csvs["table3"])
    sp1 = t3[(t3.method == "simpropnet") & (t3.shots == 1)].set_index("split")
    assert np.isnan(sp1.loc["split-2", "ours_mean"]) and sp1.loc["split-2", "paper"] == pytest.approx(67.33)
    assert sp1.loc["mean", "paper"] == pytest.approx((54.86 + 54.52) / 2)
    assert sp1.loc["mean", "ours_mean"] == pytest.approx((54.86 + 54.52 + 0.2) / 2)
    assert "split-1, split-3 only" in sp1.loc["mean", "note"]
    assert t3[t3.shots == 5].ours_mean.isna().all()  # 5-shot not evaluated
    md = out.tables_md.read_text()
    assert "*" in md and "no training curves" not in md  # the figure says so, not the table
    with Image.open(out.figures["training_curves"]) as im:
        im.verify()


def test_missing_metrics_file_names_file_and_stage(tmp_path):
    params = make_params()
    for variant in params.train.variants:
        for fold in params.train.folds:
            write_run(tmp_path, params, variant, fold, curves=False)
    RunLayout(tmp_path, "simpropnet", 2, 1).evaluate_metrics.unlink()
    with pytest.raises(MissingInputError) as err:
        build_report(params, tmp_path)
    assert "metrics/evaluate/simpropnet/fold2/seed1.json" in str(err.value)
    assert "simpropnet fold 2 training seed 1" in str(err.value)
    assert "`dvc repro evaluate` (or `python stages/evaluate.py --variant simpropnet --fold 2`)" in str(err.value)
    assert isinstance(err.value, FileNotFoundError)  # the stage runner prints it as one line

    (tmp_path / "metrics" / "train" / "canet" / "fold0" / "seed0.json").unlink()
    with pytest.raises(MissingInputError, match=r"metrics/train/canet/fold0/seed0\.json.*`dvc repro train`"):
        build_report(params, tmp_path)


def test_stale_metrics_file_is_rejected(tmp_path):
    params = make_params(variants=("canet",), folds=(1,))
    write_run(tmp_path, params, "canet", 1, curves=False)
    stale = dataclasses.replace(params, episodes=dataclasses.replace(params.episodes, test_seeds=(4, 5, 6)))
    with pytest.raises(StaleInputError, match=r"canet/fold1/seed0\.json: seeds"):
        build_report(stale, tmp_path)


def _load_stage():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "stages" / "report.py"
    spec = importlib.util.spec_from_file_location("stage_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_stage_logs_to_mlflow(tmp_path, monkeypatch, capsys, mlflow_db_template):  # noqa: F811  (fixture)
    import mlflow

    copy_store(mlflow_db_template, tmp_path)  # the default store <root>/mlflow.db, pre-migrated
    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME"):
        monkeypatch.delenv(var, raising=False)
    params = make_params(variants=("simpropnet",), folds=(0,), shots=(1,))
    for fold in params.train.folds:
        write_run(tmp_path, params, "simpropnet", fold)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(dump_yaml(params))
    stage = _load_stage()
    assert stage.main(["--params", str(params_file), "--root", str(tmp_path)]) == 0
    assert "simpropnet: shot1_miou 54.86" in capsys.readouterr().out

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("simprop").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "report"
    assert run.data.metrics["simpropnet.shot1_miou"] == pytest.approx(54.86)
    assert run.data.tags["claims.not_run"].startswith("dpr_vs_canet")  # only simpropnet was run
    assert run.data.tags["train_seed"] == "0,1,2" and run.data.metrics["num_train_seeds"] == 3
    listed = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert {"reports/tables.md", "reports/table3.csv", "reports/figures"} <= listed

    # a missing input is one clear line and exit status 2, and the run is marked FAILED
    RunLayout(tmp_path, "simpropnet", 0, 0).evaluate_metrics.unlink()
    assert stage.main(["--params", str(params_file), "--root", str(tmp_path)]) == 2
    assert "simpropnet/fold0/seed0.json" in capsys.readouterr().err
    runs = client.search_runs([run.info.experiment_id], order_by=["attributes.start_time DESC"])
    assert runs[0].info.status == "FAILED"


def test_analysis_outputs_join_the_report(tmp_path):
    analysis = tmp_path / "reports" / "analysis"
    analysis.mkdir(parents=True)
    (analysis / "error_similarity.md").write_text("# Error similarity\n\nratio 0.81 +- 0.20 (paper 0.87 +- 0.25)\n")
    text = analysis_sections(tmp_path)
    assert "ratio 0.81 +- 0.20 (paper 0.87 +- 0.25)" in text
    assert "### Error overlap with a supervised model (paper Table 1)" in text
    assert "not run" in text and "background_similarity.md" in text  # the missing ones say so
    assert "\n### Error similarity" in text  # the analysis' own title, demoted, heads its section
    assert "Similarity of mispredicted regions" not in text  # ... instead of a second heading


def _header_rows(md: str) -> dict[str, str]:
    head = md.split("## Table 3", 1)[0]
    return {r[0]: r[1] for r in (
        [c.strip() for c in line.strip().strip("|").split("|")] for line in head.splitlines() if line.startswith("| ")
    ) if len(r) == 2}  # fmt: skip


def test_header_states_the_protocol_conventions_and_the_published_lists(built, tmp_path):
    """Issue 10: episode sampling, our scoring convention, the paper's (CANet's code, 321x321) and
    whether the fold lists are the published ones."""
    root, params, out = built
    rows = _header_rows(out.tables_md.read_text())
    assert rows["episode sampling"].startswith("`pairs`: query = a uniformly drawn (image, class) test pair")
    assert "`original` label size" in rows["scoring (our columns)"]
    assert "void (255) `ignore`d" in rows["scoring (our columns)"] and "counts as 0" in rows["scoring (our columns)"]
    assert "CANet's code" in rows["scoring (paper columns)"] and "321x321" in rows["scoring (paper columns)"]
    assert "-S evaluate.resolution=321" in rows["scoring (paper columns)"]
    assert "metrics/splits.json` not found" in rows["published lists"]
    t = params.train
    assert f"lr {t.lr} ({t.lr_schedule}; encoder projection x {t.projection_lr_scale}, {t.projection_init} init)" in rows[
        "training"
    ]

    other = dataclasses.replace(
        params,
        evaluate=dataclasses.replace(params.evaluate, resolution="321", void="background"),
        episodes=dataclasses.replace(params.episodes, class_sampling="uniform"),
    )
    for variant in other.train.variants:
        for fold in other.train.folds:
            write_run(tmp_path, other, variant, fold, curves=False)
            for seed in other.train.seeds:
                record = json.loads(RunLayout(tmp_path, variant, fold, seed).evaluate_metrics.read_text())
                record.update(void="background", class_sampling="uniform")
                RunLayout(tmp_path, variant, fold, seed).evaluate_metrics.write_text(json.dumps(record))
    splits = {"published_lists": {"checked": True, "matches_all": False, "source": "HSNet lists",
                                  "fold0": {"trn": {"matches_published": True}, "val": {"matches_published": False}}}}  # fmt: skip
    (tmp_path / "metrics" / "splits.json").write_text(json.dumps(splits))
    rows = _header_rows(build_report(other, tmp_path).tables_md.read_text())
    assert rows["episode sampling"].startswith("`uniform`")
    assert "`321`: labels resized (nearest) to 321x321" in rows["scoring (our columns)"]
    assert "counted as `background`" in rows["scoring (our columns)"]
    assert rows["published lists"].startswith("**MISMATCH") and "fold0 trn ✓, fold0 val ✗" in rows["published lists"]
    splits["published_lists"] = {"checked": False, "note": "not checked: data.source 'synthetic'"}
    (tmp_path / "metrics" / "splits.json").write_text(json.dumps(splits))
    rows = _header_rows(build_report(other, tmp_path).tables_md.read_text())
    assert rows["published lists"] == "not checked: data.source 'synthetic'"

    # a metrics file scored in another convention is stale
    stale = json.loads(RunLayout(tmp_path, "canet", 0, 1).evaluate_metrics.read_text())
    RunLayout(tmp_path, "canet", 0, 1).evaluate_metrics.write_text(json.dumps({**stale, "void": "ignore"}))
    with pytest.raises(StaleInputError, match="void"):
        build_report(other, tmp_path)
