"""The claims report (minimem_tools.experiments.claims): verdict rules and the table written from results files."""

import json
import math

import pytest

from minimem_tools.experiments import claims
from minimem_tools.experiments.claims import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    NOT_RUN,
    REPRODUCED,
    better,
    combine,
    decision_bar,
    difference,
    every,
    matches,
    standard_error,
)


def test_better_uses_twice_the_standard_error_of_the_difference():
    a, b = (1.00, 0.01, 3), (1.10, 0.01, 3)  # 0.10 > 2 sqrt(2 0.01^2 / 3) = 0.0163
    assert better(a, b) == REPRODUCED and better(b, a) == NOT_REPRODUCED
    assert better((1.00, 0.1, 3), (1.05, 0.1, 3)) == INCONCLUSIVE  # 0.05 < 2 sqrt(2 0.1^2 / 3) = 0.163
    assert better(a, b, lower=False) == NOT_REPRODUCED  # accuracy: higher is better
    assert better((1.0, 0.0, 1), (2.0, 0.0, 1)) == INCONCLUSIVE  # one seed is no evidence
    assert better((float("nan"), float("nan"), 0), b) == NOT_RUN
    # unequal seeds: SE = sqrt(0.03^2 / 2 + 0.01^2 / 8) = 0.0217, bar 0.0434
    assert standard_error((1.0, 0.03, 2), (1.0, 0.01, 8)) == pytest.approx(math.sqrt(0.0009 / 2 + 0.0001 / 8))
    assert better((1.00, 0.03, 2), (1.045, 0.01, 8)) == REPRODUCED
    assert better((1.00, 0.03, 2), (1.040, 0.01, 8)) == INCONCLUSIVE


def test_the_bar_shrinks_as_one_over_root_n():
    s = 0.1
    for n in (2, 3, 4, 9, 16, 100):
        arm = (1.0, s, n)
        assert decision_bar(arm, arm) == pytest.approx(2 * s * math.sqrt(2 / n))
        assert decision_bar(arm, arm) * math.sqrt(n) == pytest.approx(decision_bar((1.0, s, 4), (1.0, s, 4)) * 2)
    # with 3 seeds it is 2 / sqrt(3) = 1.15 times the per-seed spread sqrt(s_A^2 + s_B^2) used before
    assert decision_bar((1.0, 0.03, 3), (1.0, 0.04, 3)) / math.hypot(0.03, 0.04) == pytest.approx(1.1547, abs=1e-4)
    # d = 0.15 with s = 0.1 per arm: past the old spread 0.141, short of 2 SE = 0.163 at 3 seeds, past 0.126 at 5
    assert better((1.00, 0.1, 3), (1.15, 0.1, 3)) == INCONCLUSIVE
    assert better((1.00, 0.1, 5), (1.15, 0.1, 5)) == REPRODUCED


def test_matches_fails_only_when_clearly_worse():
    assert matches((1.05, 0.1, 3), (1.00, 0.1, 3)) == REPRODUCED  # worse by 0.05 < 2 SE = 0.163
    assert matches((0.90, 0.01, 3), (1.00, 0.01, 3)) == REPRODUCED
    assert matches((1.20, 0.01, 3), (1.00, 0.01, 3)) == NOT_REPRODUCED
    assert matches((1.0, 0.0, 1), (1.0, 0.0, 1)) == INCONCLUSIVE  # one seed is no evidence here either
    # 'clearly' is 2 SE, so more seeds can show a deficit of 0.15: 0.163 at 3 seeds, 0.1 at 8
    assert matches((1.15, 0.1, 3), (1.00, 0.1, 3)) == REPRODUCED
    assert matches((1.15, 0.1, 8), (1.00, 0.1, 8)) == NOT_REPRODUCED


def test_a_difference_carries_its_standard_error():
    d = difference((1.0, 0.3, 3), (0.5, 0.4, 3))
    assert d == pytest.approx((0.5, 0.5, 3))  # equal seeds: the per-seed spread of the difference
    d = difference((1.0, 0.3, 2), (0.5, 0.4, 8))
    assert d[2] == 2 and d[1] / math.sqrt(d[2]) == pytest.approx(standard_error((1.0, 0.3, 2), (0.5, 0.4, 8)))
    # a gain against a gain: better() on two differences uses the SE of their difference
    g0, g1 = difference((0.30, 0.02, 3), (0.30, 0.02, 3)), difference((0.35, 0.02, 3), (0.30, 0.02, 3))
    assert decision_bar(g1, g0) == pytest.approx(2 * math.sqrt(4 * 0.02**2 / 3))  # 0.0462 < 0.05
    assert better(g1, g0, lower=False) == REPRODUCED
    assert difference((1.0, 0.1, 3), (math.nan, math.nan, 0))[2] == 0


