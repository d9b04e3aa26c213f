"""The training loop's mechanics, under the train stage: the epoch plan and learning-rate schedule
(`schedule`), one optimisation step and one epoch (`trainer`), weight EMA (`ema`), torchrun's
process group (`distributed`), and what training keeps across epochs and crashes (`resume`)."""
