"""Weight EMA (train.ema_decay): the exponential moving average of the weights that is validated
and saved."""
import torch
from torch.optim.swa_utils import AveragedModel


class WeightEma(AveragedModel):
    """The weights' exponential moving average (torch.optim.swa_utils), BatchNorm statistics
    included: averaged <- decay * averaged + (1 - decay) * current after every step. The decay
    warms up as (1 + n) / (10 + n) over the first updates (timm's rule), so that a short run's
    average is not dominated by its random initial weights."""

    def __init__(self, model, decay):
        super().__init__(model, multi_avg_fn=self.blend, use_buffers=True)
        self.decay, self.updates, self.decay_now = decay, 0, decay

    def update_parameters(self, model):
        self.decay_now = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1  # counted here: blend runs once per dtype group
        super().update_parameters(model)

    def load_state_dict(self, state, *args, **kwargs):
        result = super().load_state_dict(state, *args, **kwargs)
        self.updates = int(self.n_averaged)
        return result

    def blend(self, averaged, current, num_averaged):
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1 - self.decay_now)
        else:  # BatchNorm's batch counters: the current count
            for a, c in zip(averaged, current):
                a.copy_(c)
