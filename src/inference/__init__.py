"""A trained network at work in torch: batched logits for image files, as fast as the hardware
allows (`classify`) through inference-only rewrites of the traced model (`rewrites`), Grad-CAM
overlays of where it looked (`explain`), how well its confidence matches its accuracy
(`calibration_error`), and pictures of its results (`figures`)."""
