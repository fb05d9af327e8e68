"""appdistill.foundation."""
