"""pwopsd/grading.py: the answer-extraction and equivalence table, each fault kind with its cases, Maj@n order
invariance, and the time limit from other threads and processes."""
import itertools
import multiprocessing
import os
import signal
import threading
import time

import pytest

from pwopsd import grading as G

GSM8K_REF = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
             "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")

# (response, reference, extracted answer, correct)
GRADING_TABLE = [
    # fractions and decimals
    ("So the answer is \\boxed{\\frac{1}{2}}.", "0.5", "\\frac{1}{2}", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", "0.5", True),
    ("\\boxed{\\frac12}", "\\frac{1}{2}", "\\frac12", True),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", "-\\frac{1}{2}", True),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", "\\frac{1}{3}", False),
    # \dfrac / \tfrac
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", "\\dfrac{3}{4}", True),
    ("\\boxed{\\tfrac34}", "0.75", "\\tfrac34", True),
    ("\\boxed{\\dfrac{2}{4}}", "\\frac{1}{2}", "\\dfrac{2}{4}", True),
    # percent
    ("\\boxed{10\\%}", "10", "10\\%", True),
    ("\\boxed{10}", "10\\%", "10", True),
    # tuples and intervals
    ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})", True),
    ("\\boxed{(3, \\pi)}", "\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi)", False),
    ("\\boxed{[1, 3)}", "[1,3)", "[1, 3)", True),
    ("\\boxed{(1, 3]}", "[1,3)", "(1, 3]", False),
    ("\\boxed{(-\\infty, 2]}", "(-\\infty,2]", "(-\\infty, 2]", True),
    # nested braces inside \boxed{}
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", "\\frac{\\sqrt{3}}{2}", True),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}",
     "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", True),
    # two boxed answers: the last one wins
    ("First \\boxed{3}. Wait, I made an error: \\boxed{4}", "4", "4", True),
    ("\\boxed{4} -- no, recomputing gives \\boxed{3}", "4", "3", False),
    ("<think>maybe \\boxed{7}</think>The answer is \\boxed{8}.", "8", "8", True),
    # \text{} and units
    ("\\boxed{\\text{(C)}}", "C", "\\text{(C)}", True),
    ("\\boxed{5 \\text{ cm}}", "5", "5 \\text{ cm}", True),
    ("\\boxed{18 \\text{ dollars}}", "18", "18 \\text{ dollars}", True),
    ("\\boxed{\\$18}", "18", "\\$18", True),
    ("\\boxed{90^\\circ}", "90", "90^\\circ", True),
    ("\\boxed{\\text{east}}", "\\text{west}", "\\text{east}", False),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", "\\text{Evelyn}", True),
    # \boxed without braces, \fbox
    ("The answer is \\boxed 5.", "5", "5", True),
    ("\\fbox{7}", "7", "7", True),
    # negative numbers
    ("\\boxed{-3}", "-3", "-3", True),
    ("\\boxed{3}", "-3", "3", False),
    # large integers with commas
    ("\\boxed{1,000,000}", "1000000", "1,000,000", True),
    ("\\boxed{1{,}000}", "1000", "1{,}000", True),
    ("\\boxed{1,000,001}", "1000000", "1,000,001", False),
    # empty box, no box, unclosed box, empty \text
    ("\\boxed{}", "5", "", False),
    ("The answer is 5.", "5", None, False),
    ("\\boxed{5", "5", None, False),
    ("\\boxed{\\text{}}", "5", "\\text{}", False),
    # sympy-equal but written differently
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", "2\\sqrt{2}", True),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", "x^2+2x+1", True),
    ("\\boxed{6+9i}", "9i+6", "6+9i", True),
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", "\\{1,2\\}", True),
    ("\\boxed{x = 5}", "5", "x = 5", True),
    ("\\boxed{\\pi}", "3.14159", "\\pi", False),
    # GSM8K '#### N' references
    ("She sold \\boxed{72} clips.", GSM8K_REF, "72", True),
    ("\\boxed{71}", GSM8K_REF, "71", False),
    ("\\boxed{1,200}", "20 * 60 = <<20*60=1200>>1200\n#### 1,200", "1,200", True),
]


@pytest.mark.parametrize("response,reference,answer,correct", GRADING_TABLE)
def test_grading_table(response, reference, answer, correct):
    assert G.extract_answer(response) == answer
    assert G.grade(response, reference) == (answer, correct)


