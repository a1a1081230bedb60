"""`python -m efficia.export ckpt=<run>.ckpt out=<dir> [format=efficia|hf] ...` (`--help`); efficia.inference.export
does the work."""

from efficia.inference.export import main

if __name__ == "__main__":
    main()
