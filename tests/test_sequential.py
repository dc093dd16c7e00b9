"""SequentialRejectionTest against exact truth: the occupancy chain's distribution, propagated here
(independently of the library) through a schedule of looks and absorbed wherever the test's public
``decide`` stops, gives the exact probability of every verdict. No simulation."""

import json
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from irs_callbacks.cli import main as cli_main
from irs_callbacks.stats import Decision, SequentialRejectionTest, rejection_threshold

# ----------------------------------------------------------------------------- exact references


def exact_outcomes(decide, s, looks):
    """(P(decision) per Decision, P(decision at look m) per (m, verdict, rule)) for one schedule of looks.

    The chain K_{m+1} = K_m + Bernoulli((s - K_m) / s) in float64 (real s: the chance of a new image
    is clipped at 0 once K exceeds s); at each look every k still alive goes through decide(m, k)."""
    size = looks[-1] + 2
    k = np.arange(size)
    new = np.clip((s - k) / s, 0.0, 1.0)
    p = np.zeros(size)
    p[0] = 1.0
    by_decision, by_look, m = Counter(), Counter(), 0
    for look in looks:
        for _ in range(look - m):
            moved = p * new
            p = p - moved
            p[1:] += moved[:-1]
        m = look
        for kk in np.flatnonzero(p[: m + 1]):
            decision = decide(m, int(kk))
            if decision.verdict != "continue":
                by_decision[decision] += p[kk]
                by_look[m, decision.verdict, decision.rule] += p[kk]
                p[kk] = 0.0
    assert p.sum() < 1e-12, "the last look must decide every path"
    return by_decision, by_look


def exact_outcomes_rational(decide, s: int, looks):
    """The same in exact rationals (integer s)."""
    p = {0: Fraction(1)}
    by_decision, m = Counter(), 0
    for look in looks:
        for _ in range(look - m):
            q = Counter()
            for k, pk in p.items():
                q[k] += pk * Fraction(k, s)
                if k < s:
                    q[k + 1] += pk * Fraction(s - k, s)
            p = q
        m = look
        for k in list(p):
            decision = decide(m, k)
            if decision.verdict != "continue":
                by_decision[decision] += p.pop(k)
    assert not any(p.values())
    return by_decision


def probability(outcomes, verdict, rule=None):
    return sum(v for d, v in outcomes.items() if d.verdict == verdict and (rule is None or d.rule == rule))


