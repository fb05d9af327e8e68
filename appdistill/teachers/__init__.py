"""appdistill.teachers."""
