"""ablation.py on the tiny dataset: every run recorded, the table averaged over seeds, a rerun resumes."""

import json

import pytest

import ablation
import MS_COCO_test


def test_ablation_writes_runs_and_table_and_resumes(tmp_path, tiny_data, capsys):
    argv = ["--data-dir", str(tiny_data), "--out-dir", str(tmp_path / "abl"), "--variants", "default,asl",
            "--seeds", "0,1", "--epochs", "1", "--image-size", "32", "--batch-size", "8", "--device", "cpu"]
    runs = ablation.main(argv)
    assert [(r["variant"], r["seed"]) for r in runs] == [("default", 0), ("default", 1), ("asl", 0), ("asl", 1)]
    for r in runs:
        assert 0.0 <= r["f1"] <= 1.0 and r["seconds"] > 0
        assert set(r["heldout_f1"]) == set(MS_COCO_test.THRESHOLD_OPTIONS)
    table = (tmp_path / "abl" / "table.md").read_text()
    first, paired = table.split("Paired difference")
    rows = [line for line in first.splitlines() if line.startswith("| default") or line.startswith("| asl")]
    assert len(rows) == 2 and "seeds [0, 1]" in table
    asl = next(line for line in paired.splitlines() if line.startswith("| asl")).split("|")
    difference = (runs[2]["f1"] - runs[0]["f1"] + runs[3]["f1"] - runs[1]["f1"]) / 2
    assert asl[2].strip() == "0, 1" and asl[3].strip().startswith(f"{difference:.4f} ±")
    mean_f1 = (runs[0]["f1"] + runs[1]["f1"]) / 2
    assert rows[0].split("|")[2].strip().startswith(f"{mean_f1:.4f} ±")
    assert len(json.loads((tmp_path / "abl" / "runs.json").read_text())) == 4

    capsys.readouterr()
    again = ablation.main(argv)                      # everything done: no run is repeated
    assert again == runs and "seed 0:" not in capsys.readouterr().out


def test_budget_changes_are_named_and_unknown_variants_rejected(tmp_path, tiny_data):
    assert ablation.budget_note(["default", "asl"]) == ""
    assert "default-longer: epochs 13" in ablation.budget_note(["default", "default-longer"])
    with pytest.raises(SystemExit) as exc:
        ablation.main(["--data-dir", str(tiny_data), "--out-dir", str(tmp_path / "abl"), "--variants", "magic",
                       "--epochs", "1", "--image-size", "32", "--device", "cpu"])
    assert exc.value.code == 2