def test_grading_table_size():
    assert len(GRADING_TABLE) >= 30
    assert {c for *_, c in GRADING_TABLE} == {True, False}


def test_grade_off_the_main_thread():
    # math-verify's signal-based timeout raises outside the main thread; grade must still work there.
    out = {}
    t = threading.Thread(target=lambda: out.update(a=G.grade("\\boxed{\\dfrac{1}{2}}", "0.5"),
                                                   b=G.grade("\\boxed{3}", "4")))
    t.start()
    t.join()
    assert out == {"a": ("\\dfrac{1}{2}", True), "b": ("3", False)}


def test_grade_rejects_an_empty_reference():
    with pytest.raises(ValueError, match="empty reference"):
        G.grade("\\boxed{1}", " ")


def test_string_fallback_only_when_parsing_fails():
    # math-verify parses neither side -> normalised string equality decides.
    assert G._parse("\\text{}", 5) == ()
    assert G._equivalent("\\text{ yes }", "\\text{yes}", 5)
    assert not G._equivalent("\\text{}", "\\text{}", 5)  # empty after normalising: never correct


def test_majority_vote_clusters_ties_and_the_invalid_cluster():
    # \frac12 and 0.5 are one cluster of 2 -> beats "3" and the invalid cluster of 1.
    assert G.majority_correct(["\\frac12", "0.5", "3", None], [True, True, False, False]) == 1.0
    assert G.majority_correct(["3", "\\frac12", "3", "0.5", "3"], [False, True, False, True, False]) == 0.0
    # Ties: the fraction of tied clusters that are correct.
    assert G.majority_correct(["1", "2"], [True, False]) == 0.5
    assert G.majority_correct(["1", "2", "3"], [True, False, False]) == pytest.approx(1 / 3)
    assert G.majority_correct(["1", "1", "2", "2"], [True, True, True, True]) == 1.0
    # The invalid cluster (no box / empty box) is wrong when it wins, and takes part in ties.
    assert G.majority_correct([None, "", None, "5"], [False, False, False, True]) == 0.0
    assert G.majority_correct([None, "5"], [False, True]) == 0.5
    assert G.majority_correct([None, None], [False, False]) == 0.0
    # A wrong majority beats a correct minority.
    assert G.majority_correct(["4", "4", "5"], [False, False, True]) == 0.0




