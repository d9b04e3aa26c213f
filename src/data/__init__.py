"""Images on disk to batches: decoding any image file safely (`images`), the manifest and class
index the pipeline writes (`manifest`), the tutorial's transforms (`transforms`), the training
set (`datasets`), the image files that evaluation, prediction and serving read, resized and
cropped as evaluation sees them (`image_files`), and the loaders with the one rule for how many
processes decode (`loaders`)."""
