import math

import pytest

from collie.trainer.schedule import lr_factor


def test_warmup_then_cosine_to_min_ratio():
    factors = [lr_factor(s, 10, 110, "cosine", 0.1) for s in range(111)]
    assert factors[0] == pytest.approx(1 / 11) and factors[9] == pytest.approx(10 / 11)
    assert factors[10] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.1 + 0.9 * 0.5)
    assert factors[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_linear_and_constant():
    assert lr_factor(50, 0, 100, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 0, 100, "linear", 0.2) == pytest.approx(0.2)
    assert lr_factor(99, 0, 100, "constant", 0.0) == 1.0
    assert math.isclose(lr_factor(0, 0, 100, "cosine", 0.0), 1.0)
