import sys

from charclip.benchmarks.suite import main

sys.exit(main())
