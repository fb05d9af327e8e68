"""appdistill.cache."""
