import sys

from apt.cli.main import main

sys.exit(main())
