"""`hydra/launcher=slurm` (conf/hydra/launcher/slurm.yaml): lmalign's SLURM launcher."""
