"""Graph transforms. Each module holds one pass registered under a short name (see ``available_passes``)."""
