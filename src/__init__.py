"""ResNet transfer learning: one script per DVC stage (see dvc.yaml)."""
import os

# Set before torch loads its OpenMP runtime (libgomp on Linux), which reads it once. After each
# parallel op libgomp keeps its idle threads spinning for 300,000 rounds (~10 ms here) before
# they sleep. Between two batches that spinning thread takes a core from the threads decoding
# the next batch (predict on 2 CPUs: decoding 0.30 -> 0.22 ms per image) and from DataLoader
# workers; 10,000 rounds (~0.4 ms) still span the gaps between one model's ops (same speed).
# A value you set yourself wins; other OpenMP runtimes ignore it.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
