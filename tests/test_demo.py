"""The readme's first command, as a user runs it: `python MS_COCO.py --demo` in an empty
folder. About 2-3 minutes on 2 cores, so marked slow: `python -m pytest -q -m slow`."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import MS_COCO_test as T

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_from_an_empty_folder(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "MS_COCO.py"), "--demo"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r"demo: validation challenge F1 ([0-9.]+)", proc.stdout)
    assert match and 0.3 < float(match.group(1)) <= 1            # it learned something, and says so
    preds_path, = (tmp_path / "outputs").glob("*/predictions.json")
    preds = json.loads(preds_path.read_text())
    stems = sorted(p.stem for p in (tmp_path / "demo-data" / "images" / "test-resized").glob("*.jpg"))
    T.check_predictions(preds, stems)
    assert (preds_path.parent / "thresholds.json").is_file() and (preds_path.parent / "per_class_f1.png").is_file()
