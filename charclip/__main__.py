import sys

try:
    from charclip.cli import main
except KeyboardInterrupt:  # Ctrl-C while Python was still importing: nothing started, nothing to say but that
    print("charclip: interrupted; nothing was lost", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
