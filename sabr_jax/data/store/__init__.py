"""The stored dataset: per-clip prepared files (`prepared`), the TFDS ArrayRecord builder that
writes the dataset from them (`tfds_builder`) and the random-access reader of it (`tfds_source`)."""
