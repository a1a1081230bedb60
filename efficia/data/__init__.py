"""Data: what a run reads. `tokenizers` turns text into ids (char, GPT-2 via tiktoken, bytes, or ids as given);
`base.DataModule` is the contract every source keeps (batches, held-out split, bytes per token, resumable state);
`shakespeare`, `wikipedia` (streamed) and `mqar` (generated associative recall) are the sources; `resumable` the
seeded order a resumed run continues exactly."""
