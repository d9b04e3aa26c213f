"""A trained network at work in torch: batched logits for image files, as fast as the hardware
allows (`classify`) through inference-only rewrites of the traced model (`rewrites`), Grad-CAM
overlays of where it looked (`explain`), and pictures of its results (`figures`)."""
