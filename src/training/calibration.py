"""Temperature scaling (Guo et al., 2017): probabilities that mean what they say.

A network trained with cross-entropy is overconfident: its 90% answers are right less than 90%
of the time. One scalar T, fitted on the val split after training by minimising the negative
log-likelihood of softmax(logits / T), fixes most of it without changing any prediction (the
argmax of logits / T is the argmax of logits). The fitted T is folded into the classification
head (its weight and bias divided by T), so every path from the checkpoint -- evaluate, predict,
the ONNX files, the served and the Spark model -- gives calibrated probabilities without knowing
about it. The checkpoint records T, so the uncalibrated logits are `logits * T`.
"""
import torch
import torch.nn.functional as F

from src.networks.transfer import head_module_name

MIN_T, MAX_T = 0.05, 20.0  # a T outside this is a sign of a broken val split, not a calibration


def fit_temperature(logits, labels):
    """The T > 0 minimising mean NLL of softmax(logits / T) against labels (float64, L-BFGS on log T)."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(labels) == 0:
        return 1.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def nll():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(nll)
    return float(log_t.detach().exp().clamp(MIN_T, MAX_T))


def fold_temperature(state, model, temperature):
    """A copy of the state dict `state` (of `model`'s architecture) whose head gives logits / T."""
    head = head_module_name(model)
    state = dict(state)
    for name in (f"{head}.weight", f"{head}.bias"):
        if name in state:
            state[name] = state[name] / temperature
    return state
