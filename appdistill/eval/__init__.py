"""appdistill.eval."""
