"""The parts of `mupsweep tune` (whose entry point is `mupsweep.sweep.tune.tune`): search space,
objective, study and workers. Imports nothing, so importing one part loads only that part."""