# --------------------------------------------------------------------------------------------------
# Fault kinds: (response, reference, extracted answer, correct)
# --------------------------------------------------------------------------------------------------
MULTIPLE_ANSWERS = [  # boxes joined by a connector are one answer set; prose between them = a revision
    ("so \\boxed{3} and \\boxed{5}", "3, 5", "3, 5", True),
    ("\\boxed{3}, \\boxed{5}", "\\{5, 3\\}", "3, 5", True),
    ("$\\boxed{-1}$ or $\\boxed{2}$", "2, -1", "-1, 2", True),
    ("x = \\boxed{3}, y = \\boxed{5}", "3, 5", "3, 5", True),
    ("The roots are \\boxed{1}, \\boxed{2} and \\boxed{3}.", "1,2,3", "1, 2, 3", True),
    ("\\boxed{3}\\quad\\boxed{5}", "3,5", "3, 5", True),
    ("\\boxed{3} \\text{ and } \\boxed{5}", "3,5", "3, 5", True),
    ("\\boxed{3} and \\boxed{5}", "3", "3, 5", False),
    ("\\boxed{3} and \\boxed{5}", "3, 4", "3, 5", False),
    ("I first got \\boxed{3}. Checking again, the answer is \\boxed{5}", "5", "5", True),
    ("I first got \\boxed{3}. Checking again, the answer is \\boxed{5}", "3, 5", "5", False),
]
INTERVALS_INEQUALITIES = [  # the same solution set, whichever side is the reference
    ("\\boxed{x>2}", "(2,\\infty)", "x>2", True),
    ("\\boxed{(2,\\infty)}", "x>2", "(2,\\infty)", True),
    ("\\boxed{[2, \\infty)}", "x \\ge 2", "[2, \\infty)", True),
    ("\\boxed{x \\ge 2}", "[2,\\infty)", "x \\ge 2", True),
    ("\\boxed{2 < x < 5}", "(2, 5)", "2 < x < 5", True),
    ("\\boxed{(2, 5)}", "2<x<5", "(2, 5)", True),
    ("\\boxed{x<-1 \\text{ or } x>3}", "(-\\infty,-1)\\cup(3,\\infty)", "x<-1 \\text{ or } x>3", True),
    ("\\boxed{(-\\infty,-1)\\cup(3,\\infty)}", "x<-1 \\text{ or } x>3", "(-\\infty,-1)\\cup(3,\\infty)", True),
    ("\\boxed{x \\le -1 \\text{ or } x \\ge 3}", "(-\\infty,-1]\\cup[3,\\infty)", "x \\le -1 \\text{ or } x \\ge 3", True),
    ("\\boxed{x \\geq 2}", "(2, \\infty)", "x \\geq 2", False),
    ("\\boxed{(-\\infty,-1]\\cup(3,\\infty)}", "x<-1 \\text{ or } x>3", "(-\\infty,-1]\\cup(3,\\infty)", False),
    ("\\boxed{x<2}", "(2,\\infty)", "x<2", False),
]
TRUNCATION = [  # an unclosed last box = no final answer, whatever came before it
    ("the answer is \\boxed{42}. wait, actually it is \\boxed{4", "42", None, False),
    ("\\boxed{7} so the final answer is \\boxed{\\frac{7}{", "7", None, False),
    ("\\boxed{1} and \\boxed{2", "1", None, False),
    ("The answer is \\boxed{\\frac{1}{2}}. To double-check: \\boxed{\\frac{1}{", "\\frac{1}{2}", None, False),
    ("\\boxed{5} and then the text stops mid", "5", "5", True),  # cut after a closed box: it stands
]
EXTREME_MAGNITUDES = [  # exact forms compared exactly, decimals relatively, however small or large
    ("\\boxed{\\frac{1}{2^{98}}}", "\\frac{1}{2^{99}}", "\\frac{1}{2^{98}}", False),
    ("\\boxed{\\frac{1}{2006!}}", "\\frac{1}{2004!}", "\\frac{1}{2006!}", False),
    ("\\boxed{\\frac{1}{2^{99}}}", "2^{-99}", "\\frac{1}{2^{99}}", True),
    ("\\boxed{\\frac{1}{3^{50}}}", "3^{-50}", "\\frac{1}{3^{50}}", True),
    ("\\boxed{10^{-20}}", "10^{-21}", "10^{-20}", False),
    ("\\boxed{3 \\times 10^{-30}}", "2^{-98}", "3 \\times 10^{-30}", False),
    ("\\boxed{0.000001}", "\\frac{1}{2^{20}}", "0.000001", False),
    ("\\boxed{1.5 \\times 10^{-12}}", "\\frac{3}{2 \\cdot 10^{12}}", "1.5 \\times 10^{-12}", True),
    ("\\boxed{1.6 \\times 10^{-12}}", "\\frac{3}{2 \\cdot 10^{12}}", "1.6 \\times 10^{-12}", False),
    ("\\boxed{2^{100}}", "1267650600228229401496703205376", "2^{100}", True),
    ("\\boxed{2^{100}+1}", "1267650600228229401496703205376", "2^{100}+1", False),
    ("\\boxed{10^{30}+1}", "10^{30}", "10^{30}+1", False),
    ("\\boxed{\\frac{2006!}{2004!}}", "2006 \\cdot 2005", "\\frac{2006!}{2004!}", True),
    ("\\boxed{0.333333}", "\\frac13", "0.333333", True),  # decimals keep math-verify's 6-place rounding
]
UNITS_TEXT = [  # a unit or word after a number is dropped; words before it / number words are not numbers
    ("\\boxed{\\text{5 apples}}", "5", "\\text{5 apples}", True),
    ("\\boxed{\\text{5 apples}}", "6", "\\text{5 apples}", False),
    ("\\boxed{5 \\text{ apples}}", "5", "5 \\text{ apples}", True),
    ("\\boxed{5 apples}", "5", "5 apples", True),
    ("\\boxed{\\mbox{12 cm}}", "12", "\\mbox{12 cm}", True),
    ("\\boxed{\\textbf{42 students}}", "42", "\\textbf{42 students}", True),
    ("\\boxed{\\text{3.5 hours}}", "\\frac72", "\\text{3.5 hours}", True),
    ("\\boxed{\\text{-4 degrees}}", "-4", "\\text{-4 degrees}", True),
    ("\\boxed{5\\,\\mathrm{cm}^2}", "5", "5\\,\\mathrm{cm}^2", True),
    ("\\boxed{\\$1{,}250}", "1250", "\\$1{,}250", True),
    ("\\boxed{\\text{about } 5}", "5", "\\text{about } 5", False),
    ("\\boxed{\\text{five}}", "5", "\\text{five}", False),
]
KINDS = {"multiple answers": MULTIPLE_ANSWERS, "intervals / inequalities": INTERVALS_INEQUALITIES,
         "truncation": TRUNCATION, "extreme magnitudes": EXTREME_MAGNITUDES, "units / text": UNITS_TEXT}


