"""Model cards: named architecture presets shipped as ``models/<name>.yaml`` (the package ``collie.cards``).

    args = load_card("llama3-8b")            # a shipped card
    args = load_card("path/to/my-card.yaml")  # any YAML file with ModelArgs fields
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import yaml

from collie.errors import ConfigError
from collie.models.args import ModelArgs
from collie.schema import from_dict, suggest


def list_cards() -> list[str]:
    """Names of the shipped model cards."""
    return sorted(entry.name[:-len(".yaml")] for entry in files("collie.cards").iterdir()
                  if entry.name.endswith(".yaml"))


def load_card(name_or_path: str) -> ModelArgs:
    """ModelArgs of a shipped card (by name) or of a YAML file (by path), validated field by field."""
    text, label = _card_text(str(name_or_path))
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"model card {label} is not valid YAML: {e}") from e
    return from_dict(ModelArgs, data, f"model card {label}")


def _card_text(name_or_path: str) -> tuple[str, str]:
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path or Path(name_or_path).is_file():
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"model card file {path} does not exist; shipped cards: {', '.join(list_cards())}")
        return path.read_text(), str(path)
    card = files("collie.cards") / f"{name_or_path}.yaml"
    if not card.is_file():
        raise ConfigError(f"unknown model card '{name_or_path}'{suggest(name_or_path, list_cards())}; "
                          f"available: {', '.join(list_cards())} (or give a path to a YAML file)")
    return card.read_text(), name_or_path
