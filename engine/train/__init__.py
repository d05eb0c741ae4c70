"""Training: the segment recipe and its rooms (options, resume, trainer and step, loop,
data stream, saver, plan, clock, samples, loss, state, cache, metrics)."""
