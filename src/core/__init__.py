"""What every stage shares, and nothing about images or networks: params.yaml and its schema
(`params`), the project's file paths and the workspace root (`paths`), one-line user errors
(`errors`), crash-safe file writes (`files`), process set-up and environment switches
(`process`), where and in what precision tensors run (`device`), and MLflow tracking
(`tracking`)."""
