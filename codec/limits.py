"""Versions and size limits of the wire protocol.

The limits are the line between a real peer and a hostile one: each is a few times what a real
session needs, and every one of them is checked before the memory it guards is spent.
"""
from __future__ import annotations

# 2: VerdictKind names, Tokens.epoch, no Draft.flush
# 3: branches (Draft.root, Verdict.branch)
# 4: Prompt.shared (a prefix many conversations share, which the verifier may keep)
PROTOCOL_VERSION = 4
SUPPORTED_VERSIONS: tuple[int, ...] = (4,)

# Bytes of one frame as it arrives, and of the msgpack body after inflating it. The largest real
# message is a 64-token sampled Draft with wide supports: each weight is >= 1 out of
# DRAFT_RESOLUTION (4096), so a support holds at most ~8k ids, ~3 bytes each on the wire.
MAX_FRAME = 4 << 20
MAX_DECOMPRESSED = 4 << 20

MAX_BLOCK = 64  # drafted ids in one Draft
MAX_PROMPT = 32768  # ids in one Prompt (and in one Tokens message)
MAX_SUPPORT = 16384  # entries in one SparseDist
MAX_TOP_K = 1024  # paper variant: top-K entries in a Verdict, and Hello.paper_top_k

MAX_VOCAB = 1 << 31  # token ids live in [0, MAX_VOCAB)
MAX_WEIGHT = (1 << 32) - 1  # one integer weight of a SparseDist
MAX_UINT = (1 << 63) - 1  # counters (epoch, pos, seq): anything an int64 holds
MAX_SEED = (1 << 64) - 1  # what numpy.random.default_rng takes

MAX_STR = 4096  # longest string anywhere in a message (msgpack refuses longer ones)
MAX_NAME = 256  # names: model, server, client, session id
MAX_EXTRA_KEYS = 16  # extra scalar entries tolerated in a tokenizer fingerprint
