"""``python -m r2led`` (used by ``torchrun ... -m r2led train ...``)."""

from r2led.cli import main

main()
