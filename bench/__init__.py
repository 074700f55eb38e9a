"""Benchmarks for PicoSpec and the tools they need: the user-space link emulator, prompt sets."""
