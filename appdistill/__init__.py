"""appdistill."""
