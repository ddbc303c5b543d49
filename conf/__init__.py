"""The Hydra config tree of bts_lightning, importable as ``bts_lightning.conf`` (see pyproject.toml)."""
