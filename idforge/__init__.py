"""idforge: identity-conditioned face generation, from curated shards to exported checkpoints.

The code lives in the top-level folders of the repository (``data_pipeline/``, ``models/``,
``train/``, ``inference/``, ``eval/``, ``launch/``); ``pyproject.toml`` maps them to
``idforge.data_pipeline``, ``idforge.models`` and so on.
"""

__version__ = "0.1.0"
