"""Subcommands beyond quantize/fetch-model register here as they land (runtime, check, bench, verify)."""
