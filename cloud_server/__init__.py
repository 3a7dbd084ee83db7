"""The cloud pool: broker, tail workers, dynamic batching, HTTP admin."""
