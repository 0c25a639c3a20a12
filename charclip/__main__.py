import sys

from charclip.cli import main

sys.exit(main())
