"""``python -m collie.train CONFIG [key=value …]`` (and ``torchrun -m collie.train …``) = ``collie train …``."""
import sys

from collie.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
