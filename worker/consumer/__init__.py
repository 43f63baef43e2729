"""The consumer: shards, leases, checkpoints, batches, dead letters."""
