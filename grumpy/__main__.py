import sys

from grumpy.cli import main

sys.exit(main())
