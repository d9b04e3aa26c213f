"""Images on disk to batches: the dataset fetched into data/raw (bounded `archives` and
`download`, the copy ingest owns: `raw_copy`), any image file decoded safely (`images`), the
manifest and class index (`manifest`), the tutorial's transforms (`transforms`), the training set
(`datasets`), the crops evaluation, prediction and serving read, without torch (`image_files`),
and the torch loaders (`loaders`)."""
