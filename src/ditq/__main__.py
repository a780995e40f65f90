import sys

from ditq.cli import main

sys.exit(main())
