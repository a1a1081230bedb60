"""`python -m efficia.sweep dir=<sweep dir>` (`--help`): rebuild a sweep's report; efficia.training.sweep does the
work."""

from efficia.training.sweep import main

if __name__ == "__main__":
    main()