@pytest.mark.parametrize("response,reference,answer,correct",
                         [pytest.param(*case, id=f"{kind}-{i}") for kind, cases in KINDS.items()
                          for i, case in enumerate(cases)])
def test_fault_kinds(response, reference, answer, correct):
    assert G.extract_answer(response) == answer
    assert G.grade(response, reference) == (answer, correct)


def test_each_kind_has_right_and_wrong_cases():
    for kind, cases in KINDS.items():
        assert {c for *_, c in cases} == {True, False}, kind
    assert sum(map(len, KINDS.values())) - 5 >= 15  # >= 15 beyond the five inputs of the report


def test_math_verify_alone_picks_the_wrong_box():
    # Why extract_answer chooses the box itself: math-verify reads all boxes as one set and falls back to
    # an earlier box when the last is cut off.
    from math_verify import LatexExtractionConfig, parse

    config = [LatexExtractionConfig(boxed_match_priority=0)]
    assert str(parse("First \\boxed{3}. Wait, I made an error: \\boxed{4}", config)[0]) == "{3, 4}"
    assert str(parse("the answer is \\boxed{42}. wait, actually it is \\boxed{4", config)[0]) == "42"


# --------------------------------------------------------------------------------------------------
# Maj@n does not depend on the sample order
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("answers,correct,expected", [
    # verify is asymmetric here (set vs relation); two clusters of 2 tie, one correct
    (["x>2", "(2,\\infty)", "7", "7"], [True, True, False, False], 0.5),
    # one cluster with mixed grades (0.5 and \frac12 are one value): correct, ties with "3"
    (["\\frac12", "0.5", "3", "3"], [True, False, False, False], 0.5),
    # a cluster of 3 formed only through the symmetric relation beats the invalid pair
    (["x>2", "(2,\\infty)", "x > 2", None, ""], [True, False, True, False, False], 1.0),
])
def test_majority_is_the_same_for_every_order(answers, correct, expected):
    values = {G.majority_correct([answers[i] for i in p], [correct[i] for i in p])
              for p in itertools.permutations(range(len(answers)))}
    assert values == {expected}


def test_majority_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 answers but 1 grades"):
        G.majority_correct(["1", "2"], [True])


# --------------------------------------------------------------------------------------------------
# Time limit: any thread, any process; a hang is wrong, counted, and never blocks
# --------------------------------------------------------------------------------------------------
TOWER = "\\boxed{2^{2^{2^{2^{2^{2}}}}}}"


def test_a_power_tower_from_another_thread_returns_within_the_timeout():
    G.grade("\\boxed{1}", "1")  # the worker is started outside the timed part
    before = G.STATS["timeouts"]
    out = {}
    t = threading.Thread(target=lambda: out.update(r=G.grade(TOWER, "5", timeout=2)))
    start = time.monotonic()
    t.start()
    t.join(30)
    assert not t.is_alive()
    assert time.monotonic() - start < 2 + 2  # about the timeout (slack for a loaded machine)
    assert out["r"] == ("2^{2^{2^{2^{2^{2}}}}}", False)
    assert G.STATS["timeouts"] == before + 1
    assert G.grade("\\boxed{\\frac12}", "0.5") == ("\\frac12", True)  # grading goes on afterwards


