"""Loading checkpoints: Hub resolution, reading weight files confined to the checkpoint folder, key maps for
other layouts (LAVIS), the model built on the meta device and assigned strictly, the dtype policy, and the
post-load transforms. `loader.load_checkpoint` runs the steps; nothing here knows the tasks."""
