import sys

try:
    from charclip.cli import main
except KeyboardInterrupt:  # Ctrl-C while Python was still importing: nothing had started
    print("charclip: interrupted (SIGINT)", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
