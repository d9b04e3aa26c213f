"""ResNet transfer learning: one script per DVC stage (see dvc.yaml)."""
from src import runtime

runtime.before_torch()  # here because `python -m src.<stage>` runs this before the stage imports torch
