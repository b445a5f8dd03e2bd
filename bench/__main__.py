"""``python -m bench [--quick | --smoke] [--out FILE]``."""

from bench.run import main

if __name__ == "__main__":
    raise SystemExit(main())
