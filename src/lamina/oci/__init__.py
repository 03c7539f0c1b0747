"""OCI image layout model: descriptors, manifests, indexes, configs and blob access."""
