"""Answer extraction and SQuAD-style EM/F1 (aliases, articles, punctuation, yes/no, dates)."""

import pytest

from prag_vllm.metrics import best_scores, exact_match, extract_answer, f1_score, normalize_answer


@pytest.mark.parametrize("generation,answer", [
    ("August 25, 1963", "August 25, 1963"),           # never cut at the first comma
    ("Answer: August 25, 1963.\nBecause ...", "August 25, 1963"),
    ("The answer is Paris, France.", "Paris, France"),
    ("The answer to this question is: Mount Orvanne", "Mount Orvanne"),
    ("**Final Answer:** Ada Lovelace", "Ada Lovelace"),
    ("Answer:\n  Oslo\nmore text", "Oslo"),            # a bare label line: the answer is on the next line
    ('  "Velmora Quist"  ', "Velmora Quist"),
    ("Answers vary by source", "Answers vary by source"),  # 'Answers' is not a label
    ("", ""),
    ("\n\n", ""),
])
def test_extract_answer(generation, answer):
    assert extract_answer(generation) == answer


def test_normalization():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("An apple, a day") == "apple day"
    assert normalize_answer("August 25, 1963") == "august 25 1963"
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words


def test_exact_match_and_f1():
    assert exact_match("the Eiffel Tower.", "Eiffel Tower") == 1.0
    assert exact_match("Eiffel", "Eiffel Tower") == 0.0
    assert f1_score("Eiffel", "Eiffel Tower") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert f1_score("nothing in common", "Eiffel Tower") == 0.0
    assert f1_score("", "Eiffel Tower") == 0.0


def test_dates_with_commas_score_fully():
    pred = extract_answer("August 25, 1963.")
    assert best_scores(pred, ["August 25, 1963"]) == (1.0, 1.0)
    # cutting at the comma (as the paper's code does) would lose the year
    assert best_scores("August 25", ["August 25, 1963"])[0] == 0.0


def test_yes_no_only_exact():
    assert f1_score("yes", "yes") == 1.0
    assert f1_score("yes it is", "yes") == 0.0
    assert f1_score("no", "no way") == 0.0
    assert exact_match("Yes.", "yes") == 1.0


def test_max_over_aliases():
    em, f1 = best_scores("political leader", ["politician", "political leader", "pol"])
    assert (em, f1) == (1.0, 1.0)
    em, f1 = best_scores("a famous politician", ["politician", "statesman"])
    assert em == 0.0 and f1 == pytest.approx(2 / 3)
    assert best_scores("x", []) == (0.0, 0.0)
