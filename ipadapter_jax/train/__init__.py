"""Training: mesh and shardings, train state and step, Orbax checkpoints, the loop."""