def schedules(budget: int) -> dict[str, list[int]]:
    return {
        "batch 1": list(range(1, budget + 1)),
        "batch 7": [*range(7, budget, 7), budget],
        "one batch": [budget],
        "uneven": sorted({1, 2, 9, 10, budget // 3, budget // 3 + 1, (3 * budget) // 4, budget}),
    }


# (n_train, target, real_irs, budget, alpha_e, interim_alpha, pass_alpha): integer and real s_d, and
# a budget beyond s_d (the chain saturates)
CONFIGS = [
    (250, 0.6, None, 80, 0.05, None, 0.05),  # s_d = 150
    (333, 0.5, 0.9, 120, 0.1, 0.04, 0.1),  # s_d = 149.85
    (100, 0.5, None, 80, 0.05, 0.02, 0.05),  # s_d = 50 < budget
]


@pytest.mark.parametrize("n_train,target,real,budget,alpha,interim,pass_alpha", CONFIGS)
def test_error_bounds_hold_exactly_for_every_schedule(n_train, target, real, budget, alpha, interim, pass_alpha):
    test = SequentialRejectionTest(
        n_train, target, budget, alpha, real_irs=real, interim_alpha=interim, pass_alpha=pass_alpha
    )
    assert test.rejection_error <= alpha and test.pass_error <= pass_alpha
    for name, looks in schedules(budget).items():
        at_target, _ = exact_outcomes(test.decide, test.s_d, looks)
        above, _ = exact_outcomes(test.decide, 1.2 * test.s_d, looks)
        below, _ = exact_outcomes(test.decide, 0.85 * test.s_d, looks)
        assert sum(at_target.values()) == pytest.approx(1.0, abs=1e-12)
        assert probability(at_target, "reject") <= test.rejection_error + 1e-12, name
        assert probability(above, "reject") <= probability(at_target, "reject") + 1e-12, name
        assert probability(at_target, "pass", "early_pass") <= test.pass_error + 1e-12, name
        assert probability(below, "pass", "early_pass") <= pass_alpha, name
        # the early rules do fire under the alternatives they are built for
        if name == "batch 1":
            assert probability(below, "reject", "interim") > 0 and probability(above, "pass", "early_pass") > 0


def test_worst_case_is_a_look_after_every_sample_and_equals_the_reported_error():
    """Without early pass, looking after every sample rejects with exactly ``rejection_error``,
    and by any m < budget the interim rejections have spent at most interim_alpha * m / budget (the
    deterministic ones near the budget are paths the final look rejects anyway)."""
    n_train, target, budget, alpha = 250, 0.6, 80, 0.05
    test = SequentialRejectionTest(n_train, target, budget, alpha)
    outcomes, by_look = exact_outcomes(test.decide, test.s_d, list(range(1, budget + 1)))
    assert probability(outcomes, "reject") == pytest.approx(test.rejection_error, rel=1e-9, abs=1e-15)
    rejected_by = np.cumsum([by_look[m, "reject", "interim"] for m in range(1, budget)])
    allowance = test.interim_alpha * np.arange(1, budget) / budget
    assert (rejected_by <= allowance + 1e-15).all()
    assert rejected_by[-1] > 0.5 * test.interim_alpha  # the interim budget is used, not wasted


def test_last_look_uses_the_error_left():
    """One more count at the final threshold would push the worst-case error to alpha_e or beyond."""
    n_train, target, budget, alpha = 300, 0.5, 100, 0.05
    test = SequentialRejectionTest(n_train, target, budget, alpha, interim_alpha=0.02)
    assert test.k_final < test.k_min  # the interim looks did cost the final threshold something

    def raised(m, k):
        if m >= budget:
            return Decision("reject", "final") if k <= test.k_final + 1 else Decision("pass", "final")
        if k == test.k_final + 1:  # no longer a certain pass
            return Decision("continue", None)
        return test.decide(m, k)

    outcomes, _ = exact_outcomes(raised, test.s_d, list(range(1, budget + 1)))
    assert probability(outcomes, "reject") >= alpha * (1 - 1e-9)


@pytest.mark.parametrize("looks", [list(range(1, 31)), [4, 8, 12, 16, 20, 24, 28, 30], [30], [1, 2, 3, 17, 29, 30]])
def test_error_bound_in_exact_rationals(looks):
    test = SequentialRejectionTest(40, 1.0, 30, 0.1, interim_alpha=0.05, pass_alpha=0.1)
    outcomes = exact_outcomes_rational(test.decide, 40, looks)
    assert sum(outcomes.values()) == 1
    assert probability(outcomes, "reject") <= Fraction(1, 10)
    assert probability(outcomes, "pass", "early_pass") <= Fraction(1, 10)


def test_check_fails_for_a_wrong_spending_rule():
    """Spending the full alpha_e at every look (the plain Eq. 10 threshold at each look) breaks the
    bound, and the exact check says so."""
    n_train, target, budget, alpha = 250, 0.6, 80, 0.05
    test = SequentialRejectionTest(n_train, target, budget, alpha)
    plain = {m: rejection_threshold(n_train, target, m, alpha) for m in range(1, budget + 1)}

    def naive(m, k):
        if m >= budget:
            return test.decide(m, k)
        return Decision("reject", "interim") if k <= plain[m] else Decision("continue", None)

    for name in ("batch 1", "batch 7"):
        outcomes, _ = exact_outcomes(naive, test.s_d, schedules(budget)[name])
        assert probability(outcomes, "reject") > alpha, name


def test_collapsed_model_is_rejected_within_a_quarter_of_the_budget():
    """Exact: a model producing 1/5 of the target diversity, batches of 20 out of 600."""
    test = SequentialRejectionTest(2000, 0.5, 600)
    outcomes, by_look = exact_outcomes(test.decide, 200, list(range(20, 601, 20)))
    assert probability(outcomes, "reject", "interim") > 0.999
    assert sum(v for (m, verdict, _), v in by_look.items() if m <= 150 and verdict == "reject") > 0.999


def test_decide_matches_the_thresholds_and_labels_every_rule():
    test = SequentialRejectionTest(1797, 0.8, 600, pass_alpha=0.05)
    budget = test.budget
    seen = Counter()
    for m in (1, 100, 250, 400, 599, 600):
        reject, early = test.reject_threshold(m), test.pass_threshold(m)
        for k in range(m + 1):
            decision = test.decide(m, k)
            seen[decision] += 1
            if m >= budget:
                assert decision == (("reject", "final") if k <= test.k_final else ("pass", "final"))
            elif k <= reject:
                rule = "deterministic" if k + budget - m <= test.k_final else "interim"
                assert decision == ("reject", rule)
            elif k > test.k_final:
                assert decision == ("pass", "deterministic")
            elif k >= early:
                assert decision == ("pass", "early_pass")
            else:
                assert decision == ("continue", None)
    assert {d.rule for d in seen} == {"deterministic", "interim", "early_pass", "final", None}
    # the deterministic rules at the edges of the budget
    assert test.decide(599, test.k_final - 1) == ("reject", "deterministic")
    assert test.decide(599, test.k_final + 1) == ("pass", "deterministic")
    # thresholds never move against the evidence
    rejects = [test.reject_threshold(m) for m in range(budget + 1)]
    assert rejects == sorted(rejects) and max(rejects) == test.k_final <= test.k_min
    assert test.pass_threshold(budget) is None and SequentialRejectionTest(1797, 0.8, 600).pass_threshold(300) is None


def test_imagenet_scale_thresholds():
    test = SequentialRejectionTest(1_281_166, 0.8, 50_000)
    assert test.k_min == 48_744 and test.k_final <= test.k_min and test.rejection_error <= 0.05
    # the back-of-envelope: at 5,000 samples a model covering 30 % shows about 32 repeats
    # against 12 +- 3.5 at the target; the threshold at the first batch of 5,000 catches it
    assert 5000 - test.reject_threshold(5000) <= 32
    assert 5000 - test.reject_threshold(5000) > 12 + 3 * 3.5


def test_interim_alpha_zero_is_plain_eq10_with_deterministic_rules():
    test = SequentialRejectionTest(1_281_166, 0.8, 50_000, interim_alpha=0)
    assert test.k_min == test.k_final == 48_744
    assert test.rejection_error == pytest.approx(0.0496, abs=5e-4) and test.rejection_error < 0.05
    assert test.reject_threshold(10_000) == 48_744 - 40_000  # deterministic only
    assert test.decide(10_000, 9_000).verdict == "continue"


# ----------------------------------------------------------------------------- CLI


def test_cli_schedule_prints_the_thresholds_per_look(capsys):
    args = ["threshold", "--n-train", "1797", "--target", "0.8", "--n-samples", "600", "--schedule", "250"]
    assert cli_main([*args, "--pass-alpha", "0.05", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    test = SequentialRejectionTest(1797, 0.8, 600, pass_alpha=0.05)
    assert [look["n_drawn"] for look in out["looks"]] == [250, 500, 600]
    assert [look["reject_at_most"] for look in out["looks"]] == [test.reject_threshold(m) for m in (250, 500, 600)]
    assert out["looks"][-1]["rule"] == "final" and out["k_min"] == 477 and out["k_final"] == test.k_final
    assert out["looks"][1]["pass_at_least"] == test.pass_threshold(500)
    assert cli_main(args) == 0
    text = capsys.readouterr().out
    assert "k_min (Eq. 10, alpha_e = 0.05) = 477" in text and text.rstrip().endswith("final")
    assert cli_main(["threshold", "--n-train", "1281166", "--target", "0.8", "--n-samples", "50000"]) == 0
    assert capsys.readouterr().out.strip() == "48744"


@pytest.mark.parametrize("interim", ["0", "0.01"])
def test_cli_schedule_labels_each_look_with_the_rule_that_rejects_there(capsys, interim):
    """Interim looks off: a look where nothing can be rejected yet prints "-", then the deterministic
    bound; every labelled threshold is one the test itself rejects at, by that rule."""
    args = ["threshold", "--n-train", "1797", "--target", "0.8", "--n-samples", "600", "--schedule", "122",
            "--interim-alpha", interim]
    assert cli_main([*args, "--json"]) == 0
    looks = json.loads(capsys.readouterr().out)["looks"]
    test = SequentialRejectionTest(1797, 0.8, 600, interim_alpha=float(interim))
    for look in looks:
        if look["reject_at_most"] < 0:
            assert look["rule"] is None and look["min_repeats"] is None
        else:
            decision = test.decide(look["n_drawn"], look["reject_at_most"])
            assert (decision.verdict, decision.rule) == ("reject", look["rule"])
            assert test.decide(look["n_drawn"], look["reject_at_most"] + 1).verdict != "reject"
    assert cli_main(args) == 0
    first_row = capsys.readouterr().out.splitlines()[3].split()
    if interim == "0":
        assert looks[0]["rule"] is None and looks[1]["rule"] == "deterministic"
        assert first_row == ["122", "-", "-"]
    else:
        assert [look["rule"] for look in looks] == ["interim"] * 4 + ["final"] and first_row[-1] == "interim"


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"budget": 0}, "budget"),
        ({"interim_alpha": 0.05}, "interim_alpha"),
        ({"interim_alpha": -0.01}, "interim_alpha"),
        ({"pass_alpha": 0}, "pass_alpha"),
        ({"pass_alpha": 1.5}, "pass_alpha"),
        ({"spending_exponent": 0}, "spending_exponent"),
        ({"pass_spending_exponent": float("inf")}, "pass_spending_exponent"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    arguments = {"n_train": 100, "target_irs": 0.5, "budget": 50, **kwargs}
    with pytest.raises(ValueError, match=name):
        SequentialRejectionTest(**arguments)


def test_bad_counts_and_cli_options_name_themselves(capsys):
    test = SequentialRejectionTest(100, 0.5, 50)
    with pytest.raises(ValueError, match="n_learned"):
        test.decide(10, 11)
    with pytest.raises(ValueError, match="n_drawn"):
        test.decide(-1, 0)
    for extra in (["--pass-alpha", "0.05"], ["--schedule", "0"]):
        with pytest.raises(SystemExit):
            cli_main(["threshold", "--n-train", "100", "--target", "0.5", "--n-samples", "50", *extra])
        assert "--schedule" in capsys.readouterr().err


def test_equal_configurations_share_one_table_until_the_cache_is_cleared():
    from irs_callbacks.stats import _rejection_boundary

    first = SequentialRejectionTest(1797, 0.8, 600, 0.05, real_irs=1.0)
    hits = _rejection_boundary.cache_info().hits
    SequentialRejectionTest(1797, 0.8, 600, 0.05, real_irs=1.0)
    assert _rejection_boundary.cache_info().hits == hits + 1
    SequentialRejectionTest.clear_cache()
    assert _rejection_boundary.cache_info().currsize == 0
    again = SequentialRejectionTest(1797, 0.8, 600, 0.05, real_irs=1.0)
    assert [again.reject_threshold(m) for m in range(0, 601, 50)] == [first.reject_threshold(m) for m in range(0, 601, 50)]
