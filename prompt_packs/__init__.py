# Data only: the TOML prompt packs shipped with sdrt (this file makes the folder importable for importlib.resources).
