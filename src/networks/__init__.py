"""From an `arch` name to a network ready for transfer learning: the tutorial's ResNet and ResNeXt
code with torchvision's layer names (`resnet`), torchvision's other classifiers (`factory`),
pretrained weights and their normalisation (`pretrained`), the new head and freezing
(`transfer`), and self-describing checkpoints to save and rebuild a network (`checkpoint`)."""
