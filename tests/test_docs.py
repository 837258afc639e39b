"""Docs stay true to the code: the configuration reference is regenerated and compared."""
import os

from collie.config_reference import render

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_configuration_reference_is_current():
    with open(os.path.join(ROOT, "docs", "configuration.md")) as f:
        assert f.read() == render(), "regenerate with: python -m collie.config_reference > docs/configuration.md"
