"""ResNet transfer learning: one script per DVC stage (see dvc.yaml)."""
from src.core import process

process.before_torch()  # here because `python -m src.<stage>` runs this before the stage imports torch
