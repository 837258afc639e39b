"""Model cards: architecture presets (ModelArgs fields) installed as the package ``collie.cards``."""
