"""The training floor, between the task adapters and the attacks: the victim recipes' training loop
(:mod:`training.loop`) and the victim cache (:mod:`training.victims`), which attacks use for their clean models and
the runner for every victim."""
