"""The data pipeline, one module per step (docs/data.md):

    documents.py  where documents come from (files, hub, save_to_disk, the built-in corpora), their kind, the split
    chat.py       conversations through the chat template, assistant turns located
    packed.py     tokenize and pack into seq_len rows: the packed train and validation splits
    stream.py     the same on the fly over a stream (data.streaming)
    batching.py   torch only: the ignore label, packing, the per-rank batch order (no `datasets`, no file I/O)

Nothing is imported here: `from distributed_distill.data.batching import IGNORE_INDEX` costs no `datasets` import.
"""
