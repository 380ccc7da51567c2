"""The core: the model interface, the self-reward loop (sample K -> self-score -> pair) and the
losses. Depends on nothing else in dualfw."""
