"""`smp-ros compare`: paired comparison of eval results, checked against brute force and hand counts."""

import itertools
import json

import pytest

from smp_ros.cli import main
from smp_ros.compare import exact_mcnemar


def brute_force_mcnemar(a_only: int, b_only: int) -> float:
    """Every way n discordant pairs can fall (each side with probability 1/2), enumerated: the two-sided p is
    the probability of an outcome no more likely than the one observed."""
    n = a_only + b_only
    observed = min(a_only, b_only)
    extreme = sum(1 for signs in itertools.product((0, 1), repeat=n) if min(sum(signs), n - sum(signs)) <= observed)
    return min(1.0, extreme / 2 ** n)


@pytest.mark.parametrize("a_only,b_only", [(0, 0), (1, 0), (3, 3), (0, 7), (2, 9), (5, 6), (1, 12)])
def test_exact_mcnemar_equals_enumeration(a_only, b_only):
    assert exact_mcnemar(a_only, b_only) == pytest.approx(brute_force_mcnemar(a_only, b_only), rel=1e-12)
    assert exact_mcnemar(a_only, b_only) == exact_mcnemar(b_only, a_only)


def test_exact_mcnemar_textbook_value():
    # 1 against 9 discordant pairs: 2 * (1 + 10) / 1024 = 0.021484375.
    assert exact_mcnemar(1, 9) == 0.021484375
    with pytest.raises(ValueError):
        exact_mcnemar(-1, 2)


def eval_json(path, outcomes: dict[str, list[bool]], first_seed: int = 100):
    tasks = {t: {"episodes": [{"seed": first_seed + i, "success": s, "progress": float(s)} for i, s in enumerate(v)]}
             for t, v in outcomes.items()}
    path.write_text(json.dumps({"policy": "x", "tasks": tasks}))
    return str(path)


def test_pairs_by_training_seed_task_and_episode(tmp_path, capsys):
    a0 = eval_json(tmp_path / "a0.json", {"pen_cap": [True, True, False, True], "handover": [False, False]})
    a1 = eval_json(tmp_path / "a1.json", {"pen_cap": [False, False, False, False]})
    b0 = eval_json(tmp_path / "b0.json", {"pen_cap": [True, False, True, True], "handover": [True, True]})
    b1 = eval_json(tmp_path / "b1.json", {"pen_cap": [True, True, True, True, True]})  # one episode unpaired
    out = tmp_path / "cmp.json"
    assert main(["compare", "--a", a0, "--a", a1, "--b", b0, "--b", b1, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    # Paired: 6 episodes of model 0 and 4 of model 1 (the same episode seeds, a different trained model each).
    assert r["episodes"] == 10 and r["unpaired"] == {"a": 0, "b": 1}
    assert r["a"]["successes"] == 3 and r["b"]["successes"] == 9
    assert r["tasks"]["pen_cap"]["a"]["successes"] == 3 and r["tasks"]["handover"]["b"]["successes"] == 2
    # Discordant: model 0 pen_cap seeds 101 (A) and 102 (B), handover 100, 101 (B); model 1 all four (B).
    assert (r["a_only"], r["b_only"]) == (1, 7)
    assert r["mcnemar_p"] == pytest.approx(brute_force_mcnemar(1, 7))
    lo, hi = r["a"]["ci95"]
    assert lo < 0.3 < hi
    printed = capsys.readouterr().out
    assert "A only 1, B only 7" in printed and "left out (run by one side only): A 0, B 1" in printed


def test_bad_input_names_the_file_and_option(tmp_path, capsys):
    good = eval_json(tmp_path / "good.json", {"pen_cap": [True]})
    (tmp_path / "bad.json").write_text('{"tasks": {"pen_cap": {"episodes": [{"seed": 1}]}}}')
    assert main(["compare", "--a", str(tmp_path / "bad.json"), "--b", good]) == 2
    assert "--a" in (err := capsys.readouterr().err) and "bad.json" in err and "success" in err
    assert main(["compare", "--a", good, "--b", str(tmp_path / "missing.json")]) == 2
    assert "--b" in (err := capsys.readouterr().err) and "missing.json" in err
    assert main(["compare", "--a", good, good, "--b", good]) == 2  # the same episodes twice for one model
    assert "appears twice" in capsys.readouterr().err
    assert main(["compare", "--a", good, "--a", good, "--b", good]) == 2
    assert "--a was given 2 time(s) and --b 1" in capsys.readouterr().err
    other = eval_json(tmp_path / "other.json", {"handover": [True]})
    assert main(["compare", "--a", good, "--b", other]) == 2
    assert "share no episode" in capsys.readouterr().err
