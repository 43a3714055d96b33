"""``python -m autofinetune.cli``: how the supervisor starts its worker processes."""

from autofinetune.cli import main

main()
