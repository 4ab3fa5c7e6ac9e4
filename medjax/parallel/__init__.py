"""Meshes, the logical-axis rule table and sharding of params, optimizer state and batches."""
