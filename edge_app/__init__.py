"""The edge side of PicoSpec: the llama.cpp drafter, the client/pipeline, meters, energy and doctor. Never torch."""
