"""``python -m probes`` == ``safety-probes``."""

from probes.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
