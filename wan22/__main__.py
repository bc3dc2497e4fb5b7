import sys

try:
    from .generate import main  # imports torch: seconds, during which Ctrl-C must not print a traceback

    code = main()
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    code = 130
sys.exit(code)
