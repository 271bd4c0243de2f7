"""scripts/temperature_sweep.py: the gen-ppl-at-equal-entropy interpolation and the report's verdict, on
hand-made points with known answers (the sweep itself needs trained checkpoints: results/compare_long*/)."""

import math
import os
import sys
from argparse import Namespace
from pathlib import Path

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))

import temperature_sweep  # noqa: E402


def point(tau, entropy, gen_ppl):
    return {"tau": tau, "unigram_entropy": entropy, "gen_ppl": gen_ppl, "mauve": 0.5, "mauve_std": 0.1,
            "distinct_2": 0.5, "seq_rep_2": 0.01}


def test_at_entropy_is_log_linear_between_the_bracketing_points_and_none_outside():
    pts = [point(1.0, 6.0, 400.0), point(0.8, 5.0, 100.0), point(1.2, 7.0, 1600.0)]  # any order
    assert temperature_sweep.at_entropy(pts, 5.0) == pytest.approx(100.0)
    assert temperature_sweep.at_entropy(pts, 5.5) == pytest.approx(200.0)  # geometric mean of 100 and 400
    assert temperature_sweep.at_entropy(pts, 6.75) == pytest.approx(math.exp(0.25 * math.log(400) + 0.75 * math.log(1600)))
    assert temperature_sweep.at_entropy(pts, 4.9) is None and temperature_sweep.at_entropy(pts, 7.1) is None


def test_report_compares_at_the_twins_entropy_and_says_met_or_missed(tmp_path):
    twin = [point(0.9, 5.8, 150.0), point(1.0, 6.2, 240.0)]
    out = {"reference": "ref", "heldout": {"gen_ppl": 160.0, "unigram_entropy": 5.9}, "samplers": {
        "titan twin": {"run": "step-1", "points": twin},
        "DB, paper's chain (soft bridge, Euler)": {"run": "step-2", "points": [point(0.9, 6.0, 400.0),
                                                                               point(1.0, 6.4, 800.0)]},
        "DB, ancestral chain": {"run": "step-2", "points": [point(0.9, 6.1, 300.0), point(1.0, 6.3, 600.0)]}}}
    temperature_sweep.write_report(out, Namespace(pair=Path("p"), results=tmp_path, prompts=2, continuations=1))
    text = (tmp_path / "temperature.md").read_text()
    # paper's chain at entropy 6.2: halfway from 400 to 800 in log → 565.7 = 2.36× the twin's 240: missed
    assert "| DB, paper's chain (soft bridge, Euler) | 565.7 | 2.36 | missed |" in text
    # ancestral at 6.2: halfway from 300 to 600 → 424.3 = 1.77×: met
    assert "| DB, ancestral chain | 424.3 | 1.77 | met |" in text
    assert "| 2.11 … 2.11 |" in text  # paper's chain at 6.0: 400 / sqrt(150·240) = 400 / 189.7; 6.4 is outside
