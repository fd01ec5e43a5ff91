"""Recording a running model: hooks, operator-level records, on-device statistics, the
streaming writer, the compute settings and distributed shards."""
