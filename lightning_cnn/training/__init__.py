"""Training: the callbacks around Lightning's fit (resume state, faults, SLURM, watchdog), run folders and
resume, and the settings chosen for the machine (precision, compile)."""
