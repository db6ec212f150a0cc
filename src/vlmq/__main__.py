"""`python -m vlmq ...` == `vlmq ...`."""

from vlmq.cli import entry

entry()
