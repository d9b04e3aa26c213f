"""Expected calibration error (ECE): how far a model's confidence is from how often it is right,
in equal-width confidence bins (Guo et al., 2017), and the ECE chance alone shows on as many images.
evaluate reports both; the reliability diagram draws the same bins."""
import numpy as np


def confidence_bins(confidence, bins):
    """Each answer's equal-width confidence bin, one-hot (images x bins): bin b holds (b/bins, (b+1)/bins]."""
    which = np.clip(np.ceil(np.asarray(confidence) * bins).astype(int) - 1, 0, bins - 1)
    return np.eye(bins)[which]


def bin_means(onehot, values):
    """The mean of `values` (images, or rows x images) in each non-empty bin of `onehot`."""
    count = onehot.sum(0)
    used = count > 0
    return np.asarray(values, dtype=np.float64) @ onehot[:, used] / count[used]


def calibration_gaps(onehot, confidence, correct):
    """The ECE of each row of `correct` (draws x images, 1 = right), answers binned as `onehot`."""
    count = onehot.sum(0)
    share = count[count > 0] / len(onehot)
    return (share * np.abs(bin_means(onehot, correct) - bin_means(onehot, confidence))).sum(-1)


def expected_calibration_error(confidence, correct, bins):
    """Sum over equal-width confidence bins of (bin share) * |accuracy - mean confidence|:
    0 when the model is exactly as sure as it is right."""
    correct = np.asarray(correct, dtype=np.float64)[None]
    return float(calibration_gaps(confidence_bins(confidence, bins), confidence, correct)[0])


def chance_ece(confidence, bins, draws=1000, seed=0):
    """The ECE a perfectly calibrated model with these confidences shows on this many images: each
    answer right with exactly its confidence, the mean of seeded draws. It is ECE's own sampling
    noise (few images per bin, gaps by chance): a measured ECE near it is as calibrated as this
    test set can tell; it shrinks as the test set grows."""
    confidence = np.asarray(confidence, dtype=np.float64)
    n = len(confidence)
    if not n:
        return 0.0
    onehot, rng = confidence_bins(confidence, bins), np.random.default_rng(seed)
    draws = min(draws, max(20, 20_000_000 // n))  # a million images: 20 draws (their floor is tiny)
    chunk = max(1, 2_000_000 // n)  # draws at a time: each array stays ~16 MB
    gaps = [calibration_gaps(onehot, confidence, (rng.random((min(chunk, draws - done), n)) < confidence)
                             .astype(np.float64)) for done in range(0, draws, chunk)]
    return float(np.concatenate(gaps).mean())
