"""``python -m stream``: Kafka in, sentiment labels out, at least once."""
