"""The suite's floor: checkpoint and tensor I/O, config hashing, file locks and write checks, run guards (finite
losses, progress, compile) and the environment a run is recorded with. It imports nothing of the suite, so tasks,
training, attacks, defences and benchmarks all build on it."""
