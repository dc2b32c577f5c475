"""State-slot sentinels the ops share, as vLLM 0.32 uses them in state indices."""

NULL_BLOCK_ID = 0  # vLLM's null block: a state row never read or written
PAD_SLOT_ID = -1   # a padding row of the batch
