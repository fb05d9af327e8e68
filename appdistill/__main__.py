import sys

from appdistill.cli import main

sys.exit(main())