def test_a_worker_that_never_answers_is_killed_and_replaced():
    # A frozen worker stands for a computation stuck inside one C call, which no alarm interrupts.
    G.grade("\\boxed{1}", "1")
    proc = G._state["proc"]
    before, starts = G.STATS["timeouts"], G.STATS["starts"]
    os.kill(proc.pid, signal.SIGSTOP)
    start = time.monotonic()
    assert G.grade("\\boxed{17}", "17", timeout=1) == ("17", False)
    assert time.monotonic() - start < 1 + 2
    assert proc.poll() is not None  # killed
    assert G.STATS["timeouts"] == before + 1
    assert G.grade("\\boxed{17}", "18") == ("17", False) and G.grade("\\boxed{19}", "19") == ("19", True)
    assert G.STATS["starts"] == starts + 1


def _grade_in_child(queue):
    G._equivalent.cache_clear()  # the fork copied the parent's cached verdicts; make the child compare
    queue.put([G.grade(TOWER, "5", timeout=2), G.grade("\\boxed{0.5}", "\\frac12"), dict(G.STATS)])


def test_grading_in_a_daemonic_worker_process():
    G.grade("\\boxed{1}", "1")  # the parent's worker exists; the forked child must start its own
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_grade_in_child, args=(queue,), daemon=True)
    child.start()
    *result, stats = queue.get(timeout=60)
    child.join(10)
    assert result == [("2^{2^{2^{2^{2^{2}}}}}", False), ("0.5", True)]
    assert stats["timeouts"] == 1 and stats["calls"] == 2 and stats["starts"] >= 1  # its own counts
    assert G.grade("\\boxed{2}", "2") == ("2", True)  # the parent's worker is untouched


def test_bad_timeout():
    with pytest.raises(ValueError, match="timeout must be > 0"):
        G.grade("\\boxed{1}", "2", timeout=0)


def test_stable_seed():
    assert G.stable_seed("x", 1, 2) == G.stable_seed("x", 1, 2) != G.stable_seed("x", 2, 1)
    assert 0 <= G.stable_seed("anything") < 2 ** 31


def test_a_dead_worker_is_replaced_before_the_next_comparison():
    G.grade("\\boxed{1}", "1")
    proc, starts, crashes = G._state["proc"], G.STATS["starts"], G.STATS["crashes"]
    proc.kill()
    proc.wait()
    assert G.grade("\\boxed{23}", "23") == ("23", True)
    assert G.STATS["starts"] == starts + 1 and G.STATS["crashes"] == crashes  # noticed before sending


# ---------------------------------------------------------------------------------------------------------
# Issue 26, item 1: which part of a response is graded -- the strict rule and the authors' rule
# ---------------------------------------------------------------------------------------------------------
# (response, truncated, strict answer, authors' answer): reference "5" throughout
RULE_CASES = [
    ("<think>2+3 = \\boxed{5}, but let me check the carry", True, None, "5"),      # cut off inside <think>
    ("<think>so \\boxed{5}.</think>\nThe answer is 5.", False, None, "5"),         # box only in the thinking
    ("2+3: \\boxed{5}. Hmm, wait, let me revise: 2+3 could also", True, None, "5"),  # cut off while revising
    ("<think>I think it is 5 but", False, None, None),                              # thinking never closed
    ("<think>maybe \\boxed{4}</think>So \\boxed{5}.", False, "5", "5"),             # the answer after </think>
    ("2+3 = \\boxed{5}.", False, "5", "5"),                                          # no thinking at all
]


@pytest.mark.parametrize("response,truncated,strict,authors", RULE_CASES)
def test_grading_rules(response, truncated, strict, authors):
    assert G.grade(response, "5", truncated=truncated) == (strict, strict == "5")  # strict is the default
    assert G.grade(response, "5", truncated=truncated, rule="strict") == (strict, strict == "5")
    assert G.grade(response, "5", truncated=truncated, rule="authors") == (authors, authors == "5")


def test_grading_rule_unknown():
    with pytest.raises(ValueError, match="grading rule"):
        G.grade("\\boxed{5}", "5", rule="lenient")


def test_boxed_word_in_prose_is_no_answer():
    assert G.grade("I wrote it in \\boxed form, so it is five", "form") == (None, False)
    assert G.extract_answer("Put it in \\boxed form.") is None
    assert G.extract_answer("The answer is \\boxed 12.") == "12"  # a bare number still is one
