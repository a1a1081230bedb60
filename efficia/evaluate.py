"""`python -m efficia.evaluate ckpt=<.ckpt or folder> [data=<data config or text file>] ...` (`--help`);
efficia.evaluation.command does the work."""

from efficia.evaluation.command import main

if __name__ == "__main__":
    main()
