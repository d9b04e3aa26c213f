"""ResNet transfer learning: one script per DVC stage (see dvc.yaml)."""
