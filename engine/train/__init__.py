"""Training: segment orchestration, trainer and step, plan, clock, samples, loss, resume, cache."""
