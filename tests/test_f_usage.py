"""What each rule does with f: a parameter, only a precondition, or nothing (the mean refuses it)."""

import numpy as np
import pytest

import fedagg
from fedagg.rules import RULES

X = np.random.default_rng(0).standard_normal((9, 40)).astype(np.float32)
X[-1] += 50.0  # one outlier, so that rules which use f give another result for another f


def test_mean_refuses_an_f_it_would_ignore():
    with pytest.raises(ValueError, match=r"rule 'mean' does not use f \(got f = 1\)"):
        fedagg.aggregate(X, rule="mean", f=1)
    with pytest.raises(ValueError, match="'mean' does not use f"):
        fedagg.aggregate(X, "mean", 2, weights=np.ones(9))
    np.testing.assert_allclose(fedagg.aggregate(X, "mean", 0), X.mean(0), rtol=1e-6, atol=1e-6)


def test_mean_with_nnm_uses_f():
    mixed = fedagg.aggregate(X, "mean", 2, nnm=True)
    np.testing.assert_allclose(mixed, fedagg.nnm(X, 2).mean(0), rtol=1e-5, atol=1e-5)
    assert not np.allclose(mixed, fedagg.aggregate(X, "mean", 1, nnm=True))


@pytest.mark.parametrize("rule", ["median", "geometric_median", "centered_clipping"])
def test_precondition_rules_check_f_and_do_not_depend_on_it(rule):
    assert RULES[rule].uses_f == "precondition"
    np.testing.assert_array_equal(fedagg.aggregate(X, rule, 0), fedagg.aggregate(X, rule, 4))
    with pytest.raises(ValueError, match=r"n > 2f"):
        fedagg.aggregate(X, rule, 5)


@pytest.mark.parametrize("rule", ["trimmed_mean", "krum", "multi_krum", "bulyan"])
def test_parameter_rules_use_f(rule):
    assert RULES[rule].uses_f == "parameter"
    (a, ia), (b, ib) = (fedagg.aggregate(X, rule, f, return_info=True) for f in (0, 1))
    differs = not np.array_equal(a, b)
    if ia.scores is not None:  # Krum-type: f sets the neighbours scored
        differs = differs or not np.array_equal(ia.scores, ib.scores)
    assert differs


def test_every_rule_says_what_it_does_with_f():
    assert {r: s.uses_f for r, s in RULES.items()} == {
        "mean": "", "median": "precondition", "trimmed_mean": "parameter", "krum": "parameter",
        "multi_krum": "parameter", "bulyan": "parameter", "geometric_median": "precondition",
        "centered_clipping": "precondition"}
    for name in fedagg.RULES:  # and its docstring says it
        assert "``f``" in getattr(fedagg, name).__doc__, name



def test_the_streaming_aggregator_refuses_an_f_the_mean_would_ignore():
    with pytest.raises(ValueError, match="does not use f"):
        fedagg.Aggregator("mean", f=1)
    fedagg.Aggregator("mean", f=1, nnm=True)  # NNM uses f