def test_combine_needs_half_and_no_contradiction():
    assert combine([REPRODUCED, INCONCLUSIVE]) == REPRODUCED
    assert combine([REPRODUCED, INCONCLUSIVE, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine([REPRODUCED, NOT_REPRODUCED]) == INCONCLUSIVE
    assert combine([NOT_REPRODUCED, NOT_RUN]) == NOT_REPRODUCED
    assert combine([NOT_RUN]) == NOT_RUN


def test_every_part_of_a_named_claim_must_hold():
    assert every([REPRODUCED, REPRODUCED]) == REPRODUCED
    assert every([REPRODUCED, INCONCLUSIVE]) == INCONCLUSIVE  # 'beats B and C' with C undecided
    assert every([REPRODUCED, NOT_REPRODUCED]) == NOT_REPRODUCED
    assert every([REPRODUCED, NOT_RUN]) == INCONCLUSIVE
    assert every([NOT_RUN, NOT_RUN]) == NOT_RUN


def fake_runs(losses: dict[str, list[float]]) -> dict:
    runs = [
        {"name": name, "seed": seed, "config": {}, "labels": {}, "metrics": {"val_loss": v}, "wall_time_s": 1.0}
        for name, values in losses.items()
        for seed, v in enumerate(values)
    ]
    return {
        "experiment": "ablations",
        "quick": False,
        "seeds": [0, 1, 2],
        "git_commit": "abc",
        "git_dirty": False,
        "runs": runs,
        "summary": [],
    }


def test_report_computes_each_row_from_the_results_files(tmp_path):
    (tmp_path / "ablations.json").write_text(
        json.dumps(
            fake_runs(
                {
                    "baseline": [2.00, 2.01, 2.02],
                    "few_layers": [2.10, 2.11, 2.12],  # worse than the baseline: every block helps
                    "plain_values": [1.90, 1.91, 1.92],  # better than the baseline: pre-values hurt here
                    "per_block_projections": [2.01, 2.02, 2.00],
                }
            )
        )
    )
    text = claims.write_report(tmp_path).read_text()
    rows = {line.split("|")[2].strip(): line for line in text.splitlines() if line.startswith("| ") and "`" in line}
    assert "**reproduced**" in rows["A memory in every block beats memory in a few blocks"]
    assert "delta -0.100" in rows["A memory in every block beats memory in a few blocks"]
    assert "**not reproduced**" in rows["PEER-style pre-values beat plain values"]
    assert "**reproduced**" in rows["One projection after pooling is as good as UltraMem's E per-block projections"]
    assert "**not run**" in rows["The principled value initialisation beats std 0.02"]  # no such runs in the file
    assert "**not run**" in rows["More activated values beats more total values (top-768/60B beats top-256/120B)"]
    assert "| `ablations` | 12 | [0, 1, 2] | full | `abc` |" in text
    n_claims = sum(len(section) for _, section in claims.claims())
    assert f"(of {n_claims} claims)" in text and "2 reproduced, 1 not reproduced" in text
    assert f"**0 of {n_claims} claims are inconclusive.**" in text
    # Specification §4.4 settled by a measurement made while writing: the fourth root matches,
    # the printed root is silent
    line = next(l for l in text.splitlines() if l.startswith("Measured when this file was written"))
    principled = float(line.split("(`principled`) ")[1].split(",")[0])
    assert 0.8 < principled < 1.25


def test_report_cli_writes_the_file(tmp_path, capsys):
    from minimem_tools.experiments import main

    assert main(["report", "--out", str(tmp_path)]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "README.md").is_file()


def test_report_counts_the_inconclusive_claims_and_the_seeds_to_decide_them(tmp_path):
    (tmp_path / "ablations.json").write_text(
        json.dumps(
            fake_runs(
                {
                    "baseline": [2.00, 2.01, 2.02],  # 2.010 +- 0.010
                    "gelu_gate": [2.01, 2.00, 2.02],  # a tie
                    # 2.025 +- 0.010: d = 0.015 < 2 sqrt(2 0.01^2 / 3) = 0.0163 at 3 seeds;
                    # n > 4 (2 0.01^2) / 0.015^2 = 3.56, so 4 seeds (bar 0.0141) decide it
                    "two_heads": [2.015, 2.025, 2.035],
                }
            )
        )
    )
    text = claims.report(tmp_path)
    rows = {line.split("|")[2].strip(): line for line in text.splitlines() if line.startswith("| ") and "`" in line}
    assert rows["No activation on <P_i, W_p x> beats an activation"].endswith("| better | **inconclusive** |")
    assert rows["One head with doubled D_k and m beats two heads"].endswith("| better | **inconclusive** |")
    n_claims = sum(len(section) for _, section in claims.claims())
    assert f"**2 of {n_claims} claims are inconclusive.**" in text
    assert "- #14 No activation on <P_i, W_p x> beats an activation: more than 100" in text
    assert "- #17 One head with doubled D_k and m beats two heads: 4" in text


def test_report_lists_the_experiments_that_need_five_seeds(tmp_path):
    """ablations with 3 seeds and a claim within 2 spreads is listed as short of 5; with 5 seeds it is not."""
    arms = {
        "baseline": [2.00, 2.01, 2.02],
        "few_layers": [2.02, 2.03, 2.04],  # d = 0.02: decided at 3 seeds (bar 0.0163), within 2 spreads (0.028)
        "plain_values": [2.30, 2.31, 2.32],  # far apart: not within 2 spreads
    }
    (tmp_path / "ablations.json").write_text(json.dumps(fake_runs(arms)))
    text = claims.report(tmp_path)
    assert "| `ablations` | #11 | 3 | **3 seeds: 5 not run yet** |" in text
    assert "Still short of 5 seeds: `ablations`." in text
    result = fake_runs({k: v + [v[0], v[2]] for k, v in arms.items()})  # 5 seeds, same means and spreads
    result["seeds"] = [0, 1, 2, 3, 4]
    (tmp_path / "ablations.json").write_text(json.dumps(result))
    text = claims.report(tmp_path)
    assert "| `ablations` | #11 | 5 | 5 seeds run |" in text
    assert "Every experiment with a claim within 2 spreads ran 5 seeds." in text
