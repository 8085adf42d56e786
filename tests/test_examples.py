"""The training example, shortened (--quick): it runs, trains, and writes its plot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_mlp.py"


def test_quick_training_run(tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "test acc" in proc.stdout
    png = tmp_path / "bn_digits.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "results.json").read_text())
    sweep = summary["sweep"]
    assert {r["bn"] for r in sweep} == {"none", "before"}
    for run in sweep:
        if run["optimizer"] == "sgd" and run["lr"] == 0.05:  # a rate where both must train
            assert not run["diverged"]
            assert run["train_loss"][-1] < 0.5 * run["train_loss"][0]
            assert run["test_accuracy"][-1] > 0.5  # chance is 0.1
    check = summary["bias_check"]
    assert check["max_abs_output_difference"] < 1e-4 * check["max_abs_output"]
    assert check["max_abs_bias_gradient"] < 1e-4 * check["max_abs_weight_gradient"]
    fold = summary["folding"]
    assert fold["layers_folded"] < fold["layers_unfolded"]
    assert fold["max_abs_logit_difference"] < 1e-4 * fold["max_abs_logit"]
    # equal logits up to rounding: at most one borderline test image may change its argmax
    assert abs(fold["accuracy_folded"] - fold["accuracy_unfolded"]) <= 1 / 450
