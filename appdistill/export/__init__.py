"""appdistill.export."""
