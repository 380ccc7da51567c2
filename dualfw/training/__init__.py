"""Training: the Policy, DualScorer and Reference LightningModules, the DataModule that samples on
the fly, its input and rollout files, and the callbacks a run uses."""
