"""The package's shared helpers (probunlearn.utils) that other modules build on: the old names of renamed
arguments, accepted for one release."""

import inspect
import warnings

import pytest

from probunlearn import bounds, control, metrics, objectives
from probunlearn.utils import renamed_arguments


def test_an_old_argument_name_is_passed_on_under_its_new_one_with_a_warning():
    @renamed_arguments(lam="ed_weight")
    def score(x, ed_weight=2.0):
        return x * ed_weight

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert score(3, ed_weight=0.5) == 1.5  # the new name: no warning
    with pytest.warns(DeprecationWarning, match="ed_weight"):
        assert score(3, lam=0.5) == 1.5
    with pytest.raises(TypeError, match="ed_weight"):
        score(3, lam=0.5, ed_weight=1.0)


def test_the_package_speaks_one_vocabulary_and_still_takes_the_old_names():
    scores = [0.1, 0.4, 0.2, 0.9]
    with pytest.warns(DeprecationWarning, match="ed_weight"):
        assert bounds.ed_score(scores, lam=1.5) == bounds.ed_score(scores, ed_weight=1.5)
    with pytest.warns(DeprecationWarning, match="leak_tau"):
        assert metrics.is_leak("born in Lima", "she was born in Lima", [], tau=0.4)
    with pytest.warns(DeprecationWarning, match="retain_weight"):
        assert objectives.check_hparams("gd", {"alpha": 0.5}) == {"retain_weight": 0.5}
    assert list(inspect.signature(control.mixed_model).parameters) == ["model", "mixing_weight"]
